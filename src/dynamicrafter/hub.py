"""Model weights on this machine: the local Hugging Face cache, first-run downloads, sha256 checks.

Nothing here prints: a download announces itself through the ``notify`` callback (one line of text).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .presets import Preset

OFFLINE_HINT = "no network (HF_HUB_OFFLINE is set or the hub is unreachable)"


class MissingWeightsError(FileNotFoundError):
    """A preset whose weights are not on this machine."""


class DownloadError(MissingWeightsError):
    """A download that could not complete."""


def local_weights(preset: Preset) -> Path | None:
    """The cached checkpoint of a downloadable preset, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(preset.repo, preset.file)
    return Path(found) if isinstance(found, str) else None


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remote_file_info(repo: str, filename: str, alternative: str = "") -> tuple[int | None, str | None]:
    """(size in bytes, LFS sha256) of a hub file; raises DownloadError when offline (``alternative``: what else the
    user can do, appended to the message)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        info = next(iter(HfApi().get_paths_info(repo, [filename])), None)
    except OfflineModeIsEnabled:
        raise DownloadError(f"cannot download {repo}/{filename}: {OFFLINE_HINT}") from None
    except Exception as exc:  # connection errors come in many types across huggingface_hub versions
        raise DownloadError(
            f"cannot reach the Hugging Face hub for {repo}/{filename} ({exc.__class__.__name__}); check the network "
            f"and retry{alternative}"
        ) from None
    if info is None:
        raise DownloadError(f"{repo} has no file {filename}")
    lfs = getattr(info, "lfs", None)
    return getattr(info, "size", None), getattr(lfs, "sha256", None) if lfs else None


def fetch_weights(
    preset: Preset,
    directory: Path | None = None,
    *,
    notify: Callable[[str], object] | None = None,
    alternative: str = "",
) -> Path:
    """Download a preset's checkpoint (resumable, disk-space checked, sha256 verified); returns its local path.

    ``directory`` None: the Hugging Face cache.  ``alternative``: what else the user can do, appended to the
    messages of failures (a front end's way to name its own option).
    """
    from huggingface_hub import hf_hub_download

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise DownloadError(
            f"the {preset.name} model is not on this machine and HF_HUB_OFFLINE is set; "
            f"unset HF_HUB_OFFLINE and run `dynamicrafter download {preset.name}` while online{alternative}"
        )
    size, lfs_sha = remote_file_info(preset.repo, preset.file, alternative)
    target_dir = directory or Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface"))
    target_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target_dir).free
    if size is not None and free < size:
        raise DownloadError(
            f"not enough disk space for the {preset.name} model: {size / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free "
            f"in {target_dir}"
        )
    if notify is not None:
        notify(f"downloading {preset.repo}/{preset.file}" + (f" ({size / 1e9:.1f} GB)" if size else ""))
    try:
        path = Path(hf_hub_download(preset.repo, preset.file, local_dir=directory))
    except Exception as exc:
        raise DownloadError(f"download of {preset.repo}/{preset.file} failed ({exc.__class__.__name__}); rerun to resume") from None
    expected = preset.sha256 or lfs_sha
    if expected:
        got = sha256_of(path)
        if got != expected:
            raise DownloadError(f"{path}: sha256 {got} does not match the expected {expected}; delete it and rerun")
    return path


def weights_for(
    preset: Preset, *, download: bool = True, notify: Callable[[str], object] | None = None, alternative: str = ""
) -> Path | None:
    """The checkpoint of ``preset`` on this machine (downloaded first when missing and ``download``); None for a
    built-in (random-weight) preset."""
    if not preset.downloadable:
        return None
    path = local_weights(preset)
    if path is not None:
        return path
    if not download:
        raise MissingWeightsError(
            f"the {preset.name} model is not on this machine; run `dynamicrafter download {preset.name}`{alternative}"
        )
    return fetch_weights(preset, notify=notify, alternative=alternative)

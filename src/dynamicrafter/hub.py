"""Model weights on this machine: the local Hugging Face cache, first-run downloads, sha256 checks.

A download lands where ``huggingface_hub`` puts it (``<cache>/models--OWNER--NAME/blobs/<etag>``, linked from
``snapshots/<commit>/<file>``, with ``refs/main``), or in a folder of the caller's choice.  Unlike
``hf_hub_download`` it keeps an interrupted transfer (``<blob>.incomplete``) and resumes it on the next run with a
``Range`` request, checks the free disk space before it writes a byte, and verifies the sha256 before the file goes
where the loader looks.  The cache and the hub are read from the environment at call time (``HF_HUB_CACHE``,
``HF_HOME``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``).

Nothing here prints: ``notify`` gets one line of text, ``progress`` gets (bytes done, total bytes or None).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .presets import Preset

OFFLINE_HINT = "no network (HF_HUB_OFFLINE is set or the hub is unreachable)"

Notify = Callable[[str], object]
Progress = Callable[[int, int | None], object]


class MissingWeightsError(FileNotFoundError):
    """A preset whose weights are not on this machine."""


class DownloadError(MissingWeightsError):
    """A download that could not complete."""


@dataclass(frozen=True)
class RemoteFile:
    """What the hub says about one file of a repository, before any byte is fetched."""

    url: str  # the file at ``commit`` (a fixed revision, so a resumed transfer asks for the same bytes)
    commit: str
    etag: str  # the blob's name in the cache (the sha256 for LFS files)
    size: int | None
    sha256: str | None  # the LFS sha256 the hub publishes, None for a file outside LFS


def _offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The Hugging Face hub cache, as ``huggingface_hub`` resolves it, from the environment now: ``HF_HUB_CACHE``,
    else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (under ``XDG_CACHE_HOME`` when set)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _endpoint() -> str | None:
    """``HF_ENDPOINT`` as set now (None: huggingface_hub's own default)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def _repo_folder(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))


def local_weights(preset: Preset) -> Path | None:
    """The cached checkpoint of a downloadable preset, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(preset.repo, preset.file, cache_dir=cache_dir())
    return Path(found) if isinstance(found, str) else None


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    """The sha256 of a file, read in chunks of ``chunk`` bytes."""
    digest = hashlib.sha256()
    _hash_into(digest, path, chunk)
    return digest.hexdigest()


def _hash_into(digest: hashlib._Hash, path: Path, chunk: int = 1 << 24) -> None:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)


def _size(n: int | None) -> str:
    if n is None:
        return "? GB"
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _reason(exc: BaseException) -> str:
    """A few words on why a request failed."""
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(exc, "response", None)
    if isinstance(exc, HfHubHTTPError) and response is not None:
        return f"HTTP {response.status_code}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return exc.__class__.__name__


def remote_file(repo: str, filename: str, alternative: str = "") -> RemoteFile:
    """Ask the hub about ``repo/filename``: its paths-info (size, LFS sha256) and the HEAD of its resolve URL
    (commit, etag).  Raises DownloadError when offline or refused (``alternative``: what else the user can do,
    appended to the message)."""
    from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    endpoint = _endpoint()
    try:
        info = next(iter(HfApi(endpoint=endpoint).get_paths_info(repo, [filename])), None)
        if info is None:
            raise DownloadError(f"{repo} has no file {filename}")
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, endpoint=endpoint), endpoint=endpoint,
                                    timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except DownloadError:
        raise
    except OfflineModeIsEnabled:
        raise DownloadError(f"cannot download {repo}/{filename}: {OFFLINE_HINT}") from None
    except HfHubHTTPError as exc:
        raise DownloadError(f"the Hugging Face hub refused {repo}/{filename} ({_reason(exc)}){alternative}") from None
    except Exception as exc:  # connection errors come in many types across huggingface_hub versions
        raise DownloadError(
            f"cannot reach the Hugging Face hub for {repo}/{filename} ({exc.__class__.__name__}); check the network "
            f"and retry{alternative}"
        ) from None
    if not meta.commit_hash or not meta.etag:
        raise DownloadError(
            f"the Hugging Face hub gave no commit or etag for {repo}/{filename}; retry later{alternative}"
        )
    lfs = getattr(info, "lfs", None)
    return RemoteFile(
        url=hf_hub_url(repo, filename, revision=meta.commit_hash, endpoint=endpoint),
        commit=meta.commit_hash,
        etag=meta.etag,
        size=meta.size if meta.size is not None else getattr(info, "size", None),
        sha256=getattr(lfs, "sha256", None) if lfs else None,
    )


def _check_disk_space(folder: Path, needed: int, what: str, hint: str) -> None:
    """Raise DownloadError when the disk that holds (or will hold) ``folder`` has less than ``needed`` bytes free."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space for {what}: {_size(needed)} needed, {_size(free)} free in {folder}; {hint}"
        )


def _transfer(url: str, partial: Path, size: int | None, progress: Progress | None) -> str:
    """Fetch ``url`` into ``partial``, resuming after the bytes already there; returns the sha256 of the whole file.
    Raises whatever the connection or the disk raises (the bytes received so far stay in ``partial``)."""
    from huggingface_hub import constants, get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    have = partial.stat().st_size if partial.is_file() else 0
    digest = hashlib.sha256()
    if have:
        _hash_into(digest, partial)
    if size is None or have < size:
        headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        with get_session().stream("GET", url, headers=headers, follow_redirects=True,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            if have and response.status_code != 206:  # the server ignored the Range: start again
                have, digest = 0, hashlib.sha256()
            with open(partial, "ab" if have else "wb") as f:
                if progress is not None:
                    progress(have, size)
                for chunk in response.iter_bytes():
                    f.write(chunk)
                    digest.update(chunk)
                    have += len(chunk)
                    if progress is not None:
                        progress(have, size)
    if size is not None and have != size:
        raise ConnectionError(f"received {have} of {size} bytes")
    return digest.hexdigest()


def _into_cache(storage: Path, blob: Path, target: Path, commit: str) -> None:
    """Link ``snapshots/<commit>/<file>`` to the blob and point ``refs/main`` at the commit, as huggingface_hub
    does (the file itself moves there where the file system has no symlinks)."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():  # dangling: its blob was deleted
            target.unlink()
        try:
            target.symlink_to(os.path.relpath(blob, target.parent))
        except OSError:
            os.replace(blob, target)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)


def fetch_weights(
    preset: Preset,
    directory: Path | None = None,
    *,
    notify: Notify | None = None,
    progress: Progress | None = None,
    alternative: str = "",
) -> Path:
    """Download a preset's checkpoint (resumable, disk-space checked, sha256 verified); returns its local path.

    ``directory`` None: the Hugging Face cache.  A file already there is verified instead of fetched again.
    ``notify`` gets one line when a transfer (or a check) starts, ``progress`` (bytes done, total) as bytes arrive.
    ``alternative``: what else the user can do, appended to the messages of failures (a front end's way to name its
    own option).  Raises DownloadError: offline, unreachable, too little disk space, an interrupted transfer (rerun to
    resume), or bytes whose sha256 is not the expected one (the file is removed).
    """
    repo, file = preset.repo, preset.file
    if repo is None or file is None:
        raise ValueError(f"the {preset.name} model is built in; nothing to download")
    if _offline():
        found = local_weights(preset) if directory is None else None
        if found is not None:
            return found
        raise DownloadError(
            f"the {preset.name} model is not on this machine and HF_HUB_OFFLINE is set; "
            f"unset HF_HUB_OFFLINE and run `dynamicrafter download {preset.name}` while online{alternative}"
        )
    name = f"{repo}/{file}"
    remote = remote_file(repo, file, alternative)
    expected = preset.sha256 or remote.sha256
    source = "pinned in weights.toml" if preset.sha256 else "the hub's LFS sha256"
    storage = _repo_folder(repo)
    if directory is None:
        blob, target = storage / "blobs" / remote.etag, storage / "snapshots" / remote.commit / file
    else:
        blob = target = Path(directory) / file

    def verify(got: str, *paths: Path) -> None:
        if expected and got != expected:
            for path in paths:
                path.unlink(missing_ok=True)
            raise DownloadError(
                f"{name}: sha256 {got} does not match the expected {expected} ({source}); the file was removed, "
                f"rerun to download it again{alternative}"
            )

    existing = next((p for p in (target, blob) if p.is_file()), None)
    if existing is not None:  # already here: check it rather than fetch it again
        if expected:
            if notify is not None:
                notify(f"{name} is here ({_size(existing.stat().st_size)}); checking its sha256")
            verify(sha256_of(existing), target, blob)
        if directory is None:
            _into_cache(storage, blob, target, remote.commit)
        return target

    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.is_file() else 0
    if remote.size is not None and have > remote.size:  # not a prefix of this file
        partial.unlink()
        have = 0
    elsewhere = "choose another folder" if directory else "set HF_HUB_CACHE to a folder on a bigger disk"
    _check_disk_space(blob.parent, (remote.size or 0) - have, f"the {preset.name} model",
                      f"free some space or {elsewhere}{alternative}")
    if notify is not None:
        total = _size(remote.size)
        notify(f"resuming {name} at {_size(have)} of {total}" if have else f"downloading {name} ({total})")
    blob.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = _transfer(remote.url, partial, remote.size, progress)
    except Exception as exc:
        done = partial.stat().st_size if partial.is_file() else 0
        raise DownloadError(
            f"download of {name} stopped at {_size(done)} of {_size(remote.size)} ({_reason(exc)}); "
            f"rerun to resume{alternative}"
        ) from None
    verify(got, partial)
    os.replace(partial, blob)
    if directory is None:
        _into_cache(storage, blob, target, remote.commit)
    return target


def weights_for(
    preset: Preset,
    *,
    download: bool = True,
    notify: Notify | None = None,
    progress: Progress | None = None,
    alternative: str = "",
) -> Path | None:
    """The checkpoint of ``preset`` on this machine (downloaded first when missing and ``download``); None for a
    built-in (random-weight) preset; the shipped file of a bundled one (``toy``)."""
    if preset.bundled_path is not None:
        return preset.bundled_path
    if not preset.downloadable:
        return None
    path = local_weights(preset)
    if path is not None:
        return path
    if not download:
        raise MissingWeightsError(
            f"the {preset.name} model is not on this machine; run `dynamicrafter download {preset.name}`{alternative}"
        )
    return fetch_weights(preset, notify=notify, progress=progress, alternative=alternative)

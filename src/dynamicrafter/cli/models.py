"""``dynamicrafter models``, ``download`` and ``convert``: the weights on this machine."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .app import MissingWeightsError, UsageError, app, console, handle_errors
from .common import JsonOpt, QuietOpt, VerboseOpt, local_weights

OFFLINE_HINT = "no network (HF_HUB_OFFLINE is set or the hub is unreachable)"


class DownloadError(MissingWeightsError):
    """A download that could not complete."""


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


def fetch_weights(preset, directory: Path | None = None, quiet: bool = False, for_command: bool = False) -> Path:
    """Download a preset's checkpoint (resumable, disk-space checked, sha256 verified); returns its local path.

    ``for_command``: called by a command that generates (animate, batch, ...), whose errors may suggest
    ``--checkpoint PATH``; ``download`` has no such option.
    """
    alternative = ", or pass --checkpoint PATH" if for_command else ""
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
    if not quiet:
        console.print(f"downloading {preset.repo}/{preset.file}" + (f" ({size / 1e9:.1f} GB)" if size else ""))
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


@app.command()
@handle_errors
def models(as_json: JsonOpt = False) -> None:
    """List the model presets and whether their weights are on this machine."""
    from ..presets import load_presets

    rows = []
    for preset in load_presets().values():
        path = local_weights(preset) if preset.downloadable else None
        rows.append({
            "name": preset.name, "resolution": f"{preset.height}x{preset.width}", "frames": preset.frames,
            "mode": preset.mode, "local": "built in" if not preset.downloadable else ("yes" if path else "no"),
            "size_gb": round(path.stat().st_size / 1e9, 2) if path else preset.weights_gb,
            "path": str(path) if path else None, "description": preset.description,
        })
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="dynamicrafter models", caption="GB: the local file, else the download", box=box.SIMPLE_HEAD)
    for column in ("name", "resolution", "mode", "local", "GB"):
        table.add_column(column, no_wrap=True)
    table.add_column("description", min_width=24)
    for r in rows:
        table.add_row(r["name"], r["resolution"], r["mode"], r["local"],
                      "—" if r["size_gb"] is None else f"{r['size_gb']:.1f}", r["description"])
    Console().print(table)


@app.command()
@handle_errors
def download(
    names: Annotated[Optional[list[str]], typer.Argument(metavar="MODEL", help="Presets to download (default: 512).", show_default=False)] = None,
    directory: Annotated[Optional[Path], typer.Option("--dir", help="Download into this folder instead of the Hugging Face cache.")] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Download model weights (resumable, verified by sha256)."""
    from ..presets import get_preset

    presets = [get_preset(n) for n in (names or ["512"])]
    for p in presets:
        if not p.downloadable:
            raise UsageError(f"the {p.name} model is built in; nothing to download")
    done = []
    for p in presets:
        if verbose and not quiet:
            pin = f"pinned sha256 {p.sha256[:12]}…" if p.sha256 else "the hub's LFS sha256"
            console.print(f"{p.name}: {p.repo}/{p.file} into {directory or 'the Hugging Face cache'}, checked against {pin}")
        path = fetch_weights(p, directory, quiet=quiet)
        done.append({"model": p.name, "path": str(path)})
        if not quiet and not as_json:
            console.print(f"[green]ready[/] {p.name}: {path}", markup=True)
    if as_json:
        sys.stdout.write(json.dumps(done) + "\n")


@app.command()
@handle_errors
def convert(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Original .ckpt (or .safetensors) checkpoint.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="The preset the checkpoint belongs to.")] = "512",
    dtype: Annotated[str, typer.Option(help="Stored precision: fp32, fp16 or bf16.")] = "fp16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a safetensors copy with only the weights inference uses (faster, safer loading)."""
    import torch
    from safetensors.torch import save_file

    from ..checkpoint import build_skeleton, check_state_dict, convert_checkpoint, hint, read_checkpoint, CheckpointError
    from ..presets import get_preset
    from ..video import atomic_path

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"unknown --dtype {dtype!r}; choose fp32, fp16 or bf16")
    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors (got {out})")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    preset = get_preset(model)
    sd = read_checkpoint(checkpoint)
    skeleton = build_skeleton(preset.model_config())
    converted = convert_checkpoint(sd, skeleton.cfg)
    problems = check_state_dict(converted, skeleton.state_dict())
    if problems:
        raise CheckpointError(f"{checkpoint} does not fit the {model} model: {'; '.join(problems)}. {hint(sd)}")
    tensors = {
        k: (v.to(dtypes[dtype]) if v.is_floating_point() else v).contiguous() for k, v in converted.items()
    }
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt", "dynamicrafter_model": model, "dtype": dtype})
    summary = {"input": str(checkpoint), "output": str(out), "model": model, "dtype": dtype,
               "tensors": len(tensors), "bytes": out.stat().st_size}
    if verbose and not quiet:
        console.print(f"{checkpoint}: {len(sd)} tensors read ({checkpoint.stat().st_size / 1e6:.1f} MB); "
                      f"{len(tensors)} written in the tool's layout, without the keys inference never uses")
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    elif not quiet:
        console.print(f"[green]wrote[/] {out} ({len(tensors)} tensors, {out.stat().st_size / 1e6:.1f} MB, {dtype})", markup=True)

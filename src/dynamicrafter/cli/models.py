"""``dynamicrafter models``, ``download`` and ``convert``: the weights on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .app import EXIT_INTERRUPTED, UsageError, app, console, fail, handle_errors
from .common import JsonOpt, QuietOpt, VerboseOpt, download_bar

@app.command()
@handle_errors
def models(as_json: JsonOpt = False) -> None:
    """List the model presets and whether their weights are on this machine."""
    from ..hub import local_weights
    from ..presets import load_presets

    rows = []
    for preset in load_presets().values():
        path = preset.bundled_path or (local_weights(preset) if preset.downloadable else None)
        local = "shipped" if preset.bundled else "built in" if not preset.downloadable else ("yes" if path else "no")
        rows.append({
            "name": preset.name, "resolution": f"{preset.height}x{preset.width}", "frames": preset.frames,
            "mode": preset.mode, "local": local,
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
    from ..hub import fetch_weights
    from ..presets import get_preset

    presets = [get_preset(n) for n in (names or ["512"])]
    for p in presets:
        if not p.downloadable:
            raise UsageError(f"the {p.name} model {'ships with the tool' if p.bundled else 'is built in'}; nothing to download")
    done = []
    for p in presets:
        if verbose and not quiet:
            pin = f"pinned sha256 {p.sha256[:12]}…" if p.sha256 else "the hub's LFS sha256"
            console.print(f"{p.name}: {p.repo}/{p.file} into {directory or 'the Hugging Face cache'}, checked against {pin}")
        try:
            with download_bar(p.name, show=not quiet and console.is_terminal) as progress:
                path = fetch_weights(p, directory, notify=None if quiet else console.print, progress=progress)
                if p.init_statistics is not None:  # CIL's Analytic-Init statistics (a few MB), for --analytic-init
                    fetch_weights(p.init_statistics, directory, notify=None if quiet else console.print, progress=progress)
        except KeyboardInterrupt:  # the bytes received so far stay for the next run
            raise fail(f"interrupted; rerun `dynamicrafter download {p.name}` to resume", EXIT_INTERRUPTED) from None
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
    dtype: Annotated[str, typer.Option(help="Stored precision: fp32, fp16, bf16, or fp8 (8-bit linear and convolution weights, fp16 elsewhere).")] = "fp16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a safetensors copy with only the weights inference uses (faster, safer loading)."""
    from ..checkpoint import convert_to_safetensors
    from ..devices import torch_dtype

    if out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors (got {out})")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if dtype != "fp8":
        torch_dtype(dtype)  # a SettingsError for unknown names, before any work
    read, written = convert_to_safetensors(checkpoint, out, model, dtype)
    tensors = range(written)
    summary = {"input": str(checkpoint), "output": str(out), "model": model, "dtype": dtype,
               "tensors": len(tensors), "bytes": out.stat().st_size}
    if verbose and not quiet:
        console.print(f"{checkpoint}: {read} tensors read ({checkpoint.stat().st_size / 1e6:.1f} MB); "
                      f"{len(tensors)} written in the tool's layout, without the keys inference never uses")
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    elif not quiet:
        console.print(f"[green]wrote[/] {out} ({len(tensors)} tensors, {out.stat().st_size / 1e6:.1f} MB, {dtype})", markup=True)

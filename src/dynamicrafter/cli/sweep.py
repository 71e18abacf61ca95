"""``dynamicrafter lambda-sweep IMAGE PROMPT --values ...``: the same seed and noise at several λ, compared."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import UsageError, app, console, handle_errors
from .common import (
    MaxMemoryOpt, MemoryOpt, OffloadOpt, WeightsOpt, check_memory_options,
    CfgImgOpt, CfgOpt, CheckpointOpt, DeviceOpt, DtypeOpt, EtaOpt, FpsOpt, FsOpt, JsonOpt, ModelOpt, NegativeOpt,
    OverwriteOpt, QuietOpt, SeedOpt, StepsOpt, VerboseOpt, check_checkpoint_path, load_animator, progress_bar,
    warn_if_truncated,
)


def parse_values(text: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0]: numbers, no empty entries (finite and distinct: checked by the library)."""
    example = "e.g. 0,0.5,1"
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):
        raise UsageError(f"--values is empty ({example})")
    if not all(parts):
        raise UsageError(f"--values has an empty entry in {text!r} ({example})")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise UsageError(f"--values must be numbers separated by commas, {example} (got {text!r})") from None
    return values


@app.command("lambda-sweep")
@handle_errors
def lambda_sweep(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The photo to animate.", show_default=False)],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What should happen in the video.", show_default=False)],
    values: Annotated[str, typer.Option(help="λ values, comma separated.")] = "0,0.25,0.5,0.75,1",
    layers: Annotated[str, typer.Option(help="Where λ applies: all, input, middle, output, or indices like 0,3,5.")] = "all",
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", "-o", help="Output folder (default: <IMAGE stem>_lambda_sweep).")] = None,
    end_image: Annotated[Optional[Path], typer.Option("--end-image", help="End frame (interpolation model).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="λ values per UNet batch (default: all; halved automatically when the GPU runs out of memory).")] = None,
    model: ModelOpt = "512",
    checkpoint: CheckpointOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    cfg_img: CfgImgOpt = None,
    eta: EtaOpt = None,
    seed: SeedOpt = 123,
    fs: FsOpt = None,
    fps: FpsOpt = None,
    negative_prompt: NegativeOpt = "",
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    weights: WeightsOpt = None,
    offload: OffloadOpt = None,
    memory: MemoryOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Animate IMAGE once per λ with identical noise; write a labelled grid video, one video per λ, a contact
    sheet, a chart, and the motion / input-conformity measures per λ."""
    from ..api import make_request
    from ..devices import resolve_device
    from ..files import ensure_writable_dir
    from ..memory import check_fits
    from ..presets import get_preset
    from ..sweep import check_values, layer_indices
    from ..video import check_fps

    preset = get_preset(model)
    lambdas = check_values(parse_values(values))
    blocks = layer_indices(preset.model_config().unet, layers)
    warn_if_truncated(prompt)
    request = make_request(
        preset, image, prompt, end_image=end_image, seed=seed, negative_prompt=negative_prompt, steps=steps,
        cfg_scale=cfg, cfg_img=cfg_img, eta=eta, fs=fs,
    )
    if out_dir is not None and str(out_dir) == "-":
        raise UsageError("--out-dir - is not a folder; name one")
    out_dir = out_dir or Path(f"{image.stem}_lambda_sweep")
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise UsageError(f"{out_dir} already holds a sweep; pass --overwrite to replace it")
    ensure_writable_dir(out_dir)
    check_checkpoint_path(checkpoint)
    check_memory_options(weights, offload, memory, max_memory)
    torch_device, torch_dtype = resolve_device(device, dtype)
    check_fps(fps)
    check_fits(batch_size or len(lambdas), request.settings.frames, preset.height, preset.width, torch_device)

    if verbose and not quiet:
        console.print(f"model {preset.name} on {torch_device} ({torch_dtype}), λ {lambdas} on blocks {blocks}, {request.settings}")
    animator = load_animator(preset, checkpoint, device, dtype, quiet=quiet, weights=weights, offload=offload,
                             memory=memory, max_memory=max_memory)
    with progress_bar(quiet) as progress:
        task = progress.add_task(f"denoising {len(lambdas)} λ values", total=request.settings.steps)
        result = animator.sweep_request(
            request, lambdas, layers=layers, batch_size=batch_size,
            progress=lambda i, total: progress.update(task, completed=i + 1, total=total),
        )
    record = result.save(out_dir, fps=fps, overwrite=True)
    rows, timings = record["results"], result.timings
    if verbose and not quiet:
        console.print(f"load {timings['load_s']:.1f} s, generate {timings['generate_s']:.1f} s (batch of {result.batch_size})")
    if as_json:
        sys.stdout.write(json.dumps(record, default=str) + "\n")
        return
    if not quiet:
        table = Table(title=f"λ sweep ({layers} layers), seed {seed}")
        for column in ("λ", "motion", "dynamic", "conformity", "consistency", "flags", "video"):
            table.add_column(column)
        for r in rows:
            table.add_row(f"{r['lambda']:g}", f"{r['motion']:.4f}", f"{r['dynamic_degree']:.4f}",
                          f"{r['conformity']:.4f}", f"{r['temporal_consistency']:.4f}", ", ".join(r["flags"]), r["video"])
        console.print(table)
        console.print(f"[green]wrote[/] {out_dir}/grid.mp4, contact_sheet.png, chart.png, metrics.json", markup=True)

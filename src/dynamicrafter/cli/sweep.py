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
    CfgImgOpt, CfgOpt, CheckpointOpt, DeviceOpt, DtypeOpt, EtaOpt, FpsOpt, FsOpt, JsonOpt, ModelOpt, NegativeOpt,
    OverwriteOpt, QuietOpt, SeedOpt, StepsOpt, VerboseOpt, check_checkpoint_path, check_fps, check_prompt, load_for,
    progress_bar, resolve_device, sampling_settings, timed,
)


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
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Animate IMAGE once per λ with identical noise; write a labelled grid video, one video per λ, a contact
    sheet, a chart, and the motion / input-conformity measures per λ."""
    from ..images import load_image, prepare_image
    from ..presets import get_preset
    from ..sweep import chart, conformity, contact_sheet, grid_video, layer_indices, motion, parse_values, sweep_videos
    from ..video import atomic_path, ensure_writable_dir, video_to_uint8, write_frames, write_sidecar

    preset = get_preset(model)
    try:
        lambdas = parse_values(values)
        blocks = layer_indices(preset.model_config().unet, layers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    picture = load_image(image)
    end_picture = load_image(end_image) if end_image else None
    check_prompt(prompt)
    out_dir = out_dir or Path(f"{image.stem}_lambda_sweep")
    if (out_dir / "metrics.json").exists() and not overwrite:
        raise UsageError(f"{out_dir} already holds a sweep; pass --overwrite to replace it")
    ensure_writable_dir(out_dir)
    check_checkpoint_path(checkpoint)
    torch_device, torch_dtype = resolve_device(device, dtype)
    settings = sampling_settings(preset, steps, cfg, cfg_img, eta, fs)
    check_fps(fps)
    start = prepare_image(picture, preset.height, preset.width)
    end = prepare_image(end_picture, preset.height, preset.width) if end_picture is not None else None

    if verbose and not quiet:
        console.print(f"model {preset.name} on {torch_device} ({torch_dtype}), λ {lambdas} on blocks {blocks}, {settings}")
    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        net = load_for(preset, checkpoint, torch_device, torch_dtype, quiet=quiet)
    with timed(timings, "generate_s"), progress_bar(quiet) as progress:
        task = progress.add_task(f"denoising {len(lambdas)} λ values", total=settings.steps)
        video, used_batch = sweep_videos(
            net, start, prompt, settings, seed, lambdas, blocks, end=end, negative_prompt=negative_prompt,
            batch_size=batch_size, callback=lambda i, total: progress.update(task, completed=i + 1, total=total),
        )
    clips = [video_to_uint8(v) for v in video]
    labels = [f"lambda={v:g}" for v in lambdas]
    rows = [
        {"lambda": v, "motion": motion(c), "conformity": conformity(net.image_encoder, start, c),
         "video": f"lambda_{v:g}.mp4"}  # relative to the sweep folder
        for v, c in zip(lambdas, clips)
    ]
    out_fps = fps or preset.fps
    for row, clip in zip(rows, clips):
        write_frames(clip, out_dir / row["video"], out_fps)
    write_frames(grid_video(clips, labels), out_dir / "grid.mp4", out_fps)
    for name, picture_out in (("contact_sheet.png", contact_sheet(clips, labels)),
                              ("chart.png", chart(lambdas, {"motion": [r["motion"] for r in rows],
                                                            "conformity": [r["conformity"] for r in rows]}))):
        with atomic_path(out_dir / name) as tmp:
            picture_out.save(tmp)
    record = {
        "image": str(image), "prompt": prompt, "model": preset.name, "seed": seed, "layers": layers,
        "blocks": blocks, "batch_size": used_batch, "settings": settings.__dict__, "results": rows,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    previous = earlier_videos(out_dir / "metrics.json")
    write_sidecar(out_dir / "metrics.json", record)
    if verbose and not quiet:
        console.print(f"load {timings['load_s']:.1f} s, generate {timings['generate_s']:.1f} s (batch of {used_batch})")
    for name in previous - {r["video"] for r in rows}:  # an overwritten sweep's videos for λ no longer swept
        (out_dir / name).unlink(missing_ok=True)
    if as_json:
        sys.stdout.write(json.dumps(record, default=str) + "\n")
        return
    if not quiet:
        table = Table(title=f"λ sweep ({layers} layers), seed {seed}")
        for column in ("λ", "motion", "conformity", "video"):
            table.add_column(column)
        for r in rows:
            table.add_row(f"{r['lambda']:g}", f"{r['motion']:.4f}", f"{r['conformity']:.4f}", r["video"])
        console.print(table)
        console.print(f"[green]wrote[/] {out_dir}/grid.mp4, contact_sheet.png, chart.png, metrics.json", markup=True)


def earlier_videos(metrics: Path) -> set[str]:
    """The per-λ video names an earlier sweep recorded in ``metrics`` (plain names inside the folder only)."""
    try:
        rows = json.loads(metrics.read_text())["results"]
        names = {Path(r["video"]).name for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if n.startswith("lambda_") and n.endswith(".mp4")}

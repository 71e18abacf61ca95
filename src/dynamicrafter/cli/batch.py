"""``dynamicrafter batch FOLDER``: every photo of a folder, resumable, sharded, one model load."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ..batch import Item, Outcome, collect_items, group_for_batching, is_complete, item_seed, parse_shard, shard
from .app import EXIT_FAILED, EXIT_INTERRUPTED, ERRORS, UsageError, app, console, handle_errors
from .common import (
    CfgImgOpt, CfgOpt, CheckpointOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, FpsOpt, FsOpt, JsonOpt, LambdaOpt,
    ModelOpt, NegativeOpt, OverwriteOpt, QuietOpt, SeedOpt, StepsOpt, VerboseOpt, check_checkpoint_path, load_for,
    make_record, progress_bar, resolve_device, sampling_settings, sidecar_path, timed,
)


@dataclass(frozen=True)
class Job:
    """A validated item: its tensors, settings and where it goes."""

    item: Item
    start: Any  # (1, 3, H, W) tensor
    end: Any  # (1, 3, H, W) tensor or None
    mode: str
    settings: Any  # SamplingSettings
    negative_prompt: str
    image_scale: float | None
    seed: int
    output: Path

    @property
    def group_key(self) -> tuple:
        return (self.settings, self.mode, self.image_scale)


def prepare_job(item: Item, preset, base: dict[str, Any], run_seed: int, output: Path) -> Job:
    """Validate one item (image, prompt, per-item settings); raises the same errors animate would."""
    from ..images import load_image, prepare_image

    if not item.prompt or not item.prompt.strip():
        raise UsageError(f"no prompt: add {item.image.stem}.txt, a --prompts row, or --prompt")
    opts = {**base, **item.overrides}
    start = prepare_image(load_image(item.image), preset.height, preset.width)
    end_path = opts.get("end_image")
    end = prepare_image(load_image(end_path), preset.height, preset.width) if end_path else None
    settings = sampling_settings(
        preset, opts.get("steps"), opts.get("cfg"), opts.get("cfg_img"), opts.get("eta"), opts.get("fs"), opts.get("frames")
    )
    seed = opts["seed"] if "seed" in item.overrides else item_seed(run_seed, item.name)
    return Job(item, start, end, "interp" if end is not None else "i2v", settings, opts.get("negative_prompt", ""),
               opts.get("image_scale"), seed, output)


def summary_table(outcomes: list[Outcome]) -> Table:
    table = Table(title="batch summary")
    for column in ("item", "status", "seed", "output / error"):
        table.add_column(column)
    colour = {"done": "green", "skipped": "cyan", "failed": "red"}
    for o in outcomes:
        table.add_row(o.item.image.name, f"[{colour[o.status]}]{o.status}[/]", "" if o.seed is None else str(o.seed),
                      o.error or str(o.output))
    return table


def error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, tuple(ERRORS)) else f"{exc.__class__.__name__}: {exc}"


@app.command()
@handle_errors
def batch(
    folder: Annotated[Path, typer.Argument(help="Folder of photos (png, jpg, jpeg, webp, bmp).", show_default=False)],
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", "-o", help="Where outputs go (default: FOLDER/animated).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt for every photo without its own.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="CSV or JSONL with image, prompt and optional per-item settings.")] = None,
    model: ModelOpt = "512",
    checkpoint: CheckpointOpt = None,
    fmt: FormatOpt = "mp4",
    batch_size: Annotated[int, typer.Option(help="Photos per UNet call.")] = 1,
    shard_spec: Annotated[Optional[str], typer.Option("--shard", help="Run the I-th of N disjoint slices, e.g. 2/4.")] = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    cfg_img: CfgImgOpt = None,
    eta: EtaOpt = None,
    seed: SeedOpt = 123,
    fs: FsOpt = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames per video (default: the preset's).")] = None,
    fps: FpsOpt = None,
    negative_prompt: NegativeOpt = "",
    image_scale: LambdaOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Animate every photo in FOLDER; reruns skip finished items; exit code 1 if any item failed."""
    from ..presets import get_preset
    from ..video import FORMATS, ensure_writable_dir

    preset = get_preset(model)
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    items = shard(collect_items(folder, prompt, prompts), parse_shard(shard_spec))
    if not items:
        raise UsageError(f"no images in {folder} (looked for png, jpg, jpeg, webp, bmp)")
    out_dir = out_dir or folder / "animated"
    ensure_writable_dir(out_dir)
    check_checkpoint_path(checkpoint)
    torch_device, torch_dtype = resolve_device(device, dtype)
    base = {k: v for k, v in dict(steps=steps, cfg=cfg, cfg_img=cfg_img, eta=eta, fs=fs, frames=frames,
                                  negative_prompt=negative_prompt, image_scale=image_scale).items() if v is not None}
    sampling_settings(preset, steps, cfg, cfg_img, eta, fs, frames)  # refuse bad global options before any work

    outcomes: dict[str, Outcome] = {}
    jobs: list[Job] = []
    suffix = "" if fmt == "png" else f".{fmt}"
    for item in items:
        output = out_dir / f"{item.name}{suffix}"
        if is_complete(output, sidecar_path(output)) and not overwrite:
            outcomes[item.name] = Outcome(item, "skipped", output)
            continue
        try:
            jobs.append(prepare_job(item, preset, base, seed, output))
        except Exception as exc:  # one bad item never stops the batch
            outcomes[item.name] = Outcome(item, "failed", error=error_text(exc))

    interrupted = False
    if jobs:
        try:
            run_jobs(jobs, preset, checkpoint, torch_device, torch_dtype, fmt, fps or preset.fps, batch_size, outcomes, quiet)
        except KeyboardInterrupt:
            interrupted = True
    ordered = [outcomes[i.name] for i in items if i.name in outcomes]
    failed = [o for o in ordered if o.status == "failed"]
    if as_json:
        sys.stdout.write(json.dumps([{"image": str(o.item.image), "status": o.status, "seed": o.seed,
                                      "output": str(o.output) if o.output else None, "error": o.error}
                                     for o in ordered]) + "\n")
    elif not quiet or failed:
        console.print(summary_table(ordered))
    counts = {s: sum(o.status == s for o in ordered) for s in ("done", "skipped", "failed")}
    if not quiet:
        console.print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    if interrupted:
        console.print("interrupted: finished items are kept; rerun the same command to do the rest")
        raise typer.Exit(EXIT_INTERRUPTED)
    if failed:
        raise typer.Exit(EXIT_FAILED)


def run_jobs(jobs: list[Job], preset, checkpoint, device, dtype, fmt, fps, batch_size, outcomes, quiet) -> None:
    """Load the model once, run the jobs in groups of compatible settings, write outputs as each group finishes."""
    import torch

    from ..pipeline import animate as run_animate, set_image_scale
    from ..video import video_to_uint8, write_frames, write_sidecar

    timings: dict[str, float] = {}
    with timed(timings, "load_s"):
        net = load_for(preset, checkpoint, device, dtype, quiet=quiet)
    groups = group_for_batching(jobs, batch_size, key=lambda j: j.group_key)
    with progress_bar(quiet) as progress:
        overall = progress.add_task("photos", total=len(jobs))
        steps = progress.add_task("denoising", total=None)
        for group in groups:
            first = group[0]
            set_image_scale(net, 1.0 if first.image_scale is None else first.image_scale)
            try:
                with timed(timings, "generate_s"):
                    video = run_animate(
                        net, torch.cat([j.start for j in group]), [j.item.prompt for j in group], first.settings,
                        [j.seed for j in group], end=torch.cat([j.end for j in group]) if first.mode == "interp" else None,
                        mode=first.mode, negative_prompts=[j.negative_prompt for j in group],
                        callback=lambda i, total: progress.update(steps, completed=i + 1, total=total),
                    )
                for job, clip in zip(group, video):
                    frames_u8 = video_to_uint8(clip)
                    written = write_frames(frames_u8, job.output, fps, fmt)
                    record = make_record(
                        image=job.item.image, prompt=job.item.prompt, negative_prompt=job.negative_prompt,
                        preset=preset, checkpoint=checkpoint, seed=job.seed, settings=job.settings,
                        image_scale=job.image_scale, fps=fps, device=device, dtype=dtype, output=written,
                        frames=frames_u8, timings={**timings, "generate_s": timings["generate_s"] / len(group)},
                        mode=job.mode,
                    )
                    write_sidecar(sidecar_path(written), record)
                    outcomes[job.item.name] = Outcome(job.item, "done", written, seed=job.seed)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a failing group is reported; the others go on
                for job in group:
                    outcomes.setdefault(job.item.name, Outcome(job.item, "failed", error=error_text(exc), seed=job.seed))
            progress.update(overall, advance=len(group))

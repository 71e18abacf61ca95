"""``dynamicrafter batch FOLDER``: every photo of a folder, resumable, sharded, one model load per worker.

Two engines run the same library code (:func:`~dynamicrafter.batch.prepare_jobs` and
:func:`~dynamicrafter.batch.run_jobs`, on an :class:`~dynamicrafter.api.Animator`): ``local`` in this process,
``ray`` on a Ray cluster
(:mod:`dynamicrafter.ray_engine`).  This module parses and validates, skips finished items, and prints the summary;
the exit code is 1 if any item failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..batch import BatchSpec, Outcome, clear_partials, prepare_jobs, run_jobs, split_finished
from ..items import Item, collect_items, parse_shard, shard
from .app import EXIT_FAILED, UsageError, app, console, handle_errors, interrupted_code
from .common import (
    MaxMemoryOpt, MemoryOpt, OffloadOpt, WeightsOpt, check_memory_options,
    CfgImgOpt, CfgOpt, CheckpointOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, FpsOpt, FsOpt, JsonOpt, LambdaOpt,
    ModelOpt, NegativeOpt, OverwriteOpt, QuietOpt, SeedOpt, StepsOpt, VerboseOpt, check_checkpoint_path,
    load_animator, progress_bar,
)

ENGINES = ("local", "ray")


def summary_table(outcomes: list[Outcome], measures: bool) -> Table:
    """Every item: status, seed, output or error, and (on a terminal wide enough for them) its measures: motion /
    dynamic degree / conformity and flags.  report.html has them all."""
    table = Table(title="batch summary")
    columns = ["item", "status", "seed", *(["mot/dyn/conf", "flags"] if measures else []), "output / error"]
    for column in columns:
        table.add_column(column)
    colour = {"done": "green", "skipped": "cyan", "failed": "red"}
    for o in outcomes:
        m = o.measures or {}
        numbers = "/".join("–" if m.get(k) is None else f"{m[k]:.2f}" for k in ("motion", "dynamic_degree", "conformity"))
        shown = [numbers if m else "", f"[yellow]{', '.join(m.get('flags') or [])}[/]"] if measures else []
        table.add_row(escape(o.item.image.name), f"[{colour[o.status]}]{o.status}[/]",
                      "" if o.seed is None else str(o.seed), *shown, escape(o.error or str(o.output)))
    return table


def check_engine(engine: str, address: str | None, workers: int | None, gpus_per_worker: float | None) -> None:
    """Refuse impossible engine options, and say what to install when Ray is missing."""
    if engine not in ENGINES:
        raise UsageError(f"unknown --engine {engine!r}; choose local or ray")
    if engine == "local":
        given = [name for name, value in (("--address", address), ("--workers", workers),
                                          ("--gpus-per-worker", gpus_per_worker)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to --engine ray")
        return
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {workers})")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be >= 0 (got {gpus_per_worker})")
    from ..ray_engine import RayUnavailableError, require_ray

    try:
        require_ray()
    except RayUnavailableError as exc:
        raise UsageError(str(exc)) from None


def run_local(items: Sequence[Item], spec: BatchSpec, preset, quiet: bool) -> Iterator[Outcome]:
    """Validate every item first, then load the model once (only if something is left) and run the jobs here."""
    jobs, failed = prepare_jobs(items, spec)
    yield from failed
    if not jobs:
        return
    animator = load_animator(preset, spec.checkpoint, spec.device, spec.dtype, quiet=quiet, weights=spec.weights,
                             offload=spec.offload, memory=spec.memory, max_memory=spec.max_memory)
    with progress_bar(quiet) as progress:
        overall = progress.add_task("photos", total=len(jobs))
        steps = progress.add_task("denoising", total=None)
        for outcome in run_jobs(animator, jobs, spec,
                                callback=lambda i, total: progress.update(steps, completed=i + 1, total=total)):
            progress.update(overall, advance=1)
            yield outcome


@app.command()
@handle_errors
def batch(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder of photos (png, jpg, jpeg, webp, bmp).", show_default=False)],
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", "-o", help="Where outputs go (default: FOLDER/animated).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt for every photo without its own.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="CSV or JSONL with image, prompt and optional per-item settings.")] = None,
    model: ModelOpt = "512",
    checkpoint: CheckpointOpt = None,
    fmt: FormatOpt = "mp4",
    batch_size: Annotated[int, typer.Option(help="Photos per UNet call.")] = 1,
    shard_spec: Annotated[Optional[str], typer.Option("--shard", help="Run the I-th of N disjoint slices, e.g. 2/4.")] = None,
    engine: Annotated[str, typer.Option(help="local, or ray: a Ray cluster (pip install 'dynamicrafter[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto or HOST:PORT (default: RAY_ADDRESS, "
                                                        "a `ray start` cluster here, else a new local one).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray workers, one model each (default: one per GPU, else 1).")] = None,
    gpus_per_worker: Annotated[Optional[float], typer.Option(help="GPUs per Ray worker (default: 1 if any, else 0).")] = None,
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
    weights: WeightsOpt = None,
    offload: OffloadOpt = None,
    memory: MemoryOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    overwrite: OverwriteOpt = False,
    no_measures: Annotated[bool, typer.Option("--no-measures", help="Skip the quality measures and the report page.")] = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Animate every photo in FOLDER; reruns skip finished items; exit code 1 if any item failed."""
    from ..devices import check_device_names, resolve_device
    from ..files import ensure_writable_dir, folder_lock
    from ..memory import check_fits
    from ..presets import get_preset
    from ..video import FORMATS, check_fps

    preset = get_preset(model)
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    check_engine(engine, address, workers, gpus_per_worker)
    if out_dir is not None and str(out_dir) == "-":
        raise UsageError("--out-dir - is not a folder; name one")
    items = shard(collect_items(folder, prompt, prompts), parse_shard(shard_spec))
    if not items:
        raise UsageError(f"no images in {folder} (looked for png, jpg, jpeg, webp, bmp)")
    out_dir = out_dir or folder / "animated"
    ensure_writable_dir(out_dir)
    check_checkpoint_path(checkpoint)
    check_memory_options(weights, offload, memory, max_memory)
    if engine == "local":
        torch_device = resolve_device(device, dtype)[0]
        check_fits(batch_size, frames or preset.frames, preset.height, preset.width, torch_device)
    else:
        check_device_names(device, dtype)
    options = {k: v for k, v in dict(steps=steps, cfg=cfg, cfg_img=cfg_img, eta=eta, fs=fs, frames=frames,
                                     negative_prompt=negative_prompt, image_scale=image_scale).items() if v is not None}
    preset.sampling(steps=steps, cfg_scale=cfg, cfg_img=cfg_img, eta=eta, fs=fs, frames=frames)  # refuse bad options now
    check_fps(fps)
    spec = BatchSpec(model=model, out_dir=out_dir, fmt=fmt, seed=seed, options=options, checkpoint=checkpoint,
                     device=device, dtype=dtype, fps=fps, batch_size=batch_size, overwrite=overwrite,
                     measures=not no_measures, weights=weights, offload=offload, memory=memory, max_memory=max_memory)

    todo, skipped = split_finished(items, spec)  # finished items and known problems are never scheduled
    outcomes = {o.item.image: o for o in skipped}
    interrupted: KeyboardInterrupt | None = None
    if todo:
        with folder_lock(out_dir):  # a second batch on this folder is refused while this one runs
            clear_partials(todo, spec)
            if engine == "local":
                results = run_local(todo, spec, preset, quiet)
            else:
                from ..ray_engine import run_on_ray

                results = run_on_ray(todo, spec, address=address, workers=workers, gpus_per_worker=gpus_per_worker,
                                     quiet=quiet)
            try:
                with closing(results):
                    for outcome in results:
                        outcomes[outcome.item.image] = outcome
            except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (see app.handle_errors)
                interrupted = stop
            finally:
                clear_partials(todo, spec)  # what killed workers left behind
    ordered = [outcomes[i.image] for i in items if i.image in outcomes]
    failed = [o for o in ordered if o.status == "failed"]
    if as_json:
        sys.stdout.write(json.dumps([{"image": str(o.item.image), "status": o.status, "seed": o.seed,
                                      "output": str(o.output) if o.output else None, "error": o.error,
                                      "measures": o.measures} for o in ordered]) + "\n")
    elif not quiet:
        console.print(summary_table(ordered, measures=not no_measures and console.width >= 110))
    else:  # --quiet: the errors only, one line each
        for o in failed:
            console.print(f"[bold red]error:[/] {escape(o.item.image.name)}: {escape(o.error or 'failed')}", markup=True)
    if not no_measures:
        from ..report import build_report

        page = build_report(out_dir, failures=[{"image": str(o.item.image), "error": o.error} for o in failed])
        if not quiet and not as_json:
            console.print(f"report: {page}")
    counts = {s: sum(o.status == s for o in ordered) for s in ("done", "skipped", "failed")}
    if not quiet:
        console.print(f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed")
    if interrupted is not None:
        console.print("interrupted: finished items are kept; rerun the same command to do the rest")
        raise typer.Exit(interrupted_code(interrupted))
    if failed:
        raise typer.Exit(EXIT_FAILED)

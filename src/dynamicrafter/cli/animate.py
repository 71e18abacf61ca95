"""``dynamicrafter animate IMAGE PROMPT``: one photo (and optional end image) to a video plus a JSON sidecar."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.markup import escape

from .app import UsageError, app, console, flag_names, handle_errors
from .common import (
    MaxMemoryOpt, MemoryOpt, OffloadOpt, WeightsOpt, check_memory_options,
    CfgImgOpt, CfgOpt, CheckpointOpt, DeviceOpt, DtypeOpt, EtaOpt, FormatOpt, FpsOpt, FsOpt, JsonOpt, LambdaOpt,
    ModelOpt, NegativeOpt, OverwriteOpt, QuietOpt, SeedOpt, StepsOpt, VerboseOpt, check_checkpoint_path,
    load_animator, progress_bar, warn_if_truncated,
)


def output_paths(image: Path, out: Path | None, fmt: str | None, samples: int) -> tuple[list[Path], str]:
    """Final output paths (one per sample) and the format; refuses unknown formats."""
    from ..files import OutputError
    from ..video import FORMATS, format_for

    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out is not None and str(out) == "-":
        raise UsageError("--out - would not go to standard output (videos are files); name a file or a folder")
    if out is None:
        out = Path(image.stem if fmt == "png" else f"{image.stem}.{fmt or 'mp4'}")
    if fmt is None:
        try:
            fmt = format_for(out)
        except OutputError as exc:
            raise UsageError(str(exc)) from None
    else:
        suffix = out.suffix.lower().lstrip(".")
        video = suffix in FORMATS and suffix != "png"
        if (video and suffix != fmt) or (not video and fmt != "png"):  # a frame folder's name may hold dots
            what = f"'{out.suffix}'" if video else "a folder of PNG frames"
            raise UsageError(f"--out {out} means {what} but --format is {fmt}; make them agree or drop --format")
    if samples == 1:
        return [out], fmt
    return [out.with_name(f"{out.stem}_sample{i}{out.suffix}") for i in range(samples)], fmt


@app.command()
@handle_errors
def animate(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="The photo to animate (the start frame).", show_default=False)],
    prompt: Annotated[str, typer.Argument(metavar="PROMPT", help="What should happen in the video.", show_default=False)],
    model: ModelOpt = "512",
    checkpoint: CheckpointOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (.mp4/.gif/.webp) or folder (PNG frames); default: IMAGE's name.")] = None,
    fmt: FormatOpt = None,
    end_image: Annotated[Optional[Path], typer.Option("--end-image", help="End frame: interpolate from IMAGE to it (use the 512-interp model).")] = None,
    loop: Annotated[bool, typer.Option("--loop", help="Make a seamless loop (use the 512-interp model).")] = False,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    cfg_img: CfgImgOpt = None,
    eta: EtaOpt = None,
    seed: SeedOpt = 123,
    fs: FsOpt = None,
    frames: Annotated[Optional[int], typer.Option(help="Frames to generate (default: the preset's 16); more than --window makes a long video.")] = None,
    window: Annotated[Optional[int], typer.Option(help="Long videos: frames per denoising window (default 16, the model's length).")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Long videos: frames between window starts (default 8; smaller is smoother and slower).")] = None,
    fps: FpsOpt = None,
    negative_prompt: NegativeOpt = "",
    image_scale: LambdaOpt = None,
    samples: Annotated[int, typer.Option(help="Videos to make from different seeds (seed, seed+1, ...).")] = 1,
    no_measures: Annotated[bool, typer.Option("--no-measures", help="Skip the quality measures (motion, flow, CLIP conformity, flags).")] = False,
    retry_static: Annotated[int, typer.Option("--retry-static", help="Redo a video measured static with the next seeds, up to N times.")] = 0,
    start_timestep: Annotated[Optional[int], typer.Option("--start-timestep", help="CIL: start sampling at training timestep M (e.g. 940; default: the preset's, the whole schedule).")] = None,
    analytic_init: Annotated[Optional[bool], typer.Option("--analytic-init/--no-analytic-init", help="CIL: start from the analytic initial noise of the model's data statistics (default: the preset's).")] = None,
    init_statistics: Annotated[Optional[Path], typer.Option("--init-statistics", help="CIL: a local Analytic-Init statistics file (.pt) instead of the preset's; turns --analytic-init on.")] = None,
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
    """Animate IMAGE following PROMPT; writes the video and a JSON sidecar with every setting."""
    from ..api import make_request
    from ..devices import resolve_device
    from ..files import OutputError, check_name, check_replaceable, ensure_writable_dir, sidecar_path
    from ..memory import check_fits
    from ..presets import get_preset
    from ..video import check_fps

    # 1. Validate every input before the model loads.
    preset = get_preset(model)
    if loop and end_image is not None:
        raise UsageError("--loop and --end-image exclude each other")
    warn_if_truncated(prompt)
    request = make_request(
        preset, image, prompt, end_image=end_image, loop=loop, seed=seed, samples=samples,
        negative_prompt=negative_prompt, image_scale=image_scale, steps=steps, cfg_scale=cfg, cfg_img=cfg_img,
        eta=eta, fs=fs, frames=frames, window=window, stride=stride,
        start_timestep=start_timestep, analytic_init=analytic_init, init_statistics=init_statistics,
    )
    outputs, fmt = output_paths(image, out, fmt, samples)
    for path in outputs:
        try:
            check_replaceable(path)  # even with --overwrite: never a folder of other files, never "."
        except OutputError as exc:
            raise UsageError(str(exc)) from None
    if not overwrite:
        for path in outputs:
            if path.exists():
                raise UsageError(f"{path} exists; pass --overwrite to replace it")
            if sidecar_path(path).exists():  # e.g. clip.json of an earlier clip.mp4 when asking for clip.gif
                raise UsageError(
                    f"{sidecar_path(path)} (the sidecar this run writes) exists; pass --overwrite or choose another --out"
                )
    ensure_writable_dir(outputs[0].parent)
    for path in outputs:
        try:
            check_name(path)  # a name the file system refuses fails now, not after the generation
            check_name(sidecar_path(path))
        except OutputError as exc:
            raise UsageError(str(exc)) from None
    check_checkpoint_path(checkpoint)
    check_memory_options(weights, offload, memory, max_memory)
    torch_device, torch_dtype = resolve_device(device, dtype)
    check_fits(samples, request.settings.frames, preset.height, preset.width, torch_device)
    check_fps(fps)
    if retry_static < 0 or (retry_static and no_measures):
        raise UsageError("--retry-static needs the measures and a count >= 0")
    mode = request.mode
    if (mode == "i2v") != (preset.mode == "i2v") and preset.architecture != "tiny" and not quiet:
        hint = "--end-image/--loop are meant for the 512-interp or toon model" if mode != "i2v" else f"the {preset.name} model wants --end-image or --loop"
        console.print(f"[yellow]warning:[/] {hint}", markup=True)
    if verbose and not quiet:
        console.print(f"model {preset.name} on {torch_device} ({torch_dtype}), mode {mode}, {request.settings}")

    # 2. Load, generate, write.
    animator = load_animator(preset, checkpoint, device, dtype, quiet=quiet, weights=weights, offload=offload,
                             memory=memory, max_memory=max_memory)
    with progress_bar(quiet) as progress:
        task = progress.add_task("denoising", total=None)
        results = animator.run([request], progress=lambda i, total: progress.update(task, completed=i + 1, total=total),
                               measures=not no_measures, retry_static=retry_static)
    summary = []
    for path, result in zip(outputs, results):
        written = result.save(path, fmt=fmt, fps=fps, overwrite=True)
        record = result.record(written, fps)
        summary.append({**record, "sidecar": str(sidecar_path(written))})
        if not quiet and not as_json:
            console.print(f"[green]wrote[/] {written} ({result.frames.shape[0]} frames) and {sidecar_path(written)}", markup=True)
        if result.attempts and not quiet:
            console.print(f"{written.name}: seed {result.seed} after {len(result.attempts)} static attempt(s)")
        if result.warning and not quiet:
            console.print(f"[yellow]warning:[/] {written.name}: {escape(flag_names(result.warning))}", markup=True)
    if verbose and not quiet:
        console.print(f"load {animator.load_s:.1f} s, generate {sum(r.timings['generate_s'] for r in results):.1f} s")
    if as_json:
        sys.stdout.write(json.dumps(summary[0] if samples == 1 else summary) + "\n")

"""The ``dynamicrafter`` command line: parses, validates inputs before any model loads, calls the pipeline.

Every expected failure becomes one red line and a non-zero exit code (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from . import __version__
from .checkpoint import CheckpointError
from .images import ImageError
from .presets import UnknownModelError
from .video import FORMATS, OutputError

app = typer.Typer(
    name="dynamicrafter",
    help="Animate a still photo into a short video with DynamiCrafter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

EXIT_USAGE = 2
EXIT_FAILED = 1
KNOWN_ERRORS = (ImageError, CheckpointError, UnknownModelError, OutputError, ValueError, FileNotFoundError)


class MissingWeightsError(FileNotFoundError):
    """A preset whose weights are not on this machine."""


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dynamicrafter {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Show the version.")] = False,
) -> None:
    """Animate a still photo into a short video with DynamiCrafter."""


# --------------------------------------------------------------------------------------------------------------
# Shared helpers


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, "torch.dtype"]:
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype is None:
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype not in names:
        raise ValueError(f"unknown --dtype {dtype!r}; choose fp32, fp16 or bf16")
    return device, names[dtype]


def local_weights(preset) -> Path | None:
    """The cached checkpoint of a downloadable preset, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(preset.repo, preset.file)
    return Path(found) if isinstance(found, str) else None


def load_for(preset, checkpoint: Path | None, device: str, dtype):
    """The model of ``preset`` from ``checkpoint``, the local cache, or (tiny) random weights."""
    from .checkpoint import build_random, load_model

    cfg = preset.model_config()
    if checkpoint is not None:
        return load_model(cfg, checkpoint, device, dtype, expected_model=preset.name)
    if not preset.downloadable:
        return build_random(cfg, preset.seed or 0, device, dtype)
    path = local_weights(preset)
    if path is None:
        raise MissingWeightsError(
            f"the {preset.name} model is not downloaded; run `dynamicrafter download {preset.name}` "
            f"(or pass --checkpoint PATH)"
        )
    return load_model(cfg, path, device, dtype, expected_model=preset.name)


# --------------------------------------------------------------------------------------------------------------
# animate


@app.command()
def animate(
    image: Annotated[Path, typer.Argument(help="The photo to animate.")],
    prompt: Annotated[str, typer.Argument(help="What should happen in the video.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model preset (see `dynamicrafter models`).")] = "512",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint file (.ckpt or .safetensors) to load.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output file (.mp4/.gif/.webp) or folder (PNG frames).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help=f"Output format: {', '.join(FORMATS)} (default: from --out).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: the preset's).")] = None,
    cfg: Annotated[Optional[float], typer.Option("--cfg", help="Text guidance scale.")] = None,
    cfg_img: Annotated[Optional[float], typer.Option("--cfg-img", help="Separate image guidance scale (3 UNet calls per step).")] = None,
    eta: Annotated[Optional[float], typer.Option(help="DDIM eta (0 = deterministic).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 123,
    fs: Annotated[Optional[int], typer.Option("--fs", help="Frame-stride / fps conditioning (motion amount).")] = None,
    fps: Annotated[Optional[int], typer.Option(help="Frames per second of the written video.")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Prompt for the unconditional branch.")] = "",
    image_scale: Annotated[Optional[float], typer.Option("--lambda", help="Image cross-attention scale λ for every layer.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Animate IMAGE following PROMPT and write a video plus a JSON sidecar."""
    try:
        _animate(**locals())
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail("interrupted; no output was written", 130)
    except KNOWN_ERRORS as exc:
        if debug:
            raise
        raise fail(str(exc))


def _animate(image, prompt, model, checkpoint, out, fmt, steps, cfg, cfg_img, eta, seed, fs, fps, negative_prompt,
             image_scale, device, dtype, overwrite, quiet, as_json, debug) -> None:
    from dataclasses import asdict

    from .images import load_image, prepare_image
    from .pipeline import SamplingSettings, animate as run_animate, set_image_scale
    from .presets import get_preset
    from .tokenizer import get_tokenizer
    from .video import format_for, video_to_uint8, write_frames, write_sidecar

    # Validate everything before the model loads.
    preset = get_preset(model)
    picture = load_image(image)
    if not prompt.strip():
        raise ValueError("the prompt is empty; describe the motion you want, e.g. \"waves crashing\"")
    if get_tokenizer().is_truncated(prompt):
        console.print("[yellow]warning:[/] the prompt is longer than 77 tokens; the end is cut off")
    out = out or Path(f"{image.stem}.{fmt or 'mp4'}")
    fmt = fmt or format_for(out)
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    torch_device, torch_dtype = resolve_device(device, dtype)
    settings = SamplingSettings(
        steps=steps or preset.steps,
        cfg_scale=preset.cfg_scale if cfg is None else cfg,
        cfg_img=cfg_img,
        eta=preset.eta if eta is None else eta,
        fs=preset.fs if fs is None else fs,
        guidance_rescale=preset.guidance_rescale,
        timestep_spacing=preset.timestep_spacing,
        frames=preset.frames,
    )
    from .sampling import ddim_timesteps

    ddim_timesteps(settings.steps, settings.timestep_spacing)  # rejects unusable step counts now
    start = prepare_image(picture, preset.height, preset.width)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with console.status(f"loading the {preset.name} model", spinner="dots") if not quiet else _null():
        net = load_for(preset, checkpoint, torch_device, torch_dtype)
    timings["load_s"] = time.perf_counter() - t0
    if image_scale is not None:
        set_image_scale(net, image_scale)

    t1 = time.perf_counter()
    with _progress(quiet) as progress:
        task = progress.add_task("sampling", total=None)
        callback = lambda i, total: progress.update(task, completed=i + 1, total=total)  # noqa: E731
        video = run_animate(net, start, [prompt], settings, seed, negative_prompts=[negative_prompt], callback=callback)
    timings["generate_s"] = time.perf_counter() - t1
    frames = video_to_uint8(video[0])
    written = write_frames(frames, out, fps or preset.fps, fmt)
    record = {
        "tool": "dynamicrafter",
        "version": __version__,
        "image": str(image),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "model": preset.name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "seed": seed,
        "settings": asdict(settings),
        "image_scale": image_scale,
        "fps": fps or preset.fps,
        "device": torch_device,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "output": str(written),
        "frames": int(frames.shape[0]),
        "size": [int(frames.shape[1]), int(frames.shape[2])],
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    sidecar = write_sidecar(written.with_name(written.name + ".json") if fmt == "png" else written.with_suffix(".json"), record)
    if as_json:
        sys.stdout.write(json.dumps({**record, "sidecar": str(sidecar)}) + "\n")
    elif not quiet:
        console.print(f"[green]wrote[/] {written} ({frames.shape[0]} frames, {timings['generate_s']:.1f} s) and {sidecar}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=quiet, transient=True,
    )


# --------------------------------------------------------------------------------------------------------------
# models


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the model presets and whether their weights are on this machine."""
    from rich.table import Table

    from .presets import load_presets

    rows = []
    for preset in load_presets().values():
        local = "built in" if not preset.downloadable else ("yes" if local_weights(preset) else "no")
        rows.append({"name": preset.name, "resolution": f"{preset.height}x{preset.width}", "frames": preset.frames,
                     "mode": preset.mode, "local": local, "description": preset.description})
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="models")
    for column in ("name", "resolution", "frames", "mode", "local", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("name", "resolution", "frames", "mode", "local", "description")))
    Console().print(table)


if __name__ == "__main__":
    app()

"""Pieces shared by the commands: option aliases, device/dtype choice, model loading, settings, records."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .. import __version__
from .app import UsageError, console

if TYPE_CHECKING:  # the pipeline imports the networks and their libraries: only when a command runs
    from ..pipeline import SamplingSettings
    from ..presets import Preset

# Option aliases shared by animate, batch and lambda-sweep.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Model preset (see `dynamicrafter models`).")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(help="Checkpoint file (.ckpt or .safetensors) to load instead of the preset's.")]
StepsOpt = Annotated[Optional[int], typer.Option(help="DDIM steps (default: the preset's).")]
CfgOpt = Annotated[Optional[float], typer.Option("--cfg", help="Text guidance scale (default: the preset's).")]
CfgImgOpt = Annotated[Optional[float], typer.Option("--cfg-img", help="Separate image guidance scale (three UNet branches per step).")]
EtaOpt = Annotated[Optional[float], typer.Option(help="DDIM eta: 1 stochastic, 0 deterministic (default: the preset's).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed.")]
FsOpt = Annotated[Optional[int], typer.Option("--fs", help="Motion conditioning: frame stride (256) or fps (512/1024); default: the preset's.")]
FpsOpt = Annotated[Optional[int], typer.Option(help="Frames per second of the written video (default: the preset's).")]
NegativeOpt = Annotated[str, typer.Option("--negative-prompt", help="Prompt for the unconditional branch.")]
LambdaOpt = Annotated[Optional[float], typer.Option("--lambda", help="Image cross-attention scale λ for every layer (small: more motion).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu).")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Output format: mp4, gif, webp or png (a folder of frames).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace existing outputs.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print settings and timings.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]


def check_device_names(device: str | None, dtype: str | None) -> None:
    """Refuse unknown --device/--dtype names (all that can be checked where the GPUs are elsewhere, as with Ray)."""
    if device is not None and not (device in ("cpu", "mps") or device.startswith("cuda")):
        raise UsageError(f"unknown --device {device!r}; use cpu or cuda")
    if dtype is not None and dtype not in ("fp32", "fp16", "bf16"):
        raise UsageError(f"unknown --dtype {dtype!r}; choose fp32, fp16 or bf16")


def resolve_device(device: str | None, dtype: str | None):
    """(device string, torch dtype) with CPU-safe defaults; raises UsageError for impossible choices."""
    import torch

    check_device_names(device, dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    dtype = dtype or ("fp16" if device.startswith("cuda") else "fp32")
    if dtype == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bf16 support; use --dtype fp16 or fp32")
    return device, names[dtype]


def local_weights(preset: Preset) -> Path | None:
    """The cached checkpoint of a downloadable preset, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(preset.repo, preset.file)
    return Path(found) if isinstance(found, str) else None


def check_checkpoint_path(checkpoint: Path | None) -> None:
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")


def load_for(preset: Preset, checkpoint: Path | None, device: str, dtype, quiet: bool = False):
    """The model of ``preset``: from ``checkpoint``, the local cache, a first-run download, or random (built-in)."""
    from ..checkpoint import build_random, load_model

    cfg = preset.model_config()
    with console.status(f"loading the {preset.name} model", spinner="dots") if not quiet else nullcontext():
        if checkpoint is not None:
            return load_model(cfg, checkpoint, device, dtype, expected_model=preset.name)
        if not preset.downloadable:
            return build_random(cfg, preset.seed or 0, device, dtype)
        path = local_weights(preset)
    if path is None:
        from .models import fetch_weights  # first run of a missing model: download when online

        path = fetch_weights(preset, quiet=quiet, for_command=True)
    with console.status(f"loading the {preset.name} model", spinner="dots") if not quiet else nullcontext():
        return load_model(cfg, path, device, dtype, expected_model=preset.name)


def sampling_settings(
    preset: Preset,
    steps: int | None = None,
    cfg: float | None = None,
    cfg_img: float | None = None,
    eta: float | None = None,
    fs: int | None = None,
    frames: int | None = None,
) -> SamplingSettings:
    """The preset's sampler defaults with the user's overrides, validated (bad step counts refused now)."""
    from ..pipeline import SamplingSettings
    from ..sampling import ddim_timesteps

    settings = SamplingSettings(
        steps=preset.steps if steps is None else steps,
        cfg_scale=preset.cfg_scale if cfg is None else cfg,
        cfg_img=cfg_img,
        eta=preset.eta if eta is None else eta,
        fs=preset.fs if fs is None else fs,
        guidance_rescale=preset.guidance_rescale,
        timestep_spacing=preset.timestep_spacing,
        frames=preset.frames if frames is None else frames,
    )
    for name, value in (("--cfg", settings.cfg_scale), ("--cfg-img", settings.cfg_img), ("--eta", settings.eta)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number (got {value})")
    if settings.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {settings.steps})")
    if settings.eta < 0:
        raise UsageError(f"--eta must be >= 0 (got {settings.eta})")
    if settings.frames < 2:
        raise UsageError(f"--frames must be at least 2 (got {settings.frames})")
    try:
        ddim_timesteps(settings.steps, settings.timestep_spacing)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return settings


def check_fps(fps: int | None) -> None:
    """The frame rate of the written video, when given: a positive number."""
    if fps is not None and fps < 1:
        raise UsageError(f"--fps must be at least 1 (got {fps})")


def check_prompt(prompt: str) -> None:
    from ..tokenizer import get_tokenizer

    if not prompt.strip():
        raise UsageError('the prompt is empty; describe the motion you want, e.g. "waves crashing on rocks"')
    if get_tokenizer().is_truncated(prompt):
        console.print("[yellow]warning:[/] the prompt is longer than 77 tokens; the end is cut off", markup=True)


def sidecar_path(output: Path) -> Path:
    """``clip.mp4`` -> ``clip.json``; a PNG folder ``clip/`` (or ``clip.v2/``) -> ``clip.json`` (``clip.v2.json``)."""
    if output.suffix.lower() in (".mp4", ".gif", ".webp"):
        return output.with_suffix(".json")
    return output.with_name(output.name + ".json")


def make_record(
    *,
    image: Path,
    prompt: str,
    negative_prompt: str,
    preset: Preset,
    checkpoint: Path | None,
    seed: int,
    settings: SamplingSettings,
    image_scale: float | None,
    fps: int,
    device: str,
    dtype,
    output: Path,
    frames,
    timings: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """The JSON sidecar: everything needed to reproduce an output."""
    return {
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
        "fps": fps,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "output": str(output),
        "frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        **extra,
    }


def progress_bar(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=quiet, transient=True,
    )


@contextmanager
def timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start

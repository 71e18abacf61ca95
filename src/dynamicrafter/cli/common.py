"""Pieces shared by the commands: option aliases, model loading with a spinner, the progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .app import console

if TYPE_CHECKING:
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
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", help="Weight storage: full, or fp8 (8-bit UNet and towers, cast up per layer; default: chosen by --memory).")]
OffloadOpt = Annotated[Optional[str], typer.Option("--offload", help="none, model (each part on the GPU only while it runs) or group (UNet layers streamed); default: chosen by --memory.")]
MemoryOpt = Annotated[str, typer.Option("--memory", help="auto: pick --weights/--offload from the free GPU memory; manual: full weights, no offload.")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option("--max-memory", help="GPU memory --memory auto may plan for, e.g. 6GiB.")]
FormatOpt = Annotated[Optional[str], typer.Option("--format", help="Output format: mp4, gif, webp or png (a folder of frames).")]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace existing outputs.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print settings and timings.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]


@contextmanager
def download_bar(name: str, show: bool) -> Iterator[Optional[Callable[[int, Optional[int]], None]]]:
    """A progress callback for :func:`~dynamicrafter.hub.fetch_weights` that draws a bar with the size, the speed and
    the time left (None when not ``show``: quiet, or not a terminal)."""
    if not show:
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console) as bar:
        tasks: list[TaskID] = []

        def update(done: int, total: Optional[int]) -> None:
            if not tasks:  # the bar appears with the first bytes, not for a check or a refusal
                tasks.append(bar.add_task(name, total=total, completed=done))
            bar.update(tasks[0], completed=done, total=total)

        yield update


def load_animator(
    preset: Preset,
    checkpoint: Path | None,
    device: str | None,
    dtype: str | None,
    quiet: bool = False,
    *,
    weights: str | None = None,
    offload: str | None = None,
    memory: str = "auto",
    max_memory: str | None = None,
):
    """The :class:`~dynamicrafter.api.Animator` of ``preset``: from ``checkpoint``, the local cache, a first-run
    download (announced on the console), or random (built-in presets), with a spinner while it loads."""
    from ..api import Animator
    from ..hub import weights_for

    if checkpoint is None and preset.downloadable:  # first run of a missing model: download when online
        with download_bar(preset.name, show=not quiet and console.is_terminal) as progress:
            weights_for(preset, notify=None if quiet else console.print, progress=progress,
                        alternative=", or pass --checkpoint PATH")
    with console.status(f"loading the {preset.name} model", spinner="dots") if not quiet else nullcontext():
        from ..offload import parse_size

        return Animator.load(preset, checkpoint=checkpoint, device=device, dtype=dtype, download=False,
                             weights=weights, offload=offload, memory=memory, max_memory=parse_size(max_memory))


def check_memory_options(weights: str | None, offload: str | None, memory: str, max_memory: str | None) -> None:
    """--weights, --offload, --memory and --max-memory names and sizes, before any model loads."""
    from ..errors import SettingsError
    from ..offload import check_modes, parse_size

    check_modes(weights or "full", offload or "none")
    if memory not in ("auto", "manual"):
        raise SettingsError("memory", f"unknown {{setting}} {memory!r}; choose auto or manual")
    parse_size(max_memory)


def check_checkpoint_path(checkpoint: Path | None) -> None:
    if checkpoint is not None and not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")


def warn_if_truncated(prompt: str) -> None:
    """A prompt longer than the text tower's 77 tokens runs with its end cut off: say so."""
    from ..tokenizer import get_tokenizer

    if prompt.strip() and get_tokenizer().is_truncated(prompt):
        console.print("[yellow]warning:[/] the prompt is longer than 77 tokens; the end is cut off", markup=True)


def progress_bar(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, disable=quiet, transient=True,
    )

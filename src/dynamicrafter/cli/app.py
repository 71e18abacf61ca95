"""The Typer app, the shared console, and the error table that turns exceptions into one-line messages.

Commands validate their inputs before any model loads, then call library functions; every expected failure
becomes one red line on stderr and a non-zero exit code (``dynamicrafter --debug ...`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from .. import __version__

app = typer.Typer(
    name="dynamicrafter",
    help="Animate a still photo into a short video with DynamiCrafter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
console = Console(stderr=True, highlight=False, soft_wrap=True)
state = {"debug": False}

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: what is finished stays, nothing partial is left, a summary is printed."""


def interrupted_code(stop: BaseException) -> int:
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`Terminated` (in the main thread only, where signals arrive)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class UsageError(ValueError):
    """A bad option value or combination."""


# The library names a setting as the Python API spells it; the CLI shows the flag that sets it.
FLAGS = {
    "steps": "--steps", "cfg_scale": "--cfg", "cfg_img": "--cfg-img", "eta": "--eta", "fs": "--fs",
    "frames": "--frames", "window": "--window/--stride", "image_scale": "--lambda", "samples": "--samples",
    "fps": "--fps", "device": "--device", "dtype": "--dtype", "layers": "--layers", "values": "--values",
    "shard": "--shard", "workers": "--workers", "batch_size": "--batch-size", "loop": "--loop",
    "end_image": "--end-image", "random_weights": "--random-weights", "seed": "--seed",
    "retry_static": "--retry-static", "prompts": "--prompts", "weights": "--weights", "offload": "--offload",
    "memory": "--memory", "max_memory": "--max-memory", "start_timestep": "--start-timestep",
    "analytic_init": "--analytic-init", "init_statistics": "--init-statistics",
}


def flag_names(text: str) -> str:
    """A library sentence naming settings (``image_scale``, ``fs``, ``seed``) with the CLI's flags instead."""
    import re

    return re.sub(r"\b(image_scale|fs|seed|steps|cfg_scale)\b", lambda m: FLAGS[m.group(1)], text)


def message(exc: BaseException) -> str:
    """The one-line message of an expected failure, a setting it names shown as its flag."""
    from ..errors import NamesSetting

    if isinstance(exc, NamesSetting):
        return exc.message_for(FLAGS.get(exc.setting, exc.setting))
    return str(exc)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of an expected failure; None for anything else (a bug, which keeps its traceback).

    The error classes are imported here, when an error happens, so that starting the CLI (``--help``) does not
    import the networks and their libraries.
    """
    from ..checkpoint import CheckpointError
    from ..errors import SettingsError
    from ..files import OutputError
    from ..hub import MissingWeightsError
    from ..images import ImageError
    from ..presets import UnknownModelError
    from ..sampling import NonFiniteError

    errors: dict[type[BaseException], int] = {
        UsageError: EXIT_USAGE,
        SettingsError: EXIT_USAGE,
        UnknownModelError: EXIT_USAGE,
        ImageError: EXIT_FAILED,
        CheckpointError: EXIT_FAILED,
        MissingWeightsError: EXIT_FAILED,
        OutputError: EXIT_FAILED,
        NonFiniteError: EXIT_FAILED,
        FileNotFoundError: EXIT_FAILED,
        ValueError: EXIT_FAILED,
    }
    return next((code for kind, code in errors.items() if isinstance(exc, kind)), None)


def _one_line_usage_error(self, file=None) -> None:
    """Click's own usage errors (a missing argument, a value of the wrong type) as one line, like every other
    error, instead of the usage block and a framed message."""
    console.print(f"[bold red]error:[/] {escape(self.format_message())} (see --help)", markup=True)


for _module in ("typer._click.exceptions", "click.exceptions"):  # typer vendors click in recent versions
    with contextlib.suppress(ImportError):
        importlib.import_module(_module).UsageError.show = _one_line_usage_error


def fail(message: str, code: int = EXIT_FAILED) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code)


F = TypeVar("F", bound=Callable)


def handle_errors(command: F) -> F:
    """Map known exceptions to a one-line error and exit code; Ctrl-C to exit 130, SIGTERM to 143."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt as stop:
            raise fail("interrupted; no partial output was left behind", interrupted_code(stop)) from None
        except Exception as exc:
            code = exit_code(exc)
            if code is None or state["debug"]:
                raise
            raise fail(escape(message(exc)), code) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dynamicrafter {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """Animate a still photo into a short video with DynamiCrafter."""
    state["debug"] = debug

"""The ``dynamicrafter`` command line: one module per command group, all registered on one Typer app."""

from .app import app
from . import animate, batch, bench, models, report, sweep, ui  # noqa: F401  (registers the commands)

__all__ = ["app"]

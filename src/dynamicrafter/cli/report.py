"""``dynamicrafter report FOLDER``: one self-contained HTML page of every video in a folder, with its measures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app, console, handle_errors


@app.command()
@handle_errors
def report(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Folder of videos and their JSON sidecars.", show_default=False)],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Page to write (default: FOLDER/report.html).")] = None,
) -> None:
    """Write an HTML page (no network needed) with every video of FOLDER, its photo, frames, settings and measures,
    sortable by any measure, flagged videos highlighted."""
    from ..report import build_report

    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    console.print(f"[green]wrote[/] {build_report(folder, out)}", markup=True)

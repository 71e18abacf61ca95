"""Files that appear whole or not at all: atomic writes, replaceable outputs, writable folders, sidecar names."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputError(OSError):
    """An output that cannot be written."""


def sidecar_path(output: Path) -> Path:
    """``clip.mp4`` -> ``clip.json``; a PNG folder ``clip/`` (or ``clip.v2/``) -> ``clip.json`` (``clip.v2.json``)."""
    output = Path(output)
    if output.suffix.lower() in (".mp4", ".gif", ".webp"):
        return output.with_suffix(".json")
    return output.with_name(output.name + ".json")


def ensure_writable_dir(folder: Path) -> Path:
    """Create ``folder`` if needed; raise OutputError when it cannot be created or written."""
    folder = Path(folder) if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from exc
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder is not writable: {folder}")
    return folder


FRAME_NAME = re.compile(r"frame_\d{4}\.png")


def check_replaceable(final: Path) -> None:
    """Raise OutputError unless ``final`` may be replaced by an output: a file, a missing path, or a frame folder
    this tool wrote (nothing but ``frame_NNNN.png`` files).  Never the current folder or one holding anything else.
    """
    final = Path(final)
    if final.name in ("", ".", ".."):
        raise OutputError(f"cannot write an output to {final or '.'}: name a file or a new folder")
    if final.is_dir():
        others = [p.name for p in final.iterdir() if not FRAME_NAME.fullmatch(p.name)]
        if others:
            raise OutputError(f"refusing to replace folder {final}: it holds other files ({others[0]}, ...)")


@contextlib.contextmanager
def atomic_path(final: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (same suffix); on success rename it to ``final``, else remove it.

    A frame folder being replaced (see :func:`check_replaceable`) is moved aside first and deleted only once the new
    one is in place; on failure it is put back.
    """
    final = Path(final)
    check_replaceable(final)
    parent = ensure_writable_dir(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=parent))
    target = tmp / "out" if is_dir else tmp / f"out{final.suffix}"
    if is_dir:
        target.mkdir(mode=0o777)  # the permissions of any new folder (mkdtemp's own are private)
    old = tmp / "old"
    try:
        yield target
        if final.is_dir():
            os.replace(final, old)
        try:
            os.replace(target, final)
        except OSError:
            if old.exists():
                os.replace(old, final)
            raise
    except OSError as exc:
        raise OutputError(f"could not write {final}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)




def check_name(final: Path) -> None:
    """Raise OutputError unless a file named like ``final`` can be created in its folder: the temporary name
    :func:`atomic_path` will use is made and removed (a name too long for the file system, an unwritable folder)."""
    final = Path(final)
    if str(final) == "-":
        raise OutputError("an output cannot be '-' (standard output): name a file or a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None


LOCK_NAME = ".dynamicrafter.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold ``folder/.dynamicrafter.lock`` (this process's pid and host) for the block: a second batch writing to
    the same folder is refused with the holder named, instead of both animating every item.  A lock whose process
    is gone (on this host) is stale and taken over."""
    import socket

    lock = Path(folder) / LOCK_NAME
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, _, holder = lock.read_text().partition(" ")
                pid = int(pid_text)
            except (OSError, ValueError):
                pid, holder = -1, ""
            if holder.strip() == host and pid > 0 and not _alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise OutputError(
                f"another batch (pid {pid} on {holder.strip() or 'an unknown host'}) is writing to {folder}; wait for "
                f"it to finish, or delete {lock} if it is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}")
        break
    else:
        raise OutputError(f"could not take the lock {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)

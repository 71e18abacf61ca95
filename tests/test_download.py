"""``dynamicrafter download`` end to end against a hub on 127.0.0.1 (tests/hub_server.py): the cache layout and
``--dir``, ``animate`` offline afterwards, an interrupted transfer resumed with a ``Range`` request, corrupted bytes
caught by the sha256 check, the disk-space check where the file will go (``HF_HOME``, ``HF_HUB_CACHE``, ``--dir``),
and the progress bar.  No test reaches beyond this machine: host names other than 127.0.0.1 fail to resolve."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
from collections import namedtuple
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynamicrafter import hub
from dynamicrafter.cli import app
from dynamicrafter.presets import get_preset, load_presets

from .conftest import FIXTURES
from .hub_server import COMMIT, LocalHub

runner = CliRunner()
EXAMPLE = Path(__file__).parents[1] / "examples" / "astronaut.jpg"
NAME, REPO, FILE = "tiny-hub", "test-org/tiny-hub", "model.ckpt"
# The tiny architecture in the release format (a .ckpt with the original key names): what the tiny preset loads.
CHECKPOINT = FIXTURES / "tiny_512_2345.ckpt"


@cache
def payload() -> tuple[bytes, str]:
    data = CHECKPOINT.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, *texts: str) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and all(t in lines[0] for t in texts), result.output
    assert "Traceback" not in result.output
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()) if folder.exists() else []


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Only 127.0.0.1 resolves: a request for any other host (huggingface.co) fails at once."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", b"127.0.0.1"):
            raise socket.gaierror(f"the download tests stay on this machine (asked for {host!r})")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def use_preset(monkeypatch, pinned: bool = True) -> None:
    """A downloadable preset of the tiny architecture, published on the local hub (pinned or not)."""
    preset = replace(get_preset("tiny"), name=NAME, description="tiny model from the local hub", repo=REPO,
                     file=FILE, sha256=payload()[1] if pinned else None, seed=None)
    monkeypatch.setitem(load_presets(), NAME, preset)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """The local hub serving the tiny checkpoint; HF_ENDPOINT points at it and HF_HOME is a fresh folder."""
    with LocalHub() as hub_server:
        hub_server.add(REPO, FILE, payload()[0])
        monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "XDG_CACHE_HOME"):
            monkeypatch.delenv(var, raising=False)
        use_preset(monkeypatch)
        yield hub_server


def cache_entry(root: Path) -> tuple[Path, Path]:
    """(snapshot link, blob) of the tiny model in the cache at ``root``, as huggingface_hub lays it out."""
    repo = root / "models--test-org--tiny-hub"
    return repo / "snapshots" / COMMIT / FILE, repo / "blobs" / payload()[1]


def test_clean_download_lands_in_the_cache_and_animate_finds_it_offline(server, tmp_path, monkeypatch):
    """huggingface_hub's layout under HF_HOME (blob, snapshot link, refs/main); then animate with HF_HUB_OFFLINE=1
    loads it without a request to the hub."""
    result = run("download", NAME, "--json")
    assert result.exit_code == 0, result.output
    link, blob = cache_entry(tmp_path / "hf-home" / "hub")
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [{"model": NAME, "path": str(link)}]
    assert link.is_symlink() and link.resolve() == blob.resolve() and blob.read_bytes() == payload()[0]
    assert (link.parents[2] / "refs" / "main").read_text() == COMMIT
    assert hub.local_weights(load_presets()[NAME]) == link
    assert not [p for p in files_under(tmp_path) if p.name.endswith(".incomplete")]
    # the Hugging Face library itself finds the file offline in the same place
    from huggingface_hub import try_to_load_from_cache

    assert try_to_load_from_cache(REPO, FILE, cache_dir=tmp_path / "hf-home" / "hub") == str(link)

    seen = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "clip.mp4"
    result = run("animate", EXAMPLE, "waving", "-m", NAME, "--steps", 1, "--no-measures", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert out.is_file() and json.loads((tmp_path / "clip.json").read_text())["model"] == NAME
    assert len(server.requests) == seen  # nothing asked of the hub


def test_download_into_a_folder(server, tmp_path):
    """--dir puts the file itself in the folder and nothing in the cache; a rerun verifies it without a transfer."""
    folder = tmp_path / "weights"
    result = run("download", NAME, "--dir", folder)
    assert result.exit_code == 0, result.output
    assert files_under(folder) == [folder / FILE] and (folder / FILE).read_bytes() == payload()[0]
    assert files_under(tmp_path / "hf-home") == []
    # a second run checks the file instead of fetching it again
    transfers = len(server.transfers())
    result = run("download", NAME, "--dir", folder)
    assert result.exit_code == 0 and "checking its sha256" in result.output, result.output
    assert len(server.transfers()) == transfers


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    """A connection cut half-way: one-line error, the half kept as .incomplete (invisible to the loader); the rerun
    asks for the rest with Range, receives only the rest, and the whole verifies."""
    data, sha = payload()
    half = len(data) // 2
    server.drop_after = half
    one_line_error(run("download", NAME), 1, f"download of {REPO}/{FILE} stopped at", "rerun to resume")
    link, blob = cache_entry(tmp_path / "hf-home" / "hub")
    partial = blob.with_name(blob.name + ".incomplete")
    assert partial.stat().st_size == half and not blob.exists() and not link.exists()
    assert hub.local_weights(load_presets()[NAME]) is None  # the loader does not see half a file

    result = run("download", NAME)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    rerun = server.transfers()[-1]
    assert rerun.range == f"bytes={half}-" and rerun.sent == len(data) - half
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == sha and not partial.exists()
    assert hub.local_weights(load_presets()[NAME]) == link


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "hub-sha256"])
def test_corrupted_bytes_are_caught_and_removed(server, tmp_path, monkeypatch, pinned):
    """A flipped byte fails the sha256 check (against the pin, or the hub's LFS sha256 when unpinned): the message
    says what happened and what to do, and no bad file remains where the loader looks."""
    use_preset(monkeypatch, pinned)
    server.corrupt = True
    source = "pinned in weights.toml" if pinned else "the hub's LFS sha256"
    line = one_line_error(run("download", NAME), 1, f"does not match the expected {payload()[1]} ({source})",
                          "the file was removed, rerun to download it again")
    assert line.startswith(f"error: {REPO}/{FILE}: sha256 ")
    assert files_under(tmp_path / "hf-home" / "hub" / "models--test-org--tiny-hub" / "blobs") == []
    assert hub.local_weights(load_presets()[NAME]) is None
    server.corrupt = False  # the advice works
    assert run("download", NAME).exit_code == 0
    assert hub.local_weights(load_presets()[NAME]) is not None


@pytest.mark.parametrize("where", ["HF_HOME", "HF_HUB_CACHE", "--dir"])
def test_too_little_disk_space_is_refused_before_any_byte(server, tmp_path, monkeypatch, where):
    """The check looks at the disk the file will go to: HF_HUB_CACHE over HF_HOME, or --dir."""
    expected = {"HF_HOME": tmp_path / "hf-home" / "hub", "HF_HUB_CACHE": tmp_path / "hub-cache",
                "--dir": tmp_path / "weights"}[where]
    if where == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(expected))
    expected.mkdir(parents=True)
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return namedtuple("usage", "total used free")(10**12, 10**12 - 10**6, 10**6)

    monkeypatch.setattr(hub.shutil, "disk_usage", disk_usage)
    args = ["--dir", expected] if where == "--dir" else []
    one_line_error(run("download", NAME, *args), 1, "not enough disk space for the tiny-hub model: 41.9 MB needed, "
                   f"1.0 MB free in {expected}")
    assert asked == [expected]
    assert files_under(tmp_path) == [] and server.transfers() == []


def test_hf_hub_cache_wins_over_hf_home(server, tmp_path, monkeypatch):
    """HF_HUB_CACHE set: the file goes there (not under HF_HOME) and the loader finds it there."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert run("download", NAME, "-q").exit_code == 0
    link, blob = cache_entry(tmp_path / "hub-cache")
    assert blob.is_file() and hub.local_weights(load_presets()[NAME]) == link
    assert files_under(tmp_path / "hf-home") == []


def test_progress_bar_on_a_terminal_and_nothing_with_quiet(server, tmp_path, monkeypatch):
    """--quiet prints nothing at all; on a terminal a bar shows the size and the speed; the library reports
    (bytes so far, total) through its callback."""
    quiet = run("download", NAME, "--dir", tmp_path / "quiet", "--quiet")
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output

    from rich.console import Console

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120)
    monkeypatch.setattr("dynamicrafter.cli.models.console", terminal)
    monkeypatch.setattr("dynamicrafter.cli.common.console", terminal)  # the bar (download_bar) draws there
    assert run("download", NAME, "--dir", tmp_path / "shown").exit_code == 0
    text = screen.getvalue()
    assert "41.9/41.9 MB" in text and re.search(r"\d+(\.\d+)? [kMG]B/s", text) and "ready" in text, text

    # the library's callback: (bytes so far, total), from 0 to the size, never backwards
    seen: list[tuple[int, int | None]] = []
    hub.fetch_weights(load_presets()[NAME], tmp_path / "callback", progress=lambda *sample: seen.append(sample))
    size = len(payload()[0])
    assert seen[0] == (0, size) and seen[-1] == (size, size) and len(seen) > 2
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))

"""Nothing lost, nothing merged, nothing half-done: the everyday situations of issue 16, each as a new user meets it."""

import json
import os
import signal
import socket

import numpy as np
import pytest
from PIL import Image

from dynamicrafter.files import LOCK_NAME
from dynamicrafter.items import collect_items

from .test_cli import EXAMPLE, FAST, no_partials, one_line_error, run


def photo(path, seed=0, size=(64, 48)):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


def summary(result) -> dict[str, dict]:
    return {os.path.basename(r["image"]): r for r in json.loads(result.stdout.strip().splitlines()[-1])}


def test_colliding_output_names_are_refused_by_name(tmp_path):
    """a.jpg, a.png and a_jpg.png (two of them would write a_jpg), x.JPG beside x.jpg (both x_jpg): every colliding
    photo fails, naming the others; the rest run.  Names are compared case-insensitively (Y.png and y.webp keep
    their suffixes, as stems that differ only in case would share a file on macOS or Windows)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "a.png", "a_jpg.png", "x.JPG", "x.jpg", "ok.png"):
        photo(folder / name)
    items = {i.image.name: i for i in collect_items(folder, "moving")}
    assert items["a.png"].problem is None and items["a.png"].name == "a_png"
    assert "a.jpg" in items["a_jpg.png"].problem and "a_jpg.png" in items["a.jpg"].problem
    assert "x.JPG" in items["x.jpg"].problem and items["ok.png"].problem is None
    photo(folder / "Y.png")
    photo(folder / "y.webp")
    names = {i.image.name: i.name for i in collect_items(folder, "moving")}
    assert (names["Y.png"], names["y.webp"]) == ("Y_png", "y_webp")
    result = run("batch", folder, "--prompt", "moving", *FAST, "--json")
    assert result.exit_code == 1
    rows = summary(result)
    assert rows["a.png"]["status"] == "done" and rows["ok.png"]["status"] == "done"
    assert all(rows[n]["status"] == "failed" for n in ("a.jpg", "a_jpg.png", "x.JPG", "x.jpg"))
    assert len(rows) == 8  # every photo accounted for


def test_the_photo_folder_can_be_the_output_folder(tmp_path):
    """A rerun with --out-dir equal to the photo folder never takes the tool's own outputs (webp) for photos."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "p.png")
    first = run("batch", folder, "--prompt", "moving", *FAST, "--out-dir", folder, "--format", "webp", "--json")
    assert first.exit_code == 0 and (folder / "p.webp").is_file()
    again = run("batch", folder, "--prompt", "moving", *FAST, "--out-dir", folder, "--format", "webp", "--json")
    assert again.exit_code == 0 and summary(again) == {"p.png": summary(again)["p.png"]}
    assert summary(again)["p.png"]["status"] == "skipped"


def test_bad_and_duplicate_manifest_rows_fail_alone(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png", "end.png"):
        photo(folder / name, seed=len(name))
    manifest = tmp_path / "prompts.csv"
    manifest.write_text("image,prompt,steps,end_image\n"
                        "a.png,waves,two,\n"        # not a number: a fails alone
                        "b.png,wind,2,end.png\n"    # fine, with an end image
                        "c.png,rain,2,\n"
                        "c.png,snow,2,\n")          # c twice: refused, both rows named
    items = {i.image.name: i for i in collect_items(folder, None, manifest)}
    assert "steps='two' is not a whole number" in items["a.png"].problem
    assert "rows 3 and 4" in items["c.png"].problem
    result = run("batch", folder, "--prompts", manifest, "--model", "tiny", "--format", "png", "--prompt", "x",
                 "--json")
    rows = summary(result)
    assert result.exit_code == 1 and rows["b.png"]["status"] == "done"
    assert rows["a.png"]["status"] == rows["c.png"]["status"] == "failed"
    record = json.loads((folder / "animated" / "b.json").read_text())
    assert record["end_image"] == str(folder / "end.png") and record["mode"] == "interp"


def test_impossible_settings_are_refused_before_loading(tmp_path, never_load):
    long_name = tmp_path / ("x" * 250 + ".mp4")
    cases = [
        (["--out", long_name], "cannot write"),
        (["--seed", 2**64], "--seed must be a whole number within"),
        (["--frames", 5_000_000], "--frames"),
        (["--out", "-"], "--out - would not go to standard output"),
    ]
    for args, text in cases:
        one_line_error(run("animate", EXAMPLE, "waving", *FAST, *args), 2, text)
    one_line_error(run("lambda-sweep", EXAMPLE, "waving", *FAST, "--values", "0.1,0.1000000001"), 2, "print the same")
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch):
    """SIGTERM in the middle of a batch: the finished item stays, nothing partial, a summary, exit 143."""
    from dynamicrafter.api import Animator

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        photo(folder / f"p{i}.png", seed=i)
    real, calls = Animator.run, []

    def terminated_on_the_second(self, requests, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, requests, **kwargs)

    monkeypatch.setattr(Animator, "run", terminated_on_the_second)
    before = signal.getsignal(signal.SIGTERM)  # (Ray, started by earlier tests, installs its own)
    result = run("batch", folder, "--prompt", "moving", *FAST)
    assert result.exit_code == 143, result.output
    assert "1 done" in result.output and "interrupted" in result.output
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone with it
    no_partials(tmp_path)
    assert not (folder / "animated" / LOCK_NAME).exists()


def test_a_second_batch_on_the_same_folder_is_refused(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "p.png")
    out = folder / "animated"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{os.getppid()} {socket.gethostname()}")  # a live process holds it
    one_line_error(run("batch", folder, "--prompt", "moving", *FAST), 1, f"another batch (pid {os.getppid()}")
    assert not (out / "p.mp4").exists()
    (out / LOCK_NAME).write_text(f"{2**22 + 12345} {socket.gethostname()}")  # its process is gone: stale
    assert run("batch", folder, "--prompt", "moving", *FAST).exit_code == 0
    assert (out / "p.mp4").is_file() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("command", [["batch", "."], ["lambda-sweep", str(EXAMPLE), "waving"]])
def test_dash_is_not_an_output_folder(command, never_load):
    result = run(*command, *FAST, "--out-dir", "-", "--prompt", "x") if command[0] == "batch" else \
        run(*command, *FAST, "--out-dir", "-")
    one_line_error(result, 2, "--out-dir - is not a folder")

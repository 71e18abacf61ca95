"""The command line as a user meets it: outputs, sidecars, resumable batches, and one-line errors for bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dynamicrafter.cli import app
from dynamicrafter.video import read_video

from .conftest import FIXTURES

runner = CliRunner()
EXAMPLE = Path(__file__).parents[1] / "examples" / "astronaut.jpg"
FAST = ["--model", "tiny", "--steps", "2"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and text in lines[0], result.output
    assert "Traceback" not in result.output


def no_partials(folder: Path):
    assert not [p for p in folder.rglob("*") if ".partial" in p.name]


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    assert any(ep.name == "dynamicrafter" and ep.value == "dynamicrafter.cli:app" for ep in entry_points(group="console_scripts"))


def test_starting_the_cli_imports_no_heavy_library():
    """``dynamicrafter --help`` used to take 4 s importing torch, transformers and diffusers: the commands import
    them only when they run."""
    import subprocess
    import sys

    code = "import sys, dynamicrafter.cli; print(sorted({'torch', 'transformers', 'diffusers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_animate_writes_video_and_sidecar(tmp_path):
    out = tmp_path / "clip.mp4"
    result = run("animate", EXAMPLE, "an astronaut waving", *FAST, "--out", out, "--seed", 7, "--json")
    assert result.exit_code == 0, result.output
    frames = read_video(out)
    assert frames.shape == (16, 128, 128, 3)
    record = json.loads((tmp_path / "clip.json").read_text())
    assert record["seed"] == 7 and record["model"] == "tiny" and record["settings"]["steps"] == 2
    assert record["prompt"] == "an astronaut waving" and "generate_s" in record["timings"] and record["version"]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["output"] == str(out)
    # the same seed gives the same video
    again = tmp_path / "again.mp4"
    assert run("animate", EXAMPLE, "an astronaut waving", *FAST, "--out", again, "--seed", 7).exit_code == 0
    assert np.array_equal(read_video(again), frames)
    # refuses to overwrite unless asked
    one_line_error(run("animate", EXAMPLE, "x", *FAST, "--out", out), 2, "--overwrite")
    no_partials(tmp_path)


@pytest.mark.parametrize("fmt,suffix", [("gif", ".gif"), ("webp", ".webp"), ("png", "")])
def test_other_formats(tmp_path, fmt, suffix):
    out = tmp_path / f"clip{suffix}"
    result = run("animate", EXAMPLE, "waving", *FAST, "--format", fmt, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert read_video(out).shape == (16, 128, 128, 3)
    assert (tmp_path / "clip.json").exists()
    if fmt == "png":  # the frame folder gets ordinary permissions, not mkdtemp's private 0700
        import os

        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_out_suffix_and_format_must_agree(tmp_path, never_load):
    one_line_error(run("animate", EXAMPLE, "waving", *FAST, "--out", tmp_path / "x.mp4", "--format", "gif"), 2,
                   "means '.mp4' but --format is gif")
    one_line_error(run("animate", EXAMPLE, "waving", *FAST, "--out", tmp_path / "frames", "--format", "mp4"), 2,
                   "means a folder of PNG frames")
    assert list(tmp_path.iterdir()) == []
    from dynamicrafter.cli.animate import output_paths

    # dotted names: a frame folder may hold dots, a video suffix decides the format
    assert output_paths(Path("photo.v2.jpg"), None, "png", 1) == ([Path("photo.v2")], "png")
    assert output_paths(Path("p.jpg"), Path("lambda_0.5"), "png", 1) == ([Path("lambda_0.5")], "png")
    assert output_paths(Path("photo.v2.jpg"), None, "gif", 1) == ([Path("photo.v2.gif")], "gif")
    assert output_paths(Path("p.jpg"), Path("c.MP4"), None, 2)[1] == "mp4"


def test_an_existing_sidecar_is_not_replaced_silently(tmp_path, never_load):
    """clip.json of an earlier clip.mp4 would be rewritten by a run asking for clip.gif: refused without --overwrite."""
    (tmp_path / "clip.json").write_text("{}")
    one_line_error(run("animate", EXAMPLE, "waving", *FAST, "--out", tmp_path / "clip.gif"), 2, "the sidecar this run writes")
    assert (tmp_path / "clip.json").read_text() == "{}"


def test_samples_get_consecutive_seeds(tmp_path):
    result = run("animate", EXAMPLE, "waving", *FAST, "--samples", 2, "--seed", 5, "--out", tmp_path / "s.mp4", "-q")
    assert result.exit_code == 0, result.output
    seeds = [json.loads((tmp_path / f"s_sample{i}.json").read_text())["seed"] for i in range(2)]
    assert seeds == [5, 6]
    assert not np.array_equal(read_video(tmp_path / "s_sample0.mp4"), read_video(tmp_path / "s_sample1.mp4"))


@pytest.mark.parametrize(
    "make,code,text",
    [
        (lambda d: d / "missing.png", 1, "image not found"),
        (lambda d: d, 1, "directory"),
        (lambda d: (d / "notes.png").write_text("hello") and d / "notes.png", 1, "not a readable image"),
        (lambda d: Image.new("RGB", (1, 1)).save(d / "dot.png") or d / "dot.png", 1, "too small"),
    ],
)
def test_bad_images_fail_cleanly(tmp_path, never_load, make, code, text):
    one_line_error(run("animate", make(tmp_path), "waving", "--model", "tiny"), code, text)


def test_bad_options_fail_before_loading(tmp_path, never_load):
    one_line_error(run("animate", EXAMPLE, "   ", "--model", "tiny"), 2, "prompt is empty")
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "huge"), 2, "unknown model 'huge'")
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "tiny", "--steps", 61), 2, "use 60 or 62 steps")
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "tiny", "--format", "avi"), 2, "unknown --format")
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "tiny", "--device", "cuda"), 2, "no CUDA GPU")
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "tiny", "--out", blocker / "x.mp4"), 1, "cannot create output folder")
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "tiny", "--checkpoint", tmp_path / "no.ckpt"), 1, "checkpoint not found")


def test_unwritable_output_folder(tmp_path, monkeypatch, never_load):
    import os

    real = os.access  # root ignores permission bits: simulate a read-only folder
    monkeypatch.setattr(os, "access", lambda path, mode: "read-only" not in str(path) and real(path, mode))
    target = tmp_path / "read-only" / "x.mp4"
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "tiny", "--out", target), 1, "not writable")


def test_long_prompt_warns_and_runs(tmp_path):
    prompt = " ".join(["waving"] * 100)
    result = run("animate", EXAMPLE, prompt, *FAST, "--out", tmp_path / "x.mp4")
    assert result.exit_code == 0 and "longer than 77 tokens" in result.output


def test_wrong_checkpoint_for_model(tmp_path):
    result = run("animate", EXAMPLE, "waving", "--model", "512", "--checkpoint", FIXTURES / "tiny_256_1234.ckpt",
                 "--out", tmp_path / "x.mp4")
    one_line_error(result, 1, "does not fit the 512 model")
    assert "Hint: this looks like a custom architecture" in result.output
    assert not (tmp_path / "x.mp4").exists()


def test_missing_weights_offline_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("dynamicrafter.hub.local_weights", lambda preset: None)
    one_line_error(run("animate", EXAMPLE, "waving", "--model", "512", "--out", tmp_path / "x.mp4"), 1,
                   "dynamicrafter download 512")


def test_disk_full_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import imageio.v2 as imageio

    real = imageio.get_writer

    class Failing:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)
            self.count = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

        def append_data(self, frame):
            self.count += 1
            if self.count == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.inner.append_data(frame)

    monkeypatch.setattr(imageio, "get_writer", Failing)
    one_line_error(run("animate", EXAMPLE, "waving", *FAST, "--out", tmp_path / "x.mp4"), 1, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def make_folder(tmp_path, n=3):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(200, 150), (90, 160), (128, 128), (64, 64)]
    for i in range(n):
        Image.fromarray((rng.random(sizes[i][::-1] + (3,)) * 255).astype(np.uint8)).save(folder / f"p{i}.{'PNG' if i == 1 else 'jpg'}")
    (folder / "p0.txt").write_text("waves on the sea\n")
    return folder


def test_batch_resumes_reports_and_shards(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    result = run("batch", folder, "--prompt", "moving", "--out-dir", out, *FAST, "--batch-size", 2)
    assert result.exit_code == 1  # one item failed
    assert "broken.png" in result.output and "3 done, 0 skipped, 1 failed" in result.output
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(records) == {"p0", "p1", "p2"}
    assert records["p0"]["prompt"] == "waves on the sea" and records["p1"]["prompt"] == "moving"
    from dynamicrafter.items import item_seed

    assert records["p2"]["seed"] == item_seed(123, "p2.jpg")
    result = run("batch", folder, "--prompt", "moving", "--out-dir", out, *FAST, "--json")
    rows = {r["image"].rsplit("/", 1)[-1]: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert [rows[f"p{i}.{'PNG' if i == 1 else 'jpg'}"]["status"] for i in range(3)] == ["skipped"] * 3
    assert rows["p2.jpg"]["seed"] == records["p2"]["seed"]  # a skipped item shows the seed its sidecar records
    shard1 = run("batch", folder, "--prompt", "m", "--out-dir", tmp_path / "s", *FAST, "--shard", "1/2", "--json")
    shard2 = run("batch", folder, "--prompt", "m", "--out-dir", tmp_path / "s", *FAST, "--shard", "2/2", "--json")
    names = [[r["image"] for r in json.loads(s.stdout.strip().splitlines()[-1])] for s in (shard1, shard2)]
    assert not set(names[0]) & set(names[1]) and len(names[0]) + len(names[1]) == 4
    no_partials(tmp_path)


def test_batch_matches_single_animate(tmp_path):
    """An item's video depends only on its own seed: batch (any batch size) and animate agree."""
    folder = make_folder(tmp_path, 2)
    png = ["--format", "png", "-q"]
    run("batch", folder, "--prompt", "moving", "--out-dir", tmp_path / "b1", *FAST, *png)
    run("batch", folder, "--prompt", "moving", "--out-dir", tmp_path / "b2", *FAST, *png, "--batch-size", 2)
    seed = json.loads((tmp_path / "b1" / "p1.json").read_text())["seed"]
    run("animate", folder / "p1.PNG", "moving", *FAST, *png, "--seed", seed, "--out", tmp_path / "single")
    single = read_video(tmp_path / "single")
    assert np.array_equal(read_video(tmp_path / "b1" / "p1"), single)
    batched = read_video(tmp_path / "b2" / "p1").astype(int)
    assert np.abs(batched - single).mean() < 0.05  # float reordering only (random tiny weights amplify it a little)


def test_batch_manifest_and_interrupt(tmp_path, monkeypatch):
    folder = make_folder(tmp_path)
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(
        '{"image": "p0.jpg", "prompt": "zoom", "seed": 42}\n{"image": "p1.PNG", "prompt": "pan", "steps": 4}\n'
    )
    import dynamicrafter.pipeline as pipeline

    real = pipeline.animate
    calls = {"n": 0}

    def interrupt_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "animate", interrupt_second)
    out = tmp_path / "out"
    result = run("batch", folder, "--prompts", manifest, "--prompt", "default", "--out-dir", out, *FAST)
    assert result.exit_code == 130 and "rerun" in result.output
    assert len(list(out.glob("*.mp4"))) == 1
    no_partials(out)
    monkeypatch.setattr(pipeline, "animate", real)
    result = run("batch", folder, "--prompts", manifest, "--prompt", "default", "--out-dir", out, *FAST)
    assert result.exit_code == 0 and "2 done, 1 skipped" in result.output
    records = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert records["p0"]["seed"] == 42 and records["p1"]["settings"]["steps"] == 4
    assert records["p1"]["prompt"] == "pan" and records["p2"]["prompt"] == "default"


def test_batch_items_keep_their_seed_when_a_namesake_arrives(tmp_path):
    """Adding a.jpg beside a.png renames a.png's output (a_png) but keeps its seed (from the photo's file name);
    a manifest row whose photo is missing is an item that fails, not a silent skip."""
    from dynamicrafter.items import collect_items, seed_of

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    before = {i.image.name: (i.name, seed_of(i, 7)) for i in collect_items(folder, prompt="x")}
    Image.new("RGB", (64, 64)).save(folder / "a.jpg")
    after = {i.image.name: (i.name, seed_of(i, 7)) for i in collect_items(folder, prompt="x")}
    assert before["a.png"] == ("a", after["a.png"][1]) and after["a.png"][0] == "a_png" and after["a.jpg"][0] == "a_jpg"
    assert after["a.png"][1] != after["a.jpg"][1]
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt\nghost.png,boo\n")
    (folder / "a.jpg").unlink()
    (folder / "a.png").unlink()
    result = run("batch", folder, "--prompts", manifest, "--out-dir", tmp_path / "out", *FAST)
    assert result.exit_code == 1 and "ghost.png" in result.output and "1 failed" in result.output, result.output
    quiet = run("batch", folder, "--prompts", manifest, "--out-dir", tmp_path / "out", *FAST, "-q")
    assert quiet.exit_code == 1 and quiet.output.strip() == f"error: ghost.png: image not found: {folder / 'ghost.png'}"


def test_models_lists_presets():
    result = run("models", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"256", "512", "1024", "512-interp", "cil-512", "cil-1024", "toon", "tiny", "tiny-toon", "toy"}
    assert rows["toy"]["local"] == "shipped" and rows["toy"]["path"].endswith("toy.safetensors")
    assert rows["toon"]["size_gb"] == 10.5 and rows["tiny-toon"]["local"] == "built in"
    assert rows["tiny"]["local"] == "built in" and rows["1024"]["resolution"] == "576x1024"


def test_download_offline_and_builtin(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine has downloaded
    one_line_error(run("download", "256"), 1, "HF_HUB_OFFLINE")
    one_line_error(run("download", "tiny"), 2, "built in")
    one_line_error(run("download", "toy"), 2, "ships with the tool")


def test_convert_roundtrip(tmp_path):
    """convert keeps exactly the inference weights, in fp16, and the loader takes the result."""
    import torch

    from dynamicrafter.checkpoint import load_model, read_checkpoint
    from dynamicrafter.presets import get_preset

    ckpt = FIXTURES / "tiny_512_2345.ckpt"  # the tiny preset's architecture, in the original format
    out = tmp_path / "tiny.safetensors"
    result = run("convert", ckpt, "--out", out, "--model", "tiny", "--dtype", "fp16", "--json")
    assert result.exit_code == 0, result.output
    cfg = get_preset("tiny").model_config()
    reference = load_model(cfg, ckpt).state_dict()
    converted = read_checkpoint(out)
    assert set(converted) == set(reference)  # unused keys (schedule buffers, CLIP leftovers) are gone
    assert all(v.dtype == torch.float16 for v in converted.values() if v.is_floating_point())
    loaded = load_model(cfg, out).state_dict()
    assert all(torch.equal(loaded[k], reference[k].half().float()) for k in reference)
    one_line_error(run("convert", ckpt, "--out", out, "--model", "tiny"), 2, "--overwrite")
    one_line_error(run("convert", ckpt, "--out", tmp_path / "x.safetensors", "--model", "512"), 1, "does not fit the 512 model")


def test_lambda_sweep_outputs_and_measures(tmp_path):
    out = tmp_path / "sweep"
    result = run("lambda-sweep", EXAMPLE, "waving", *FAST, "--values", "0,1", "--layers", "input", "--out-dir", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["lambda"] for r in record["results"]] == [0.0, 1.0] and record["blocks"] == [0, 1, 2, 3, 4, 5]
    assert record["batch_size"] == 2  # both λ values in one batch
    for r in record["results"]:
        assert 0 <= r["motion"] <= 1 and -1 <= r["conformity"] <= 1
    grid, a, b = (read_video(out / name) for name in ("grid.mp4", "lambda_0.mp4", "lambda_1.mp4"))
    assert grid.shape == (16, 128 + 20, 2 * 128, 3) and a.shape == b.shape == (16, 128, 128, 3)
    assert not np.array_equal(a, b)  # λ on the input layers changes the video
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 128, 2 * (128 + 20))
    assert Image.open(out / "chart.png").size[0] > 0
    one_line_error(run("lambda-sweep", EXAMPLE, "waving", *FAST, "--layers", "99", "--out-dir", out), 2, "between 0 and 15")
    assert record["results"][0]["video"] == "lambda_0.mp4"  # relative to the sweep folder, which may move
    # --overwrite with other values removes the videos of λ values no longer swept, and nothing else
    (out / "notes.txt").write_text("mine")
    result = run("lambda-sweep", EXAMPLE, "waving", *FAST, "--values", "1", "--out-dir", out, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert not (out / "lambda_0.mp4").exists() and (out / "lambda_1.mp4").exists() and (out / "notes.txt").exists()


@pytest.mark.parametrize(("values", "message"), [
    ("0,0", "lists 0 more than once"), ("0,,1", "empty entry"), ("nan,1", "finite"), ("", "empty"), ("a", "numbers"),
])
def test_lambda_values_are_checked_first(tmp_path, never_load, values, message):
    out = tmp_path / "sweep"
    one_line_error(run("lambda-sweep", EXAMPLE, "waving", *FAST, "--values", values, "--out-dir", out), 2, message)


def test_option_values_get_one_line_errors(tmp_path, never_load):
    """Click's own errors (a missing argument, a wrong type, an out-of-range value) and ours read alike: one line,
    exit 2, nothing written."""
    one_line_error(run("animate", EXAMPLE), 2, "Missing argument")
    one_line_error(run("animate", EXAMPLE, "x", "--steps", "abc"), 2, "--steps")
    one_line_error(run("lambda-sweep", EXAMPLE, "x", "--batch-size", "0"), 2, "--batch-size")
    for fps in ("0", "-3"):
        one_line_error(run("animate", EXAMPLE, "x", *FAST, "--fps", fps, "--out", tmp_path / "a.gif"), 2, "--fps must be")
    one_line_error(run("animate", EXAMPLE, "x", *FAST, "--cfg", "nan", "--out", tmp_path / "a.mp4"), 2, "--cfg must be")
    one_line_error(run("animate", EXAMPLE, "x", *FAST, "--out", tmp_path / "w.txt"), 2, "unsupported output type")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_never_replaces_a_folder_of_other_files(tmp_path, monkeypatch, never_load):
    work = tmp_path / "mywork"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    one_line_error(run("animate", EXAMPLE, "x", *FAST, "--out", work, "--format", "png", "--overwrite"), 2,
                   "refusing to replace folder")
    monkeypatch.chdir(work)
    one_line_error(run("animate", EXAMPLE, "x", *FAST, "--out", ".", "--format", "png", "--overwrite"), 2,
                   "cannot write an output to .")
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


def test_a_frame_folder_is_replaced_only_once_the_new_one_is_complete(tmp_path):
    from dynamicrafter.files import OutputError, atomic_path, sidecar_path
    from dynamicrafter.video import write_frames

    frames = np.zeros((2, 8, 8, 3), np.uint8)
    folder = write_frames(frames, tmp_path / "clip.v2", 8, "png")
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "frame_0001.png"]
    assert sidecar_path(folder).name == "clip.v2.json"  # a dotted folder keeps its whole name
    with pytest.raises(OutputError):
        with atomic_path(folder, is_dir=True) as tmp:
            (tmp / "frame_0000.png").write_bytes(b"new")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in folder.iterdir()) == ["frame_0000.png", "frame_0001.png"]  # the old one stays
    write_frames(frames[:1], folder, 8, "png")
    assert [p.name for p in folder.iterdir()] == ["frame_0000.png"]
    no_partials(tmp_path)


@pytest.mark.parametrize("frames", [16, 24])
def test_lambda_values_batched_equal_one_run_per_value(frames):
    """λ values as samples of one UNet batch give the videos of one run per λ (float64, so only the batching is
    tested), for a plain and a windowed (24 frames: two windows) run."""
    import torch

    from dynamicrafter.checkpoint import build_random
    from dynamicrafter.sweep import sweep_videos
    from dynamicrafter.presets import get_preset

    preset = get_preset("tiny")
    net = build_random(preset.model_config(), 0, dtype=torch.float64)
    settings = preset.sampling(steps=2, frames=frames)
    start = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    calls = []
    net.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    videos = {}
    for size in (None, 1):
        videos[size], used = sweep_videos(net, start, "waving", settings, 5, [0.0, 0.5, 1.0], [0, 1, 2, 3, 4, 5], batch_size=size)
        assert used == (size or 3)
    windows = 1 if frames == 16 else 2
    assert calls == [2 * 3 * windows] * 2 + [2 * windows] * 6  # all λ in each step's call, then one λ per call
    for a, b in zip(videos[None], videos[1]):
        assert (a - b).abs().max() < 1e-7  # float64 rounding of different batch sizes, amplified by guidance
    assert (videos[1][0] - videos[1][2]).abs().max() > 1e-3  # λ matters


def test_non_finite_sampling_writes_nothing(tmp_path, monkeypatch):
    """NaN from the sampler (a reduced-precision overflow) is a one-line error that names the way out, and no file
    is written."""
    import torch

    import dynamicrafter.pipeline as pipeline

    monkeypatch.setattr(pipeline, "sample", lambda *a, **k: torch.full((1, 4, 16, 16, 16), float("nan")))
    out = tmp_path / "clip.mp4"
    one_line_error(run("animate", EXAMPLE, "waving", *FAST, "--out", out), 1, "in float32: the checkpoint or the settings")
    one_line_error(run("animate", EXAMPLE, "waving", *FAST, "--out", out, "--dtype", "bf16"), 1, "in bfloat16; rerun with --dtype fp32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["animate", "batch", "lambda-sweep", "convert", "download"])
def test_commands_that_write_files_take_quiet_verbose_and_json(command):
    text = run(command, "--help").output
    assert all(option in text for option in ("--quiet", "--verbose", "--json")), text

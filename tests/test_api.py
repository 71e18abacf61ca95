"""The public Python API: what a script gets, what it is refused, and that calls leave nothing behind."""

import json

import numpy as np
import pytest
import torch

from dynamicrafter import Animator, SettingsError, make_request
from dynamicrafter.files import OutputError
from dynamicrafter.video import read_video

from .test_cli import EXAMPLE, run


@pytest.fixture(scope="module")
def anim():
    return Animator.load("tiny", device="cpu")


def test_animate_save_matches_the_cli_byte_for_byte(anim, tmp_path):
    steps: list[tuple[int, int]] = []
    result = anim.animate(EXAMPLE, "an astronaut waving", steps=3, seed=7, image_scale=0.5,
                          progress=lambda i, n: steps.append((i, n)))
    assert steps == [(0, 3), (1, 3), (2, 3)]
    assert result.frames.shape == (16, 128, 128, 3) and result.frames.dtype == np.uint8
    path = result.save(tmp_path / "api.mp4")
    cli = run("animate", EXAMPLE, "an astronaut waving", "--model", "tiny", "--steps", 3, "--seed", 7, "--lambda", 0.5,
              "--out", tmp_path / "cli.mp4")
    assert cli.exit_code == 0, cli.output
    assert path.read_bytes() == (tmp_path / "cli.mp4").read_bytes()
    api, cli_record = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("api", "cli"))
    for record in (api, cli_record):
        record.pop("timings"), record.pop("output")
    assert api == cli_record and api["image_scale"] == 0.5 and api["seed"] == 7
    with pytest.raises(OutputError, match="exists"):
        result.save(tmp_path / "api.mp4")
    assert np.array_equal(read_video(result.save(tmp_path / "frames", fmt="png")), result.frames)


def test_a_call_leaves_no_state_behind(anim):
    """λ is data: a run with λ = 0 changes nothing for the next run (same video as a fresh model's)."""
    plain = anim.animate(EXAMPLE, "waving", steps=2, seed=3).frames
    anim.animate(EXAMPLE, "waving", steps=2, seed=3, image_scale=0.0)
    assert np.array_equal(anim.animate(EXAMPLE, "waving", steps=2, seed=3).frames, plain)
    fresh = Animator.load("tiny", device="cpu").animate(EXAMPLE, "waving", steps=2, seed=3).frames
    assert np.array_equal(fresh, plain)


def test_run_batches_requests_and_samples(anim):
    """Two requests, one with two samples: one UNet batch of 3 per branch, seeds in order, each video equal to its
    own single run."""
    calls: list[int] = []
    handle = anim.net.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        results = anim.run([anim.request(EXAMPLE, "waving", seed=1, steps=2, samples=2),
                            anim.request(np.full((90, 120, 3), 200, np.uint8), "a grey wall", seed=9, steps=2)])
    finally:
        handle.remove()
    assert [r.seed for r in results] == [1, 2, 9] and calls == [6, 6]  # cond + uncond branches of 3 samples
    alone = anim.animate(EXAMPLE, "waving", seed=2, steps=2).frames
    assert np.abs(results[1].frames.astype(int) - alone.astype(int)).max() <= 1  # batching: float rounding only
    assert results[2].record()["image"] is None  # an in-memory picture has no path
    with pytest.raises(ValueError, match="share settings"):
        anim.run([anim.request(EXAMPLE, "a", steps=2), anim.request(EXAMPLE, "b", steps=3)])


def test_settings_errors_name_the_setting():
    cases = [({"steps": 0}, "steps"), ({"cfg_scale": float("nan")}, "cfg_scale"), ({"image_scale": float("inf")},
             "image_scale"), ({"frames": 40, "stride": 20}, "window"), ({"samples": 0}, "samples")]
    for options, setting in cases:
        with pytest.raises(SettingsError) as info:
            make_request("tiny", EXAMPLE, "waving", **options)
        assert info.value.setting == setting and setting in str(info.value)
    with pytest.raises(SettingsError, match="prompt is empty"):
        make_request("tiny", EXAMPLE, "  ")
    with pytest.raises(SettingsError) as info:
        Animator.load("tiny", dtype="fp8")
    assert info.value.setting == "dtype" and info.value.message_for("--dtype").startswith("unknown --dtype")
    with pytest.raises(TypeError, match="unknown sampling settings: stepz"):
        make_request("tiny", EXAMPLE, "waving", stepz=3)


def test_the_cli_shows_flags_for_settings(never_load):
    result = run("animate", EXAMPLE, "waving", "--model", "tiny", "--steps", 0)
    assert result.exit_code == 2 and "error: --steps must be at least 1" in result.output
    result = run("animate", EXAMPLE, "waving", "--model", "tiny", "--lambda", "nan")
    assert result.exit_code == 2 and "error: --lambda must be a finite number" in result.output


def test_batch_and_sweep_validate_before_loading(tmp_path, never_load):
    """The guard covers every command that loads a model: batch and lambda-sweep refuse bad options first."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(EXAMPLE.read_bytes())
    for args, text in [(["--steps", 0], "--steps must be at least 1"), (["--fps", 0], "--fps must be at least 1"),
                       (["--dtype", "fp8"], "unknown --dtype")]:
        result = run("batch", folder, "--prompt", "waving", "--model", "tiny", *args)
        assert result.exit_code == 2 and text in result.output, result.output
        result = run("lambda-sweep", EXAMPLE, "waving", "--model", "tiny", *args)
        assert result.exit_code == 2 and text in result.output, result.output
    result = run("lambda-sweep", EXAMPLE, "waving", "--model", "tiny", "--layers", "99")
    assert result.exit_code == 2 and "--layers indices must be between 0 and" in result.output


def test_sweep_through_the_api_equals_separate_runs(anim, tmp_path):
    sweep = anim.sweep(EXAMPLE, "waving", [0.0, 1.0], steps=2, seed=4)
    single = anim.animate(EXAMPLE, "waving", steps=2, seed=4, image_scale=0.0).frames
    assert np.abs(sweep.clips[0].astype(int) - single.astype(int)).max() <= 1
    record = sweep.save(tmp_path / "sweep")
    assert [r["video"] for r in record["results"]] == ["lambda_0.mp4", "lambda_1.mp4"]
    assert torch.is_tensor(sweep.request.start)


def test_every_output_is_measured_and_batches_write_a_report(tmp_path):
    """animate's sidecar has the measures (unless --no-measures); batch writes report.html listing a failed item."""
    out = tmp_path / "clip.mp4"
    assert run("animate", EXAMPLE, "waving", "--model", "tiny", "--steps", 2, "--out", out).exit_code == 0
    measures = json.loads(out.with_suffix(".json").read_text())["measures"]
    assert measures["version"] == 1 and set(measures) >= {"motion", "dynamic_degree", "moving", "conformity",
                                                          "conformity_min", "temporal_consistency", "flags"}
    assert run("animate", EXAMPLE, "waving", "--model", "tiny", "--steps", 2, "--out", tmp_path / "n.mp4",
               "--no-measures").exit_code == 0
    assert json.loads((tmp_path / "n.json").read_text())["measures"] is None
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(EXAMPLE.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    result = run("batch", folder, "--prompt", "waving", "--model", "tiny", "--steps", 2)
    assert result.exit_code == 1
    page = (folder / "animated" / "report.html").read_text()
    assert "a.mp4" in page and "broken.png" in page and "http://" not in page and "https://" not in page


def test_a_static_video_warns_and_is_retried_with_the_next_seed(tmp_path, monkeypatch):
    """--retry-static 2: the first video measures static, so seed 124 runs next; the sidecar records the attempt,
    and a video still flagged gets a one-line warning in CLI words."""
    import dynamicrafter.measures as measures

    real, calls = measures.measure_video, []

    def first_static(frames, **kwargs):
        calls.append(1)
        m = real(frames, **kwargs)
        return {**m, "moving": False, "flags": ["static"]} if len(calls) == 1 else m

    monkeypatch.setattr(measures, "measure_video", first_static)
    out = tmp_path / "clip.mp4"
    result = run("animate", EXAMPLE, "waving", "--model", "tiny", "--steps", 2, "--out", out, "--retry-static", 2)
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["seed"] == 124 and [a["seed"] for a in record["attempts"]] == [123]
    assert record["attempts"][0]["measures"]["flags"] == ["static"] and "static" not in record["measures"]["flags"]
    assert "after 1 static attempt" in result.output

    monkeypatch.setattr(measures, "measure_video", lambda frames, **k: {**real(frames, **k), "flags": ["static"]})
    result = run("animate", EXAMPLE, "waving", "--model", "tiny", "--steps", 2, "--out", tmp_path / "s.mp4")
    assert result.exit_code == 0 and "warning: s.mp4: the video barely moves: try a smaller --lambda" in result.output
    assert json.loads((tmp_path / "s.json").read_text()).get("attempts") is None


def test_bench_reports_the_cost_of_the_measures():
    result = run("bench", "--model", "tiny", "--device", "cpu", "--steps", 2, "--frames", 4, "--json")
    assert result.exit_code == 0, result.output
    assert 0 < json.loads(result.stdout.strip().splitlines()[-1])["measures_s"] < 60

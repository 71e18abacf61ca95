"""``dynamicrafter bench``: the JSON report of a real tiny run, settings passed through, FLOP counting, usage errors."""

import json
from dataclasses import fields

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from dynamicrafter.bench import BenchResult, unet_flops
from dynamicrafter.checkpoint import build_random
from dynamicrafter.cli import app
from dynamicrafter.memory import decode_within_peak
from dynamicrafter.pipeline import decode_latents
from dynamicrafter.presets import get_preset

runner = CliRunner()
TIMES = ("build_s", "encode_s", "unet_call_s", "step_s", "first_step_s", "sample_s", "decode_s", "end_to_end_s")


def bench(*args: object) -> dict:
    result = runner.invoke(app, ["bench", "--model", "tiny", "--device", "cpu", "--json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_report_of_a_tiny_run() -> None:
    report = bench("--steps", 2)
    assert set(report) == {f.name for f in fields(BenchResult)}
    assert all(report[key] > 0 for key in TIMES), report
    assert report["sample_s"] >= report["step_s"] and report["end_to_end_s"] >= report["sample_s"] + report["decode_s"]
    assert report["peak_memory_gib"] > 0 and report["memory_kind"] == "process peak RSS"
    assert report["unet_tflop"] > 0 and report["tflops"] > 0
    assert abs(report["tflops"] - report["unet_tflop"] / report["unet_call_s"]) < 1e-9
    assert (report["model"], report["device"], report["dtype"]) == ("tiny", "cpu", "float32")
    shape = (report["height"], report["width"], report["frames"], report["steps"], report["batch"])
    assert shape == (128, 128, 16, 2, 1)
    assert report["unet_batch"] == 2 and report["unet_calls"] == 2  # cond + uncond batched: one call a step
    assert report["finite"] is True


def test_settings_pass_through() -> None:
    report = bench("--steps", 1, "--height", 64, "--width", 128, "--frames", 8, "--batch", 2, "--seed", 3)
    assert (report["height"], report["width"], report["frames"], report["steps"], report["batch"]) == (64, 128, 8, 1, 2)
    assert report["weights"] == "random (seed 3)" and report["unet_calls"] == 1 and report["unet_batch"] == 4
    assert report["finite"] is True


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["--random-weights", "--checkpoint", "missing.ckpt"], 2, "exclude each other"),
        (["--height", "100"], 1, "multiples of 64"),
        (["--batch", "0"], 2, "--batch"),
        (["--dtype", "fp8"], 2, "--dtype"),
    ],
)
def test_bad_arguments_give_one_line_errors(args: list[str], code: int, text: str) -> None:
    result = runner.invoke(app, ["bench", "--model", "tiny", "--device", "cpu", *args])
    assert result.exit_code == code and text in result.output and "Traceback" not in result.output


def test_released_model_needs_weights_or_random(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("dynamicrafter.hub.local_weights", lambda preset: None)
    result = runner.invoke(app, ["bench", "--model", "256", "--device", "cpu"])
    assert result.exit_code == 2 and "--random-weights" in result.output


def test_flops_counted_on_meta_equal_a_real_call(tiny, monkeypatch) -> None:
    """The meta-device count equals FlopCounterMode around a real call that reuses the projected context.

    (The real call takes ``F.linear`` and the math attention: the counter sees neither the oneDNN matmul nor the
    fused attention kernel of CPU inference, which is why the benchmark counts on the meta device.)
    """
    monkeypatch.setattr("dynamicrafter.models.ops._onednn_matmul", lambda: False)
    x, t = torch.randn(2, 8, 16, 8, 8), torch.tensor([500, 500])
    context, fs = torch.randn(2, 77 + 16 * 16, 32), torch.tensor([24, 24])
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        prepared = tiny.unet.prepare(context, fs, 16)
        with counter:
            tiny.unet(x, t, prepared)
    assert unet_flops(tiny, x, t, prepared) == counter.get_total_flops() > 0


def test_decode_on_cpu_is_the_pipeline_decode(tiny) -> None:
    latents = torch.randn(1, 4, 3, 8, 8)
    video, chunk = decode_within_peak(tiny, latents, decode_latents)
    assert chunk == 4 and torch.equal(video, decode_latents(tiny, latents))


def test_animate_places_the_parts_before_each_stage(tiny, monkeypatch) -> None:
    """The memory policy the benchmark measures is the one every run follows: before encoding, sampling and decoding
    the parts go where the offload mode wants them (the encoders leave after encoding unless a caller keeps them)."""
    from dynamicrafter import pipeline

    events: list[tuple] = []
    encode = pipeline.make_conditioning
    monkeypatch.setattr(pipeline, "make_conditioning", lambda *a, **k: events.append(("encoding",)) or encode(*a, **k))
    monkeypatch.setattr(pipeline, "place", lambda model, stage, keep=False: events.append((stage, keep)))
    settings = get_preset("tiny").sampling(steps=2, frames=4)
    image = torch.zeros(1, 3, 64, 64)
    pipeline.animate(tiny, image, ["a cat"], settings, [0])
    assert events == [("encode", False), ("encoding",), ("sample", False), ("decode", False)]
    events.clear()
    pipeline.animate(tiny, image, ["a cat"], settings, [0], keep_encoders=True)
    assert events == [("encode", False), ("encoding",), ("sample", True), ("decode", True)]


def test_decode_builds_no_autograd_graph(tiny) -> None:
    """decode_latents runs without autograd even when called outside ``no_grad`` with trainable weights (its
    ``no_grad`` decorator once slid onto a helper defined above it)."""
    tiny.vae.requires_grad_(True)
    try:
        video = decode_latents(tiny, torch.randn(1, 4, 2, 8, 8))
    finally:
        tiny.vae.requires_grad_(False)
    assert not video.requires_grad

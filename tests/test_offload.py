"""Smaller GPUs (issue 14), tested on the CPU: 8-bit weight storage, offloading modes, the automatic memory mode,
the 8-bit converted file, Apple MPS defaults."""

import copy

import numpy as np
import pytest
import torch

from dynamicrafter import Animator
from dynamicrafter.checkpoint import build_random, build_skeleton, load_model, read_checkpoint
from dynamicrafter.errors import SettingsError
from dynamicrafter.offload import ON_DEVICE, PARTS, choose, parse_size, place, store_in_fp8, weight_bytes
from dynamicrafter.presets import get_preset

from .conftest import FIXTURES, rel_err, scenario
from .test_cli import EXAMPLE, run

GIB = 2**30
FP8_FIXTURE_TOL = 0.2  # e4m3 keeps 3 mantissa bits: each weight moves by up to 2^-4 (6 %); measured 0.12 here


def probe(model, name="i2v_512_style"):
    info, _, exp = scenario(name)
    x = torch.cat([exp["probe_x_t"], exp["concat_latent"]], dim=1)
    ctx = torch.cat([exp["text_emb"], exp["image_ctx"]], dim=1)
    with torch.no_grad():
        return model.unet(x, torch.tensor([info["inputs"]["probe_t"]]), ctx, torch.tensor([info["inputs"]["fs"]]))


def test_fp8_storage_on_the_fixture_probe():
    """The recorded 512-style probe with the UNet stored in float8: within FP8_FIXTURE_TOL of the original's output;
    the weights really are 8-bit at rest (and the first convolution, a norm, stay as they were)."""
    _, cfg, exp = scenario("i2v_512_style")
    model = load_model(cfg, FIXTURES / "tiny_512_2345.ckpt")
    store_in_fp8(model)
    block = model.unet.input_blocks[1]
    assert block[0].in_layers[2].weight.dtype == torch.float8_e4m3fn
    assert model.unet.input_blocks[0][0].weight.dtype == torch.float32
    assert block[0].in_layers[0].weight.dtype == torch.float32  # GroupNorm
    err = rel_err(probe(model), exp["probe_unet_out"])
    assert 0 < err < FP8_FIXTURE_TOL, err
    assert block[0].in_layers[2].weight.dtype == torch.float8_e4m3fn  # back to 8 bits after the call


@pytest.mark.slow
def test_fp8_error_of_the_full_width_256_unet():
    """One call of the released 256 architecture (random weights, 64x64 pixels, 16 frames): fp8 storage against
    fp32 and against fp16 compute; the figures go to the README."""
    from .test_precision import unet_inputs

    torch.manual_seed(0)
    model = build_random(get_preset("256").model_config(), 0)
    inputs = unet_inputs(model.unet, 1, 8)
    with torch.no_grad():
        ref = model.unet(*inputs)
        half = copy.deepcopy(model.unet).half()(*(t.half() if t.is_floating_point() else t for t in inputs)).float()
        store_in_fp8(model)
        low = model.unet(*inputs)
    err32, err16 = rel_err(low, ref), rel_err(low, half)
    print(f"fp8 vs fp32 {err32:.4f}, fp8 vs fp16 {err16:.4f}, fp16 vs fp32 {rel_err(half, ref):.5f}")
    assert err32 < 0.25 and err16 < 0.25 and torch.isfinite(low).all()  # measured 0.18 (random weights)


def test_every_offload_mode_gives_the_same_video():
    """On the CPU every mode animates to the same frames (fp32); fp8 storage runs end to end."""
    base = Animator.load("tiny", device="cpu", offload="none").animate(EXAMPLE, "waving", steps=2, seed=3).frames
    for mode in ("model", "group"):
        anim = Animator.load("tiny", device="cpu", offload=mode)
        assert anim.offload == mode
        assert np.array_equal(anim.animate(EXAMPLE, "waving", steps=2, seed=3).frames, base)
    eight = Animator.load("tiny", device="cpu", weights="fp8").animate(EXAMPLE, "waving", steps=2, seed=3).frames
    assert eight.shape == base.shape and np.abs(eight.astype(int) - base.astype(int)).mean() < 40


def test_group_offloading_hooks_give_the_same_unet_output():
    """diffusers' leaf-level group offloading on our UNet (here onto and off the CPU): the same numbers, including the
    context projection that runs outside the UNet's forward and the fast paths that read weights directly."""
    from diffusers.hooks import apply_group_offloading

    model = build_random(get_preset("tiny").model_config(), 0)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 8, 16, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 333, 32, generator=g))
    with torch.no_grad():
        ref = model.unet(*args)
        apply_group_offloading(model.unet, onload_device="cpu", offload_device="cpu", offload_type="leaf_level")
        assert torch.equal(model.unet(*args), ref)


def test_each_part_is_where_its_stage_needs_it():
    """place() per mode and stage, with "meta" standing in for the GPU: the parts the table puts on the device are
    there, every other part is on the CPU; the UNet of group offloading is left to its hooks."""
    for mode in ("none", "model", "group"):
        for stage in ("encode", "sample", "decode"):
            for keep in (False, True):
                model = build_random(get_preset("tiny").model_config(), 0)
                model.device, model.offload = torch.device("meta"), mode
                place(model, stage, keep)
                wanted = ON_DEVICE[mode][stage] | ({"text_encoder", "image_encoder", "image_proj"} if keep else set())
                for part in PARTS:
                    where = next(getattr(model, part).parameters()).device.type
                    if part == "unet" and mode == "group":
                        assert where == "cpu"
                    else:
                        assert where == ("meta" if part in wanted else "cpu"), (mode, stage, keep, part)
    assert ON_DEVICE["model"]["sample"] == {"unet"} and "unet" not in ON_DEVICE["model"]["decode"]
    assert not {"text_encoder", "image_encoder"} & ON_DEVICE["none"]["sample"]  # towers leave after encoding


@pytest.mark.parametrize(("free_gib", "height", "width", "expected"), [
    (24, 576, 1024, ("full", "none")),
    (12, 320, 512, ("full", "none")),
    (8, 576, 1024, ("fp8", "none")),
    (7.8, 576, 1024, ("fp8", "model")),
    (7.5, 576, 1024, ("fp8", "group")),
    (5, 320, 512, ("fp8", "none")),
    (3.6, 320, 512, ("fp8", "model")),
    (3, 256, 256, ("fp8", "none")),
    (1, 576, 1024, ("fp8", "group")),
])
def test_auto_memory_picks_the_fastest_mode_that_fits(free_gib, height, width, expected):
    """Needs while sampling (GiB): weights on the device (fp16: UNet 2.68 + VAE 0.16; fp8: 1.34 + 0.16; model: the
    UNet alone; group: one layer) plus activations (0.9 / 2.2 / 6.4 at 256 / 320x512 / 576x1024)."""
    weights = weight_bytes(build_skeleton(get_preset("512").model_config()), torch.float16)
    assert choose(weights, height, width, int(free_gib * GIB)) == expected


def test_weight_bytes_are_counted_exactly():
    """The released architecture in fp16: 4.74 GiB, of which fp8 storage keeps 2.55 GiB (UNet 2.68 -> 1.34)."""
    weights = weight_bytes(build_skeleton(get_preset("512").model_config()), torch.float16)
    full = sum(v for k, v in weights["full"].items() if k in PARTS)
    eight = sum(v for k, v in weights["fp8"].items() if k in PARTS)
    assert round(full / GIB, 2) == 4.74 and round(eight / GIB, 2) == 2.55
    assert round(weights["full"]["unet"] / GIB, 2) == 2.68 and round(weights["fp8"]["unet"] / GIB, 2) == 1.34


def test_fp8_conversion_round_trips_and_loads_strictly(tmp_path):
    ckpt = FIXTURES / "tiny_512_2345.ckpt"
    out = tmp_path / "tiny-fp8.safetensors"
    result = run("convert", ckpt, "--out", out, "--model", "tiny", "--dtype", "fp8", "--json")
    assert result.exit_code == 0, result.output
    stored = read_checkpoint(out)
    kinds = {v.dtype for v in stored.values()}
    assert torch.float8_e4m3fn in kinds and torch.float16 in kinds
    cfg = get_preset("tiny").model_config()
    loaded = load_model(cfg, out).state_dict()  # strict
    reference = load_model(cfg, ckpt).state_dict()
    for key, value in stored.items():
        exp = reference[key].to(value.dtype).float() if value.is_floating_point() else reference[key]
        assert torch.equal(loaded[key], exp.to(loaded[key].dtype)), key
    fp16 = tmp_path / "tiny-fp16.safetensors"
    run("convert", ckpt, "--out", fp16, "--model", "tiny", "--dtype", "fp16")
    assert out.stat().st_size < 0.8 * fp16.stat().st_size


def test_memory_options_are_checked_before_loading(never_load):
    for args, text in [(["--weights", "fp4"], "unknown --weights"), (["--offload", "disk"], "unknown --offload"),
                       (["--memory", "max"], "unknown --memory"), (["--max-memory", "lots"], "--max-memory must")]:
        result = run("animate", EXAMPLE, "waving", "--model", "tiny", *args)
        assert result.exit_code == 2 and text in result.output, result.output
    assert parse_size("6GiB") == 6 * GIB and parse_size("6GB") == 6 * 10**9 and parse_size("512MiB") == 2**29


def test_mps_defaults_and_refusals(monkeypatch):
    """Without Apple hardware here: mps is chosen after cuda, runs in fp16 by default, and is refused (one line) where
    there is none; fp8 storage says it has no MPS path."""
    import dynamicrafter.devices as devices

    monkeypatch.setattr(devices, "mps_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device() == ("mps", torch.float16)
    monkeypatch.setattr(devices, "mps_available", lambda: False)
    assert devices.resolve_device() == ("cpu", torch.float32)
    with pytest.raises(SettingsError, match="no Apple GPU"):
        devices.resolve_device("mps")
    model = build_random(get_preset("tiny").model_config(), 0)
    model.device = torch.device("mps")
    with pytest.raises(SettingsError, match="not available on Apple MPS"):
        store_in_fp8(model)

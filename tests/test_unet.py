"""The 3D UNet against the reference fixtures, the full-size key manifests, λ control and the rare variants."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynamicrafter.config import UNetConfig, from_reference
from dynamicrafter.models.attention import CrossAttention
from dynamicrafter.models.context import ImageScale
from dynamicrafter.models.unet import UNet3D

from .conftest import rel_err

FIXTURES = Path(__file__).parent / "fixtures"
PREFIX = "model.diffusion_model."
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(2)


@functools.cache
def load_scenario(name: str) -> tuple[UNet3D, dict[str, torch.Tensor], dict]:
    scenario = json.loads((FIXTURES / name / "scenario.json").read_text())
    cfg = from_reference(scenario["reference_model_config"], scenario["tiny_clip_config"])
    unet = UNet3D(cfg.unet).eval()
    ckpt = torch.load(FIXTURES / name / scenario["checkpoint"], map_location="cpu", weights_only=True, mmap=True)
    unet.load_state_dict({k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)})
    return unet, load_file(FIXTURES / name / "expected.safetensors"), scenario["inputs"]


def probe(name: str, uncond: bool = False, image_scale: ImageScale | None = None) -> torch.Tensor:
    unet, exp, inputs = load_scenario(name)
    x = torch.cat([exp["probe_x_t"], exp["concat_latent"]], dim=1)
    text, image = ("uncond_text_emb", "uncond_image_ctx") if uncond else ("text_emb", "image_ctx")
    context = torch.cat([exp[text], exp[image]], dim=1)
    with torch.no_grad():
        return unet(x, torch.tensor([inputs["probe_t"]]), context, torch.tensor([inputs["fs"]]), image_scale)


@pytest.mark.parametrize("name", ["i2v_256_style", "i2v_512_style", "interp_512_style"])
def test_probe_outputs_match_reference(name: str) -> None:
    unet, exp, _ = load_scenario(name)
    assert rel_err(probe(name), exp["probe_unet_out"]) <= TOL
    assert rel_err(probe(name, uncond=True), exp["probe_unet_out_uncond"]) <= TOL
    for lam in (0.0, 0.5):
        assert rel_err(probe(name, image_scale=ImageScale.of(lam)), exp[f"probe_unet_out_lambda_{lam}"]) <= TOL
    assert not any(hasattr(a, "image_cross_attention_scale") for a in unet.spatial_attentions())  # λ is data


def test_probe_output_full_resolution() -> None:
    """The 512-style tiny model at the real 40×64 latent (one call, the slowest test of the file)."""
    _, exp, _ = load_scenario("i2v_512_fullres")
    assert rel_err(probe("i2v_512_fullres"), exp["probe_unet_out"]) <= TOL


def test_lambda_per_block_changes_only_the_chosen_block() -> None:
    unet, exp, _ = load_scenario("i2v_512_style")
    attns = unet.spatial_attentions()
    outputs: dict[int, torch.Tensor] = {}
    hooks = [a.register_forward_hook(lambda m, i, o, k=k: outputs.__setitem__(k, o)) for k, a in enumerate(attns)]
    try:
        base, base_outputs = probe("i2v_512_style"), dict(outputs)
        scale = ImageScale.of(0.0, [5])
        assert unet.layer_scales(scale, torch.device("cpu")) == [1.0] * 5 + [0.0] + [1.0] * 10
        changed = probe("i2v_512_style", image_scale=scale)
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.equal(outputs[k], base_outputs[k]) for k in range(5))  # earlier layers untouched
    assert not torch.allclose(outputs[5], base_outputs[5])
    assert rel_err(base, exp["probe_unet_out"]) <= TOL and rel_err(changed, base) > 1e-4
    assert not any("image_cross_attention_scale" in k for k in unet.state_dict())
    with pytest.raises(ValueError):
        probe("i2v_512_style", image_scale=ImageScale.of(0.5, [16]))


def test_one_lambda_per_sample_matches_the_reference_per_lambda() -> None:
    """λ = (0, 0.5, 1) as one batch of three samples, guidance branches outermost (cond ×3, uncond ×3): every row
    equals the original's output for its λ."""
    unet, exp, inputs = load_scenario("i2v_512_style")
    x = torch.cat([exp["probe_x_t"], exp["concat_latent"]], dim=1).repeat(6, 1, 1, 1, 1)
    cond = torch.cat([exp["text_emb"], exp["image_ctx"]], dim=1)
    uncond = torch.cat([exp["uncond_text_emb"], exp["uncond_image_ctx"]], dim=1)
    context = torch.cat([cond.repeat(3, 1, 1), uncond.repeat(3, 1, 1)])
    scale = ImageScale.of([0.0, 0.5, 1.0])
    with torch.no_grad():
        out = unet(x, torch.full((6,), inputs["probe_t"]), context, torch.full((6,), inputs["fs"]), scale)
        with pytest.raises(ValueError, match="do not divide"):
            unet(x[:4], torch.full((4,), inputs["probe_t"]), context[:4], torch.full((4,), inputs["fs"]), scale)
        plain = unet(x[:1], torch.full((1,), inputs["probe_t"]), context[:1], torch.full((1,), inputs["fs"]))
    for row, key in enumerate(["probe_unet_out_lambda_0.0", "probe_unet_out_lambda_0.5", "probe_unet_out"]):
        assert rel_err(out[row : row + 1], exp[key]) <= TOL
    assert rel_err(out[5:], exp["probe_unet_out_uncond"]) <= TOL
    assert rel_err(plain, exp["probe_unet_out_lambda_0.0"]) > 1e-3  # nothing of the last call's λ stays behind


def test_per_sample_lambda_in_bf16_equals_the_scalar_path_and_any_number_works() -> None:
    """In bf16 a per-sample λ of 0.3 must act as the float 0.3 does (not as 0.3 rounded to bf16, 0.30078125), and a
    λ given as an int or a numpy number is a plain number."""
    import copy

    import numpy as np

    cached, exp, inputs = load_scenario("i2v_512_style")
    unet = copy.deepcopy(cached).to(torch.bfloat16)  # the cached fp32 network stays untouched
    x = torch.cat([exp["probe_x_t"], exp["concat_latent"]], dim=1).repeat(2, 1, 1, 1, 1).bfloat16()
    context = torch.cat([exp["text_emb"], exp["image_ctx"]], dim=1).repeat(2, 1, 1).bfloat16()
    t, fs = torch.full((2,), inputs["probe_t"]), torch.full((2,), inputs["fs"])
    with torch.no_grad():
        batched = unet(x, t, context, fs, ImageScale.of([0.3, 0.3]))
        scalar = unet(x, t, context, fs, ImageScale.of(0.3))
        half = unet(x, t, context, fs, ImageScale.of(0.5))
        for number in (np.float32(0.5), np.float64(0.5)):
            assert torch.equal(unet(x, t, context, fs, ImageScale.of([number])), half)
        assert torch.equal(unet(x, t, context, fs, ImageScale.of(0)), unet(x, t, context, fs, ImageScale.of(0.0)))
    assert torch.equal(batched, scalar)


TINY = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_res_blocks=1, context_dim=32,
            temporal_length=4)
RARE = {
    "heads_updown_scaleshift_relcausal": UNetConfig(
        **TINY, num_heads=2, num_head_channels=-1, use_linear=False, resblock_updown=True, use_scale_shift_norm=True,
        use_relative_position=True, use_causal_attention=True, transformer_depth=2, addition_attention=False,
        image_cross_attention_scale_learnable=True, fs_condition=False,
    ),
    "crossinit_relcausal_pool_tempspatial": UNetConfig(
        **TINY, num_head_channels=16, temporal_selfatt_only=False, use_relative_position=True,
        use_causal_attention=True, conv_resample=False, tempspatial_aware=True, use_linear=False,
        image_cross_attention=False,
    ),
}
RARE_KEYS = {  # key -> shape, as the original builds these variants
    "heads_updown_scaleshift_relcausal": {
        "input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
        "input_blocks.1.2.proj_in.weight": (32, 32, 1),
        "input_blocks.1.2.transformer_blocks.1.attn2.relative_position_v.embeddings_table": (9, 16),
        "input_blocks.1.1.transformer_blocks.1.attn2.alpha": (),
        "input_blocks.1.0.emb_layers.1.weight": (64, 128),
        "input_blocks.2.0.in_layers.2.weight": (32, 32, 3, 3),
        "output_blocks.1.3.in_layers.2.weight": (64, 64, 3, 3),
    },
    "crossinit_relcausal_pool_tempspatial": {
        "init_attn.0.proj_in.weight": (128, 32, 1),
        "init_attn.0.transformer_blocks.0.attn2.to_k.weight": (128, 32),
        "init_attn.0.transformer_blocks.0.attn1.relative_position_k.embeddings_table": (9, 16),
        "input_blocks.1.0.temopral_conv.conv1.2.weight": (32, 32, 3, 3, 1),
        "input_blocks.1.0.temopral_conv.conv2.3.weight": (32, 32, 3, 1, 3),
    },
}


@pytest.mark.parametrize("name", list(RARE))
def test_rare_variants_run(name: str) -> None:
    torch.manual_seed(0)
    unet = UNet3D(RARE[name]).eval()
    state = unet.state_dict()
    assert {k: tuple(state[k].shape) for k in RARE_KEYS[name]} == RARE_KEYS[name]
    assert "input_blocks.2.0.temopral_conv.conv1.0.weight" not in state and "input_blocks.2.0.op.weight" not in state
    x, context = torch.randn(2, 8, 4, 8, 8), torch.randn(2, 77 + 16 * 4, 32)
    t = torch.tensor([5, 900])
    with torch.no_grad():
        y = unet(x, t, context)
        y16 = unet.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert y.shape == (2, 4, 4, 8, 8) and torch.isfinite(y).all()
    assert y16.dtype == torch.bfloat16 and rel_err(y16, y) < 0.05


@pytest.mark.parametrize("relative", [None, 4])
def test_causal_attention_ignores_later_frames(relative: int | None) -> None:
    torch.manual_seed(0)
    attn = CrossAttention(32, heads=2, dim_head=16, relative_length=relative)
    x = torch.randn(3, 4, 32)
    x2 = x.clone()
    x2[:, 3] += 1.0
    with torch.no_grad():
        a, b = attn(x, causal=True), attn(x2, causal=True)
        full = attn(x2)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6) and not torch.allclose(a[:, :3], full[:, :3])
    if relative is not None:  # with zero tables the explicit path equals the fused one
        plain = CrossAttention(32, heads=2, dim_head=16)
        plain.load_state_dict(attn.state_dict(), strict=False)
        with torch.no_grad():
            attn.relative_position_k.embeddings_table.zero_()
            attn.relative_position_v.embeddings_table.zero_()
            assert torch.allclose(attn(x, causal=True), plain(x, causal=True), atol=1e-6)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_head_channels"):
        UNet3D(UNetConfig(**TINY, num_heads=2, num_head_channels=-1))
    unet = UNet3D(RARE["crossinit_relcausal_pool_tempspatial"])
    with pytest.raises(ValueError, match="divisible"):
        unet(torch.randn(1, 8, 4, 7, 8), torch.tensor([1]), torch.randn(1, 77, 32))

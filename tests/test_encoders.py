"""Conditioning encoders against the reference fixtures: text and vision towers, CLIP preprocessing, Resampler, VAE."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from dynamicrafter.config import from_reference
from dynamicrafter.models.encoders import (
    ImageEncoder,
    TextEncoder,
    build_vae,
    clip_preprocess,
    convert_text_state_dict,
    convert_vae_state_dict,
    convert_vision_state_dict,
    vae_decode,
    vae_encode,
)
from dynamicrafter.models.resampler import Resampler

from .conftest import FIXTURES, fixture_state_dict, rel_err, scenario

torch.set_num_threads(2)

SCENARIOS = ["i2v_256_style", "i2v_512_style", "interp_512_style", "i2v_512_fullres"]
# The 320x512 VAE is slow on CPU: check a subset of its (identical) frames there.
VAE_FRAMES = {"i2v_512_fullres": [0, 15]}
TOL = 1e-5
VAE_TOL = 5e-5  # conv kernels differ by CPU ISA; observed <= 6e-6



def strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def checkpoint(name: str) -> dict[str, torch.Tensor]:
    info, _, _ = scenario(name)
    return fixture_state_dict(str(Path(name) / info["checkpoint"]))


@cache
def models(name: str):
    """Tiny encoders built on the meta device and strict-loaded with ``assign=True`` (as the loader does)."""
    _, cfg, _ = scenario(name)
    sd = checkpoint(name)
    with torch.device("meta"):
        text, image, resampler, vae = (
            TextEncoder(cfg.text), ImageEncoder(cfg.vision), Resampler(cfg.resampler), build_vae(cfg.vae)
        )
    text.load_state_dict(convert_text_state_dict(strip(sd, "cond_stage_model.model."), cfg.text), assign=True)
    image.load_state_dict(convert_vision_state_dict(strip(sd, "embedder.model."), cfg.vision), assign=True)
    resampler.load_state_dict(strip(sd, "image_proj_model."), assign=True)
    vae.load_state_dict(convert_vae_state_dict(strip(sd, "first_stage_model."), cfg.vae), assign=True)
    return text, image, resampler, vae


def load_image(path: Path) -> torch.Tensor:
    """PNG -> (1, 3, H, W) in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous().float() / 255.0
    return ((x - 0.5) / 0.5)[None]


def input_video(name: str) -> torch.Tensor:
    """The reference's input frames (T, 3, H, W): i2v = start x T; interp = start x T/2 then end x T/2."""
    info, _, _ = scenario(name)
    inputs, frames = info["inputs"], info["inputs"]["frames"]
    start = load_image(FIXTURES / name / inputs["start_image"])
    if inputs["mode"] == "interp":
        end = load_image(FIXTURES / name / inputs["end_image"])
        return torch.cat([start.expand(frames // 2, -1, -1, -1), end.expand(frames - frames // 2, -1, -1, -1)])
    return start.expand(frames, -1, -1, -1)


@pytest.mark.parametrize("name", SCENARIOS)
@torch.no_grad()
def test_text_embeddings(name: str) -> None:
    _, _, exp = scenario(name)
    text = models(name)[0]
    ids = exp["token_ids"]
    assert rel_err(text(ids[0:1]), exp["text_emb"]) <= TOL
    assert rel_err(text(ids[1:2]), exp["uncond_text_emb"]) <= TOL


@pytest.mark.parametrize("name", SCENARIOS)
def test_clip_pixels(name: str) -> None:
    _, cfg, exp = scenario(name)
    got = clip_preprocess(input_video(name)[:1], cfg.vision)
    assert got.shape == (1, 3, 224, 224)
    assert rel_err(got, exp["clip_pixels"]) <= 1e-6


@pytest.mark.parametrize("name", SCENARIOS)
@torch.no_grad()
def test_image_tokens_and_context(name: str) -> None:
    _, _, exp = scenario(name)
    _, image, resampler, _ = models(name)
    start = input_video(name)[:1]
    tokens = image(start)
    assert rel_err(tokens, exp["image_tokens"]) <= TOL
    assert rel_err(resampler(tokens), exp["image_ctx"]) <= TOL
    assert rel_err(resampler(image(torch.zeros_like(start))), exp["uncond_image_ctx"]) <= TOL


@pytest.mark.parametrize("name", SCENARIOS)
@torch.no_grad()
def test_latent_z(name: str) -> None:
    _, cfg, exp = scenario(name)
    frames = VAE_FRAMES.get(name, slice(None))
    video = input_video(name)[frames]  # (T', 3, H, W)
    z = vae_encode(models(name)[3], video, cfg.diffusion.scale_factor)  # (T', 4, h, w)
    assert rel_err(z, exp["latent_z"][0, :, frames].transpose(0, 1)) <= VAE_TOL


@pytest.mark.parametrize("name", SCENARIOS)
@torch.no_grad()
def test_decoded_video(name: str) -> None:
    _, cfg, exp = scenario(name)
    frames = VAE_FRAMES.get(name, slice(None))
    latents = exp["sample_final_latent"][0, :, frames].transpose(0, 1)  # (T', 4, h, w)
    video = vae_decode(models(name)[3], latents, cfg.diffusion.scale_factor)  # (T', 3, H, W)
    assert rel_err(video, exp["decoded_video"][0, :, frames].transpose(0, 1)) <= VAE_TOL


@torch.no_grad()
def test_vae_chunking_is_exact() -> None:
    _, cfg, exp = scenario("interp_512_style")
    vae, scale = models("interp_512_style")[3], cfg.diffusion.scale_factor
    video = input_video("interp_512_style")[6:10]
    torch.testing.assert_close(vae_encode(vae, video, scale, chunk=3), vae_encode(vae, video, scale))
    latents = exp["sample_final_latent"][0, :, :3].transpose(0, 1)  # (3, 4, h, w)
    torch.testing.assert_close(vae_decode(vae, latents, scale, chunk=2), vae_decode(vae, latents, scale))
    with pytest.raises(ValueError, match="chunk"):
        vae_encode(vae, video, scale, chunk=0)


@torch.no_grad()
def test_image_embed_is_projected_post_norm_cls() -> None:
    sd = strip(checkpoint("i2v_512_style"), "embedder.model.visual.")
    image = models("i2v_512_style")[1]
    start = input_video("i2v_512_style")[:1]
    cls = image(start)[:, 0]  # (1, D)
    expected = F.layer_norm(cls, cls.shape[-1:], sd["ln_post.weight"], sd["ln_post.bias"], 1e-5) @ sd["proj"]
    torch.testing.assert_close(image.embed(start), expected)


def test_clip_preprocess_dtypes_and_identity() -> None:
    _, cfg, exp = scenario("i2v_512_fullres")
    start = input_video("i2v_512_fullres")[:1]
    for dtype in (torch.bfloat16, torch.float16):
        got = clip_preprocess(start.to(dtype), cfg.vision)
        assert got.dtype == dtype
        assert rel_err(got, exp["clip_pixels"]) <= 2e-2
    # at 224x224 no resize happens: only (x + 1) / 2 and the CLIP mean/std
    square = torch.rand(2, 3, 224, 224) * 2 - 1
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(square, cfg.vision), ((square + 1) / 2 - mean) / std, rtol=0, atol=0)
    # antialias off: plain bicubic squash
    plain = clip_preprocess(start, replace(cfg.vision, antialias=False))
    bicubic = F.interpolate(start, size=(224, 224), mode="bicubic", align_corners=True)
    torch.testing.assert_close(plain, ((bicubic + 1) / 2 - mean) / std, rtol=0, atol=0)
    with pytest.raises(ValueError, match="clip_preprocess"):
        clip_preprocess(start[0], cfg.vision)


def test_bad_inputs_raise() -> None:
    text, _, resampler, _ = models("i2v_256_style")
    with pytest.raises(ValueError, match="TextEncoder"):
        text(torch.zeros(1, 76, dtype=torch.long))
    with pytest.raises(ValueError, match="Resampler"):
        resampler(torch.zeros(1, 257, 7))


def test_unknown_keys_reach_strict_load() -> None:
    _, cfg, _ = scenario("i2v_256_style")
    sd = checkpoint("i2v_256_style")
    extra = torch.zeros(1)
    cases = [
        (models("i2v_256_style")[0], convert_text_state_dict, "cond_stage_model.model.", cfg.text),
        (models("i2v_256_style")[1], convert_vision_state_dict, "embedder.model.", cfg.vision),
        (models("i2v_256_style")[3], convert_vae_state_dict, "first_stage_model.", cfg.vae),
    ]
    for module, convert, prefix, sub_cfg in cases:
        converted = convert({**strip(sd, prefix), "mystery.weight": extra}, sub_cfg)
        assert converted["mystery.weight"] is extra
        with pytest.raises(RuntimeError, match="mystery.weight"):
            module.load_state_dict(converted, strict=True)


def test_text_layer_last_keeps_every_block() -> None:
    _, cfg, _ = scenario("i2v_256_style")
    last = replace(cfg.text, layer="last")
    with torch.device("meta"):
        text = TextEncoder(last)
    assert len(text.model.encoder.layers) == last.layers
    text.load_state_dict(convert_text_state_dict(strip(checkpoint("i2v_256_style"), "cond_stage_model.model."), last),
                         strict=True, assign=True)

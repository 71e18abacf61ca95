"""Interpolation, looping, multi-condition guidance and frame counts below 16, with the tiny model and the CLI."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dynamicrafter import conditioning, pipeline
from dynamicrafter.checkpoint import build_random
from dynamicrafter.long_video import split_windows, window_starts
from dynamicrafter.presets import get_preset

from .conftest import rel_err, tiny_model as tiny
from dynamicrafter.sampling import rescale_guidance

SIZE = 64
WELL_CONDITIONED = 128  # at 64x64 the tiny UNet's deepest level is 1x1 and GroupNorm amplifies rounding 1e3-fold
SETTINGS = pipeline.SamplingSettings(
    steps=4, cfg_scale=7.5, guidance_rescale=0.7, timestep_spacing="uniform_trailing", fs=5, frames=16
)


def image(seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def final_latent(cond, settings, seed=11):
    shape = pipeline.latent_shape(tiny(), 1, settings.frames, SIZE, SIZE)
    x_T, noise_fn = pipeline.seeded_noise(
        [seed], shape, "cpu", torch.float32, window=settings.window, stride=settings.stride
    )
    return pipeline.sample(tiny(), cond, settings, x_T, noise_fn)


# ----------------------------------------------------------------------------------------------------------------
# interpolation and looping


@pytest.mark.parametrize("frames", [16, 40])
def test_concat_layouts(frames):
    settings = replace(SETTINGS, frames=frames)
    start, end = image(1), image(2)
    z_start, z_end = conditioning.encode_latents(tiny(), start), conditioning.encode_latents(tiny(), end)
    interp = pipeline.make_conditioning(tiny(), start, ["p"], settings, end=end, mode="interp").concat
    loop = pipeline.make_conditioning(tiny(), start, ["p"], settings, mode="loop").concat
    assert interp.shape == loop.shape == (1, 4, frames, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(interp[:, :, 0], z_start, rtol=0, atol=1e-6)
    torch.testing.assert_close(interp[:, :, -1], z_end, rtol=0, atol=1e-6)
    torch.testing.assert_close(loop[:, :, 0], z_start, rtol=0, atol=1e-6)
    assert torch.equal(loop[:, :, -1], loop[:, :, 0])
    assert not interp[:, :, 1:-1].any() and not loop[:, :, 1:-1].any()  # exact zeros between the ends
    if frames > 16:  # windows: the first sees the start on its first frame, the last the end on its last frame
        starts = window_starts(frames, 16, 8)
        windows = split_windows(interp, starts, 16).chunk(len(starts))
        assert torch.equal(windows[0][:, :, 0], interp[:, :, 0]) and torch.equal(
            windows[-1][:, :, -1], interp[:, :, -1]
        )
        assert not any(w.any() for w in windows[1:-1])


@pytest.mark.parametrize("frames", [16, 24])
def test_loop_equals_interp_to_the_same_image_and_drops_the_last_frame(frames):
    settings = replace(SETTINGS, frames=frames, steps=3)
    start = image(3)
    loop = pipeline.make_conditioning(tiny(), start, ["a wave"], settings, mode="loop")
    interp = pipeline.make_conditioning(tiny(), start, ["a wave"], settings, end=start.clone(), mode="interp")
    assert torch.equal(interp.concat, loop.concat)
    assert torch.equal(final_latent(loop, settings), final_latent(interp, settings))
    video = pipeline.animate(tiny(), start, ["a wave"], replace(settings, steps=2), [11], mode="loop")
    assert video.shape == (1, 3, frames - 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="end image"):
        pipeline.make_conditioning(tiny(), start, ["a wave"], settings, mode="interp")
    with pytest.raises(ValueError, match="must match"):
        pipeline.make_conditioning(tiny(), start, ["a wave"], settings, end=start[:, :, :32], mode="interp")


# ----------------------------------------------------------------------------------------------------------------
# multi-condition guidance


@functools.cache
def guidance_inputs():
    cond = pipeline.make_conditioning(tiny(), image(4, WELL_CONDITIONED), ["a dog runs"], SETTINGS)
    x = torch.randn(1, 4, 16, WELL_CONDITIONED // 8, WELL_CONDITIONED // 8, generator=torch.Generator().manual_seed(0))
    return cond, x


def raw(context: torch.Tensor, t: int) -> torch.Tensor:
    """One unguided UNet call with ``context`` (and the real concat latent)."""
    cond, x = guidance_inputs()
    return pipeline.guided_denoiser(tiny(), replace(cond, context=context), replace(SETTINGS, cfg_scale=1.0))(x, t)


# Tolerance 5e-5: the 2- and 3-branch UNet batches round differently (~3e-6 per output), which the guidance
# scale 7.5 amplifies; everything else is the same arithmetic.
TOL = 5e-5


@pytest.mark.parametrize("t", [999, 400])
def test_multi_condition_with_equal_scales_is_plain_cfg(t):
    cond, x = guidance_inputs()
    plain = pipeline.guided_denoiser(tiny(), cond, SETTINGS)(x, t)
    multi = pipeline.guided_denoiser(tiny(), cond, replace(SETTINGS, cfg_img=SETTINGS.cfg_scale))(x, t)
    assert rel_err(multi, plain) < TOL


@pytest.mark.parametrize("cfg_img", [1.0, 2.5])
def test_multi_condition_formula(cfg_img):
    cond, x = guidance_inputs()
    t, s = 700, SETTINGS.cfg_scale
    e_c, e_u, e_ui = raw(cond.context, t), raw(cond.uncond_context, t), raw(cond.image_only_context, t)
    expected = e_u + cfg_img * (e_ui - e_u) + s * (e_c - e_ui)
    if cfg_img == 1.0:
        torch.testing.assert_close(expected, e_ui + s * (e_c - e_ui), rtol=0, atol=1e-5)
    expected = rescale_guidance(expected, e_c, SETTINGS.guidance_rescale)  # guidance rescale uses e_c
    got = pipeline.guided_denoiser(tiny(), cond, replace(SETTINGS, cfg_img=cfg_img))(x, t)
    assert rel_err(got, expected) < TOL
    assert rel_err(got, pipeline.guided_denoiser(tiny(), cond, SETTINGS)(x, t)) > 1e-3  # it does change the result


def test_image_only_branch_has_empty_text_and_real_image():
    cond, _ = guidance_inputs()
    torch.testing.assert_close(cond.image_only_context[:, :77], cond.uncond_context[:, :77], rtol=0, atol=0)
    torch.testing.assert_close(cond.image_only_context[:, 77:], cond.context[:, 77:], rtol=0, atol=0)
    assert not torch.equal(cond.uncond_context[:, 77:], cond.context[:, 77:])


# ----------------------------------------------------------------------------------------------------------------
# frame counts up to the window


def test_short_videos_see_all_image_tokens_on_every_frame():
    # 77 + 16·T context rule: with the Resampler's 256 image tokens only T = 16 gives each frame its own 16 tokens;
    # at T = 8 every frame attends to all 256, so shuffling the image tokens changes nothing.
    cond, _ = guidance_inputs()
    context = cond.context
    shuffled = torch.cat(
        [context[:, :77], context[:, 77:][:, torch.randperm(256, generator=torch.Generator().manual_seed(0))]], 1
    )
    ts, fs = torch.tensor([500]), cond.fs
    for frames, changes in ((8, False), (16, True)):
        xin = torch.randn(1, 8, frames, 16, 16, generator=torch.Generator().manual_seed(frames))
        a, b = tiny().unet(xin, ts, context, fs), tiny().unet(xin, ts, shuffled, fs)
        assert (rel_err(b, a) > 1e-3) == changes, frames
    video = pipeline.animate(tiny(), image(5), ["a wave"], replace(SETTINGS, frames=8, steps=2), [0])
    assert video.shape == (1, 3, 8, SIZE, SIZE) and torch.isfinite(video).all()


# ----------------------------------------------------------------------------------------------------------------
# command line


def write_image(path, size, seed):
    pixels = torch.rand(size[1], size[0], 3, generator=torch.Generator().manual_seed(seed))
    Image.fromarray((pixels * 255).byte().numpy()).save(path)
    return path


@pytest.mark.parametrize(
    "mode,options,frames",
    [("interp", ["--cfg", "5", "--cfg-img", "2"], 16), ("loop", ["--loop", "--cfg", "1"], 15)],
)
def test_cli_interp_and_loop(tmp_path, mode, options, frames):
    from dynamicrafter.cli import app
    from dynamicrafter.video import read_video

    start = write_image(tmp_path / "start.png", (160, 96), 0)
    end = write_image(tmp_path / "end.jpg", (90, 200), 1)  # another size and aspect: both go to 128x128
    out = tmp_path / f"{mode}.mp4"
    args = ["animate", start, "a wave", "--model", "tiny", "--steps", "2", "--out", out, *options]
    args += ["--end-image", end] if mode == "interp" else []
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert read_video(out).shape == (frames, 128, 128, 3)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["mode"] == mode and record["end_image"] == (str(end) if mode == "interp" else None)
    settings = record["settings"]
    assert (settings["cfg_scale"], settings["cfg_img"]) == ((5.0, 2.0) if mode == "interp" else (1.0, None))


def test_cli_refuses_loop_with_end_image(tmp_path):
    from dynamicrafter.cli import app

    start = write_image(tmp_path / "start.png", (64, 64), 0)
    result = CliRunner().invoke(
        app, ["animate", str(start), "x", "--model", "tiny", "--loop", "--end-image", str(start)]
    )
    assert result.exit_code == 2 and "exclude" in result.output

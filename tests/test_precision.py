"""Reduced precision and the batched guidance step: bf16 vs fp32 UNet outputs, batched vs separate guidance calls,
and (where CUDA exists) the CUDA path against the CPU path."""

import pytest
import torch

from dynamicrafter.checkpoint import build_random
from dynamicrafter.config import tiny_config
from dynamicrafter.models.unet import UNet3D
from dynamicrafter.pipeline import guided_denoiser, latent_shape, make_conditioning, sample, seeded_noise
from dynamicrafter.presets import get_preset
from dynamicrafter.sampling import (
    cfg_combine, ddim_coefficients, ddim_step, ddim_timesteps, make_schedule, multi_cond_combine, rescale_guidance,
)

from .conftest import rel_err



def unet_inputs(unet: UNet3D, batch: int, latent: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    cfg = unet.cfg
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, 16, latent, latent, generator=g)
    context = torch.randn(batch, cfg.text_tokens + 16 * cfg.image_tokens_per_frame, cfg.context_dim, generator=g)
    return x, torch.tensor([999, 421][:batch]), context, torch.full((batch,), cfg.default_fs)


def bf16_error(unet: UNet3D, latent: int) -> float:
    """Relative max error of the bf16 call against the fp32 call (the model is left in bf16)."""
    inputs = unet_inputs(unet, 2, latent)
    with torch.no_grad():
        exp = unet(*inputs)
        unet.to(torch.bfloat16)
        got = unet(*(t.bfloat16() if t.is_floating_point() else t for t in inputs))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    return rel_err(got, exp)


# Measured (2-core AMD EPYC, oneDNN bf16 kernels): full width 1.8 %, tiny 4.6 %.  The tiny net is the more
# sensitive one: rounding only its weights to bf16 (fp32 compute) already moves its output 1.6 %, and the original
# implementation under bf16 autocast is 3.9 % off on the same weights and inputs; so the 2 % target holds for the
# released width only, and the tiny bound guards against regressions instead.
BF16_LIMIT = {"tiny": 0.06, "256": 0.02}


@pytest.mark.parametrize("model", ["tiny", pytest.param("256", marks=pytest.mark.slow)])
def test_bf16_unet_close_to_fp32(model: str) -> None:
    """Same random weights in fp32 and bf16: the tiny UNet at 128x128 and the full-width 256 UNet at 64x64 pixels.

    The full-width case builds 1.4B parameters (5.8 GB in fp32): about 20 s on an idle 2-core CPU.
    """
    torch.manual_seed(0)
    unet = UNet3D(get_preset(model).model_config().unet).eval().requires_grad_(False)
    err = bf16_error(unet, 16 if model == "tiny" else 8)
    assert err < BF16_LIMIT[model], err


def guided_step_two_ways(preset: str, cfg_img: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step with the batched guided denoiser and with one UNet call per branch, combined by hand.

    Tiny widths with ``preset``'s diffusion and conditioning settings (256: eps; 512: v, rescale 0.7), in float64:
    float32 kernels round differently for different batch sizes, and guidance (x7.5) and the eps -> x0 step
    (up to 1/sqrt(alpha)) amplify those last-bit differences far beyond 1e-5; float64 tests the batching itself.
    """
    p = get_preset(preset)
    model = build_random(tiny_config(p.model_config()), 0, dtype=torch.float64)
    settings = p.sampling(steps=5, cfg_img=cfg_img)
    cond = make_conditioning(model, torch.rand(1, 3, 64, 64) * 2 - 1, ["a cat"], settings)
    schedule = make_schedule(model.cfg.diffusion)
    timesteps = ddim_timesteps(settings.steps, settings.timestep_spacing)
    coeffs = ddim_coefficients(schedule, timesteps, settings.eta)
    k = len(timesteps) - 2
    t = int(timesteps[k])
    g = torch.Generator().manual_seed(1)
    x, noise = (torch.randn(1, 4, 16, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    step = lambda out: ddim_step(x, out, t, k, schedule, coeffs, model.cfg.diffusion.parameterization, noise)  # noqa: E731
    with torch.no_grad():
        batched = step(guided_denoiser(model, cond, settings)(x, t))
        xin, ts = torch.cat([x, cond.concat], dim=1), torch.tensor([t])
        e_c = model.unet(xin, ts, cond.context, cond.fs)
        e_u = model.unet(xin, ts, cond.uncond_context, cond.fs)
        if cfg_img is None:
            out = cfg_combine(e_c, e_u, settings.cfg_scale)
        else:
            e_i = model.unet(xin, ts, cond.image_only_context, cond.fs)
            out = multi_cond_combine(e_c, e_u, e_i, settings.cfg_scale, cfg_img)
        separate = step(rescale_guidance(out, e_c, settings.guidance_rescale))
    return batched, separate


@pytest.mark.parametrize(("preset", "cfg_img"), [("256", None), ("512", None), ("512", 2.0)])
def test_batched_guidance_step_equals_separate_calls(preset: str, cfg_img: float | None) -> None:
    batched, separate = guided_step_two_ways(preset, cfg_img)
    assert rel_err(batched, separate) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compares the CUDA path with the CPU path)")
def test_cuda_path_agrees_with_cpu_path() -> None:
    """Tiny model, same seed, TF32 off: a UNet call and a 3-step run in fp32 on CUDA and on the CPU agree; the fp16
    CUDA call is finite and within 2 % of the fp32 CPU call."""
    preset = get_preset("tiny")
    settings = preset.sampling(steps=3)
    image = torch.rand(1, 3, 128, 128) * 2 - 1
    cpu = build_random(preset.model_config(), 0)
    inputs = unet_inputs(cpu.unet, 2, 16)

    def run(model, device):
        cond = make_conditioning(model, image.to(device), ["a cat"], settings)
        x_T, noise_fn = seeded_noise([7], latent_shape(model, 1, 16, 128, 128), torch.device(device), torch.float32)
        return sample(model, cond, settings, x_T, noise_fn)

    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = build_random(preset.model_config(), 0, "cuda")
        half = build_random(preset.model_config(), 0, "cuda", torch.float16)
        with torch.no_grad():
            exp = cpu.unet(*inputs)
            assert rel_err(gpu.unet(*(t.cuda() for t in inputs)).cpu(), exp) < 1e-4
            assert rel_err(run(gpu, "cuda").cpu(), run(cpu, "cpu")) < 1e-3
            got = half.unet(*(t.cuda().half() if t.is_floating_point() else t.cuda() for t in inputs))
        assert torch.isfinite(got).all() and rel_err(got.cpu(), exp) < 0.02
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_overflowing_reduced_precision_decode_is_redone_in_fp32(monkeypatch) -> None:
    """A VAE chunk that overflows in bf16 is decoded again with the VAE alone in fp32 (only that chunk), and the
    VAE is back in bf16 afterwards, weights unchanged."""
    import dynamicrafter.pipeline as pipeline

    model = build_random(tiny_config(get_preset("512").model_config()), 0, dtype=torch.bfloat16)
    weights = {k: v.clone() for k, v in model.vae.state_dict().items()}
    latents = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    real_decode, calls = pipeline.vae_decode, []

    def overflow_first_chunk(vae, z, scale):
        calls.append(z.dtype)
        out = real_decode(vae, z, scale)
        return out.fill_(float("inf")) if len(calls) == 1 else out

    monkeypatch.setattr(pipeline, "vae_decode", overflow_first_chunk)
    with torch.no_grad():
        video = pipeline.decode_latents(model, latents, chunk=4)
    assert calls == [torch.bfloat16, torch.float32, torch.bfloat16]  # chunk 1 twice (bf16, then fp32), chunk 2 once
    assert video.dtype == torch.float32 and torch.isfinite(video).all()
    assert all(torch.equal(v, weights[k]) and v.dtype == torch.bfloat16 for k, v in model.vae.state_dict().items())


def test_reduced_precision_sampling_keeps_the_ddim_state_in_fp32() -> None:
    """Under a bf16 UNet the DDIM state and guidance stay float32 (bf16 would round sqrt(alpha) = 0.9995 to 1 at
    every step); the UNet itself sees bf16 inputs."""
    from dataclasses import replace

    from dynamicrafter import pipeline

    preset = get_preset("tiny")
    model = build_random(preset.model_config(), 0, dtype=torch.bfloat16)
    seen: list[torch.dtype] = []
    model.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    sampled: list[torch.Tensor] = []
    real_sample = pipeline.sample

    def spy(*args, **kwargs):
        sampled.append(real_sample(*args, **kwargs))
        return sampled[-1]

    settings = replace(preset.sampling(steps=2), frames=4)
    try:
        pipeline.sample = spy
        video = pipeline.animate(model, torch.zeros(1, 3, 64, 64), ["a cat"], settings, [0])
    finally:
        pipeline.sample = real_sample
    assert seen == [torch.bfloat16] * 2 and sampled[0].dtype == torch.float32
    assert video.dtype == torch.float32 and torch.isfinite(video).all()
    assert pipeline.sampler_dtype(model) == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the memory policies act on CUDA only)")
def test_cuda_animate_end_to_end_in_fp16() -> None:
    """The whole fp16 CUDA path as the commands run it: encoders leave the GPU after encoding and come back for the
    next run, the VAE decodes in chunks sized by memory, the result is finite and repeatable, and a λ sweep batch
    agrees with its one-value runs far better than the two λ values agree with each other."""
    from dataclasses import replace

    from dynamicrafter import pipeline
    from dynamicrafter.sweep import sweep_videos

    preset = get_preset("tiny")
    model = build_random(preset.model_config(), 0, "cuda", torch.float16)
    settings = replace(preset.sampling(steps=3), frames=8)
    image = (torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()
    first = pipeline.animate(model, image, ["a cat"], settings, [4])
    assert next(model.image_encoder.parameters()).device.type == "cpu"  # offloaded after encoding
    again = pipeline.animate(model, image, ["a cat"], settings, [4])
    assert torch.isfinite(first).all() and (first - again).abs().max() < 1e-3
    batched, _ = sweep_videos(model, image, "a cat", settings, 4, [0.0, 1.0], list(range(6)))
    single, _ = sweep_videos(model, image, "a cat", settings, 4, [0.0, 1.0], list(range(6)), batch_size=1)
    apart = (single[0] - single[1]).abs().mean()  # what λ changes
    assert all((a - b).abs().mean() < 0.1 * apart for a, b in zip(batched, single))
    assert next(model.image_encoder.parameters()).device.type == "cuda"  # the sweep keeps them for conformity

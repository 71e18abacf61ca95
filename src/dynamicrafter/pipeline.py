"""Image(s) + prompt + settings -> video, top to bottom: :func:`animate` runs the stages in order.

    make_conditioning (conditioning.py) -> seeded_noise -> sample (DDIM, guidance; overlapping windows for long
    videos) -> decode_latents -> video in [-1, 1]  (video.py writes it)

Letters: B batch, T frames, H x W pixels, h x w latent (H/8 x W/8), C context width, W_n frames per window,
N windows.

Frame counts: any T works.  T <= ``settings.window`` (default 16) runs as one video; the UNet then applies the
77 + 16·T context rule, which matches the Resampler's 256 image tokens only at T = 16 (each frame gets its own 16
tokens); at other T every frame attends to all 256 image tokens, exactly as the original code does.  Longer videos
are denoised as overlapping 16-frame windows fused at every step (see :mod:`dynamicrafter.long_video`).
Every function takes plain tensors or small dataclasses; nothing here prints (progress goes through a callback).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from .cil import AnalyticInit, start_noise
from .conditioning import Conditioning, make_conditioning, placement
from .long_video import blend_weights, fuse_windows, noise_index, split_windows, spread_frames, window_starts
from .memory import decode_within_peak
from .models.context import ImageScale
from .models.dynamicrafter import DynamiCrafter
from .offload import place
from .models.encoders import vae_decode
from .sampling import (
    NonFiniteError,
    cfg_combine,
    ddim_coefficients,
    ddim_timesteps,
    make_schedule,
    multi_cond_combine,
    rescale_guidance,
    sample_ddim,
)
from .settings import SamplingSettings
from .toon import decode_toon

Progress = Callable[[int, int], None]
WINDOWS_PER_BATCH = 4  # long videos: windows per UNet batch unless asked otherwise (memory stays flat in length)


# --------------------------------------------------------------------------------------------------------------
# Denoising


def sampler_dtype(model: DynamiCrafter) -> torch.dtype:
    """The dtype of the DDIM state (x_t, noise, step arithmetic): float32 under a fp16/bf16 UNet, whose rounding
    would otherwise enter every step (in bf16, sqrt(alpha) = 0.9995 rounds to 1); otherwise the UNet's."""
    dtype = placement(model)[1]
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def guided_denoiser(
    model: DynamiCrafter, cond: Conditioning, settings: SamplingSettings, prepared: dict | None = None
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``model_fn(x, t)`` -> guided raw UNet output (eps or v); the 1-3 guidance branches run as one UNet batch.

    ``prepared``: projected contexts shared between denoisers whose conditioning differs only in ``concat`` (the
    windows of a long video), by batch size; filled here when missing.
    """
    use_cfg = settings.cfg_scale != 1.0
    multi = use_cfg and settings.cfg_img is not None
    contexts = [cond.context]
    if use_cfg:
        contexts.append(cond.uncond_context)
    if multi:
        contexts.append(cond.image_only_context)
    n = len(contexts)
    dtype = placement(model)[1]
    frames = cond.concat.shape[2]
    # the step-invariant work, once per run: fs embedding, every layer's context keys and values, λ
    prepared = {} if prepared is None else prepared
    key = (cond.context.shape[0], frames)
    if key not in prepared:
        prepared[key] = model.unet.prepare(torch.cat(contexts), cond.fs.repeat(n), frames, cond.image_scale)
    context = prepared[key]  # (n*B, ...)

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        xin = torch.cat([x.to(dtype), cond.concat.to(dtype)], dim=1).repeat(n, 1, 1, 1, 1)  # (n*B, 8, T, h, w)
        ts = torch.full((xin.shape[0],), t, dtype=torch.long, device=x.device)
        outs = model.unet(xin, ts, context).to(x.dtype).chunk(n)  # guidance in the sampler's dtype
        if not use_cfg:
            return outs[0]
        if multi:
            out = multi_cond_combine(outs[0], outs[1], outs[2], settings.cfg_scale, settings.cfg_img)
        else:
            out = cfg_combine(outs[0], outs[1], settings.cfg_scale)
        if settings.guidance_rescale > 0:
            out = rescale_guidance(out, outs[0], settings.guidance_rescale)
        return out

    return model_fn


def _window_conditioning(cond: Conditioning, starts: Sequence[int], window: int) -> Conditioning:
    """The conditioning of N windows batched window-major: concat cropped per window, the rest repeated."""
    n = len(starts)
    return replace(
        cond,
        context=cond.context.repeat(n, 1, 1),  # (N*B, L, C)
        uncond_context=cond.uncond_context.repeat(n, 1, 1),
        image_only_context=cond.image_only_context.repeat(n, 1, 1),
        concat=split_windows(cond.concat, starts, window),  # (N*B, 4, W_n, h, w)
        fs=cond.fs.repeat(n),
    )


def windowed_denoiser(
    model: DynamiCrafter, cond: Conditioning, settings: SamplingSettings, window_batch: int | None = None
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``model_fn(x, t)`` for a long latent (B, 4, T, h, w): every window is an ordinary guided call, fused.

    Windows of ``settings.window`` frames start every ``settings.stride`` frames; ``window_batch`` windows (None:
    up to :data:`WINDOWS_PER_BATCH`) go through the UNet as one batch, so a UNet batch stays a few windows wide
    whatever the video's length; groups of one size share one projected context.  The guided outputs are averaged with the tapering weights of
    :func:`~dynamicrafter.long_video.blend_weights`.  Fusing the model output is the same as fusing each window's
    DDIM update, because the update is linear in it.  One window covering all T frames gives exactly the plain
    :func:`guided_denoiser` result.
    """
    frames = cond.concat.shape[2]
    starts = window_starts(frames, settings.window, settings.stride)
    window = min(settings.window, frames)
    weights = blend_weights(frames, window, starts).to(cond.concat.device)
    if window_batch is not None and window_batch < 1:
        raise ValueError(f"window_batch must be at least 1, got {window_batch}")
    size = window_batch or min(len(starts), WINDOWS_PER_BATCH)
    groups = [starts[i : i + size] for i in range(0, len(starts), size)]
    prepared: dict = {}
    denoisers = [guided_denoiser(model, _window_conditioning(cond, g, window), settings, prepared) for g in groups]

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        outs = [fn(split_windows(x, g, window), t) for g, fn in zip(groups, denoisers)]
        return fuse_windows(torch.cat(outs), starts, weights, frames)  # (B, 4, T, h, w)

    return model_fn


@torch.no_grad()
def sample(
    model: DynamiCrafter,
    cond: Conditioning,
    settings: SamplingSettings,
    x_T: torch.Tensor,
    noise_fn: Callable[[int, torch.Size], torch.Tensor],
    callback: Progress | None = None,
    *,
    windowed: bool | None = None,
    window_batch: int | None = None,
    analytic_init: AnalyticInit | None = None,
) -> torch.Tensor:
    """DDIM from ``x_T`` (B, 4, T, h, w) -> final latent (B, 4, T, h, w).

    ``windowed`` None: plain when T <= ``settings.window``, overlapping windows otherwise (True/False force it).
    CIL: the DDIM grid spans ``settings.start_timestep`` timesteps; with ``settings.analytic_init`` the standard
    normal ``x_T`` becomes the analytic start from the statistics ``analytic_init``
    (:func:`~dynamicrafter.cil.start_noise`; they may be None only where ā at the start is 0).
    """
    if windowed is None:
        windowed = x_T.shape[2] > settings.window
    if windowed:
        model_fn = windowed_denoiser(model, cond, settings, window_batch)
    else:
        model_fn = guided_denoiser(model, cond, settings)
    diffusion = model.cfg.diffusion
    schedule = make_schedule(diffusion)
    timesteps = ddim_timesteps(settings.steps, settings.timestep_spacing, diffusion.timesteps, settings.start_timestep)
    if settings.analytic_init:
        x_T = start_noise(x_T, schedule, settings.start_timestep or diffusion.timesteps, analytic_init)
    coefficients = ddim_coefficients(schedule, timesteps, settings.eta)
    return sample_ddim(
        model_fn,
        x_T,
        timesteps,
        coefficients,
        schedule=schedule,
        parameterization=diffusion.parameterization,
        noise_fn=noise_fn,
        callback=callback,
    )


def latent_shape(model: DynamiCrafter, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    down = model.cfg.vae.downscale
    if height % (down * 8) or width % (down * 8):
        raise ValueError(f"height and width must be multiples of {down * 8} (got {height}x{width})")
    return (batch, model.cfg.diffusion.channels, frames, height // down, width // down)


def seeded_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    *,
    window: int | None = None,
    stride: int | None = None,
):
    """x_T and a per-step noise source, sample b drawn from its own CPU generator seeded with ``seeds[b]``.

    A seed therefore gives the same video on any device and in any batch composition.  With ``window`` < T (long
    videos) every draw is ``window`` frames long and spread over the T frames by the sample's FreeNoise map
    (:func:`~dynamicrafter.long_video.noise_index` with ``stride``, from a second generator seeded with the same
    seed); the same map serves x_T and every step's noise, and the first window's noise is the plain draw.
    """
    if len(seeds) != shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]}")
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def draw(shape_: Sequence[int]) -> torch.Tensor:
        parts = [torch.randn((1, *shape_[1:]), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(parts).to(device=device, dtype=dtype)

    frames = shape[2]
    if window is None or window >= frames:
        return draw(shape), lambda step, shape_: draw(shape_)
    if stride is None:
        raise ValueError("seeded_noise: a window needs a stride")
    maps = [noise_index(frames, window, stride, torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    index = torch.stack(maps)  # (B, T)
    window_shape = (*shape[:2], window, *shape[3:])  # (B, 4, W_n, h, w)
    return spread_frames(draw(window_shape), index), lambda step, shape_: spread_frames(draw(window_shape), index)


def _way_out(dtype: torch.dtype) -> str:
    """The end of a NaN/inf message: the precision it happened in and what to try instead."""
    if dtype == torch.float16:
        return " in float16; rerun with {setting} bf16 or {setting} fp32"
    if dtype == torch.bfloat16:
        return " in bfloat16; rerun with {setting} fp32"
    return f" in {str(dtype).removeprefix('torch.')}: the checkpoint or the settings produce them, not the precision"


@torch.no_grad()
def decode_latents(model: DynamiCrafter, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Latents (B, 4, T, h, w) -> video (B, 3, T, H, W) float32 (float64 stays), unclamped; ``chunk`` frames per call.

    In fp16/bf16 a chunk whose frames come out NaN/inf (an overflow inside the VAE) is decoded again with the VAE
    alone in fp32, then the VAE goes back to its dtype (exactly: the round trip through fp32 is lossless).
    """
    b, c, t, h, w = latents.shape
    _, dtype = placement(model)
    flat = latents.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # (B*T, 4, h, w)
    scale = model.cfg.diffusion.scale_factor
    parts = []
    for part in flat.split(chunk):
        frames = vae_decode(model.vae, part, scale)
        if dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(frames).all():
            try:
                model.vae.float()  # inside: a failure half-way must not leave the VAE in mixed dtypes
                frames = vae_decode(model.vae, part.float(), scale)
            finally:
                model.vae.to(dtype)
        if not torch.isfinite(frames).all():
            raise NonFiniteError("dtype", f"the VAE decoded NaN/inf values{_way_out(dtype)}")
        parts.append(frames if frames.dtype == torch.float64 else frames.float())
    frames = torch.cat(parts)
    return frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)


# --------------------------------------------------------------------------------------------------------------
# All of it


@dataclass
class StageTimes:
    """Filled by :func:`animate` when given: seconds per stage (``encode``, ``sample``, ``decode``; the device
    synchronised at each boundary), the decode chunk, and on CUDA the peak memory of sampling and of the whole run."""

    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)  # CUDA: the allocation peak within each stage, bytes
    decode_chunk: int = 0
    sample_peak_bytes: int = 0
    peak_bytes: int = 0


@contextlib.contextmanager
def _stage(times: StageTimes | None, name: str, device: torch.device) -> Iterator[None]:
    if times is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times.peaks[name] = torch.cuda.max_memory_allocated(device)
        times.peak_bytes = max(times.peak_bytes, before, times.peaks[name])
    times.seconds[name] = time.perf_counter() - start


@torch.no_grad()
def animate(
    model: DynamiCrafter,
    start: torch.Tensor,
    prompts: Sequence[str],
    settings: SamplingSettings,
    seeds: Sequence[int],
    *,
    end: torch.Tensor | None = None,
    mode: str = "i2v",
    negative_prompts: Sequence[str] | None = None,
    image_scale: float | ImageScale | None = None,
    decode_chunk: int | None = None,
    window_batch: int | None = None,
    keep_encoders: bool = False,
    callback: Progress | None = None,
    times: StageTimes | None = None,
    analytic_init: AnalyticInit | None = None,
) -> torch.Tensor:
    """Start (and end) images (B, 3, H, W) in [-1, 1], B prompts and B seeds -> video (B, 3, T', H, W) in [-1, 1].

    Any ``settings.frames``: up to ``settings.window`` one plain run, beyond it overlapping windows fused at every
    step with FreeNoise noise re-use (``window_batch`` windows per UNet batch; None: all).  T' = T - 1 for loop
    (the last frame equals the first).  ``image_scale``: λ (see :func:`make_conditioning`).  Before each stage the
    parts move where the model's offload mode wants them (:func:`~dynamicrafter.offload.place`: the encoders leave
    the GPU after encoding unless ``keep_encoders``, a caller with more runs to make), and ``decode_chunk`` None
    sizes the VAE chunks by memory (:func:`~dynamicrafter.memory.decode_within_peak`; 4 frames elsewhere).
    ``times``: filled with each stage's duration (see :class:`StageTimes`).  ``analytic_init``: CIL's data
    statistics, to start from the analytic noise (see :func:`sample`).
    """
    device, dtype = placement(model)
    window_starts(settings.frames, settings.window, settings.stride)  # refuse bad windows before any work
    place(model, "encode")
    with _stage(times, "encode", device):
        cond = make_conditioning(
            model, start, prompts, settings, end=end, mode=mode, negative_prompts=negative_prompts,
            image_scale=image_scale,
        )
    place(model, "sample", keep_encoders)
    shape = latent_shape(model, start.shape[0], settings.frames, start.shape[2], start.shape[3])
    x_T, noise_fn = seeded_noise(
        seeds, shape, device, sampler_dtype(model), window=settings.window, stride=settings.stride
    )
    with _stage(times, "sample", device):
        latents = sample(model, cond, settings, x_T, noise_fn, callback, window_batch=window_batch,
                         analytic_init=analytic_init)
    if not torch.isfinite(latents).all():
        raise NonFiniteError("dtype", f"sampling produced NaN/inf values{_way_out(dtype)}")
    sample_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    place(model, "decode", keep_encoders)
    with _stage(times, "decode", device):
        if cond.refs is not None:  # ToonCrafter's temporal decoder: whole chunks of one sample (see toon.py)
            video, decode_chunk = decode_toon(model, latents, cond.refs)
        elif decode_chunk is None:
            run_peak = max(sample_peak, times.peak_bytes) if times is not None else sample_peak
            video, decode_chunk = decode_within_peak(model, latents, decode_latents, run_peak)
        else:
            video = decode_latents(model, latents, decode_chunk)
    if times is not None:
        times.decode_chunk, times.sample_peak_bytes = decode_chunk, sample_peak
    video = video.clamp(-1.0, 1.0)
    return video[:, :, :-1] if mode == "loop" else video

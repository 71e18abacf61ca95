"""Image(s) + prompt + settings -> video, top to bottom.

    prepare_image -> encode_text / encode_image_context / encode_latents -> make_conditioning
    -> sample (DDIM, guidance; overlapping windows for long videos) -> decode_latents -> video_to_uint8

Letters: B batch, T frames, H x W pixels, h x w latent (H/8 x W/8), C context width, W_n frames per window,
N windows.

Frame counts: any T works.  T <= ``settings.window`` (default 16) runs as one video; the UNet then applies the
77 + 16·T context rule, which matches the Resampler's 256 image tokens only at T = 16 (each frame gets its own 16
tokens); at other T every frame attends to all 256 image tokens, exactly as the original code does.  Longer videos
are denoised as overlapping 16-frame windows fused at every step (see :mod:`dynamicrafter.long_video`).
Every function takes plain tensors or small dataclasses; nothing here prints (progress goes through a callback).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .long_video import blend_weights, fuse_windows, noise_index, split_windows, spread_frames, window_starts
from .models.dynamicrafter import DynamiCrafter
from .models.encoders import vae_decode, vae_encode
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
from .tokenizer import get_tokenizer

MODES = ("i2v", "interp", "loop")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SamplingSettings:
    """What the sampler is asked to do (defaults: a preset's values; see ``Preset.sampling``)."""

    steps: int = 50
    cfg_scale: float = 7.5
    cfg_img: float | None = None  # None: plain classifier-free guidance; a number: separate image guidance
    eta: float = 1.0
    fs: int | None = None  # None: the UNet's default_fs
    guidance_rescale: float = 0.0
    timestep_spacing: str = "uniform"
    frames: int = 16
    window: int = 16  # longer videos are denoised as overlapping windows of this many frames ...
    stride: int = 8  # ... starting this many frames apart (half-window overlap: every frame seen twice)


@dataclass
class Conditioning:
    """Everything the denoiser needs that does not change across steps."""

    context: torch.Tensor  # (B, 77 + n_img, C) text then image tokens
    uncond_context: torch.Tensor  # (B, 77 + n_img, C) negative/empty text, black-image tokens
    image_only_context: torch.Tensor  # (B, 77 + n_img, C) empty text, real image tokens (multi-condition CFG)
    concat: torch.Tensor  # (B, 4, T, h, w) image latent(s) concatenated to the noisy latent
    fs: torch.Tensor  # (B,) long


# --------------------------------------------------------------------------------------------------------------
# Encoding


def _device_dtype(model: DynamiCrafter) -> tuple[torch.device, torch.dtype]:
    p = next(model.unet.parameters())
    return p.device, p.dtype


def sampler_dtype(model: DynamiCrafter) -> torch.dtype:
    """The dtype of the DDIM state (x_t, noise, step arithmetic): float32 under a fp16/bf16 UNet, whose rounding
    would otherwise enter every step (in bf16, sqrt(alpha) = 0.9995 rounds to 1); otherwise the UNet's."""
    dtype = _device_dtype(model)[1]
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.no_grad()
def encode_text(model: DynamiCrafter, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> text tokens (B, 77, C)."""
    device, _ = _device_dtype(model)
    ids = get_tokenizer()(list(prompts), context_length=model.cfg.text.context_length).to(device)
    return model.text_encoder(ids)


@torch.no_grad()
def encode_image_context(model: DynamiCrafter, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> Resampler context tokens (B, n_img, C)."""
    _, dtype = _device_dtype(model)
    tokens = model.image_encoder(images.to(dtype))  # (B, 257, W_clip)
    return model.image_proj(tokens)


@torch.no_grad()
def encode_latents(model: DynamiCrafter, frames: torch.Tensor) -> torch.Tensor:
    """Frames (N, 3, H, W) in [-1, 1] -> scaled posterior-mean latents (N, 4, h, w)."""
    _, dtype = _device_dtype(model)
    return vae_encode(model.vae, frames.to(dtype), model.cfg.diffusion.scale_factor)


def concat_latent(start: torch.Tensor, end: torch.Tensor | None, mode: str, frames: int) -> torch.Tensor:
    """Latents (B, 4, h, w) of the start (and end) image -> c_concat (B, 4, T, h, w).

    i2v: the start latent on every frame; interp: start on frame 0, end on frame T-1, zeros between;
    loop: like interp with the start image at both ends.  For a long (windowed) video T is the whole length: the
    first window sees the start latent on its first frame, the last window the end latent on its last frame, and
    windows in between see only zeros, the model's "frame to be generated" marker, so that all windows share one
    timeline instead of each interpolating start -> end on its own.
    """
    if mode == "i2v":
        return start.unsqueeze(2).repeat(1, 1, frames, 1, 1)
    if mode not in ("interp", "loop"):
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "interp" and end is None:
        raise ValueError("interpolation needs an end image")
    c = torch.zeros(*start.shape[:2], frames, *start.shape[2:], dtype=start.dtype, device=start.device)
    c[:, :, 0] = start
    c[:, :, -1] = start if mode == "loop" else end
    return c


@torch.no_grad()
def make_conditioning(
    model: DynamiCrafter,
    start: torch.Tensor,
    prompts: Sequence[str],
    settings: SamplingSettings,
    *,
    end: torch.Tensor | None = None,
    mode: str = "i2v",
    negative_prompts: Sequence[str] | None = None,
) -> Conditioning:
    """Start (and end) images (B, 3, H, W) in [-1, 1] and B prompts -> :class:`Conditioning`.

    The CLIP stream sees the start image only (also in interp/loop); the unconditional branch uses the negative
    prompt (default empty) and the CLIP tokens of a black image, with the same concatenated latent.
    """
    device, _ = _device_dtype(model)
    b = start.shape[0]
    if len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for {b} images")
    if mode == "interp" and end is not None and end.shape != start.shape:
        raise ValueError(f"end images {tuple(end.shape)} must match the start images {tuple(start.shape)}")
    negative = list(negative_prompts) if negative_prompts is not None else [""] * b
    start = start.to(device)
    text = encode_text(model, [*prompts, *negative])  # (2B, 77, C)
    image = encode_image_context(model, torch.cat([start, torch.zeros_like(start)]))  # (2B, n_img, C)
    txt_c, txt_u = text[:b], text[b:]
    img_c, img_u = image[:b], image[b:]
    z = encode_latents(model, start)  # (B, 4, h, w)
    # separate VAE calls: an interpolation to the start image is then bit-identical to a loop
    z_end = encode_latents(model, end.to(device)) if mode == "interp" and end is not None else None
    fs = settings.fs if settings.fs is not None else model.cfg.unet.default_fs
    return Conditioning(
        context=torch.cat([txt_c, img_c], dim=1),
        uncond_context=torch.cat([txt_u, img_u], dim=1),
        image_only_context=torch.cat([txt_u, img_c], dim=1),
        concat=concat_latent(z, z_end, mode, settings.frames),
        fs=torch.full((b,), fs, dtype=torch.long, device=device),
    )


# --------------------------------------------------------------------------------------------------------------
# Denoising


def guided_denoiser(
    model: DynamiCrafter, cond: Conditioning, settings: SamplingSettings
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``model_fn(x, t)`` -> guided raw UNet output (eps or v); the 1-3 guidance branches run as one UNet batch."""
    use_cfg = settings.cfg_scale != 1.0
    multi = use_cfg and settings.cfg_img is not None
    contexts = [cond.context]
    if use_cfg:
        contexts.append(cond.uncond_context)
    if multi:
        contexts.append(cond.image_only_context)
    n = len(contexts)
    dtype = _device_dtype(model)[1]
    context = torch.cat(contexts)  # (n*B, L, C)
    fs = cond.fs.repeat(n)  # (n*B,)

    def model_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        xin = torch.cat([x.to(dtype), cond.concat.to(dtype)], dim=1).repeat(n, 1, 1, 1, 1)  # (n*B, 8, T, h, w)
        ts = torch.full((xin.shape[0],), t, dtype=torch.long, device=x.device)
        outs = model.unet(xin, ts, context, fs).to(x.dtype).chunk(n)  # guidance in the sampler's dtype
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
    return Conditioning(
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
    all) go through the UNet as one batch.  The guided outputs are averaged with the tapering weights of
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
    size = window_batch or len(starts)
    groups = [starts[i : i + size] for i in range(0, len(starts), size)]
    denoisers = [guided_denoiser(model, _window_conditioning(cond, g, window), settings) for g in groups]

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
) -> torch.Tensor:
    """DDIM from ``x_T`` (B, 4, T, h, w) -> final latent (B, 4, T, h, w).

    ``windowed`` None: plain when T <= ``settings.window``, overlapping windows otherwise (True/False force it).
    """
    if windowed is None:
        windowed = x_T.shape[2] > settings.window
    if windowed:
        model_fn = windowed_denoiser(model, cond, settings, window_batch)
    else:
        model_fn = guided_denoiser(model, cond, settings)
    diffusion = model.cfg.diffusion
    schedule = make_schedule(diffusion)
    timesteps = ddim_timesteps(settings.steps, settings.timestep_spacing, diffusion.timesteps)
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
        return " in float16; rerun with --dtype bf16 or --dtype fp32"
    if dtype == torch.bfloat16:
        return " in bfloat16; rerun with --dtype fp32"
    return f" in {str(dtype).removeprefix('torch.')}: the checkpoint or the settings produce them, not the precision"


@torch.no_grad()
def decode_latents(model: DynamiCrafter, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
    """Latents (B, 4, T, h, w) -> video (B, 3, T, H, W) float32 (float64 stays), unclamped; ``chunk`` frames per call.

    In fp16/bf16 a chunk whose frames come out NaN/inf (an overflow inside the VAE) is decoded again with the VAE
    alone in fp32, then the VAE goes back to its dtype (exactly: the round trip through fp32 is lossless).
    """
    b, c, t, h, w = latents.shape
    _, dtype = _device_dtype(model)
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
            raise NonFiniteError(f"the VAE decoded NaN/inf values{_way_out(dtype)}")
        parts.append(frames if frames.dtype == torch.float64 else frames.float())
    frames = torch.cat(parts)
    return frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, 3, T, H, W)


# --------------------------------------------------------------------------------------------------------------
# Memory policies (CUDA): encoders on the GPU only while encoding, VAE chunks sized by memory


def _encoders(model: DynamiCrafter) -> tuple[torch.nn.Module, ...]:
    return model.text_encoder, model.image_encoder, model.image_proj


def bring_encoders(model: DynamiCrafter) -> None:
    """Put the text and image towers and the Resampler back where the UNet is (after :func:`offload_encoders`)."""
    device = next(model.unet.parameters()).device
    for tower in _encoders(model):
        tower.to(device)


def offload_encoders(model: DynamiCrafter) -> None:
    """On CUDA, move the text and image towers and the Resampler to the CPU: they run once, before sampling."""
    if next(model.unet.parameters()).device.type != "cuda":
        return
    for tower in _encoders(model):
        tower.to("cpu")
    torch.cuda.empty_cache()


def decode_within_peak(model: DynamiCrafter, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``decode_latents`` with the chunk size chosen by memory: (video (B, 3, T, H, W), frames per chunk).

    On CUDA the first frame of every sample is decoded alone to measure the memory one frame needs; the rest goes in
    the largest chunks that keep the allocation under the peak reached so far (sampling's) and within free memory,
    at least one frame at a time.  Elsewhere 4 frames per chunk.  Resets CUDA's peak-memory statistics: a caller
    that wants the run's peak reads it before.
    """
    device = latents.device
    if device.type != "cuda":
        return decode_latents(model, latents), 4
    b, t = latents.shape[0], latents.shape[2]
    run_peak = torch.cuda.max_memory_allocated(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    first = decode_latents(model, latents[:, :, :1], chunk=b)  # (B, 3, 1, H, W)
    per_frame = max((torch.cuda.max_memory_allocated(device) - base) / b, 1.0)
    headroom = min(run_peak - torch.cuda.memory_allocated(device), torch.cuda.mem_get_info(device)[0])
    chunk = max(1, min(b * (t - 1), int(headroom // per_frame))) if t > 1 else b
    video = first if t == 1 else torch.cat([first, decode_latents(model, latents[:, :, 1:], chunk)], dim=2)
    return video, chunk


# --------------------------------------------------------------------------------------------------------------
# λ control


def set_image_scale(
    model: DynamiCrafter, value: float | Sequence[float], blocks: Iterable[int] | None = None
) -> None:
    """Set the image cross-attention scale λ on the chosen spatial-transformer indices (None: all): one value, or
    one per sample of the batches that follow (see ``UNet3D.set_image_cross_attention_scale``)."""
    model.unet.set_image_cross_attention_scale(value, blocks)


# --------------------------------------------------------------------------------------------------------------
# All of it


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
    decode_chunk: int | None = None,
    window_batch: int | None = None,
    keep_encoders: bool = False,
    callback: Progress | None = None,
) -> torch.Tensor:
    """Start (and end) images (B, 3, H, W) in [-1, 1], B prompts and B seeds -> video (B, 3, T', H, W) in [-1, 1].

    Any ``settings.frames``: up to ``settings.window`` one plain run, beyond it overlapping windows fused at every
    step with FreeNoise noise re-use (``window_batch`` windows per UNet batch; None: all).  T' = T - 1 for loop
    (the last frame equals the first).  On CUDA the encoders leave the GPU after encoding unless ``keep_encoders``
    (a caller with more runs to make), and ``decode_chunk`` None sizes the VAE chunks by memory
    (:func:`decode_within_peak`; 4 frames elsewhere).
    """
    device, dtype = _device_dtype(model)
    window_starts(settings.frames, settings.window, settings.stride)  # refuse bad windows before any work
    bring_encoders(model)
    cond = make_conditioning(model, start, prompts, settings, end=end, mode=mode, negative_prompts=negative_prompts)
    if not keep_encoders:
        offload_encoders(model)
    shape = latent_shape(model, start.shape[0], settings.frames, start.shape[2], start.shape[3])
    x_T, noise_fn = seeded_noise(
        seeds, shape, device, sampler_dtype(model), window=settings.window, stride=settings.stride
    )
    latents = sample(model, cond, settings, x_T, noise_fn, callback, window_batch=window_batch)
    if not torch.isfinite(latents).all():
        raise NonFiniteError(f"sampling produced NaN/inf values{_way_out(dtype)}")
    if decode_chunk is None:
        video = decode_within_peak(model, latents)[0].clamp(-1.0, 1.0)
    else:
        video = decode_latents(model, latents, decode_chunk).clamp(-1.0, 1.0)
    return video[:, :, :-1] if mode == "loop" else video

"""Encoding: image(s) + prompts -> :class:`Conditioning`, everything the denoiser needs that no step changes.

    prompts -> tokenizer -> text tower ──────────────┐
    start image -> vision tower -> Resampler ────────┼─> Conditioning (context, uncond / image-only contexts,
    start (and end) image -> VAE encode -> concat ───┘    concatenated latent, fs, λ)

Letters: B batch, T frames, H x W pixels, h x w latent (H/8 x W/8), C context width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .models.context import ImageScale
from .models.dynamicrafter import DynamiCrafter
from .models.encoders import vae_encode
from .models.toon_vae import encode_with_hidden, pair_refs
from .settings import SamplingSettings
from .tokenizer import get_tokenizer

MODES = ("i2v", "interp", "loop")


@dataclass
class Conditioning:
    """Everything the denoiser needs that does not change across steps."""

    context: torch.Tensor  # (B, 77 + n_img, C) text then image tokens
    uncond_context: torch.Tensor  # (B, 77 + n_img, C) negative/empty text, black-image tokens
    image_only_context: torch.Tensor  # (B, 77 + n_img, C) empty text, real image tokens (multi-condition CFG)
    concat: torch.Tensor  # (B, 4, T, h, w) image latent(s) concatenated to the noisy latent
    fs: torch.Tensor  # (B,) long
    image_scale: ImageScale | None = None  # λ of the image cross-attention; None: 1 on every layer
    # ToonCrafter only: the encoder maps of the start and end frames its decoder reads, per level (B, C_i, 2, h_i, w_i)
    refs: list[torch.Tensor] | None = None


# --------------------------------------------------------------------------------------------------------------
# Encoding


def placement(model: DynamiCrafter) -> tuple[torch.device, torch.dtype]:
    """Where the networks compute and in which dtype (fixed at load time: parts may be offloaded between stages or
    stored in float8)."""
    return model.device, model.dtype


@torch.no_grad()
def encode_text(model: DynamiCrafter, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> text tokens (B, 77, C)."""
    device, _ = placement(model)
    ids = get_tokenizer()(list(prompts), context_length=model.cfg.text.context_length).to(device)
    return model.text_encoder(ids)


@torch.no_grad()
def encode_image_context(model: DynamiCrafter, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> Resampler context tokens (B, n_img, C)."""
    _, dtype = placement(model)
    tokens = model.image_encoder(images.to(dtype))  # (B, 257, W_clip)
    return model.image_proj(tokens)


@torch.no_grad()
def encode_latents(model: DynamiCrafter, frames: torch.Tensor) -> torch.Tensor:
    """Frames (N, 3, H, W) in [-1, 1] -> scaled posterior-mean latents (N, 4, h, w)."""
    _, dtype = placement(model)
    return vae_encode(model.vae, frames.to(dtype), model.cfg.diffusion.scale_factor)


@torch.no_grad()
def encode_with_refs(
    model: DynamiCrafter, start: torch.Tensor, end: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """ToonCrafter: start and end images (B, 3, H, W) (``end`` None: the start image ends the video too) -> their
    latents (B, 4, h, w) each and the decoder's references (B, C_i, 2, h_i, w_i), from one encoder call."""
    _, dtype = placement(model)
    frames = start if end is None else torch.cat([start, end])  # (B or 2B, 3, H, W)
    z, maps = encode_with_hidden(model.vae, frames.to(dtype), model.cfg.diffusion.scale_factor)
    b = start.shape[0]
    if end is None:
        return z, z, pair_refs(maps, maps)
    return z[:b], z[b:], pair_refs([m[:b] for m in maps], [m[b:] for m in maps])


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
    image_scale: float | ImageScale | None = None,
) -> Conditioning:
    """Start (and end) images (B, 3, H, W) in [-1, 1] and B prompts -> :class:`Conditioning`.

    The CLIP stream sees the start image only (also in interp/loop); the unconditional branch uses the negative
    prompt (default empty) and the CLIP tokens of a black image, with the same concatenated latent.  ``image_scale``:
    λ for every layer (a number), or an :class:`~dynamicrafter.models.context.ImageScale` (per sample, per layer).
    """
    device, _ = placement(model)
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
    refs = None
    if model.cfg.vae.decoder == "dualref":  # ToonCrafter: one encoder call, which also gives the decoder's references
        end_here = end.to(device) if mode == "interp" and end is not None else None
        z, z_end, refs = encode_with_refs(model, start, end_here)
    else:
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
        image_scale=ImageScale.of(image_scale) if isinstance(image_scale, (int, float)) else image_scale,
        refs=refs,
    )

"""ToonCrafter's decode stage: latents + the references of :class:`~dynamicrafter.conditioning.Conditioning` ->
video, as the original's ``image_guided_synthesis`` does it.

    V = decode(x0)                              T frames, in chunks of 16 (the UNet's temporal length)
    M = decode(x0 without latent frames 1, T-2) T-2 frames
    video = V with frames T/2-1, T/2 taken from M (frames T/2-2, T/2-1)

Memory: the decoder is temporal (see :mod:`dynamicrafter.models.toon_vae`), so unlike DynamiCrafter's VAE it cannot
decode a frame at a time, and tiling the image would change GroupNorm statistics and the attention.  What its
temporal parts allow, and what runs: one sample at a time, one chunk of at most 16 frames per decoder call (the
original's own chunking), two such decodes per sample (V and M).  Letters: B samples, T frames.
"""

from __future__ import annotations

import torch

from .conditioning import placement
from .models.dynamicrafter import DynamiCrafter
from .models.toon_vae import middle_indices, splice, toon_decode
from .sampling import NonFiniteError


def _decode(model: DynamiCrafter, latents: torch.Tensor, refs: list[torch.Tensor] | None) -> torch.Tensor:
    """One decode of (B, 4, T, h, w) -> (B, 3, T, H, W) float32 (float64 stays); a half-precision result with
    NaN/inf is decoded again with the VAE in float32 (then the VAE goes back to its dtype)."""
    _, dtype = placement(model)
    device = next(model.vae.parameters()).device  # where the decode runs, whatever moved during sampling
    scale, window = model.cfg.diffusion.scale_factor, model.cfg.unet.temporal_length
    refs = [r.to(device) for r in refs or ()]
    video = toon_decode(model.vae, latents.to(device, dtype), refs, scale, window)
    if dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(video).all():
        try:
            model.vae.float()
            video = toon_decode(model.vae, latents.to(device).float(), [r.float() for r in refs], scale, window)
        finally:
            model.vae.to(dtype)
    if not torch.isfinite(video).all():
        how = "the checkpoint or the settings produce them" if dtype == torch.float32 else "rerun with {setting} fp32"
        raise NonFiniteError("dtype", f"the VAE decoded NaN/inf values in {str(dtype).removeprefix('torch.')}; {how}")
    return video if video.dtype == torch.float64 else video.float()


@torch.no_grad()
def decode_parts(
    model: DynamiCrafter, latents: torch.Tensor, refs: list[torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (B, 3, T, H, W), M (B, 3, T-2, H, W)): the two decodes of the splice, unclamped."""
    middle = latents[:, :, middle_indices(latents.shape[2])]  # (B, 4, T-2, h, w)
    return _decode(model, latents, refs), _decode(model, middle, refs)


@torch.no_grad()
def decode_toon(
    model: DynamiCrafter, latents: torch.Tensor, refs: list[torch.Tensor] | None
) -> tuple[torch.Tensor, int]:
    """Latents (B, 4, T, h, w) -> (spliced video (B, 3, T, H, W) float32, unclamped; frames per decoder call)."""
    video, middle = decode_parts(model, latents, refs)
    return splice(video, middle), min(latents.shape[2], model.cfg.unet.temporal_length)

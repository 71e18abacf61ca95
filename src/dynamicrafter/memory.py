"""Memory during a run: the VAE decoding in chunks sized by the memory left, the vision tower brought back for the
measures, and whether a frame count fits at all (where each part lives per stage: :mod:`dynamicrafter.offload`).

Letters: B batch, T frames, H x W pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .models.dynamicrafter import DynamiCrafter

# decode(model, latents (B, 4, T, h, w), frames per chunk) -> video (B, 3, T, H, W)
Decode = Callable[[DynamiCrafter, torch.Tensor, int], torch.Tensor]


@contextlib.contextmanager
def vision_tower_on_device(model: DynamiCrafter) -> Iterator[torch.nn.Module]:
    """The CLIP vision tower where the UNet is for the block (the quality measures after decoding), then back where
    it was: sampling never holds it on the GPU for them."""
    tower = model.image_encoder
    home = next(tower.parameters()).device
    tower.to(model.device)
    try:
        yield tower
    finally:
        tower.to(home)


def decode_within_peak(
    model: DynamiCrafter, latents: torch.Tensor, decode: Decode, run_peak: int | None = None
) -> tuple[torch.Tensor, int]:
    """``decode(model, latents, chunk)`` with the chunk size chosen by memory: (video (B, 3, T, H, W), frames per
    chunk).

    On CUDA the first frame of every sample is decoded alone to measure the memory one frame needs; the rest goes in
    the largest chunks that keep the allocation under the peak reached so far (sampling's) and within free memory,
    at least one frame at a time (``run_peak``: that peak, when the caller has reset the statistics since).
    Elsewhere 4 frames per chunk.  Resets CUDA's peak-memory statistics: a caller that wants the run's peak reads it
    before.
    """
    device = latents.device
    if device.type != "cuda":
        return decode(model, latents, 4), 4
    b, t = latents.shape[0], latents.shape[2]
    run_peak = torch.cuda.max_memory_allocated(device) if run_peak is None else run_peak
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    first = decode(model, latents[:, :, :1], b)  # (B, 3, 1, H, W)
    per_frame = max((torch.cuda.max_memory_allocated(device) - base) / b, 1.0)
    headroom = min(run_peak - torch.cuda.memory_allocated(device), torch.cuda.mem_get_info(device)[0])
    chunk = max(1, min(b * (t - 1), int(headroom // per_frame))) if t > 1 else b
    video = first if t == 1 else torch.cat([first, decode(model, latents[:, :, 1:], chunk)], dim=2)
    return video, chunk


def available_bytes(device: str | torch.device) -> int | None:
    """Memory a run may still take on ``device``: free CUDA memory, else the system's MemAvailable (None where
    neither can be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def video_bytes(batch: int, frames: int, height: int, width: int) -> int:
    """What a run holds for its whole length at once, beyond the model and one UNet batch: the latent video and
    its sampler state (float32, a few copies), the decoded float32 video twice (decoding, clamping) and the uint8
    frames; a long video's UNet batches stay a few windows wide whatever its length."""
    latent = 4 * (height // 8) * (width // 8) * 4 * 6  # x_t, noise, model output, fused output, concat, weights
    pixels = 3 * height * width * (4 * 2 + 1)
    return batch * frames * (latent + pixels)


def check_fits(batch: int, frames: int, height: int, width: int, device: str | torch.device) -> None:
    """Refuse a frame count whose whole-length tensors (:func:`video_bytes`) exceed the memory left on ``device``,
    before any work; a SettingsError that names ``frames`` and the most that fits."""
    from .errors import SettingsError

    free = available_bytes(device)
    need = video_bytes(batch, frames, height, width)
    if free is not None and need > free:
        most = max(0, free // max(1, video_bytes(batch, 1, height, width)))
        raise SettingsError(
            "frames",
            f"{frames} frames at {height}x{width} (x{batch}) need about {need / 2**30:.1f} GiB for the video alone, "
            f"more than the {free / 2**30:.1f} GiB free on {torch.device(device)}; use {{setting}} {most} or fewer",
        )

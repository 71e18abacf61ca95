"""Window math for videos longer than the model's 16 frames: placement, blending, FreeNoise-style noise re-use.

A long latent video of F frames is covered by overlapping windows of W frames whose starts are ``stride`` apart
(the last window is pulled back to end exactly on the last frame).  At every DDIM step each window is denoised as an
ordinary W-frame video and the windows' predictions are averaged frame by frame with weights that taper linearly
towards each window's edges (MultiDiffusion), so neighbouring windows cross-fade instead of meeting at a seam.  The
initial (and per-step) noise of frames beyond the first window re-uses the first window's noise frames, shuffled in
blocks of ``stride`` (FreeNoise), so that every stride-aligned window holds the same W noise frames in some order.

Letters: B batch, C channels, F frames of the whole video, W frames per window, N windows, h x w latent size.
Plain functions over tensors; nothing here knows about models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def window_starts(frames: int, window: int, stride: int) -> list[int]:
    """First frame of every window: 0, stride, 2·stride, … plus ``frames − window`` so the last frame is covered.

    ``frames <= window`` gives one window ``[0]`` (of ``frames`` frames).
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if window < 1:
        raise ValueError(f"window must be at least 1 frame, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}")
    if frames <= window:
        return [0]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return starts


def blend_weights(frames: int, window: int, starts: Sequence[int]) -> Tensor:
    """Normalised per-window frame weights (N, W) float32: for every video frame they sum to 1 over its windows.

    Raw weight of window position i is min(i + 1, W − i) (a triangle: 1 at the edges, W/2 in the middle), so two
    windows overlapping by half cross-fade linearly.  A frame covered by one window gets weight exactly 1.0 (w/w),
    which makes a single window reproduce the plain, unwindowed result bit for bit.
    """
    window = min(window, frames)
    i = torch.arange(window)
    raw = torch.minimum(i + 1, window - i).float()  # (W,)
    total = torch.zeros(frames)
    for s in starts:
        total[s : s + window] += raw
    if (total == 0).any():
        raise ValueError(f"windows at {list(starts)} leave frames of {frames} uncovered")
    return torch.stack([raw / total[s : s + window] for s in starts])  # (N, W)


def split_windows(x: Tensor, starts: Sequence[int], window: int) -> Tensor:
    """(B, C, F, h, w) -> (N·B, C, W, h, w), window-major (all samples of window 0, then window 1, …)."""
    return torch.cat([x[:, :, s : s + window] for s in starts])


def fuse_windows(outputs: Tensor, starts: Sequence[int], weights: Tensor, frames: int) -> Tensor:
    """Window-major (N·B, C, W, h, w) predictions -> their weighted average (B, C, F, h, w)."""
    n, window = weights.shape
    parts = outputs.chunk(n)  # N × (B, C, W, h, w)
    fused = outputs.new_zeros(*parts[0].shape[:2], frames, *parts[0].shape[3:])
    for s, part, weight in zip(starts, parts, weights.to(outputs)):
        fused[:, :, s : s + window] += weight.view(1, 1, window, 1, 1) * part
    return fused


def noise_index(frames: int, window: int, stride: int, generator: torch.Generator) -> Tensor:
    """FreeNoise frame map (F,) int64 into a W-frame noise draw.

    Frames 0…W−1 map to themselves; each following block of ``stride`` frames re-uses, in a random order drawn
    from ``generator``, the noise of the block W frames earlier.  Every window starting at a multiple of
    ``stride`` therefore sees each of the W noise frames exactly once.
    """
    window_starts(frames, window, stride)  # validates
    index = list(range(min(window, frames)))
    for f in range(window, frames, stride):
        block = index[f - window : min(f - window + stride, frames - window)]
        order = torch.randperm(len(block), generator=generator).tolist()
        index.extend(block[j] for j in order)
    return torch.tensor(index, dtype=torch.long)


def spread_frames(base: Tensor, index: Tensor) -> Tensor:
    """Noise (B, C, W, h, w) and per-sample frame maps (B, F) -> (B, C, F, h, w) with frame f = base[:, :, index[f]]."""
    return torch.stack([b[:, i] for b, i in zip(base, index.to(base.device))])

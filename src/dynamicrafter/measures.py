"""Reference-free quality measures of a generated video, and the failure flags derived from them.

A video is ``frames``: a (T, H, W, 3) uint8 array.  Every measure below is cheap except the CLIP ones, which need the
checkpoint's vision tower and are therefore optional.  :func:`measure_video` bundles all of them in one JSON-ready
dict (floats rounded to 6 decimals) whose layout is versioned by :data:`MEASURES_VERSION`.

Measures (range in brackets):

``motion`` [0, 1]
    Mean absolute difference of consecutive frames, pixel values scaled to [0, 1]:
    ``mean |f[t+1] - f[t]| / 255`` over all pixels, channels and pairs.  0 for a still video or a single frame.
``flow_px`` [0, inf) pixels
    Dense optical flow (Farneback, OpenCV, on grayscale) between consecutive frames; for each pair the mean of the
    largest 5 % of flow magnitudes (:data:`FLOW_TOP_SHARE`); then the mean over pairs.  It says how far the
    fastest-moving part of the picture travels from one frame to the next.  0 for a single frame.  Frames with a
    shorter side above :data:`FLOW_MAX_SIDE` are shrunk for the flow and the magnitudes rescaled to full size.
``dynamic_degree`` [0, inf), in practice [0, ~0.3]
    ``flow_px / min(H, W)``: the same number as a share of the frame's shorter side, so that it does not depend on
    the resolution.  0.01 means the fast part moves 1 % of the short side per frame.
``moving`` (bool) and ``moving_pairs`` (int)
    The VBench-like verdict.  A pair of frames *moves* when its top-5 % mean flow exceeds
    ``MOVE_THRESHOLD_PX * min(H, W) / 256`` pixels (VBench: 6 px at 256 px, i.e. 3 px at 128 px).  The video
    is *moving* when at least ``max(1, round(MOVE_PAIRS * (T - 1) / 15))`` pairs move, i.e. 4 of the 15 pairs of a
    16-frame video (VBench's rule for 16 frames, scaled linearly with the number of pairs).
``conformity`` / ``conformity_min`` [-1, 1], in practice [0, 1]
    Cosine similarity of the CLIP image embedding of the input photo and of each frame: mean and minimum over the
    frames.  1 when every frame looks like the photo to CLIP.
``temporal_consistency`` [-1, 1], in practice [0, 1]
    Mean cosine similarity of the CLIP embeddings of adjacent frames; 1 for a single frame or a still video.
    Low values mean flicker or frames that change content abruptly.

Flags (each frame-level flag is raised when *some* frame fails the test, see the constants):

``black``      some frame has mean brightness (all pixels and channels, [0, 1]) below :data:`BLACK_BRIGHTNESS`.
``flat``       some frame has a standard deviation (all pixels and channels, [0, 1]) below :data:`FLAT_STD`:
               a uniform or washed-out frame.
``saturated``  in some frame more than :data:`SATURATED_SHARE` of the values (pixels x channels) are 0 or 255.
``static``     the video has at least two frames and is not *moving* by the verdict above.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

MEASURES_VERSION = 1

FLOW_TOP_SHARE = 0.05  # per pair of frames, the mean of this share of the largest flow magnitudes
FLOW_MAX_SIDE = 256  # optical flow runs on frames shrunk to this shorter side at most (then rescaled)
MOVE_THRESHOLD_PX = 6.0  # a pair moves when its top-5 % flow exceeds this many pixels per 256 pixels of short side
MOVE_PAIRS = 4  # ... and the video moves when this many pairs out of 15 move (scaled by T - 1, at least 1)
BLACK_BRIGHTNESS = 0.06  # mean brightness in [0, 1] under which a frame is black (about 15 of 255)
FLAT_STD = 0.02  # standard deviation in [0, 1] under which a frame is uniform (about 5 of 255)
SATURATED_SHARE = 0.5  # share of values clipped at 0 or 255 above which a frame is saturated
EMBED_CHUNK = 16  # frames per batch through the vision tower

# Farneback parameters: pyramid scale, levels, window, iterations, polynomial neighbourhood and sigma, flags.
_FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)

FLAGS = ("black", "flat", "saturated", "static")


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be a (T, H, W, 3) uint8 array with T >= 1, got {frames.dtype} {frames.shape}")
    return frames


# --------------------------------------------------------------------------------------------------------------
# Pixel measures


def motion(frames: np.ndarray) -> float:
    """Mean absolute frame-to-frame difference in [0, 1]; 0 for a single frame."""
    frames = _check_frames(frames)
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames.astype(np.float32) / 255, axis=0)).mean())


def move_threshold_px(height: int, width: int) -> float:
    """Top-5 % flow (pixels) above which a pair of frames moves: ``MOVE_THRESHOLD_PX * min(H, W) / 256``."""
    return MOVE_THRESHOLD_PX * min(height, width) / 256


def moving_pairs_needed(num_frames: int) -> int:
    """Moving pairs needed for a moving video: ``max(1, round(MOVE_PAIRS * (T - 1) / 15))`` (4 for 16 frames)."""
    return max(1, round(MOVE_PAIRS * (num_frames - 1) / 15))


def pair_flows(frames: np.ndarray) -> np.ndarray:
    """Per consecutive pair, the mean of the top :data:`FLOW_TOP_SHARE` Farneback flow magnitudes (pixels): (T-1,).

    Frames whose shorter side exceeds :data:`FLOW_MAX_SIDE` are first shrunk to that size (area interpolation) and
    the magnitudes multiplied back, so the numbers stay in the frame's own pixels at a bounded cost.
    """
    import cv2

    frames = _check_frames(frames)
    _, h, w, _ = frames.shape
    scale = min(1.0, FLOW_MAX_SIDE / min(h, w))
    grays = [cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames]
    if scale < 1.0:  # flow on a smaller copy, magnitudes scaled back to the frame's pixels
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grays = [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in grays]
    out = np.zeros(len(frames) - 1, dtype=np.float64)
    for i in range(len(frames) - 1):
        flow = cv2.calcOpticalFlowFarneback(grays[i], grays[i + 1], None, *_FARNEBACK)
        mag = np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2).ravel()
        k = max(1, math.ceil(FLOW_TOP_SHARE * mag.size))
        out[i] = float(np.partition(mag, mag.size - k)[mag.size - k :].mean()) / scale
    return out


def dynamic_degree(frames: np.ndarray) -> dict[str, Any]:
    """The optical-flow measures: ``{"flow_px", "dynamic_degree", "moving", "moving_pairs"}`` (see the module doc).

    ``flow_px`` is the mean over pairs of the top-5 % flow magnitude in pixels, ``dynamic_degree`` is ``flow_px``
    divided by the frame's shorter side, ``moving_pairs`` counts the pairs above :func:`move_threshold_px` and
    ``moving`` is ``moving_pairs >= moving_pairs_needed(T)``.  A single frame gives zeros and ``moving=False``.
    """
    frames = _check_frames(frames)
    t, h, w, _ = frames.shape
    if t < 2:
        return {"flow_px": 0.0, "dynamic_degree": 0.0, "moving": False, "moving_pairs": 0}
    flows = pair_flows(frames)
    flow_px = float(flows.mean())
    moving_pairs = int((flows > move_threshold_px(h, w)).sum())
    return {
        "flow_px": flow_px,
        "dynamic_degree": flow_px / min(h, w),
        "moving": moving_pairs >= moving_pairs_needed(t),
        "moving_pairs": moving_pairs,
    }


def frame_flags(frames: np.ndarray) -> list[str]:
    """The frame-level flags ``black``, ``flat``, ``saturated`` raised by ``frames`` (in that order)."""
    frames = _check_frames(frames)
    x = frames.reshape(len(frames), -1)
    flags = []
    means = x.mean(axis=1, dtype=np.float64) / 255
    if (means < BLACK_BRIGHTNESS).any():
        flags.append("black")
    stds = x.std(axis=1, dtype=np.float64) / 255
    if (stds < FLAT_STD).any():
        flags.append("flat")
    clipped = ((x == 0) | (x == 255)).mean(axis=1)
    if (clipped > SATURATED_SHARE).any():
        flags.append("saturated")
    return flags


# --------------------------------------------------------------------------------------------------------------
# CLIP measures (from embeddings, so that they do not depend on the model)


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).detach().float().cpu()


def conformity_from(
    photo_embed: torch.Tensor | np.ndarray, frame_embeds: torch.Tensor | np.ndarray
) -> tuple[float, float]:
    """(mean, min) cosine similarity of ``photo_embed`` (E,) with each row of ``frame_embeds`` (T, E)."""
    p = torch.nn.functional.normalize(_as_tensor(photo_embed).reshape(-1), dim=0)
    f = torch.nn.functional.normalize(_as_tensor(frame_embeds), dim=-1)
    if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] != p.shape[0]:
        raise ValueError(f"expected photo (E,) and frames (T, E) embeddings, got {tuple(p.shape)} and {tuple(f.shape)}")
    sims = f @ p
    return float(sims.mean()), float(sims.min())


def temporal_consistency_from(frame_embeds: torch.Tensor | np.ndarray) -> float:
    """Mean cosine similarity of adjacent rows of ``frame_embeds`` (T, E); 1.0 for a single frame."""
    f = torch.nn.functional.normalize(_as_tensor(frame_embeds), dim=-1)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"expected (T, E) frame embeddings, got {tuple(f.shape)}")
    if f.shape[0] < 2:
        return 1.0
    return float((f[1:] * f[:-1]).sum(dim=-1).mean())


def embed_frames(
    image_encoder, frames: np.ndarray, photo: torch.Tensor | None = None, chunk: int = EMBED_CHUNK
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIP embeddings of uint8 ``frames`` (T, H, W, 3) and of ``photo`` (1, 3, H, W) in [-1, 1] if given.

    ``image_encoder`` is anything with ``.embed(images)`` taking (N, 3, H, W) in [-1, 1] (an ``ImageEncoder``);
    it is run without gradients on its own device and dtype, ``chunk`` frames at a time.  Returns
    ``(frame_embeds (T, E), photo_embed (E,) or None)``, float32 on the CPU.
    """
    frames = _check_frames(frames)
    p = next(image_encoder.parameters())
    out = []
    with torch.no_grad():
        for start in range(0, len(frames), chunk):
            x = torch.from_numpy(frames[start : start + chunk]).permute(0, 3, 1, 2).to(p.device, p.dtype)
            out.append(image_encoder.embed(x / 127.5 - 1.0).float().cpu())
        photo_embed = None
        if photo is not None:
            photo_embed = image_encoder.embed(photo.to(p.device, p.dtype)).float().cpu().reshape(-1)
    return torch.cat(out), photo_embed


# --------------------------------------------------------------------------------------------------------------
# All of them


def measure_video(
    frames: np.ndarray,
    *,
    photo: torch.Tensor | None = None,
    image_encoder=None,
    frame_embeds: torch.Tensor | np.ndarray | None = None,
    photo_embed: torch.Tensor | np.ndarray | None = None,
) -> dict[str, Any]:
    """All measures of ``frames`` (T, H, W, 3) uint8 as one JSON-ready dict (floats rounded to 6 decimals).

    The CLIP measures come from ``image_encoder`` (with ``photo`` (1, 3, H, W) in [-1, 1] for conformity), or from
    embeddings computed beforehand (``frame_embeds`` (T, E), ``photo_embed`` (E,)); they are None when neither is
    given.  Keys: ``version, motion, flow_px, dynamic_degree, moving, moving_pairs, conformity, conformity_min,
    temporal_consistency, flags`` (a list, in the order of :data:`FLAGS`).
    """
    frames = _check_frames(frames)
    if image_encoder is not None and (frame_embeds is not None or photo_embed is not None):
        raise ValueError("give either image_encoder or precomputed embeddings, not both")
    if photo is not None and image_encoder is None:
        raise ValueError("a photo needs an image_encoder (with precomputed embeddings, pass photo_embed)")
    if photo_embed is not None and frame_embeds is None:
        raise ValueError("photo_embed needs frame_embeds")
    if image_encoder is not None:
        frame_embeds, photo_embed = embed_frames(image_encoder, frames, photo)

    flow = dynamic_degree(frames)
    result: dict[str, Any] = {
        "version": MEASURES_VERSION,
        "motion": motion(frames),
        **flow,
        "conformity": None,
        "conformity_min": None,
        "temporal_consistency": None,
    }
    if frame_embeds is not None:
        result["temporal_consistency"] = temporal_consistency_from(frame_embeds)
        if photo_embed is not None:
            result["conformity"], result["conformity_min"] = conformity_from(photo_embed, frame_embeds)
    flags = frame_flags(frames)
    if len(frames) >= 2 and not flow["moving"]:
        flags.append("static")
    result["flags"] = flags
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}


_ADVICE = {
    "black": "frames are (nearly) black: try another seed, a smaller image_scale or another fs",
    "flat": "some frames are uniform or washed out: try another seed or a smaller image_scale",
    "saturated": "frames are saturated (many pure black/white pixels): try another seed or a smaller image_scale",
    "static": "the video barely moves: try a smaller image_scale, another fs or another seed",
}


def warning_for(measures: dict[str, Any] | None) -> str | None:
    """One line saying what is wrong with a video and what to try, from its ``measures``; None when nothing is."""
    flags = [f for f in FLAGS if f in ((measures or {}).get("flags") or [])]
    if not flags:
        return None
    line = _ADVICE[flags[0]]
    others = flags[1:]
    return line + (f" (also flagged: {', '.join(others)})" if others else "")

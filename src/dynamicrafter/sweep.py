"""λ sweeps: which layers a λ applies to, the two measures, and the pictures (grid video, contact sheet, chart).

Motion = mean absolute difference between consecutive frames (uint8 frames scaled to [0, 1]).
Input conformity = mean cosine similarity between the CLIP image embedding of the input photo and of each frame,
computed with the checkpoint's own vision tower and projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .config import UNetConfig
from .pipeline import SamplingSettings, animate as run_animate, set_image_scale

if TYPE_CHECKING:
    from .models.dynamicrafter import DynamiCrafter

LAYER_GROUPS = ("all", "input", "middle", "output")


def layer_indices(cfg: UNetConfig, spec: str) -> list[int]:
    """Spatial-transformer indices for ``all``/``input``/``middle``/``output`` or a comma list like ``0,3,5``."""
    total = cfg.num_spatial_transformers
    n_in = (total - 1) * cfg.num_res_blocks // (2 * cfg.num_res_blocks + 1)  # input side of the total
    groups = {
        "all": list(range(total)),
        "input": list(range(n_in)),
        "middle": [n_in],
        "output": list(range(n_in + 1, total)),
    }
    spec = spec.strip().lower()
    if spec in groups:
        return groups[spec]
    try:
        chosen = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--layers must be all, input, middle, output or indices like 0,3,5 (got {spec!r})") from None
    if not chosen or chosen[0] < 0 or chosen[-1] >= total:
        raise ValueError(f"--layers indices must be between 0 and {total - 1} (got {spec!r})")
    return chosen


def parse_values(text: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0]: finite, distinct numbers, no empty entries."""
    example = "e.g. 0,0.5,1"
    parts = [v.strip() for v in text.split(",")]
    if not any(parts):
        raise ValueError(f"--values is empty ({example})")
    if not all(parts):
        raise ValueError(f"--values has an empty entry in {text!r} ({example})")
    try:
        values = [float(v) for v in parts]
    except ValueError:
        raise ValueError(f"--values must be numbers separated by commas, {example} (got {text!r})") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--values must be finite numbers (got {text!r})")
    repeated = sorted({f"{v:g}" for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"--values lists {', '.join(repeated)} more than once")
    return values


def motion(frames: np.ndarray) -> float:
    """Mean absolute frame-to-frame difference of (T, H, W, 3) uint8 frames, in [0, 1]."""
    x = frames.astype(np.float32) / 255.0
    return float(np.abs(np.diff(x, axis=0)).mean()) if len(x) > 1 else 0.0


@torch.no_grad()
def conformity(image_encoder, photo: torch.Tensor, frames: np.ndarray) -> float:
    """Mean cosine similarity of CLIP embeddings: ``photo`` (1, 3, H, W) in [-1, 1] vs each uint8 frame."""
    p = next(image_encoder.parameters())
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).to(p.device, p.dtype) / 127.5 - 1.0  # (T, 3, H, W)
    embeds = image_encoder.embed(torch.cat([photo.to(p.device, p.dtype), video])).float()  # (1 + T, E)
    embeds = torch.nn.functional.normalize(embeds, dim=-1)
    return float((embeds[1:] @ embeds[0]).mean())


# --------------------------------------------------------------------------------------------------------------
# Pictures


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def label_frame(frame: np.ndarray, text: str, strip: int = 20) -> np.ndarray:
    """A frame with a white label strip on top."""
    h, w, _ = frame.shape
    canvas = Image.new("RGB", (w, h + strip), "white")
    canvas.paste(Image.fromarray(frame), (0, strip))
    ImageDraw.Draw(canvas).text((4, 3), text, fill="black", font=_font())
    return np.asarray(canvas)


def grid_video(videos: Sequence[np.ndarray], labels: Sequence[str]) -> np.ndarray:
    """Side-by-side labelled videos: list of (T, H, W, 3) -> (T, H + strip, W·n, 3)."""
    return np.stack([
        np.concatenate([label_frame(v[t], label) for v, label in zip(videos, labels)], axis=1)
        for t in range(videos[0].shape[0])
    ])


def contact_sheet(videos: Sequence[np.ndarray], labels: Sequence[str]) -> Image.Image:
    """One row per video: first, middle and last frame, labelled."""
    rows = []
    for video, label in zip(videos, labels):
        t = video.shape[0]
        picks = [(0, "first"), (t // 2, "middle"), (t - 1, "last")]
        rows.append(np.concatenate([label_frame(video[i], f"{label} {name}") for i, name in picks], axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


def chart(values: Sequence[float], series: dict[str, Sequence[float]], size=(360, 220)) -> Image.Image:
    """Small line charts (one panel per series) of each measure against λ."""
    w, h = size
    image = Image.new("RGB", (w * len(series), h), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    for panel, (name, ys) in enumerate(series.items()):
        x0, y0, x1, y1 = panel * w + 50, 25, panel * w + w - 15, h - 35
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 5), f"{name} vs lambda", fill="black", font=font)
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-6
        xl, xh = min(values), max(values)
        xh = xh if xh > xl else xl + 1e-6
        points = [(x0 + (x - xl) / (xh - xl) * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)) for x, y in zip(values, ys)]
        if len(points) > 1:
            draw.line(points, fill=colours[panel % 3], width=2)
        for (px, py), x in zip(points, values):
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colours[panel % 3])
            draw.text((px - 8, y1 + 5), f"{x:g}", fill="black", font=font)
        draw.text((panel * w + 2, y0), f"{hi:.3g}", fill="black", font=font)
        draw.text((panel * w + 2, y1 - 12), f"{lo:.3g}", fill="black", font=font)
    return image


def sweep_videos(
    net: DynamiCrafter,
    start: torch.Tensor,
    prompt: str,
    settings: SamplingSettings,
    seed: int,
    lambdas: Sequence[float],
    blocks: Sequence[int],
    *,
    end: torch.Tensor | None = None,
    negative_prompt: str = "",
    batch_size: int | None = None,
    callback: Callable[[int, int], object] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """One video (3, T, H, W) per λ, and the batch size that ran.

    The λ values are the samples of one batch (``batch_size`` at a time; None: all), each with its own λ on
    ``blocks`` (every other layer has λ = 1, and all are back at 1 afterwards) and the same seed, hence the same
    noise.  On a CUDA out-of-memory error the batch is halved and the chunk retried.  The encoders stay where the
    UNet is (the conformity measure uses the vision tower next); the videos come back on the CPU.  ``start`` (and
    ``end``, interpolation) is (1, 3, H, W); ``callback(step, steps)`` follows the denoising of each chunk.
    """
    size = min(batch_size or len(lambdas), len(lambdas))
    videos: list[torch.Tensor] = []
    set_image_scale(net, 1.0)
    try:
        while len(videos) < len(lambdas):
            chunk = lambdas[len(videos) : len(videos) + size]
            n = len(chunk)
            set_image_scale(net, chunk, blocks)
            try:
                out = run_animate(
                    net, start.expand(n, -1, -1, -1), [prompt] * n, settings, [seed] * n,
                    end=None if end is None else end.expand(n, -1, -1, -1), mode="i2v" if end is None else "interp",
                    negative_prompts=[negative_prompt] * n, keep_encoders=True, callback=callback,
                )
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                size = n // 2
            else:
                videos.extend(out.cpu().unbind(0))  # finished videos leave the GPU
                continue
            torch.cuda.empty_cache()  # outside the handler: the failed run's tensors are released by now
    finally:
        set_image_scale(net, 1.0)
    return videos, size

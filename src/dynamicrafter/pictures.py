"""Pictures for comparing videos side by side: labelled frames, a grid video, a contact sheet, line charts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont



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
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
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
            draw.line(points, fill=colours[panel % 4], width=2)
        for (px, py), x in zip(points, values):
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colours[panel % 4])
            draw.text((px - 8, y1 + 5), f"{x:g}", fill="black", font=font)
        draw.text((panel * w + 2, y0), f"{hi:.3g}", fill="black", font=font)
        draw.text((panel * w + 2, y1 - 12), f"{lo:.3g}", fill="black", font=font)
    return image

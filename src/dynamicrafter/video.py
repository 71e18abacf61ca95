"""Writing frames: MP4 (H.264, yuv420p), GIF, WebP or a folder of PNGs, plus the JSON sidecar.

Every writer goes through :func:`~dynamicrafter.files.atomic_path` (a temporary name in the destination folder and
an atomic rename), so an interrupted or failed write never leaves a partial file under the final name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SettingsError
from .files import OutputError, atomic_path

FORMATS = ("mp4", "gif", "webp", "png")


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] -> (T, H, W, 3) uint8, truncating like the original (no rounding)."""
    x = (video.detach().float().clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0
    return x.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


def format_for(path: Path) -> str:
    """The output format implied by a path's suffix (a path without suffix is a PNG folder)."""
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("mp4", "gif", "webp"):
        return suffix
    if suffix == "":
        return "png"
    raise OutputError(f"unsupported output type '.{suffix}' (use .mp4, .gif, .webp, or a folder for PNG frames)")


def check_fps(fps: int | None) -> None:
    """The frame rate of a written video, when given: a positive whole number."""
    if fps is not None and fps < 1:
        raise SettingsError("fps", f"{{setting}} must be at least 1 (got {fps})")


def write_frames(frames: np.ndarray, path: str | Path, fps: int, fmt: str | None = None) -> Path:
    """Write (T, H, W, 3) uint8 frames to ``path`` atomically; returns the final path."""
    import imageio.v2 as imageio

    path = Path(path)
    fmt = fmt or format_for(path)
    if fmt not in FORMATS:
        raise OutputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    with atomic_path(path, is_dir=fmt == "png") as tmp:
        if fmt == "mp4":
            writer = imageio.get_writer(
                tmp, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p", quality=None,
                ffmpeg_params=["-crf", "10", "-movflags", "+faststart"], macro_block_size=2, ffmpeg_log_level="error",
            )
            with writer:
                for frame in frames:
                    writer.append_data(frame)
        elif fmt == "gif":
            imageio.mimsave(tmp, list(frames), format="GIF", duration=1000 / fps, loop=0)
        elif fmt == "webp":
            imageio.mimsave(tmp, list(frames), format="WEBP", duration=1000 / fps, loop=0, lossless=False)
        else:
            for i, frame in enumerate(frames):
                imageio.imwrite(tmp / f"frame_{i:04d}.png", frame)
    return path


def write_sidecar(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as pretty JSON to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode a video written by :func:`write_frames` back to (T, H, W, 3) uint8 (used by tests and metrics)."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.is_dir():
        return np.stack([imageio.imread(p) for p in sorted(path.glob("frame_*.png"))])
    return np.stack([np.asarray(f)[..., :3] for f in imageio.mimread(path, memtest=False)])

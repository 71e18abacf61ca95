"""λ sweeps: the same seed and noise at several image cross-attention scales λ, compared.

Which layers a λ applies to, the videos (one UNet batch serves several λ: each sample carries its own), the two
measures, and the files a sweep writes (grid video, one video per λ, contact sheet, chart, metrics.json).

Every video is measured by :func:`dynamicrafter.measures.measure_video` (motion, dynamic degree, input conformity,
temporal consistency, flags), the same measures every output gets.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .config import UNetConfig
from .errors import SettingsError
from .files import OutputError, atomic_path, ensure_writable_dir
from .measures import measure_video
from .models.context import ImageScale
from .pictures import chart, contact_sheet, grid_video
from .pipeline import animate
from .presets import Preset
from .request import Request
from .settings import SamplingSettings
from .video import check_fps, video_to_uint8, write_frames, write_sidecar

if TYPE_CHECKING:
    from .models.dynamicrafter import DynamiCrafter

LAYER_GROUPS = ("all", "input", "middle", "output")


def layer_indices(cfg: UNetConfig, spec: str | Sequence[int]) -> list[int]:
    """Spatial-transformer indices for ``all``/``input``/``middle``/``output``, a comma list like ``0,3,5``, or a
    sequence of indices."""
    if not isinstance(spec, str):
        spec = ",".join(str(int(i)) for i in spec)
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
        raise SettingsError("layers", f"{{setting}} must be all, input, middle, output or indices like 0,3,5 (got {spec!r})") from None
    if not chosen or chosen[0] < 0 or chosen[-1] >= total:
        raise SettingsError("layers", f"{{setting}} indices must be between 0 and {total - 1} (got {spec!r})")
    return chosen


def check_values(values: Sequence[float]) -> list[float]:
    """The λ values of a sweep: at least one, finite, distinct."""
    values = [float(v) for v in values]
    if not values:
        raise SettingsError("values", "{setting} is empty (e.g. 0,0.5,1)")
    if not all(math.isfinite(v) for v in values):
        raise SettingsError("values", f"{{setting}} must be finite numbers (got {', '.join(f'{v:g}' for v in values)})")
    repeated = sorted({f"{v:g}" for v in values if values.count(v) > 1})
    if repeated:
        raise SettingsError("values", f"{{setting}} lists {', '.join(repeated)} more than once")
    labels = [f"{v:g}" for v in values]  # names of the videos (lambda_<label>.mp4) and of the grid's columns
    alike = sorted({label for label in labels if labels.count(label) > 1})
    if alike:
        same = [repr(v) for v, label in zip(values, labels) if label == alike[0]]
        raise SettingsError("values", f"{{setting}} {' and '.join(same)} print the same ({alike[0]}) and would share "
                                      f"one video; give values that differ in the first 6 digits")
    return values


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
    ``blocks`` (every other layer has λ = 1) and the same seed, hence the same noise.  On a CUDA out-of-memory
    error the batch is halved and the chunk retried.  The encoders stay where the UNet is (the conformity measure
    uses the vision tower next); the videos come back on the CPU.  ``start`` (and ``end``, interpolation) is
    (1, 3, H, W); ``callback(step, steps)`` follows the denoising of each chunk.
    """
    size = min(batch_size or len(lambdas), len(lambdas))
    videos: list[torch.Tensor] = []
    while len(videos) < len(lambdas):
        chunk = lambdas[len(videos) : len(videos) + size]
        n = len(chunk)
        try:
            out = animate(
                net, start.expand(n, -1, -1, -1), [prompt] * n, settings, [seed] * n,
                end=None if end is None else end.expand(n, -1, -1, -1), mode="i2v" if end is None else "interp",
                negative_prompts=[negative_prompt] * n, image_scale=ImageScale.of(chunk, blocks),
                keep_encoders=True, callback=callback,
            )
        except torch.cuda.OutOfMemoryError:
            if n == 1:
                raise
            size = n // 2
        else:
            videos.extend(out.cpu().unbind(0))  # finished videos leave the GPU
            continue
        torch.cuda.empty_cache()  # outside the handler: the failed run's tensors are released by now
    return videos, size


@dataclass
class SweepResult:
    """The videos of a λ sweep (uint8 (T, H, W, 3) per λ) and their measures; :meth:`save` writes them all."""

    request: Request
    model: str
    layers: str
    blocks: list[int]
    lambdas: list[float]
    clips: list[np.ndarray]
    rows: list[dict[str, Any]]  # per λ: lambda, motion, conformity, video (name inside the sweep folder)
    batch_size: int
    fps: int
    timings: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        r = self.request
        return {
            "image": r.image, "prompt": r.prompt, "model": self.model, "seed": r.seed, "layers": self.layers,
            "blocks": self.blocks, "batch_size": self.batch_size, "settings": r.settings.__dict__,
            "results": self.rows, "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }

    def save(self, folder: str | Path, *, fps: int | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Write ``grid.mp4``, one ``lambda_<v>.mp4`` per λ, ``contact_sheet.png``, ``chart.png`` and
        ``metrics.json`` (the record, returned) into ``folder``; each file atomically.  A folder that already holds
        a sweep is replaced only with ``overwrite`` (then the videos of λ values no longer swept are removed)."""
        folder = ensure_writable_dir(Path(folder))
        if (folder / "metrics.json").exists() and not overwrite:
            raise OutputError(f"{folder} already holds a sweep; save with overwrite=True to replace it")
        check_fps(fps)
        fps = fps or self.fps
        labels = [f"lambda={v:g}" for v in self.lambdas]
        for row, clip in zip(self.rows, self.clips):
            write_frames(clip, folder / row["video"], fps)
        write_frames(grid_video(self.clips, labels), folder / "grid.mp4", fps)
        series = {k: [r[k] for r in self.rows] for k in ("motion", "dynamic_degree", "conformity", "temporal_consistency")}
        for name, picture in (("contact_sheet.png", contact_sheet(self.clips, labels)),
                              ("chart.png", chart(self.lambdas, series))):
            with atomic_path(folder / name) as tmp:
                picture.save(tmp)
        record = self.record()
        previous = earlier_videos(folder / "metrics.json")
        write_sidecar(folder / "metrics.json", record)
        for name in previous - {r["video"] for r in self.rows}:  # an overwritten sweep's videos for λ no longer swept
            (folder / name).unlink(missing_ok=True)
        return record


def earlier_videos(metrics: Path) -> set[str]:
    """The per-λ video names an earlier sweep recorded in ``metrics`` (plain names inside the folder only)."""
    try:
        rows = json.loads(metrics.read_text())["results"]
        names = {Path(r["video"]).name for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if n.startswith("lambda_") and n.endswith(".mp4")}


def run_sweep(
    net: DynamiCrafter,
    preset: Preset,
    request: Request,
    values: Sequence[float],
    layers: str | Sequence[int] = "all",
    batch_size: int | None = None,
    progress: Callable[[int, int], object] | None = None,
    *,
    load_s: float = 0.0,
) -> SweepResult:
    """Animate ``request`` with ``preset``'s network ``net`` once per λ (see :func:`sweep_videos`) and measure
    every video."""
    lambdas = check_values(values)
    blocks = layer_indices(preset.model_config().unet, layers)
    if request.mode == "loop" or request.image_scale is not None or request.samples != 1:
        raise SettingsError("values", "a λ sweep takes one photo (and end_image), without loop, image_scale or samples")
    if batch_size is not None and batch_size < 1:
        raise SettingsError("batch_size", f"{{setting}} must be at least 1 (got {batch_size})")
    started = time.perf_counter()
    video, used = sweep_videos(
        net, request.start, request.prompt, request.settings, request.seed, lambdas, blocks, end=request.end,
        negative_prompt=request.negative_prompt, batch_size=batch_size, callback=progress,
    )
    generate_s = time.perf_counter() - started
    clips = [video_to_uint8(v) for v in video]
    rows = []
    for v, clip in zip(lambdas, clips):
        m = measure_video(clip, photo=request.start, image_encoder=net.image_encoder)
        rows.append({"lambda": v, "motion": m["motion"], "conformity": m["conformity"],
                     "dynamic_degree": m["dynamic_degree"], "temporal_consistency": m["temporal_consistency"],
                     "flags": m["flags"], "video": f"lambda_{v:g}.mp4"})  # video: relative to the sweep folder
    layer_name = layers if isinstance(layers, str) else ",".join(str(i) for i in blocks)
    return SweepResult(
        request=request, model=preset.name, layers=layer_name, blocks=blocks, lambdas=lambdas, clips=clips,
        rows=rows, batch_size=used, fps=preset.fps, timings={"load_s": load_s, "generate_s": generate_s},
    )

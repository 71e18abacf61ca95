"""One animation, described and checked before any model loads: the photo(s) prepared at the model's resolution,
the prompt, the seed(s), λ and every sampler setting resolved against the preset."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from .errors import SettingsError
from .images import load_image, prepare_image
from .presets import Preset, get_preset
from .settings import SamplingSettings

if TYPE_CHECKING:
    import torch

# A photo: a file path, a PIL image, or an (H, W, 3) uint8 array.
ImageInput = Union[str, Path, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Request:
    """One validated animation: the photo(s) prepared at the model's resolution, every setting resolved."""

    image: str | None  # where the photo came from (recorded in the sidecar); None for an in-memory picture
    start: torch.Tensor  # (1, 3, H, W) in [-1, 1]
    prompt: str
    settings: SamplingSettings
    seed: int = 123
    mode: str = "i2v"  # "i2v", "interp" (with ``end``) or "loop"
    end: torch.Tensor | None = None  # (1, 3, H, W) in [-1, 1]
    end_image: str | None = None
    negative_prompt: str = ""
    image_scale: float | None = None  # λ on every layer; None: the checkpoint's 1
    samples: int = 1  # videos from seeds seed, seed + 1, ...
    init_statistics: str | None = None  # CIL: a local Analytic-Init statistics file instead of the preset's

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.samples)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one UNet batch."""
        return (self.settings, self.mode, self.image_scale, self.init_statistics)


def _picture(image: ImageInput, setting: str) -> tuple[Image.Image, str | None]:
    """A photo of any accepted kind as an RGB PIL image, and its path (None for in-memory pictures)."""
    if isinstance(image, (str, Path)):
        return load_image(image), str(image)
    if isinstance(image, Image.Image):
        return image.convert("RGB"), None
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return Image.fromarray(image), None
    raise SettingsError(setting, f"{{setting}} must be a path, a PIL image or an (H, W, 3) uint8 array (got {type(image).__name__})")


def make_request(
    model: str | Preset,
    image: ImageInput,
    prompt: str,
    *,
    end_image: ImageInput | None = None,
    loop: bool = False,
    seed: int = 123,
    samples: int = 1,
    negative_prompt: str = "",
    image_scale: float | None = None,
    init_statistics: str | Path | None = None,
    **settings: Any,
) -> Request:
    """Check everything about one animation of ``model`` (a preset or its name) before any model loads.

    ``settings`` override the preset's sampler defaults (``steps``, ``cfg_scale``, ``cfg_img``, ``eta``, ``fs``,
    ``frames``, ``window``, ``stride``; see :class:`~dynamicrafter.settings.SamplingSettings`).  ``end_image``
    interpolates towards a second photo, ``loop`` makes a seamless loop (both meant for the 512-interp model).
    CIL: ``start_timestep`` and ``analytic_init`` are sampler settings; ``init_statistics`` a local Analytic-Init
    file (it turns ``analytic_init`` on unless that is given) instead of the preset's download.
    """
    preset = get_preset(model) if isinstance(model, str) else model
    if not isinstance(prompt, str) or not prompt.strip():
        raise SettingsError("prompt", 'the prompt is empty; describe the motion you want, e.g. "waves crashing on rocks"')
    if loop and end_image is not None:
        raise SettingsError("loop", "{setting} and end_image exclude each other")
    if samples < 1:
        raise SettingsError("samples", f"{{setting}} must be at least 1 (got {samples})")
    if not -(2**63) <= int(seed) <= 2**63 - samples:  # the generators' int64 range, every sample's seed included
        raise SettingsError("seed", f"{{setting}} must be a whole number within ±2**63 (got {seed})")
    if image_scale is not None and not math.isfinite(image_scale):
        raise SettingsError("image_scale", f"{{setting}} must be a finite number (got {image_scale})")
    start_picture, image_path = _picture(image, "image")
    end_picture, end_path = _picture(end_image, "end_image") if end_image is not None else (None, None)
    if init_statistics is not None:
        if not Path(init_statistics).is_file():
            raise SettingsError("init_statistics", f"{{setting}} file not found: {init_statistics}")
        settings["analytic_init"] = True if settings.get("analytic_init") is None else settings["analytic_init"]
    checked = preset.sampling(**settings)
    if checked.analytic_init and init_statistics is None and preset.init_file is None:
        raise SettingsError(
            "analytic_init",
            f"the {preset.name} model has no Analytic-Init statistics of its own for {{setting}}; give a statistics file",
        )
    if checked.frames < 4 and preset.model_config().vae.decoder == "dualref":
        raise SettingsError(
            "frames", f"ToonCrafter's decode splices two middle frames: {{setting}} must be at least 4 (got {checked.frames})"
        )
    return Request(
        image=image_path,
        start=prepare_image(start_picture, preset.height, preset.width),
        prompt=prompt,
        settings=checked,
        seed=int(seed),
        mode="loop" if loop else ("interp" if end_picture is not None else "i2v"),
        end=None if end_picture is None else prepare_image(end_picture, preset.height, preset.width),
        end_image=end_path,
        negative_prompt=negative_prompt,
        image_scale=image_scale,
        samples=samples,
        init_statistics=None if init_statistics is None else str(init_statistics),
    )

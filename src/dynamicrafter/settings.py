"""What the sampler is asked to do: one typed, frozen object whose defaults come from a preset
(:meth:`dynamicrafter.presets.Preset.sampling`), checked before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SettingsError


@dataclass(frozen=True)
class SamplingSettings:
    """The sampler's settings (defaults: the 256 model's; a preset's come from ``Preset.sampling``)."""

    steps: int = 50
    cfg_scale: float = 7.5
    cfg_img: float | None = None  # None: plain classifier-free guidance; a number: separate image guidance
    eta: float = 1.0
    fs: int | None = None  # None: the UNet's default_fs
    guidance_rescale: float = 0.0
    timestep_spacing: str = "uniform"
    frames: int = 16
    window: int = 16  # longer videos are denoised as overlapping windows of this many frames ...
    stride: int = 8  # ... starting this many frames apart (half-window overlap: every frame seen twice)

    def checked(self) -> SamplingSettings:
        """These settings, or a :class:`SettingsError` naming the first impossible one (step counts the schedule
        cannot serve are refused here, with nearby working counts)."""
        from .long_video import window_starts
        from .sampling import ddim_timesteps

        for name, value in (("cfg_scale", self.cfg_scale), ("cfg_img", self.cfg_img), ("eta", self.eta)):
            if value is not None and not math.isfinite(value):
                raise SettingsError(name, f"{{setting}} must be a finite number (got {value})")
        if self.steps < 1:
            raise SettingsError("steps", f"{{setting}} must be at least 1 (got {self.steps})")
        if self.eta < 0:
            raise SettingsError("eta", f"{{setting}} must be >= 0 (got {self.eta})")
        if self.frames < 2:
            raise SettingsError("frames", f"{{setting}} must be at least 2 (got {self.frames})")
        try:
            ddim_timesteps(self.steps, self.timestep_spacing)
        except ValueError as exc:
            raise SettingsError("steps", str(exc)) from None
        try:
            window_starts(self.frames, self.window, self.stride)
        except ValueError as exc:
            raise SettingsError("window", f"{{setting}}/stride: {exc}") from None
        return self

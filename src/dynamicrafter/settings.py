"""What the sampler is asked to do: one typed, frozen object whose defaults come from a preset
(:meth:`dynamicrafter.presets.Preset.sampling`), checked before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SettingsError


TRAIN_TIMESTEPS = 1000  # the DDPM schedule's length in every released model


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
    # CIL (conditional image leakage): sampling starts at training timestep M (the DDIM grid spans 0..M-1 instead
    # of the whole schedule; None: the whole schedule), from the analytic initial noise of the model's data
    # statistics when ``analytic_init`` (see dynamicrafter.cil)
    start_timestep: int | None = None
    analytic_init: bool = False

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
        start = self.start_timestep
        if start is not None and not 2 <= start <= TRAIN_TIMESTEPS:
            raise SettingsError("start_timestep", f"{{setting}} must be within 2..{TRAIN_TIMESTEPS} (got {start})")
        try:
            ddim_timesteps(self.steps, self.timestep_spacing, TRAIN_TIMESTEPS, start)
        except ValueError as exc:
            raise SettingsError("steps", str(exc)) from None
        try:
            window_starts(self.frames, self.window, self.stride)
        except ValueError as exc:
            raise SettingsError("window", f"{{setting}}/stride: {exc}") from None
        return self

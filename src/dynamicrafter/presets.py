"""Model presets: the entries of ``weights.toml`` as typed objects.

Every setting that differs between the released models lives in ``weights.toml``; this module only reads it and
builds the matching :class:`~dynamicrafter.config.ModelConfig`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources

from .config import ModelConfig, tiny_config
from .settings import SamplingSettings


class UnknownModelError(ValueError):
    """A model name that is not in ``weights.toml``."""


@dataclass(frozen=True)
class Preset:
    """One ``[models.NAME]`` entry of ``weights.toml``."""

    name: str
    description: str
    architecture: str  # "full" or "tiny"
    height: int
    width: int
    frames: int
    parameterization: str
    rescale_betas_zero_snr: bool
    use_dynamic_rescale: bool
    base_scale: float
    default_fs: int
    fs: int
    image_cross_attention_scale_learnable: bool
    timestep_spacing: str
    guidance_rescale: float
    steps: int
    eta: float
    cfg_scale: float
    fps: int
    mode: str
    repo: str | None = None
    file: str | None = None
    sha256: str | None = None
    weights_gb: float | None = None  # tensor bytes of the released checkpoint (what a download fetches, roughly)
    seed: int | None = None  # random-weight seed of built-in architectures

    @property
    def downloadable(self) -> bool:
        return self.repo is not None

    def sampling(self, **overrides: object) -> SamplingSettings:
        """This preset's sampler settings with ``overrides`` (None values keep the preset's), checked: a
        :class:`~dynamicrafter.errors.SettingsError` names the first impossible one."""
        known = {f.name for f in fields(SamplingSettings)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown sampling settings: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        base = SamplingSettings(
            steps=self.steps,
            cfg_scale=self.cfg_scale,
            eta=self.eta,
            fs=self.fs,
            guidance_rescale=self.guidance_rescale,
            timestep_spacing=self.timestep_spacing,
            frames=self.frames,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None}).checked()

    def model_config(self) -> ModelConfig:
        """The network configuration this preset runs with."""
        base = ModelConfig()
        unet = replace(
            base.unet,
            default_fs=self.default_fs,
            temporal_length=self.frames,
            image_cross_attention_scale_learnable=self.image_cross_attention_scale_learnable,
        )
        diffusion = replace(
            base.diffusion,
            parameterization=self.parameterization,
            rescale_betas_zero_snr=self.rescale_betas_zero_snr,
            use_dynamic_rescale=self.use_dynamic_rescale,
            base_scale=self.base_scale,
        )
        cfg = replace(base, unet=unet, diffusion=diffusion)
        if self.architecture == "tiny":
            return tiny_config(cfg)
        if self.architecture != "full":
            raise ValueError(f"weights.toml: model {self.name!r} has unknown architecture {self.architecture!r}")
        return cfg


@cache
def load_presets() -> dict[str, Preset]:
    """All presets of the packaged ``weights.toml``, by name."""
    text = resources.files("dynamicrafter").joinpath("weights.toml").read_text(encoding="utf-8")
    table = tomllib.loads(text)["models"]
    return {name: Preset(name=name, **entry) for name, entry in table.items()}


def get_preset(name: str) -> Preset:
    presets = load_presets()
    if name not in presets:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


__all__ = ["Preset", "UnknownModelError", "load_presets", "get_preset"]

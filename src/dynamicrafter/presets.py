"""Model presets: the entries of ``weights.toml`` as typed objects.

Every setting that differs between the released models lives in ``weights.toml``; this module only reads it and
builds the matching :class:`~dynamicrafter.config.ModelConfig`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources
from pathlib import Path

from .config import ARCHITECTURES, ModelConfig
from .settings import SamplingSettings


class UnknownModelError(ValueError):
    """A model name that is not in ``weights.toml``."""


@dataclass(frozen=True)
class Preset:
    """One ``[models.NAME]`` entry of ``weights.toml``."""

    name: str
    description: str
    architecture: str  # a key of config.ARCHITECTURES: "full", "tiny", "toy", "toon" or "tiny-toon"
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
    bundled: str | None = None  # a checkpoint shipped inside the package (dynamicrafter/data/NAME): the toy model
    # CIL: the start timestep M and whether sampling starts from the analytic initial noise by default, and where
    # the data statistics of that noise are (Hugging Face repository and file; see dynamicrafter.cil)
    start_timestep: int | None = None
    analytic_init: bool = False
    init_repo: str | None = None
    init_file: str | None = None
    init_sha256: str | None = None

    @property
    def downloadable(self) -> bool:
        return self.repo is not None

    @property
    def bundled_path(self) -> Path | None:
        """The shipped checkpoint of a bundled preset (``toy``), or None."""
        if self.bundled is None:
            return None
        return Path(str(resources.files("dynamicrafter").joinpath("data", self.bundled)))

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
            start_timestep=self.start_timestep,
            analytic_init=self.analytic_init,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None}).checked()

    @property
    def init_statistics(self) -> Preset | None:
        """The analytic-init statistics file as a downloadable entry (the hub fetches it like a checkpoint)."""
        if self.init_repo is None or self.init_file is None:
            return None
        return replace(self, repo=self.init_repo, file=self.init_file, sha256=self.init_sha256)

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
        build = ARCHITECTURES.get(self.architecture)
        if build is None:
            raise ValueError(f"weights.toml: model {self.name!r} has unknown architecture {self.architecture!r}")
        return build(replace(base, unet=unet, diffusion=diffusion))


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

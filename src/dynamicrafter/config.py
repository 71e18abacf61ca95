"""Typed configuration for every network and for the diffusion process.

Field defaults are the released DynamiCrafter architecture (ViT-H/14 CLIP towers, 1.4B UNet, SD VAE), so a
full-size model is ``ModelConfig()`` plus the few per-model settings of ``weights.toml``, and the tiny test model is
the same dataclasses with small widths.  ``from_reference`` translates the original yaml ``model`` block (as stored
in a fixture's ``scenario.json``) and an open_clip model config into these dataclasses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class UNetConfig:
    """The 3D UNet (``model.diffusion_model``); names follow the original ``UNetModel`` arguments."""

    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_head_channels: int = 64
    num_heads: int = -1
    transformer_depth: int = 1
    context_dim: int | None = 1024
    use_linear: bool = True
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    conv_resample: bool = True
    temporal_conv: bool = True
    tempspatial_aware: bool = False
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    use_relative_position: bool = False
    use_causal_attention: bool = False
    temporal_length: int = 16
    addition_attention: bool = True
    image_cross_attention: bool = True
    image_cross_attention_scale_learnable: bool = False
    fs_condition: bool = True
    default_fs: int = 24
    text_tokens: int = 77  # the fixed text/image split of the context inside attention
    norm_groups: int = 32  # GroupNorm groups (the original's 32; the toy model's 8, see toy_config)
    image_tokens_per_frame: int = 16  # the "77 + 16*T" per-frame context rule

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def num_spatial_transformers(self) -> int:
        """Spatial transformers in the network: one per image-cross-attention gate (``alpha``)."""
        n, ds = 0, 1
        for level, _ in enumerate(self.channel_mult):
            if ds in self.attention_resolutions:
                n += self.num_res_blocks  # input side
                n += self.num_res_blocks + 1  # output side
            if level != len(self.channel_mult) - 1:
                ds *= 2
        return n + 1  # middle block


@dataclass(frozen=True)
class ResamplerConfig:
    """The query transformer turning CLIP image tokens into per-frame context tokens (``image_proj_model``)."""

    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4
    video_length: int | None = 16

    @property
    def num_latents(self) -> int:
        return self.num_queries * (self.video_length or 1)


@dataclass(frozen=True)
class ClipTextConfig:
    """OpenCLIP text tower (ViT-H/14 by default)."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 1024  # projection width (unused at inference)
    quick_gelu: bool = False
    layer: str = "penultimate"  # "penultimate" or "last"

    @property
    def layers_used(self) -> int:
        return self.layers - 1 if self.layer == "penultimate" else self.layers


@dataclass(frozen=True)
class ClipVisionConfig:
    """OpenCLIP vision tower (ViT-H/14 by default); its output is all tokens of the last block."""

    width: int = 1280
    layers: int = 32
    head_width: int = 80
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 224
    embed_dim: int = 1024
    quick_gelu: bool = False
    antialias: bool = True  # Gaussian antialias blur before the 224x224 squash

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class VaeConfig:
    """LDM AutoencoderKL ``ddconfig`` (SD VAE by default)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    attn_resolutions: tuple[int, ...] = ()
    # "image": the SD decoder, frame by frame; "dualref": ToonCrafter's temporal decoder that also reads the encoder
    # features of the first and last frames (models/toon_vae.py)
    decoder: str = "image"
    attn_level: tuple[int, ...] = (2, 3)  # dualref: levels refined by cross-attention (the others by a 1x1 add)
    norm_groups: int = 32  # GroupNorm groups of the image decoder and encoder (the SD VAE's 32; the toy model's 8)

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class DiffusionConfig:
    """The DDPM schedule, parameterization and the sampler-relevant flags of ``LatentVisualDiffusion``."""

    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    beta_schedule: str = "linear"
    parameterization: str = "eps"  # "eps" or "v"
    rescale_betas_zero_snr: bool = False
    scale_factor: float = 0.18215
    use_dynamic_rescale: bool = False
    base_scale: float = 0.7
    turning_step: int = 400
    uncond_type: str = "empty_seq"
    channels: int = 4


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a DynamiCrafter model."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    vision: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)


# --------------------------------------------------------------------------------------------------------------
# The tiny architecture: the fixtures' widths (same code paths as the full model, ~10M parameters).

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 48, "head_width": 24, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}


def tiny_config(base: ModelConfig | None = None) -> ModelConfig:
    """The tiny architecture with ``base``'s diffusion settings and conditioning flags."""
    base = base or ModelConfig()
    unet = replace(base.unet, model_channels=32, channel_mult=(1, 2, 2, 2), num_head_channels=16, context_dim=32)
    resampler = replace(
        base.resampler, dim=32, depth=2, dim_head=16, heads=2, embedding_dim=48, output_dim=32, ff_mult=2
    )
    vae = replace(base.vae, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
    text, vision = clip_configs_from_open_clip(TINY_CLIP, layer=base.text.layer, antialias=base.vision.antialias)
    return replace(base, unet=unet, resampler=resampler, vae=vae, text=text, vision=vision)


def toon_config(base: ModelConfig | None = None) -> ModelConfig:
    """ToonCrafter: ``base`` with the dual-reference temporal VAE decoder (everything else is 512-interp's)."""
    base = base or ModelConfig()
    return replace(base, vae=replace(base.vae, decoder="dualref"))


# The ToonCrafter fixture's tiny widths: those of ``tiny_config`` with a 16-wide text tower (so a 16-wide context)
# and two residual blocks per VAE level.
TINY_TOON_CLIP = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "width": 16}}


def tiny_toon_config(base: ModelConfig | None = None) -> ModelConfig:
    """The tiny ToonCrafter architecture (``tests/fixtures/tiny_toon_4567.ckpt``) with ``base``'s diffusion settings."""
    cfg = tiny_config(base)
    text, vision = clip_configs_from_open_clip(TINY_TOON_CLIP, layer=cfg.text.layer, antialias=cfg.vision.antialias)
    return replace(
        cfg,
        unet=replace(cfg.unet, context_dim=text.width),
        resampler=replace(cfg.resampler, output_dim=text.width),
        vae=replace(cfg.vae, num_res_blocks=2, decoder="dualref"),
        text=text,
        vision=vision,
    )


def toy_config(base: ModelConfig | None = None) -> ModelConfig:
    """The toy model's architecture (scripts/train_toy.py): the tiny widths with 8 GroupNorm groups instead of 32.

    At the tiny widths (32 and 64 channels) 32 groups normalise each channel on its own, which erases every
    per-channel constant: the time embedding that a ResBlock adds before its second norm, and an image's plain
    background colour in the VAE.  Trained that way the model barely learns; 8 groups keep both.  The weights have
    the tiny model's keys and shapes (a GroupNorm's parameters do not depend on its groups).
    """
    cfg = tiny_config(base)
    return replace(cfg, unet=replace(cfg.unet, norm_groups=8), vae=replace(cfg.vae, norm_groups=8))


# weights.toml ``architecture`` -> the builder of its ModelConfig from the released defaults plus the preset's settings
ARCHITECTURES: dict[str, Callable[[ModelConfig], ModelConfig]] = {
    "full": lambda base: base,
    "tiny": tiny_config,
    "toy": toy_config,
    "toon": toon_config,
    "tiny-toon": tiny_toon_config,
}


# --------------------------------------------------------------------------------------------------------------
# Translation from the original configs.


def _pick(cls, params: dict[str, Any], **overrides: Any):
    """Build dataclass ``cls`` from the keys of ``params`` it knows (lists become tuples)."""
    names = {f.name for f in cls.__dataclass_fields__.values()}
    kwargs = {}
    for key, value in params.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    return cls(**kwargs)


def clip_configs_from_open_clip(
    clip: dict[str, Any], layer: str = "penultimate", antialias: bool = True
) -> tuple[ClipTextConfig, ClipVisionConfig]:
    """Text and vision tower configs from an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    t, v = clip["text_cfg"], clip["vision_cfg"]
    quick = bool(clip.get("quick_gelu", False))
    text = ClipTextConfig(
        width=t["width"],
        layers=t["layers"],
        heads=t["heads"],
        mlp_ratio=float(t.get("mlp_ratio", 4.0)),
        context_length=t.get("context_length", 77),
        vocab_size=t.get("vocab_size", 49408),
        embed_dim=clip["embed_dim"],
        quick_gelu=quick,
        layer=layer,
    )
    vision = ClipVisionConfig(
        width=v["width"],
        layers=v["layers"],
        head_width=v.get("head_width", 64),
        mlp_ratio=float(v.get("mlp_ratio", 4.0)),
        patch_size=v["patch_size"],
        image_size=v.get("image_size", 224),
        embed_dim=clip["embed_dim"],
        quick_gelu=quick,
        antialias=antialias,
    )
    return text, vision


VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


# The original classes' own defaults, used for keys absent from a reference config (they differ from the release).
REFERENCE_UNET_DEFAULTS: dict[str, Any] = {
    "channel_mult": (1, 2, 4, 8), "conv_resample": True, "context_dim": None, "use_scale_shift_norm": False,
    "resblock_updown": False, "num_heads": -1, "num_head_channels": -1, "transformer_depth": 1, "use_linear": False,
    "temporal_conv": False, "tempspatial_aware": False, "temporal_attention": True, "use_relative_position": True,
    "use_causal_attention": False, "temporal_length": None, "addition_attention": False,
    "temporal_selfatt_only": True, "image_cross_attention": False, "image_cross_attention_scale_learnable": False,
    "default_fs": 4, "fs_condition": False,
}
REFERENCE_RESAMPLER_DEFAULTS: dict[str, Any] = {
    "dim": 1024, "depth": 8, "dim_head": 64, "heads": 16, "num_queries": 8, "embedding_dim": 768,
    "output_dim": 1024, "ff_mult": 4, "video_length": None,
}
REFERENCE_DIFFUSION_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000, "beta_schedule": "linear", "linear_start": 1e-4, "linear_end": 2e-2, "parameterization": "eps",
    "rescale_betas_zero_snr": False, "scale_factor": 1.0, "use_dynamic_rescale": False, "base_scale": 0.7,
    "turning_step": 400, "uncond_type": "empty_seq", "channels": 3,
}


def from_reference(model: dict[str, Any], clip: dict[str, Any] | None = None) -> ModelConfig:
    """Translate the original yaml ``model`` block (``target`` + ``params``) and an open_clip config.

    ``clip`` defaults to ViT-H/14.  Absent keys take the original classes' defaults, not the release's.
    """
    p = model.get("params", model)
    unet = _pick(UNetConfig, {**REFERENCE_UNET_DEFAULTS, **p["unet_config"]["params"]})
    if unet.temporal_length is None:
        raise ValueError("reference config: unet_config.params.temporal_length is required")
    first = p["first_stage_config"]["params"]
    dualref = p["first_stage_config"].get("target", "").endswith("AutoencoderKL_Dualref")  # ToonCrafter
    vae = _pick(
        VaeConfig,
        first["ddconfig"],
        embed_dim=first.get("embed_dim", first["ddconfig"]["z_channels"]),
        decoder="dualref" if dualref else "image",
    )
    resampler = _pick(ResamplerConfig, {**REFERENCE_RESAMPLER_DEFAULTS, **p["image_proj_stage_config"]["params"]})
    layer = p.get("cond_stage_config", {}).get("params", {}).get("layer", "last")
    antialias = p.get("img_cond_stage_config", {}).get("params", {}).get("antialias", True)
    text, vision = clip_configs_from_open_clip(clip or VIT_H_14, layer=layer, antialias=antialias)
    diffusion = _pick(DiffusionConfig, {**REFERENCE_DIFFUSION_DEFAULTS, **p})
    return ModelConfig(unet=unet, resampler=resampler, text=text, vision=vision, vae=vae, diffusion=diffusion)

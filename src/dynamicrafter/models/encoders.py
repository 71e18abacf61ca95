"""Conditioning encoders: the OpenCLIP text and vision towers (as transformers CLIP models) and the VAE (diffusers).

Also the original-checkpoint key conversion for each tower: one pure function per tower, taking the original keys
with their prefix stripped (``cond_stage_model.model.``, ``embedder.model.``, ``first_stage_model.``) and returning
this module's parameter names.  Keys known to be unused at inference are dropped; unrecognised keys are passed
through unchanged so that a strict ``load_state_dict`` names them.  Conversion only slices and transposes, so it
works on meta tensors.

Shape letters: B batch, N frames or images, H x W pixels, h x w latent pixels (H/8 x W/8), D tower width,
P projection width (``embed_dim``).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from ..config import ClipTextConfig, ClipVisionConfig, VaeConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS_TOKEN, EOS_TOKEN = 49406, 49407


# --------------------------------------------------------------------------------------------------------------
# CLIP image preprocessing (kornia ``resize(..., 'bicubic', align_corners=True, antialias=True)`` in plain torch).


def _gaussian_kernel1d(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """Normalised Gaussian taps at integer offsets -size//2 .. size//2, computed in float32."""
    offsets = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    sigma_t = torch.tensor(sigma, dtype=torch.float32, device=device)
    taps = torch.exp(-offsets.pow(2) / (2 * sigma_t.pow(2)))
    return taps / taps.sum()


def _blur_1d(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise correlation of (B, C, H, W) with a 1-D kernel along ``dim`` (-1 or -2), reflect padding."""
    c, r = x.shape[1], kernel.numel() // 2
    if dim == -1:
        weight = kernel.view(1, 1, 1, -1)
        pad = (r, r, 0, 0)
    else:
        weight = kernel.view(1, 1, -1, 1)
        pad = (0, 0, r, r)
    weight = weight.to(x.dtype).expand(c, -1, -1, -1)  # (C, 1, kh, kw)
    return F.conv2d(F.pad(x, pad, mode="reflect"), weight, groups=c)


def clip_resize(x: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """Squash (B, 3, H, W) to (B, 3, size, size): optional Gaussian antialias, then bicubic ``align_corners=True``."""
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    fh, fw = height / size, width / size
    if antialias and max(fh, fw) > 1:
        sh, sw = max((fh - 1) / 2, 0.001), max((fw - 1) / 2, 0.001)
        kh, kw = int(max(4 * sh, 3)), int(max(4 * sw, 3))
        kh, kw = kh + 1 - kh % 2, kw + 1 - kw % 2  # odd sizes
        x = _blur_1d(x, _gaussian_kernel1d(kw, sw, x.device), dim=-1)  # horizontal first
        x = _blur_1d(x, _gaussian_kernel1d(kh, sh, x.device), dim=-2)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=True)


def clip_preprocess(images: torch.Tensor, cfg: ClipVisionConfig) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> normalised CLIP input (B, 3, S, S), S = ``cfg.image_size``."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"clip_preprocess expects a float tensor (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.device.type == "mps" and images.dtype != torch.float32:  # MPS lacks half-precision bicubic resizing
        x = clip_resize(images.float(), cfg.image_size, cfg.antialias).to(images.dtype)
    else:
        x = clip_resize(images, cfg.image_size, cfg.antialias)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------------------
# The CLIP towers.


def _restore_position_ids(module: nn.Module, _incompatible_keys: object = None) -> None:
    """Re-create transformers' non-persistent ``position_ids`` buffers left on the meta device by a meta build.

    Registered as a load-state-dict post hook, so a meta build followed by ``load_state_dict(assign=True)`` (on this
    module or any parent) leaves a usable model.
    """
    for sub in module.modules():
        ids = dict(sub.named_buffers(recurse=False)).get("position_ids")
        if ids is not None and ids.is_meta:
            device = sub.position_embedding.weight.device
            sub.position_ids = torch.arange(ids.shape[-1], device=device).expand(1, -1)  # (1, positions)


def text_hf_config(cfg: ClipTextConfig) -> CLIPTextConfig:
    """transformers config of the text tower, truncated to the ``cfg.layers_used`` blocks that run."""
    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        projection_dim=cfg.embed_dim,
        num_hidden_layers=cfg.layers_used,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act="quick_gelu" if cfg.quick_gelu else "gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        pad_token_id=0,
        bos_token_id=BOS_TOKEN,
        eos_token_id=EOS_TOKEN,
        attn_implementation="sdpa",
    )


def vision_hf_config(cfg: ClipVisionConfig) -> CLIPVisionConfig:
    """transformers config of the vision tower."""
    return CLIPVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=int(cfg.width * cfg.mlp_ratio),
        projection_dim=cfg.embed_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="quick_gelu" if cfg.quick_gelu else "gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        initializer_range=0.02,
        initializer_factor=1.0,
        attn_implementation="sdpa",
    )


class TextEncoder(nn.Module):
    """OpenCLIP text tower: token ids (B, 77) -> hidden states (B, 77, D) of the last used block + ``ln_final``."""

    def __init__(self, cfg: ClipTextConfig) -> None:
        super().__init__()
        if cfg.layer not in ("penultimate", "last"):
            raise ValueError(f"text layer must be 'penultimate' or 'last', got {cfg.layer!r}")
        self.cfg = cfg
        self.model = CLIPTextModel(text_hf_config(cfg))
        self.register_load_state_dict_post_hook(_restore_position_ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.cfg.context_length or ids.dtype != torch.long:
            raise ValueError(
                f"TextEncoder expects int64 ids of shape (B, {self.cfg.context_length}), "
                f"got {ids.dtype} {tuple(ids.shape)}"
            )
        return self.model(input_ids=ids).last_hidden_state  # (B, 77, D)


class ImageEncoder(nn.Module):
    """OpenCLIP vision tower: images (B, 3, H, W) in [-1, 1] -> all tokens of the last block (B, 257, D)."""

    def __init__(self, cfg: ClipVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = CLIPVisionModelWithProjection(vision_hf_config(cfg))
        self.register_load_state_dict_post_hook(_restore_position_ids)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Last-block tokens, without ``ln_post`` and without the projection."""
        pixels = clip_preprocess(images, self.cfg)
        return self.model.vision_model(pixel_values=pixels).last_hidden_state  # (B, 257, D)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Projected pooled embedding ``ln_post(CLS) @ proj``: (B, P)."""
        return self.model(pixel_values=clip_preprocess(images, self.cfg)).image_embeds


# --------------------------------------------------------------------------------------------------------------
# The VAE.


def build_vae(cfg: VaeConfig) -> AutoencoderKL:
    """diffusers ``AutoencoderKL`` with the LDM ``ddconfig`` architecture."""
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError(f"VAE embed_dim ({cfg.embed_dim}) must equal z_channels ({cfg.z_channels})")
    if cfg.attn_resolutions:
        raise ValueError(
            f"VAE attention outside the mid block is not supported (attn_resolutions={cfg.attn_resolutions})"
        )
    levels = len(cfg.ch_mult)
    return AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.num_res_blocks,
        act_fn="silu",
        latent_channels=cfg.z_channels,
        norm_num_groups=cfg.norm_groups,
        sample_size=cfg.resolution,
        mid_block_add_attention=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
    )


def _in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """``fn`` over ``chunk`` frames at a time, on contiguous NCHW input (a channels-last input changes the numerics)."""
    x = x.contiguous()
    if chunk is None:
        return fn(x)
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of frames, got {chunk}")
    return torch.cat([fn(part) for part in x.split(chunk)])


def vae_encode(
    vae: AutoencoderKL, frames: torch.Tensor, scale_factor: float, chunk: int | None = None
) -> torch.Tensor:
    """Frames (N, 3, H, W) in [-1, 1] -> scaled posterior means (N, 4, h, w); ``chunk`` frames per VAE call."""
    return _in_chunks(lambda x: vae.encode(x).latent_dist.mean * scale_factor, frames, chunk)


def vae_decode(
    vae: AutoencoderKL, latents: torch.Tensor, scale_factor: float, chunk: int | None = None
) -> torch.Tensor:
    """Scaled latents (N, 4, h, w) -> frames (N, 3, H, W), unclamped; ``chunk`` frames per VAE call."""
    return _in_chunks(lambda z: vae.decode(z * (1.0 / scale_factor)).sample, latents, chunk)


# --------------------------------------------------------------------------------------------------------------
# Original-checkpoint key conversion.

_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _convert_block(sub: str, value: torch.Tensor, prefix: str) -> dict[str, torch.Tensor] | None:
    """One open_clip residual block key (after ``resblocks.{i}.``) -> transformers keys; None if unknown."""
    if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = sub.rsplit("_", 1)[1]  # weight | bias
        q, k, v = value.chunk(3, dim=0)  # rows ordered q, k, v
        return {f"{prefix}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))}
    module, _, kind = sub.rpartition(".")
    if module in _BLOCK_RENAMES and kind in ("weight", "bias"):
        return {f"{prefix}{_BLOCK_RENAMES[module]}.{kind}": value}
    return None


def _convert_tower(
    sd: dict[str, torch.Tensor],
    renames: dict[str, str],
    drop: set[str],
    blocks_in: str,
    blocks_out: str,
    blocks_dropped: range,
) -> dict[str, torch.Tensor]:
    """Rename ``renames``, drop ``drop``, convert ``{blocks_in}{i}.*`` to ``{blocks_out}{i}.*``, pass the rest."""
    block_key = re.compile(re.escape(blocks_in) + r"(\d+)\.(.+)")
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in drop:
            continue
        if key in renames:
            out[renames[key]] = value
            continue
        match = block_key.fullmatch(key)
        if match:
            index = int(match[1])
            if index in blocks_dropped:
                continue
            converted = _convert_block(match[2], value, f"{blocks_out}{index}.")
            if converted is not None:
                out.update(converted)
                continue
        out[key] = value
    return out


def convert_text_state_dict(sd: dict[str, torch.Tensor], cfg: ClipTextConfig) -> dict[str, torch.Tensor]:
    """open_clip text tower (``cond_stage_model.model.`` stripped) -> ``TextEncoder`` keys.

    Dropped: the blocks beyond ``cfg.layers_used`` (the last one for "penultimate"), ``text_projection``,
    ``logit_scale``.
    """
    prefix = "model."
    renames = {
        "token_embedding.weight": f"{prefix}embeddings.token_embedding.weight",
        "positional_embedding": f"{prefix}embeddings.position_embedding.weight",
        "ln_final.weight": f"{prefix}final_layer_norm.weight",
        "ln_final.bias": f"{prefix}final_layer_norm.bias",
    }
    drop = {"text_projection", "logit_scale"}
    return _convert_tower(
        sd, renames, drop, "transformer.resblocks.", f"{prefix}encoder.layers.", range(cfg.layers_used, cfg.layers)
    )


def convert_vision_state_dict(sd: dict[str, torch.Tensor], cfg: ClipVisionConfig) -> dict[str, torch.Tensor]:
    """open_clip model minus its text transformer (``embedder.model.`` stripped) -> ``ImageEncoder`` keys.

    Dropped: the text leftovers (``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``,
    ``logit_scale``).  ``visual.proj`` (D x P) becomes ``visual_projection.weight`` (P x D).  ``cfg`` is not needed
    by this layout; it is taken for symmetry with the other converters.
    """
    prefix = "model.vision_model."
    renames = {
        "visual.class_embedding": f"{prefix}embeddings.class_embedding",
        "visual.conv1.weight": f"{prefix}embeddings.patch_embedding.weight",
        "visual.positional_embedding": f"{prefix}embeddings.position_embedding.weight",
        "visual.ln_pre.weight": f"{prefix}pre_layrnorm.weight",
        "visual.ln_pre.bias": f"{prefix}pre_layrnorm.bias",
        "visual.ln_post.weight": f"{prefix}post_layernorm.weight",
        "visual.ln_post.bias": f"{prefix}post_layernorm.bias",
    }
    drop = {
        "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
        "logit_scale",
    }
    rest = {k: v for k, v in sd.items() if k != "visual.proj"}
    out = _convert_tower(rest, renames, drop, "visual.transformer.resblocks.", f"{prefix}encoder.layers.", range(0))
    if "visual.proj" in sd:
        out["model.visual_projection.weight"] = sd["visual.proj"].t().contiguous()  # (P, D)
    return out


_VAE_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2", "nin_shortcut"}
_VAE_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae_resnet(prefix: str, sub: str) -> str | None:
    """ResnetBlock sub-module ``sub`` under diffusers ``prefix``; ``nin_shortcut`` is ``conv_shortcut``."""
    return f"{prefix}.{'conv_shortcut' if sub == 'nin_shortcut' else sub}" if sub in _VAE_RESNET_PARTS else None


_VAE_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str], int], str | None]]] = [
    (re.compile(r"(?:encoder|decoder)\.(?:conv_in|conv_out)|quant_conv|post_quant_conv"), lambda m, n: m[0]),
    (re.compile(r"(encoder|decoder)\.norm_out"), lambda m, n: f"{m[1]}.conv_norm_out"),
    (
        re.compile(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)"),
        lambda m, n: _vae_resnet(f"encoder.down_blocks.{m[1]}.resnets.{m[2]}", m[3]),
    ),
    (
        re.compile(r"encoder\.down\.(\d+)\.downsample\.conv"),
        lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv",
    ),
    (
        re.compile(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)"),
        lambda m, n: _vae_resnet(f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}", m[3]),
    ),
    (
        re.compile(r"decoder\.up\.(\d+)\.upsample\.conv"),
        lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv",
    ),
    (
        re.compile(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)"),
        lambda m, n: _vae_resnet(f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", m[3]),
    ),
    (
        re.compile(r"(encoder|decoder)\.mid\.attn_1\.(\w+)"),
        lambda m, n: f"{m[1]}.mid_block.attentions.0.{_VAE_ATTN_PARTS[m[2]]}" if m[2] in _VAE_ATTN_PARTS else None,
    ),
]


def _vae_key(module: str, levels: int) -> str | None:
    for pattern, rename in _VAE_RULES:
        match = pattern.fullmatch(module)
        if match:
            return rename(match, levels)
    return None


def convert_vae_state_dict(sd: dict[str, torch.Tensor], cfg: VaeConfig) -> dict[str, torch.Tensor]:
    """LDM AutoencoderKL (``first_stage_model.`` stripped) -> diffusers ``AutoencoderKL`` keys.

    Decoder levels are reversed (LDM ``up.{i}`` is diffusers ``up_blocks.{n-1-i}``); the mid attention's 1x1 convs
    become linear weights.
    """
    levels = len(cfg.ch_mult)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, _, kind = key.rpartition(".")
        new = _vae_key(module, levels) if kind in ("weight", "bias") else None
        if new is None:
            out[key] = value
            continue
        if ".attentions.0.to_" in new and kind == "weight" and value.ndim == 4:
            value = value[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        out[f"{new}.{kind}"] = value
    return out

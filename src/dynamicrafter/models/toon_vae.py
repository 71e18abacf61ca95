"""ToonCrafter's VAE: the SD encoder, and a temporal decoder that also reads the encoder features of the start and
end frames (the original's ``AutoencoderKL_Dualref`` with its ``VideoDecoder``).

The decoder is SVD's temporal decoder, built from diffusers' blocks: every residual block is the 2-D ResnetBlock
followed by a temporal residual branch (GroupNorm, SiLU, Conv3d (3,1,1), twice) mixed in by sigmoid(``mix_factor``);
a Conv3d (3,1,1) follows ``conv_out``.  What ToonCrafter adds, written here, are the refinement steps, one after
the residual blocks of every level (before its upsampling) and one after ``norm_out``:

- :class:`Fusion` (levels in ``attn_level``, 2 and 3): cross-attention from every frame to the tokens of the start
  and end frames' encoder features (8 heads of 64), added to the frame;
- :class:`Combiner` (the other levels and after ``norm_out``): a 1x1 conv of the start (end) features added to the
  first (last) frame of the chunk.

The decoder is temporal: a frame depends on every frame decoded with it (temporal convolutions, GroupNorm
statistics over all frames, references on the chunk's first and last frames), so it decodes whole chunks, never
single frames.  ``post_quant_conv`` is in every checkpoint and never applied (the original skips it whenever the
decoder gets keyword arguments, which it always does).

Letters: B samples, n frames of a decoded chunk, C channels, h x w a feature map, L = 2 references (start, end).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.unets.unet_3d_blocks import MidBlockTemporalDecoder, UpBlockTemporalDecoder
from torch import nn

from ..config import VaeConfig
from .encoders import _VAE_ATTN_PARTS, _VAE_RESNET_PARTS, build_vae, convert_vae_state_dict, vae_encode

FUSION_HEADS, FUSION_DIM_HEAD = 8, 64  # the original's defaults: inner width 512 whatever the channels
Refs = Sequence[torch.Tensor]  # per level 0..3 and conv_in: (B, C_i, 2, h_i, w_i), start frame at index 0


class Combiner(nn.Module):
    """Adds a 1x1 conv of the start (end) reference to the first (last) frame of every sample's chunk."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        b = ref.shape[0]
        add = self.conv(ref.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, 2))  # (B, L, C, h, w)
        x = x.unflatten(0, (b, -1))  # (B, n, C, h, w)
        if x.shape[1] == 1:  # one frame is first and last
            return (x + add[:, :1] + add[:, 1:]).flatten(0, 1)
        return torch.cat([x[:, :1] + add[:, :1], x[:, 1:-1], x[:, -1:] + add[:, 1:]], dim=1).flatten(0, 1)


class Fusion(nn.Module):
    """Cross-attention of every frame to the start and end references: q from GroupNorm(x), k and v from the
    un-normalised reference tokens (start frame's, then end frame's), 8 heads of 64, residual."""

    def __init__(self, channels: int, heads: int = FUSION_HEADS, dim_head: int = FUSION_DIM_HEAD) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, channels))

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = ref.shape
        n = x.shape[0] // b
        q = self.to_q(self.norm(x).flatten(2).transpose(1, 2))  # (B*n, h*w, D)
        # every frame of a sample attends to the same keys, so its frames fold into one long query sequence
        q = q.unflatten(0, (b, n)).flatten(1, 2)  # (B, n*h*w, D)
        tokens = ref.flatten(3).permute(0, 2, 3, 1).flatten(1, 2)  # (B, L*h*w, C), row-major per frame
        k, v = self.to_k(tokens), self.to_v(tokens)  # (B, L*h*w, D)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, 64)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, n*h*w, 64), scale 1/8
        out = self.to_out(out.transpose(1, 2).flatten(2))  # (B, n*h*w, C)
        out = out.unflatten(1, (n, h * w)).flatten(0, 1).transpose(1, 2)  # (B*n, C, h*w)
        return x + out.reshape(x.shape)


class ToonDecoder(nn.Module):
    """The dual-reference temporal decoder: latents (B*n, 4, h, w) of B samples of n frames -> (B*n, 3, H, W)."""

    def __init__(self, cfg: VaeConfig) -> None:
        super().__init__()
        channels = cfg.block_out_channels
        levels = len(channels)
        self.conv_in = nn.Conv2d(cfg.z_channels, channels[-1], 3, padding=1)
        # the LDM mid block: res, attention (one head of all channels), res, whatever num_res_blocks is
        top = channels[-1]
        self.mid_block = MidBlockTemporalDecoder(top, top, attention_head_dim=top, num_layers=2)
        self.up_blocks = nn.ModuleList(
            UpBlockTemporalDecoder(
                channels[min(level + 1, levels - 1)], channels[level], cfg.num_res_blocks + 1, add_upsample=level > 0
            )
            for level in reversed(range(levels))
        )
        self.conv_norm_out = nn.GroupNorm(32, channels[0], eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[0], cfg.out_ch, 3, padding=1)
        self.time_conv_out = nn.Conv3d(cfg.out_ch, cfg.out_ch, (3, 1, 1), padding=(1, 0, 0))
        refine = [Fusion(channels[i]) if i in cfg.attn_level else Combiner(channels[i]) for i in range(levels)]
        # index = LDM level; the last one acts after norm_out
        self.attn_refinement = nn.ModuleList([*refine, Combiner(channels[0])])

    def forward(self, z: torch.Tensor, refs: Refs | None, frames: int) -> torch.Tensor:
        """``z`` (B*frames, 4, h, w) unscaled latents, frames of a sample consecutive; ``refs`` None or empty: no
        refinement (as the original)."""
        if z.shape[0] % frames:
            raise ValueError(f"{z.shape[0]} latent frames are not whole samples of {frames} frames")
        indicator = z.new_zeros(z.shape[0] // frames, frames)  # diffusers' temporal blocks read the frame count here
        x = self.mid_block(self.conv_in(z), image_only_indicator=indicator)  # (B*n, C, h, w)
        for k, block in enumerate(self.up_blocks):
            level = len(self.up_blocks) - 1 - k
            for resnet in block.resnets:
                x = resnet(x, image_only_indicator=indicator)
            if refs:
                x = self.attn_refinement[level](x, refs[level])
            for upsampler in block.upsamplers or ():
                x = upsampler(x)
        x = self.conv_act(self.conv_norm_out(x))
        if refs:
            x = self.attn_refinement[-1](x, refs[-1])
        x = self.conv_out(x)  # (B*n, 3, H, W)
        video = x.unflatten(0, (-1, frames)).transpose(1, 2)  # (B, 3, n, H, W)
        return self.time_conv_out(video).transpose(1, 2).flatten(0, 1)  # (B*n, 3, H, W)


def build_toon_vae(cfg: VaeConfig) -> AutoencoderKL:
    """diffusers' ``AutoencoderKL`` (encoder, quant convs) with :class:`ToonDecoder` as its decoder.

    Never call its ``decode``: it would apply ``post_quant_conv``; use :func:`toon_decode`."""
    vae = build_vae(cfg)
    vae.decoder = ToonDecoder(cfg)
    return vae


# --------------------------------------------------------------------------------------------------------------
# Encoding with the reference features, decoding


@torch.no_grad()
def encode_with_hidden(
    vae: AutoencoderKL, frames: torch.Tensor, scale_factor: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Frames (N, 3, H, W) in [-1, 1] -> (scaled posterior means (N, 4, h, w), 5 encoder maps (N, C_i, h_i, w_i)).

    Maps 0-3: the output of the last residual block of encoder level i (before its downsampling); 4: ``conv_in``'s
    output.  One encoder call on all N frames, as the original's ``get_latent_z_with_hidden_states``."""
    taps = [block.resnets[-1] for block in vae.encoder.down_blocks] + [vae.encoder.conv_in]
    maps: list[torch.Tensor] = [torch.empty(0)] * len(taps)

    def keep(i: int):
        def hook(_module: nn.Module, _args: object, out: torch.Tensor) -> None:
            maps[i] = out

        return hook

    handles = [tap.register_forward_hook(keep(i)) for i, tap in enumerate(taps)]
    try:
        z = vae_encode(vae, frames, scale_factor)
    finally:
        for handle in handles:
            handle.remove()
    return z, maps


def pair_refs(start_maps: Sequence[torch.Tensor], end_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, the maps (B, C, h, w) of the start and end frames -> references (B, C, 2, h, w)."""
    return [torch.stack([s, e], dim=2) for s, e in zip(start_maps, end_maps)]


@torch.no_grad()
def toon_decode(
    vae: AutoencoderKL, latents: torch.Tensor, refs: Refs | None, scale_factor: float, window: int = 16
) -> torch.Tensor:
    """Scaled latents (B, 4, T, h, w) -> video (B, 3, T, H, W), unclamped, in the VAE's dtype.

    Each sample is decoded alone (the original runs batch 1), in chunks of ``window`` frames (its
    ``temporal_length``), every chunk with the sample's references on its own first and last frames."""
    parts = []
    for i in range(latents.shape[0]):
        sample_refs = None if not refs else [r[i : i + 1] for r in refs]
        chunks = []
        for chunk in latents[i].split(window, dim=1):  # (4, n, h, w)
            z = chunk.transpose(0, 1) * (1.0 / scale_factor)  # (n, 4, h, w); post_quant_conv is not applied
            chunks.append(vae.decoder(z, sample_refs, z.shape[0]))  # (n, 3, H, W)
        parts.append(torch.cat(chunks).transpose(0, 1))  # (3, T, H, W)
    return torch.stack(parts)


def middle_indices(frames: int) -> list[int]:
    """The latent frames of the second decode: all but frames 1 and T-2."""
    if frames < 4:
        raise ValueError(f"ToonCrafter's decode needs at least 4 frames, got {frames}")
    return [i for i in range(frames) if i not in (1, frames - 2)]


def splice(video: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    """The original's splice: frames T/2-1 and T/2 of ``video`` (B, 3, T, H, W) replaced by frames T/2-2 and T/2-1
    of ``middle`` (B, 3, T-2, H, W), the decode without latent frames 1 and T-2."""
    t = video.shape[2]
    if middle.shape[2] != t - 2:
        raise ValueError(f"the middle decode has {middle.shape[2]} frames, expected {t - 2}")
    half = t // 2
    return torch.cat([video[:, :, : half - 1], middle[:, :, half - 2 : half], video[:, :, half + 1 :]], dim=2)


# --------------------------------------------------------------------------------------------------------------
# Original-checkpoint key conversion

_TIME_STACK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2"}
_DECODER_KEY = re.compile(
    r"(?P<plain>conv_in|conv_out|attn_refinement\.\d+\.(?:conv|norm|to_[qkv]|to_out\.0))\.(?P<kind>weight|bias)"
    r"|conv_out\.time_mix_conv\.(?P<mix>weight|bias)"
    r"|norm_out\.(?P<norm>weight|bias)"
    r"|mid\.block_(?P<mid>[12])\.(?P<mid_sub>.+)"
    r"|mid\.attn_1\.(?P<attn>\w+)\.(?P<attn_kind>weight|bias)"
    r"|up\.(?P<up>\d+)\.block\.(?P<block>\d+)\.(?P<up_sub>.+)"
    r"|up\.(?P<ups>\d+)\.upsample\.conv\.(?P<ups_kind>weight|bias)"
)


def _video_resblock(prefix: str, sub: str) -> str | None:
    """A VideoResBlock key (after ``block.J.``) -> SpatioTemporalResBlock key under ``prefix``."""
    if sub == "mix_factor":
        return f"{prefix}.time_mixer.mix_factor"
    module, _, kind = sub.rpartition(".")
    if module.startswith("time_stack.") and module[len("time_stack.") :] in _TIME_STACK:
        return f"{prefix}.temporal_res_block.{_TIME_STACK[module[len('time_stack.') :]]}.{kind}"
    if module in _VAE_RESNET_PARTS:
        return f"{prefix}.spatial_res_block.{'conv_shortcut' if module == 'nin_shortcut' else module}.{kind}"
    return None


def _decoder_key(key: str, levels: int) -> str | None:
    m = _DECODER_KEY.fullmatch(key)
    if m is None:
        return None
    if m["plain"]:
        return key
    if m["mix"]:
        return f"time_conv_out.{m['mix']}"
    if m["norm"]:
        return f"conv_norm_out.{m['norm']}"
    if m["mid"]:
        return _video_resblock(f"mid_block.resnets.{int(m['mid']) - 1}", m["mid_sub"])
    if m["attn"]:
        part = _VAE_ATTN_PARTS.get(m["attn"])
        return None if part is None else f"mid_block.attentions.0.{part}.{m['attn_kind']}"
    if m["up"]:
        return _video_resblock(f"up_blocks.{levels - 1 - int(m['up'])}.resnets.{m['block']}", m["up_sub"])
    return f"up_blocks.{levels - 1 - int(m['ups'])}.upsamplers.0.conv.{m['ups_kind']}"


def convert_toon_vae_state_dict(sd: dict[str, torch.Tensor], cfg: VaeConfig) -> dict[str, torch.Tensor]:
    """``AutoencoderKL_Dualref`` (``first_stage_model.`` stripped) -> :func:`build_toon_vae` keys.

    The encoder and quant convs convert as for DynamiCrafter; decoder keys follow the temporal decoder's layout
    (LDM ``up.{i}`` is ``up_blocks.{n-1-i}``, ``time_stack`` is ``temporal_res_block``, ``mix_factor`` is
    ``time_mixer.mix_factor``); unknown keys pass through unchanged so that a strict load names them."""
    levels = len(cfg.ch_mult)
    out = convert_vae_state_dict({k: v for k, v in sd.items() if not k.startswith("decoder.")}, cfg)
    for key, value in sd.items():
        if not key.startswith("decoder."):
            continue
        new = _decoder_key(key[len("decoder.") :], levels)
        if new is None:
            out[key] = value
            continue
        if ".attentions.0.to_" in new and new.endswith("weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        out[f"decoder.{new}"] = value
    return out

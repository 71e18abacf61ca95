"""The DynamiCrafter 3D UNet (``model.diffusion_model``).

Shape letters: B batch, T frames, C channels, h×w latent height×width (divisible by 2^(levels−1)), L context
tokens, D context width, E time-embedding width (4·``model_channels``). Frames are folded batch-major: (B·T) index
= b·T + t. Parameter names equal the original checkpoint keys without the ``model.diffusion_model.`` prefix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .attention import CrossAttention, SpatialTransformer, TemporalTransformer
from .context import ImageScale, UNetContext
from .ops import Conv2d, Linear, conv_over_time


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of integer timesteps (N,) -> float32 (N, dim), cos half first, zero-padded when dim is odd."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (float64 input: float64) and cast back (ResBlocks and the output head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return y.to(x.dtype)


class TemporalConvBlock(nn.Module):
    """Four residual GroupNorm → SiLU → Conv3d stages over time (statistics across frames)."""

    def __init__(self, channels: int, spatial_aware: bool = False, groups: int = 32) -> None:
        super().__init__()
        th_kernel, th_pad = ((3, 3, 1), (1, 1, 0)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        tw_kernel, tw_pad = ((3, 1, 3), (1, 0, 1)) if spatial_aware else ((3, 1, 1), (1, 0, 0))

        def stage(kernel: tuple[int, ...], pad: tuple[int, ...], first: bool = False) -> nn.Sequential:
            layers = [nn.GroupNorm(groups, channels), nn.SiLU()] + ([] if first else [nn.Identity()])  # Dropout slot
            return nn.Sequential(*layers, nn.Conv3d(channels, channels, kernel, padding=pad))

        self.conv1 = stage(th_kernel, th_pad, first=True)
        self.conv2 = stage(tw_kernel, tw_pad)
        self.conv3 = stage(th_kernel, th_pad)
        self.conv4 = stage(tw_kernel, tw_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, h, w) -> (B, C, T, h, w)."""
        h = x
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            for layer in stage[:-1]:
                h = layer(h)
            h = conv_over_time(stage[-1], h)
        return x + h


def _down(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class ResBlock(nn.Module):
    """Residual block with the time embedding, optional resampling (``resblock_updown``) and temporal conv."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        *,
        use_scale_shift_norm: bool = False,
        temporal_conv: bool = False,
        tempspatial_aware: bool = False,
        resample: str | None = None,
        groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = {None: None, "down": _down, "up": _up}[resample]
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(  # index 2 is the original's (inert) Dropout
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Identity(), Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)
        # (sic) the checkpoint's spelling
        self.temopral_conv = TemporalConvBlock(out_channels, tempspatial_aware, groups) if temporal_conv else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch: int) -> torch.Tensor:
        """x (B·T, Ci, h, w), emb (B·T, E) -> (B·T, Co, h', w')."""
        h = self.in_layers[1](self.in_layers[0](x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb)[:, :, None, None]  # (B·T, Co or 2·Co, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[3](self.out_layers[1](h))
        else:
            h = self.out_layers(h + e)
        h = self.skip_connection(x) + h
        if self.temopral_conv is not None:
            z = self.temopral_conv(h.unflatten(0, (batch, -1)).transpose(1, 2))  # (B, Co, T, h, w)
            h = z.transpose(1, 2).flatten(0, 1)  # (B·T, Co, h, w)
        return h


class Downsample(nn.Module):
    """Halve h and w: 3×3 stride-2 conv (key ``op``) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double h and w: nearest neighbour, then an optional 3×3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_up(x))


class UNetBlock(nn.Sequential):
    """One ``input_blocks.i`` / ``middle_block`` / ``output_blocks.i`` entry: routes each layer its inputs."""

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: ContextKVs, batch: int) -> torch.Tensor:
        """h (B·T, C, h, w), emb (B·T, E), the projected context -> (B·T, C', h', w')."""
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, batch)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, TemporalTransformer):
                z = layer(h.unflatten(0, (batch, -1)).transpose(1, 2), context)  # (B, C, T, h, w)
                h = z.transpose(1, 2).flatten(0, 1)  # (B·T, C, h, w)
            else:
                h = layer(h)
        return h


def _embed_mlp(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(Linear(dim, out), nn.SiLU(), Linear(out, out))


class UNet3D(nn.Module):
    """The 3D UNet: ``forward(x, timesteps, context, fs)`` predicts eps or v for every frame."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.context_dim is None:
            raise ValueError("UNetConfig.context_dim is required (the UNet always cross-attends to a context)")
        if cfg.num_heads == -1 and cfg.num_head_channels == -1:
            raise ValueError("UNetConfig: set num_heads or num_head_channels")
        if cfg.addition_attention and cfg.num_head_channels == -1:
            raise ValueError("addition_attention needs num_head_channels (init_attn uses 8 heads of that width)")
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, cfg.time_embed_dim
        self.time_embed = _embed_mlp(mc, emb_dim)
        if cfg.fs_condition:
            self.fps_embedding = _embed_mlp(mc, emb_dim)

        self.input_blocks = nn.ModuleList([UNetBlock(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        if cfg.addition_attention:
            self.init_attn = UNetBlock(
                TemporalTransformer(
                    mc,
                    8,
                    cfg.num_head_channels,
                    cfg.transformer_depth,
                    cfg.context_dim,
                    use_linear=False,
                    cross_attention=not cfg.temporal_selfatt_only,
                    relative_length=self._relative_length,
                    groups=cfg.norm_groups,
                )
            )
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += self._transformers(ch)
                self.input_blocks.append(UNetBlock(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(UNetBlock(self._resample(ch, "down")))
                chans.append(ch)
                ds *= 2

        self.middle_block = UNetBlock(self._resblock(ch, ch), *self._transformers(ch), self._resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [self._resblock(ch + chans.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += self._transformers(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(self._resample(ch, "up"))
                    ds //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(GroupNorm32(cfg.norm_groups, ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))

    # ----------------------------------------------------------------------------------------------------------
    # construction helpers

    @property
    def _relative_length(self) -> int | None:
        return self.cfg.temporal_length if self.cfg.use_relative_position else None

    def _resblock(self, ch_in: int, ch_out: int) -> ResBlock:
        cfg = self.cfg
        return ResBlock(
            ch_in,
            cfg.time_embed_dim,
            ch_out,
            use_scale_shift_norm=cfg.use_scale_shift_norm,
            temporal_conv=cfg.temporal_conv,
            tempspatial_aware=cfg.tempspatial_aware,
            groups=cfg.norm_groups,
        )

    def _resample(self, ch: int, direction: str) -> nn.Module:
        cfg = self.cfg
        if cfg.resblock_updown:
            return ResBlock(ch, cfg.time_embed_dim, use_scale_shift_norm=cfg.use_scale_shift_norm, resample=direction,
                            groups=cfg.norm_groups)
        return Downsample(ch, cfg.conv_resample) if direction == "down" else Upsample(ch, cfg.conv_resample)

    def _transformers(self, ch: int) -> list[nn.Module]:
        cfg = self.cfg
        if cfg.num_head_channels == -1:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        else:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        layers: list[nn.Module] = [
            SpatialTransformer(
                ch,
                heads,
                dim_head,
                cfg.transformer_depth,
                cfg.context_dim,
                use_linear=cfg.use_linear,
                image_cross_attention=cfg.image_cross_attention,
                scale_learnable=cfg.image_cross_attention_scale_learnable,
                groups=cfg.norm_groups,
            )
        ]
        if cfg.temporal_attention:
            layers.append(
                TemporalTransformer(
                    ch,
                    heads,
                    dim_head,
                    cfg.transformer_depth,
                    cfg.context_dim,
                    use_linear=cfg.use_linear,
                    causal=cfg.use_causal_attention,
                    relative_length=self._relative_length,
                    groups=cfg.norm_groups,
                )
            )
        return layers

    # ----------------------------------------------------------------------------------------------------------
    # the context: projected once per run

    def spatial_attentions(self) -> list[CrossAttention]:
        """The image-aware cross-attentions in network order (input blocks, middle block, output blocks)."""
        return [m for m in self.modules() if isinstance(m, CrossAttention) and m.image_cross_attention]

    def context_attentions(self) -> list[CrossAttention]:
        """Every attention layer that reads the context (spatial ``attn2`` and cross-attending temporal ones)."""
        return [
            attn
            for m in self.modules()
            if isinstance(m, (SpatialTransformer, TemporalTransformer))
            for attn in m.context_attentions()
        ]

    def split_context(self, context: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D) -> text (B, L_t, D) shared by a sample's frames, image tokens (B·T, 16, D) or (B, L_i, D) or None.

        With L = 77 + 16·T (the "77 + 16·T" rule) frame t gets image tokens 16t … 16t + 15; otherwise every frame
        gets the whole context, i.e. the image tokens are shared by the frames of a sample like the text.
        """
        n_text, n_img = self.cfg.text_tokens, self.cfg.image_tokens_per_frame
        text, image = context[:, :n_text], context[:, n_text:]
        if context.shape[1] == n_text + n_img * t:
            image = image.reshape(-1, n_img, context.shape[2])  # (B·T, 16, D)
        return text, image if image.shape[1] > 0 else None

    def layer_scales(self, image_scale: ImageScale | None, device: torch.device) -> list[float | torch.Tensor]:
        """λ of every image cross-attention (``spatial_attentions`` order): ``image_scale`` on its layers, 1 elsewhere."""
        n = len(self.spatial_attentions())
        if image_scale is None:
            return [1.0] * n
        chosen = set(image_scale.layer_indices(n))
        value: float | torch.Tensor = image_scale.values[0]
        if len(image_scale.values) > 1:  # per sample: kept where the UNet runs, no copy per call
            value = torch.tensor(image_scale.values, dtype=torch.float32, device=device)
        return [value if i in chosen else 1.0 for i in range(n)]

    def prepare(
        self, context: torch.Tensor, fs: torch.Tensor | None, frames: int, image_scale: ImageScale | None = None
    ) -> UNetContext:
        """The step-invariant work of a run: the fs embedding (B, E) and every layer's context keys and values.

        ``context`` (B, L, D) is split by the 77 + 16·T rule for ``frames``; ``fs`` (B,) or None (the config's
        default); ``image_scale`` None: λ = 1 everywhere.
        """
        cfg = self.cfg
        b = context.shape[0]
        if context.ndim != 3 or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
        fs_emb = None
        if cfg.fs_condition:
            if fs is not None and fs.shape != (b,):
                raise ValueError(f"fs must have shape ({b},), got {tuple(fs.shape)}")
            rates = torch.full((b,), cfg.default_fs, device=context.device) if fs is None else fs
            dtype = self.fps_embedding[0].weight.dtype
            fs_emb = self.fps_embedding(timestep_embedding(rates, cfg.model_channels).to(dtype))  # (B, E)
        text, image = self.split_context(context, frames)
        scales = dict(zip(self.spatial_attentions(), self.layer_scales(image_scale, context.device)))
        layers = {attn: attn.project(text, image, scales.get(attn, 1.0)) for attn in self.context_attentions()}
        return UNetContext(
            batch=b, frames=frames, tokens=context.shape[1], fs_emb=fs_emb, layers=layers, image_scale=image_scale
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | UNetContext,
        fs: torch.Tensor | None = None,
        image_scale: ImageScale | None = None,
    ) -> torch.Tensor:
        """x (B, in_channels, T, h, w) = cat([x_t, c_concat]); timesteps (B,); context (B, L, D) with fs (B,) or
        None and ``image_scale``, or a :class:`UNetContext` from :meth:`prepare` (which already holds them).

        Returns (B, out_channels, T, h, w).
        """
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, T, h, w), got {tuple(x.shape)}")
        b, _, t, h, w = x.shape
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(f"latent size {h}x{w} must be divisible by {factor}")
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must have shape ({b},), got {tuple(timesteps.shape)}")
        if isinstance(context, torch.Tensor):
            context = self.prepare(context, fs, t, image_scale)
        elif fs is not None or image_scale is not None:
            raise ValueError("fs and image_scale belong to UNet3D.prepare when the context is prepared")
        if context.batch != b or context.frames != t:
            raise ValueError(f"the context was prepared for {context.batch} x {context.frames} frames, not {b} x {t}")

        emb = self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(self.time_embed[0].weight.dtype))
        if context.fs_emb is not None:
            emb = emb + context.fs_emb
        emb = emb.repeat_interleave(t, dim=0)  # (B·T, E)

        projected = context.layers
        hidden = x.transpose(1, 2).flatten(0, 1)  # (B·T, C, h, w)
        skips = []
        for i, block in enumerate(self.input_blocks):
            hidden = block(hidden, emb, projected, b)
            if i == 0 and cfg.addition_attention:
                hidden = self.init_attn(hidden, emb, projected, b)
            skips.append(hidden)
        hidden = self.middle_block(hidden, emb, projected, b)
        for block in self.output_blocks:
            hidden = block(torch.cat([hidden, skips.pop()], dim=1), emb, projected, b)
        return self.out(hidden).unflatten(0, (b, t)).transpose(1, 2).contiguous()  # (B, out_channels, T, h, w)

"""Attention blocks of the 3D UNet: the dual text/image cross-attention and the spatial/temporal transformers.

Shape letters: B batch, T frames, C channels, h×w latent height×width, N a batch of sequences (B·T frames for
spatial attention, B·h·w pixels for temporal attention), n query tokens, m key tokens, H heads, d head width,
L context tokens, D context width (``context_dim``), G key sets: the N query sequences form G equal runs that
share one key/value set (G = B for the text tokens, which every frame and pixel of a sample shares; G = B·T for
per-frame image tokens).  Shared keys are therefore projected once and attended by one long query sequence
instead of being repeated per frame.

Parameter names follow the original checkpoint (``to_q``, ``to_k_ip``, ``to_out.0``, ``ff.net.0.proj``, ...).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .context import ContextKV, ContextKVs
from .ops import Linear, pointwise



def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (N, n, H·d) -> (N, H, n, d), a view


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (N, H, n, d) -> (N, n, H·d)


# SDPA batches above 65535 fail on CUDA in torch < 2.8 ("invalid configuration argument", pytorch#146704): larger
# batches are attended in slices of this many key sets.
MAX_SDPA_BATCH = 32768


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """q (N, n, H·d) over k, v (G, m, H·d) -> (N, n, H·d); query sequences g·N/G … (g+1)·N/G − 1 use key set g.

    Each run of N/G query sequences is attended as one sequence of N/G·n queries (attention is independent per
    query row), so the result equals attending every sequence to its own copy of the keys.
    """
    n_seq, n, width = q.shape
    groups = k.shape[0]
    if n_seq % groups or (causal and groups != n_seq):
        raise ValueError(f"{n_seq} query sequences cannot share {groups} key sets{' causally' if causal else ''}")
    if groups > MAX_SDPA_BATCH:  # e.g. temporal attention of a 1024 sweep: 10 x 9216 pixel sequences
        per, step = n_seq // groups, MAX_SDPA_BATCH
        return torch.cat([
            attend(q[g * per : (g + step) * per], k[g : g + step], v[g : g + step], heads, causal)
            for g in range(0, groups, step)
        ])
    q = q.reshape(groups, -1, width)  # (G, N/G·n, H·d)
    out = F.scaled_dot_product_attention(
        _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads), is_causal=causal
    )  # (G, H, N/G·n, d)
    return _merge_heads(out).reshape(n_seq, n, width)  # (N, n, H·d)


class RelativePosition(nn.Module):
    """Learned embedding of the key-minus-query offset, clipped to ±``max_distance``."""

    def __init__(self, dim_head: int, max_distance: int) -> None:
        super().__init__()
        self.max_distance = max_distance
        self.embeddings_table = nn.Parameter(torch.empty(2 * max_distance + 1, dim_head))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, n_q: int, n_k: int) -> torch.Tensor:
        device = self.embeddings_table.device
        offset = torch.arange(n_k, device=device)[None, :] - torch.arange(n_q, device=device)[:, None]  # (n, m)
        return self.embeddings_table[offset.clamp(-self.max_distance, self.max_distance) + self.max_distance]


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over a projected context (over ``x`` itself when none is given).

    The context is projected once per run by :meth:`project`: the text tokens through ``to_k``/``to_v`` and, with
    ``image_cross_attention``, the image tokens through ``to_k_ip``/``to_v_ip``; then
    ``out = Attn_text + λ·Attn_image`` (times ``tanh(alpha) + 1`` with the learnable gate) before ``to_out``, λ
    arriving with the projected context (:class:`ContextKV`): a number, or a 1-D float32 tensor of one λ per sample
    (see :func:`per_row`).  The module holds no λ of its own.  Without image cross-attention the image tokens are ignored.  ``relative_length`` adds the
    relative-position terms (temporal attention only); ``causal`` in ``forward`` masks keys after the query
    (self-attention).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        *,
        image_cross_attention: bool = False,
        scale_learnable: bool = False,
        relative_length: int | None = None,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim))  # the original's to_out.1 is an inert Dropout
        self.relative_position_k = self.relative_position_v = None
        if relative_length is not None:
            self.relative_position_k = RelativePosition(dim_head, relative_length)
            self.relative_position_v = RelativePosition(dim_head, relative_length)
        self.image_cross_attention = image_cross_attention
        self.alpha = None
        if image_cross_attention:
            self.to_k_ip = Linear(context_dim, inner, bias=False)
            self.to_v_ip = Linear(context_dim, inner, bias=False)
            if scale_learnable:
                self.alpha = nn.Parameter(torch.zeros(()))

    def project(
        self, text: torch.Tensor, image: torch.Tensor | None, image_scale: float | torch.Tensor = 1.0
    ) -> ContextKV:
        """Text tokens (G, Lt, D), image tokens (G', Li, D) or None, and this layer's λ -> :class:`ContextKV`."""
        if not self.image_cross_attention or image is None:
            return ContextKV(self.to_k(text), self.to_v(text))
        return ContextKV(self.to_k(text), self.to_v(text), self.to_k_ip(image), self.to_v_ip(image), image_scale)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q (N, n, H·d), k and v (G, m, H·d) -> (N, n, H·d)."""
        if self.relative_position_k is None:
            return attend(q, k, v, self.heads, causal)
        if k.shape[0] != q.shape[0]:  # the offsets are per sequence: give every sequence its keys
            k, v = (t.repeat_interleave(q.shape[0] // k.shape[0], dim=0) for t in (k, v))
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))  # (N, H, *, d)
        n, m = q.shape[-2], k.shape[-2]
        scale = self.dim_head**-0.5
        sim = (q @ k.transpose(-1, -2)) * scale
        sim = sim + torch.einsum("...id,ijd->...ij", q, self.relative_position_k(n, m)) * scale  # (N, H, n, m)
        if causal:
            keep = torch.ones(n, m, dtype=torch.bool, device=sim.device).tril()
            sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        out = attn @ v + torch.einsum("...ij,ijd->...id", attn, self.relative_position_v(n, m))
        return _merge_heads(out)

    def forward(self, x: torch.Tensor, context: ContextKV | None = None, causal: bool = False) -> torch.Tensor:
        """x (N, n, C), the projected context (see :meth:`project`) or None -> (N, n, C)."""
        q = self.to_q(x)  # (N, n, H·d)
        if context is None:
            return self.to_out(self._attend(q, self.to_k(x), self.to_v(x), causal))
        out = self._attend(q, context.k, context.v, causal)
        scale, k_image = context.image_scale, context.k_image
        per_sample = isinstance(scale, torch.Tensor)
        if k_image is not None and k_image.shape[1] > 0 and (per_sample or scale != 0):
            out_image = self._attend(q, k_image, context.v_image, False)
            if per_sample:  # rows with text key set g belong to sample g mod S; λ stays float32, as a float does
                rows = per_row(scale.to(q.device, torch.float32), q.shape[0], context.k.shape[0])
                out_image = (out_image * rows).to(q.dtype)
            else:
                out_image = float(scale) * out_image
            out = out + (out_image if self.alpha is None else out_image * (torch.tanh(self.alpha) + 1))
        return self.to_out(out)


def per_row(values: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """S per-sample values -> (rows, 1, 1) for a batch of ``rows`` query sequences in ``groups`` equal runs, one run
    per UNet sample; the UNet batch is laid out with the sample index innermost (branch- or window-major), so
    run g is sample g mod S."""
    if groups % values.numel():
        raise ValueError(f"{values.numel()} per-sample λ values do not divide a UNet batch of {groups}")
    return values.repeat(groups // values.numel()).repeat_interleave(rows // groups)[:, None, None]




class GEGLU(nn.Module):
    """``a · GELU(g)`` with ``[a, g] = proj(x)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return F.gelu(gate).mul_(a)  # in place: one activation-sized buffer less (1.6x faster at large batches)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4× hidden width (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))  # 1: Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, second attention (cross- or self-), feed-forward; each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        *,
        image_cross_attention: bool = False,
        scale_learnable: bool = False,
        relative_length: int | None = None,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, relative_length=relative_length)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(
            dim,
            context_dim,
            heads,
            dim_head,
            image_cross_attention=image_cross_attention,
            scale_learnable=scale_learnable,
            relative_length=relative_length,
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: ContextKVs | None = None, causal: bool = False) -> torch.Tensor:
        """x (N, n, C); ``context`` None makes ``attn2`` a second self-attention (causal masks only those)."""
        x = x + self.attn1(self.norm1(x), causal=causal)
        if context is None:
            x = x + self.attn2(self.norm2(x), causal=causal)
        else:
            x = x + self.attn2(self.norm2(x), context[self.attn2])
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h·w tokens of each frame, cross-attending to the context."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        *,
        use_linear: bool = True,
        image_cross_attention: bool = False,
        scale_learnable: bool = False,
        groups: int = 32,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                heads,
                dim_head,
                context_dim,
                image_cross_attention=image_cross_attention,
                scale_learnable=scale_learnable,
            )
            for _ in range(depth)
        )
        self.proj_out = Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def context_attentions(self) -> list[CrossAttention]:
        return [block.attn2 for block in self.transformer_blocks]

    def forward(self, x: torch.Tensor, context: ContextKVs) -> torch.Tensor:
        """x (B·T, C, h, w) and the projected context (text G = B, image G = B·T or B) -> (B·T, C, h, w)."""
        h, w = x.shape[-2:]
        y = pointwise(self.proj_in, self.norm(x).flatten(2).transpose(1, 2))  # (B·T, h·w, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + pointwise(self.proj_out, y).transpose(1, 2).unflatten(2, (h, w))  # (B·T, C, h, w)


class TemporalTransformer(nn.Module):
    """Per-pixel transformer over the T frames (both attentions are self-attentions unless ``cross_attention``).

    With ``cross_attention`` (``init_attn`` when ``temporal_selfatt_only`` is false) ``attn2`` attends to the text
    tokens of the context; the original hands pixel p the text of frame p // (h·w / T), which is the same text for
    every frame of a sample, so every pixel of sample b attends to sample b's text.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int = 1,
        context_dim: int | None = None,
        *,
        use_linear: bool = True,
        cross_attention: bool = False,
        causal: bool = False,
        relative_length: int | None = None,
        groups: int = 32,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.cross_attention, self.causal = cross_attention, causal
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, heads, dim_head, context_dim if cross_attention else None, relative_length=relative_length
            )
            for _ in range(depth)
        )
        self.proj_out = Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)

    def context_attentions(self) -> list[CrossAttention]:
        return [block.attn2 for block in self.transformer_blocks] if self.cross_attention else []

    def forward(self, x: torch.Tensor, context: ContextKVs | None = None) -> torch.Tensor:
        """x (B, C, T, h, w) and the projected context (used only with ``cross_attention``) -> (B, C, T, h, w)."""
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)  # (B·h·w, T, C)
        y = pointwise(self.proj_in, y)
        for block in self.transformer_blocks:
            y = block(y, context if self.cross_attention else None, causal=self.causal)
        y = pointwise(self.proj_out, y)
        return x + y.unflatten(0, (b, h, w)).permute(0, 4, 3, 1, 2)  # (B, C, T, h, w)

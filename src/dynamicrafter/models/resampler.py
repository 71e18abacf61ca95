"""The Resampler (``image_proj_model``): a perceiver-style query transformer from CLIP image tokens to context tokens.

A fixed set of learned queries (``num_queries`` per frame, ``video_length`` frames, frame-major) attends, layer after
layer, to the projected CLIP tokens concatenated with the queries themselves.  Parameter names match the original
checkpoint with the ``image_proj_model.`` prefix stripped.

Shape letters: B batch, N CLIP tokens (257), L latent queries (num_queries * video_length), D ``dim``,
E ``embedding_dim``, O ``output_dim``, H heads, K ``dim_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ResamplerConfig


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from ``cat([image tokens, latents])``; no mask, no biases."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)  # (B, N, D), (B, L, D)
        b, n_q, _ = latents.shape
        q = self.to_q(latents)  # (B, L, H*K)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, N+L, H*K) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, *, K)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, K), scale 1/sqrt(K)
        return self.to_out(out.transpose(1, 2).reshape(b, n_q, -1))  # (B, L, D)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm -> Linear -> exact GELU -> Linear, no biases (indices 0, 1, 3 carry the weights)."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class Resampler(nn.Module):
    """CLIP image tokens (B, N, E) -> context tokens (B, L, O)."""

    def __init__(self, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.randn(1, cfg.num_latents, cfg.dim) / cfg.dim**0.5)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)]
            )
            for _ in range(cfg.depth)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.cfg.embedding_dim:
            raise ValueError(
                f"Resampler expects tokens of shape (B, N, {self.cfg.embedding_dim}), got {tuple(tokens.shape)}"
            )
        latents = self.latents.expand(tokens.shape[0], -1, -1)  # (B, L, D)
        x = self.proj_in(tokens)  # (B, N, D)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (B, L, O)

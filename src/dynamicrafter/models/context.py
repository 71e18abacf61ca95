"""The data a UNet call reads besides the latent: the projected context of every layer, and λ.

Letters: G key sets, m key tokens, H heads, d head width, S samples, B batch, E time-embedding width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
import torch
from torch import nn


@dataclass(frozen=True)
class ContextKV:
    """The projected context of one cross-attention layer, made once per run (see ``UNet3D.prepare``).

    ``k``, ``v``: text keys and values (G, m, H·d); ``k_image``, ``v_image``: image keys and values, or None;
    ``image_scale``: λ of this layer, a number or a float32 tensor (S,) of one λ per sample (see :func:`per_row`).
    """

    k: torch.Tensor
    v: torch.Tensor
    k_image: torch.Tensor | None = None
    v_image: torch.Tensor | None = None
    image_scale: float | torch.Tensor = 1.0


# The projected context of every context-attending layer of a network, by layer (a CrossAttention module).
ContextKVs = Mapping[nn.Module, ContextKV]


@dataclass(frozen=True)
class ImageScale:
    """The image cross-attention scale λ of a run, as data: ``values`` holds one λ for every sample, or one per
    sample (S values; a UNet batch then holds S samples, or whole multiples of them with the sample index
    innermost: guidance branches and windows outermost); ``layers`` the spatial-transformer indices it applies to
    (positions in ``UNet3D.spatial_attentions()``, None: all).  Every other layer keeps λ = 1."""

    values: tuple[float, ...] = (1.0,)
    layers: tuple[int, ...] | None = None

    @classmethod
    def of(cls, value: float | Sequence[float], layers: Sequence[int] | None = None) -> ImageScale:
        values = (float(value),) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
        if not values:
            raise ValueError("image_scale needs at least one value")
        return cls(values, None if layers is None else tuple(int(i) for i in layers))

    def layer_indices(self, n_layers: int) -> list[int]:
        """The chosen layers among ``n_layers`` (negative indices count from the end); raises for out-of-range ones."""
        if self.layers is None:
            return list(range(n_layers))
        bad = [i for i in self.layers if not -n_layers <= i < n_layers]
        if bad:
            raise ValueError(f"image cross-attention indices {bad} out of range for {n_layers} layers")
        return [i % n_layers for i in self.layers]


@dataclass(frozen=True, eq=False)
class UNetContext:
    """What :meth:`UNet3D.prepare` computes once per run: the fs embedding (B, E) or None and every context
    layer's :class:`ContextKV`, for ``batch`` samples of ``frames`` frames."""

    batch: int
    frames: int
    tokens: int  # L, the context length it was made from
    fs_emb: torch.Tensor | None
    layers: ContextKVs
    image_scale: ImageScale | None = None

"""CPU kernels of the networks: linear layers through oneDNN, im2col convolutions, temporal convolutions as 2-D.

Every function here computes exactly what its plain PyTorch counterpart computes (same parameters, same result to
float32 rounding); only the kernel differs, and only for float32 CPU inference.  Other devices, dtypes, autograd and
``torch.compile`` take the plain path.  docs/PERFORMANCE.md has the measured effect of each.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _onednn_matmul() -> bool:
    """Whether oneDNN's (private) fused linear op exists here and agrees with ``F.linear`` on a small probe: a
    torch release that renames or changes it silently falls back to ``F.linear``."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    try:
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return got.shape == (3, 5, 4) and torch.allclose(got, F.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except (RuntimeError, TypeError):
        return False


def onednn_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float32 CPU inference (no autograd, not under ``torch.compile``) with oneDNN's matmul available."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()
        and _onednn_matmul()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with float32 CPU inference routed through oneDNN's matmul.

    oneDNN's AVX-512 kernels run these products about twice as fast as the BLAS behind ``F.linear`` on CPUs where
    that BLAS falls back to AVX2 (AMD); see docs/PERFORMANCE.md.
    """
    if onednn_inference(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def pointwise(layer: nn.Linear | nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a Linear or a kernel-1 convolution to the last (channel) axis of ``x``.  A Linear runs through its own
    forward (where weight-storage and offloading hooks act); a convolution's weight is used as stored, cast to
    ``x``'s dtype if it is stored in another (fp8)."""
    if isinstance(layer, nn.Linear):
        return layer(x)
    weight, bias = layer.weight.flatten(1), layer.bias
    if weight.dtype != x.dtype:
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    return linear(x, weight, bias)


# im2col pays off on the CPU for wide convolutions with few output pixels (docs/PERFORMANCE.md).
IM2COL_MIN_CHANNELS, IM2COL_MAX_ROWS = 1024, 512


def _pair(v: tuple[int, int] | int) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (v[0], v[1])


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int] | int = 1,
    padding: tuple[int, int] | int = 0,
) -> torch.Tensor:
    """Zero-padded ``F.conv2d`` of x (N, C, H', W').

    In float32 CPU inference a convolution with at least 1024 input channels and at most 512 output pixels in all
    (N·h·w) runs as one im2col matmul through oneDNN instead: its direct kernel is weight-bandwidth bound there,
    1.25-6x slower at the 1280-channel levels of the UNet.
    """
    n, c, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[2:], _pair(stride), _pair(padding)
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    if c < IM2COL_MIN_CHANNELS or n * out_h * out_w > IM2COL_MAX_ROWS or not onednn_inference(x, weight):
        return F.conv2d(x, weight, bias, stride, padding)
    cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (N, C·kh·kw, h·w)
    y = linear(cols.transpose(1, 2), weight.flatten(1), bias)  # (N, h·w, C')
    return y.transpose(1, 2).reshape(n, -1, out_h, out_w)  # (N, C', h, w)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding, same parameters) computed by :func:`conv2d`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding)


def conv_over_time(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for x (B, C, T, h, w); a (k, 1, 1) kernel runs as the equal 2-D convolution over (T, h·w).

    The 2-D kernel is 2-2.5x faster than the 3-D one on the CPU (docs/PERFORMANCE.md).
    """
    if conv.kernel_size[1:] != (1, 1) or conv.weight.dtype != x.dtype or conv.weight.device != x.device:
        return conv(x)  # also a layer stored in fp8 or offloaded: its forward hooks bring the weight
    y = conv2d(x.flatten(3), conv.weight.squeeze(-1), conv.bias, padding=(conv.padding[0], 0))  # (B, C', T, h·w)
    return y.unflatten(3, x.shape[3:])  # (B, C', T, h, w)

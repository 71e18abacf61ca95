"""The UNet's speed paths compute the same numbers as the plain formulation: grouped-key attention, the oneDNN
matmul, im2col and 2-D temporal convolutions, and the per-run memo of the context projections."""

import pytest
import torch
import torch.nn.functional as F

from dynamicrafter.models import attention
from dynamicrafter.models.attention import CrossAttention, attend, linear
from dynamicrafter.models.unet import TemporalConvBlock, UNet3D, conv2d
from dynamicrafter.presets import get_preset


def rel_err(got: torch.Tensor, exp: torch.Tensor) -> float:
    return ((got - exp).abs().max() / exp.abs().max()).item()


def test_grouped_keys_equal_repeated_keys() -> None:
    """Six query sequences in two runs of three sharing keys == every sequence with its own copy of the keys."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(6, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    heads = lambda t: t.unflatten(-1, (4, 8)).transpose(1, 2)  # noqa: E731
    repeated = [heads(t.repeat_interleave(3, dim=0)) for t in (k, v)]
    exp = F.scaled_dot_product_attention(heads(q), *repeated).transpose(1, 2).flatten(2)
    assert rel_err(attend(q, k, v, 4), exp) < 1e-6
    with pytest.raises(ValueError, match="cannot share"):
        attend(q, torch.randn(4, 7, 32), torch.randn(4, 7, 32), 4)


def test_relative_position_attention_accepts_shared_keys() -> None:
    torch.manual_seed(0)
    attn = CrossAttention(32, 16, heads=2, dim_head=16, relative_length=4)
    x, text = torch.randn(6, 4, 32), torch.randn(2, 5, 16)
    with torch.no_grad():
        shared = attn(x, attn.project(text, None))
        per_sequence = attn(x, attn.project(text.repeat_interleave(3, dim=0), None))
    assert rel_err(shared, per_sequence) < 1e-6


def test_onednn_matmul_equals_f_linear() -> None:
    x, w, b = torch.randn(3, 40, 96), torch.randn(64, 96), torch.randn(64)
    assert rel_err(linear(x, w, b), F.linear(x, w, b)) < 1e-6
    assert rel_err(linear(x.transpose(1, 2).contiguous().transpose(1, 2), w), F.linear(x, w)) < 1e-6


def test_a_broken_onednn_op_falls_back_to_f_linear(monkeypatch) -> None:
    """A torch release whose private oneDNN op fails or disagrees is detected once and not used."""
    import dynamicrafter.models.attention as attention

    class Broken:
        @staticmethod
        def _linear_pointwise(x, w, b, *rest):
            raise RuntimeError("schema changed")

    monkeypatch.setattr(torch.ops, "mkldnn", Broken())
    attention._onednn_matmul.cache_clear()
    try:
        assert not attention._onednn_matmul()
        x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
        assert torch.equal(linear(x, w), F.linear(x, w))
    finally:
        monkeypatch.undo()
        attention._onednn_matmul.cache_clear()
    assert attention._onednn_matmul() == (torch.backends.mkldnn.is_available())


@pytest.mark.parametrize(("channels", "size", "stride", "kernel"), [(1024, 2, 1, 3), (1024, 4, 2, 3), (1024, 1, 1, 1)])
def test_im2col_convolution_equals_f_conv2d(channels: int, size: int, stride: int, kernel: int) -> None:
    x, w, b = torch.randn(4, channels, size, size), torch.randn(8, channels, kernel, kernel) / 50, torch.randn(8)
    pad = kernel // 2
    got, exp = conv2d(x, w, b, stride, pad), F.conv2d(x, w, b, stride, pad)
    assert got.shape == exp.shape and rel_err(got, exp) < 1e-5


def test_temporal_conv_block_equals_conv3d() -> None:
    torch.manual_seed(0)
    block = TemporalConvBlock(64).eval()
    x = torch.randn(2, 64, 8, 3, 5)
    with torch.no_grad():
        h = x
        for stage in (block.conv1, block.conv2, block.conv3, block.conv4):
            h = stage(h)  # nn.Sequential: the Conv3d module itself
        assert rel_err(block(x), x + h) < 1e-5


@pytest.fixture(scope="module")
def unet() -> UNet3D:
    torch.manual_seed(0)
    return UNet3D(get_preset("tiny").model_config().unet).eval().requires_grad_(False)


def count_projections(monkeypatch) -> list[int]:
    calls = [0]
    project = CrossAttention.project

    def counted(self, *args):
        calls[0] += 1
        return project(self, *args)

    monkeypatch.setattr(CrossAttention, "project", counted)
    return calls


def test_context_projected_once_per_run(unet, monkeypatch) -> None:
    """The same context and fs tensors come back at every step: projected once; anything changed: projected again."""
    calls = count_projections(monkeypatch)
    layers = len(unet.context_attentions())
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 8, 16, 8, 8, generator=g), torch.randn(2, 77 + 256, 32, generator=g)
    t, fs = torch.tensor([900, 900]), torch.tensor([24, 24])
    with torch.no_grad():
        first = unet(x, t, context, fs)
        again = unet(x, t - 100, context, fs)
        assert calls[0] == layers
        fresh = unet(x, t - 100, context.clone(), fs.clone())  # equal values, new tensors: projected again
        assert calls[0] == 2 * layers and torch.equal(again, fresh)
        context.mul_(2)  # modified in place: projected again, with the new values
        assert not torch.equal(unet(x, t, context, fs), first) and calls[0] == 3 * layers
        unet(x, t, context, None)  # default fs
        unet(x, t, context, None)
        assert calls[0] == 4 * layers
        weight = unet.context_attentions()[0].to_k.weight
        weight.mul_(1.5)
        unet(x, t, context, None)
        weight.div_(1.5)
        assert calls[0] == 5 * layers
    unet(x, t, context, fs)  # with autograd: nothing remembered
    unet(x, t, context, fs)
    assert calls[0] == 7 * layers


def test_memo_is_released_with_its_context(unet) -> None:
    context, fs = torch.randn(1, 77 + 256, 32), torch.tensor([24])
    with torch.no_grad():
        unet(torch.randn(1, 8, 16, 8, 8), torch.tensor([10]), context, fs)
    assert unet._memo is not None
    del context
    assert unet._memo is None


def test_fast_paths_off_give_the_same_unet_output(unet, monkeypatch) -> None:
    """(At 16x16 latents: at 8x8 the tiny net's 1x1 level normalises groups of two values, which turns 1e-7
    differences in rounding into 1e-3.)"""
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 8, 16, 16, 16, generator=g), torch.tensor([999, 10]), torch.randn(2, 333, 32, generator=g))
    with torch.no_grad():
        fast = unet(*args)
        monkeypatch.setattr(attention, "_onednn_matmul", lambda: False)
        monkeypatch.setattr("dynamicrafter.models.unet._conv_over_time", lambda conv, x: conv(x))
        unet._memo = None
        plain = unet(*args)
    assert rel_err(fast, plain) < 1e-5


@pytest.mark.parametrize("shared", [False, True])
def test_huge_attention_batches_are_sliced_with_the_same_result(monkeypatch, shared: bool) -> None:
    """Above MAX_SDPA_BATCH key sets, attention runs in slices (CUDA kernels of torch < 2.8 fail beyond 65535)."""
    import dynamicrafter.models.attention as attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(12, 5, 16, generator=g)
    k, v = (torch.randn(4 if shared else 12, 7, 16, generator=g) for _ in range(2))
    whole = attention.attend(q, k, v, heads=2)
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 3)
    assert torch.allclose(attention.attend(q, k, v, heads=2), whole, atol=1e-6)

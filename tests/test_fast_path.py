"""The speed paths compute the same numbers as the plain formulation, and each test shows its fast path ran:
grouped-key attention, the oneDNN matmul, im2col and 2-D temporal convolutions, and the context projected once per
sampling run."""

import pytest
import torch
import torch.nn.functional as F

from dynamicrafter.models import ops
from dynamicrafter.models.attention import CrossAttention, attend
from dynamicrafter.models.ops import conv2d, linear
from dynamicrafter.models.unet import TemporalConvBlock, UNet3D
from dynamicrafter.presets import get_preset

from .conftest import rel_err

needs_onednn = pytest.mark.skipif(
    not ops._onednn_matmul(), reason="oneDNN's fused linear op is not available in this torch build (plain path only)"
)


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple]:
    """Every call of oneDNN's linear op, recorded (the op still runs)."""
    calls: list[tuple] = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        @staticmethod
        def _linear_pointwise(x, w, *rest):
            calls.append((tuple(x.shape), tuple(w.shape)))
            return real(x, w, *rest)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy())
    return calls


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


@needs_onednn
def test_onednn_matmul_equals_f_linear(onednn_calls) -> None:
    x, w, b = torch.randn(3, 40, 96), torch.randn(64, 96), torch.randn(64)
    assert rel_err(linear(x, w, b), F.linear(x, w, b)) < 1e-6
    assert rel_err(linear(x.transpose(1, 2).contiguous().transpose(1, 2), w), F.linear(x, w)) < 1e-6
    assert onednn_calls == [((3, 40, 96), (64, 96))] * 2  # the fast path ran, both times
    with torch.enable_grad():  # autograd takes the plain path
        linear(x.requires_grad_(), w)
    assert len(onednn_calls) == 2


def test_a_broken_onednn_op_falls_back_to_f_linear(monkeypatch) -> None:
    """A torch release whose private oneDNN op fails or disagrees is detected once and not used."""

    class Broken:
        @staticmethod
        def _linear_pointwise(x, w, b, *rest):
            raise RuntimeError("schema changed")

    monkeypatch.setattr(torch.ops, "mkldnn", Broken())
    ops._onednn_matmul.cache_clear()
    try:
        assert not ops._onednn_matmul()
        x, w = torch.randn(2, 3, 8), torch.randn(4, 8)
        assert torch.equal(linear(x, w), F.linear(x, w))
    finally:
        monkeypatch.undo()
        ops._onednn_matmul.cache_clear()
    assert ops._onednn_matmul() == (torch.backends.mkldnn.is_available())


@needs_onednn
@pytest.mark.parametrize(("channels", "size", "stride", "kernel"), [(1024, 2, 1, 3), (1024, 4, 2, 3), (1024, 1, 1, 1)])
def test_im2col_convolution_equals_f_conv2d(onednn_calls, channels: int, size: int, stride: int, kernel: int) -> None:
    x, w, b = torch.randn(4, channels, size, size), torch.randn(8, channels, kernel, kernel) / 50, torch.randn(8)
    pad = kernel // 2
    got, exp = conv2d(x, w, b, stride, pad), F.conv2d(x, w, b, stride, pad)
    assert got.shape == exp.shape and rel_err(got, exp) < 1e-5
    assert onednn_calls == [((4, got.shape[2] * got.shape[3], channels * kernel * kernel), (8, channels * kernel**2))]
    conv2d(x[:, :512], w[:, :512], b, stride, pad)  # narrow: the direct kernel
    assert len(onednn_calls) == 1


def test_temporal_conv_block_equals_conv3d(monkeypatch) -> None:
    torch.manual_seed(0)
    block = TemporalConvBlock(64).eval()
    x = torch.randn(2, 64, 8, 3, 5)
    with torch.no_grad():
        h = x
        for stage in (block.conv1, block.conv2, block.conv3, block.conv4):
            h = stage(h)  # nn.Sequential: the Conv3d module itself
        conv3d_calls: list[int] = []
        monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda *a: conv3d_calls.append(1))
        assert rel_err(block(x), x + h) < 1e-5
    assert conv3d_calls == []  # every (3, 1, 1) kernel ran as a 2-D convolution


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


def test_context_projected_once_per_sampling_run(tiny, monkeypatch) -> None:
    """A sampling run projects the context of every layer once (``UNet3D.prepare``), not once per step; the UNet
    keeps nothing between runs."""
    from dynamicrafter import pipeline

    calls = count_projections(monkeypatch)
    layers = len(tiny.unet.context_attentions())
    unet_calls: list[int] = []
    handle = tiny.unet.register_forward_pre_hook(lambda m, args: unet_calls.append(1))
    try:
        settings = get_preset("tiny").sampling(steps=3, frames=4)
        pipeline.animate(tiny, torch.zeros(1, 3, 64, 64), ["a cat"], settings, [0])
    finally:
        handle.remove()
    assert len(unet_calls) == 3 and calls[0] == layers
    assert not [k for k in vars(tiny.unet) if "memo" in k or "cache" in k]


def test_a_raw_context_is_projected_on_every_call(unet, monkeypatch) -> None:
    """Called with a raw context tensor the UNet projects it every time (no hidden cache); a prepared context
    skips the projection and gives the same numbers."""
    calls = count_projections(monkeypatch)
    layers = len(unet.context_attentions())
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 8, 16, 8, 8, generator=g), torch.randn(2, 77 + 256, 32, generator=g)
    t, fs = torch.tensor([900, 900]), torch.tensor([24, 24])
    with torch.no_grad():
        first = unet(x, t, context, fs)
        unet(x, t, context, fs)
        assert calls[0] == 2 * layers
        prepared = unet.prepare(context, fs, 16)
        assert torch.equal(unet(x, t, prepared), first) and calls[0] == 3 * layers
        context.mul_(2)
        assert not torch.equal(unet(x, t, context, fs), first)
        with pytest.raises(ValueError, match="prepared for"):
            unet(x[:1], t[:1], prepared)


def test_fast_paths_off_give_the_same_unet_output(unet, monkeypatch) -> None:
    """(At 16x16 latents: at 8x8 the tiny net's 1x1 level normalises groups of two values, which turns 1e-7
    differences in rounding into 1e-3.)"""
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 8, 16, 16, 16, generator=g), torch.tensor([999, 10]), torch.randn(2, 333, 32, generator=g))
    with torch.no_grad():
        fast = unet(*args)
        monkeypatch.setattr(ops, "_onednn_matmul", lambda: False)
        monkeypatch.setattr("dynamicrafter.models.unet.conv_over_time", lambda conv, x: conv(x))
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
    sdpa_calls: list[int] = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or real(*a, **k))
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 3)
    assert torch.allclose(attention.attend(q, k, v, heads=2), whole, atol=1e-6)
    assert len(sdpa_calls) == (2 if shared else 4)  # sliced: 4 or 12 key sets in slices of 3

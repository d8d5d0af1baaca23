"""qd_core.layers: the channels-last re-view and the resize that uses it; ``class_argmax``.

The ``gpu`` test checks that PyTorch's channels-last CUDA kernel, which ``resize`` picks, gives the NCHW kernel's
values bit for bit at the model's shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qd_core.layers import (
    CHANNELS_LAST_MIN, Mlp, channels_last, class_argmax, map_layout, prefers_channels_last, resize,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def token_map(b: int, h: int, w: int, c: int, device: str = "cpu", dtype: torch.dtype = torch.float32
              ) -> torch.Tensor:
    """(b, c, h, w) view of (b, 1 + h·w, c) tokens without their first (CLS) token, as the backbone's pyramid
    and the refinement make their maps."""
    tokens = torch.randn(b, 1 + h * w, c, device=device, dtype=dtype)
    return tokens[:, 1:].transpose(1, 2).reshape(b, c, h, w)


def picked_channels_last(x: torch.Tensor) -> bool:
    """Whether PyTorch's own layout guess for x is channels-last (interpolate allocates its output by it)."""
    return F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False).is_contiguous(
        memory_format=torch.channels_last)


def test_batch_one_token_map_is_re_viewed_not_copied():
    x = token_map(1, 8, 6, 32)
    # The quirk this works around: channels-last in memory, yet guessed NCHW because of the batch stride.
    assert x.is_contiguous(memory_format=torch.channels_last) and not picked_channels_last(x)
    y = channels_last(x)
    assert y.data_ptr() == x.data_ptr() and y.shape == x.shape and torch.equal(y, x)
    assert y.stride() == (8 * 6 * 32, 1, 6 * 32, 32)
    assert picked_channels_last(y)


@pytest.mark.parametrize("make", [lambda: torch.randn(2, 32, 8, 6), lambda: token_map(3, 8, 6, 32)],
                         ids=["nchw", "batch-3-token-map"])
def test_other_layouts_are_copied_to_channels_last(make):
    x = make()
    y = channels_last(x)
    assert y.data_ptr() != x.data_ptr() and torch.equal(y, x)
    assert y.is_contiguous(memory_format=torch.channels_last) and picked_channels_last(y)


@pytest.mark.parametrize("make", [lambda: token_map(1, 4, 5, 16), lambda: torch.randn(2, 16, 4, 5)],
                         ids=["view", "copy"])
def test_channels_last_passes_gradients(make):
    x = make().requires_grad_()
    weight = torch.randn(x.shape)
    (channels_last(x) * weight).sum().backward()
    assert torch.equal(x.grad, weight)


def test_resize_is_interpolate_channels_last():
    x = token_map(1, 8, 8, 32)
    assert prefers_channels_last(x) and not prefers_channels_last(torch.randn(1, CHANNELS_LAST_MIN - 1, 4, 4))
    eps = torch.finfo(torch.float32).eps
    for how in (dict(size=(3, 5)), dict(size=(32, 24)), dict(scale_factor=0.5), dict(scale_factor=4.0)):
        out = resize(x, **how)
        expected = F.interpolate(x.contiguous(), mode="bilinear", align_corners=False, **how)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expected, rtol=4 * eps, atol=1e-6)
    assert resize(x, (8, 8)) is x


def test_traced_resize_keeps_pytorch_layout():
    # Export graphs carry no layout changes: they would be transposes in ONNX.
    graph = torch.jit.trace(lambda x: resize(x, (3, 5)), token_map(1, 8, 8, 32)).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "aten::upsample_bilinear2d" in kinds
    assert not kinds & {"aten::permute", "aten::contiguous", "aten::view", "aten::reshape"}


def test_channels_last_interpolate_matches_nchw_on_cpu():
    # PyTorch's CPU kernels for the two layouts evaluate the same bilinear weights in different orders: a few
    # fp32 ulps at most, here as on CUDA (where the gpu test below asks for bit equality).
    x = token_map(1, 16, 16, CHANNELS_LAST_MIN)
    for size in ((4, 4), (64, 48), (7, 9)):
        expected = F.interpolate(x.contiguous(), size=size, mode="bilinear", align_corners=False)
        actual = F.interpolate(channels_last(x), size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(actual, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 8])
def test_resize_on_cuda_is_the_nchw_result(b, dtype):
    """The model's resize calls at 512² (ViT-L: pyramid from 1024-channel tokens, refinement/decoder maps of 256):
    the channels-last kernel's output equals the NCHW kernel's exactly (both compute each output element as
    h0·(w0·a + w1·b) + h1·(w0·c + w1·d) in fp32) and comes back channels-last."""
    cases = [(token_map(b, 32, 32, 1024, "cuda", dtype), dict(scale_factor=0.5)),
             (token_map(b, 32, 32, 1024, "cuda", dtype), dict(scale_factor=4.0)),
             (token_map(b, 16, 16, 256, "cuda", dtype), dict(size=(128, 128))),
             (torch.randn(b, 256, 128, 128, device="cuda", dtype=dtype), dict(size=(16, 16))),
             (torch.randn(b, 256, 128, 128, device="cuda", dtype=dtype), dict(size=(64, 64)))]
    for x, how in cases:
        assert prefers_channels_last(x)
        out = resize(x, **how)
        expected = F.interpolate(x.contiguous(), mode="bilinear", align_corners=False, **how)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(out, expected), f"{tuple(x.shape)} {how}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_class_argmax_is_argmax(dtype):
    # Integer scores make ties everywhere: both must pick the first maximum. NaN counts as the maximum.
    scores = torch.randint(0, 3, (3, 19, 17, 23)).to(dtype)
    scores[0, 5, 3, 4] = float("nan")
    scores[1, :, 0, 0] = float("nan")
    scores[2, :, 1, 1] = float("-inf")
    labels = class_argmax(scores)
    assert labels.dtype == torch.int64 and torch.equal(labels, scores.argmax(dim=1))
    assert labels[0, 3, 4] == 5 and labels[1, 0, 0] == 0 and labels[2, 1, 1] == 0
    noise = torch.randn(2, 7, 9, 5).to(dtype)
    assert torch.equal(class_argmax(noise), noise.argmax(dim=1))


def test_class_argmax_traces_to_one_argmax():
    graph = torch.jit.trace(class_argmax, torch.randn(1, 4, 3, 3)).graph
    kinds = [node.kind() for node in graph.nodes()]
    assert "aten::argmax" in kinds and "aten::max" not in kinds


def test_map_layout_re_views_maps_and_leaves_thin_ones():
    x = token_map(1, 4, 4, CHANNELS_LAST_MIN)
    y = map_layout(x)
    assert y.data_ptr() == x.data_ptr() and picked_channels_last(y)
    thin = torch.randn(1, CHANNELS_LAST_MIN - 1, 4, 4)
    assert map_layout(thin) is thin
    traced = torch.jit.trace(map_layout, x).graph
    assert not {node.kind() for node in traced.nodes()} & {"aten::permute", "aten::contiguous", "aten::view"}


def test_mlp_is_linear_exact_gelu_linear_without_dropout():
    torch.manual_seed(0)
    mlp = Mlp(16, 64).train()  # train mode: a dropout would show here
    x = torch.randn(4, 16)
    hidden = x @ mlp.fc1.weight.T + mlp.fc1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / 2 ** 0.5))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), hidden @ mlp.fc2.weight.T + mlp.fc2.bias, atol=1e-5, rtol=0)

"""Small reusable layers shared by the backbone, the agent-query encoder and the head, and the few tensor operations
whose fastest PyTorch form depends on the device."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from qd_core.attention import agent_attention, attention, is_tracing, masked_attention

# Feature maps run channels-last. PyTorch's CUDA bilinear resize has two kernels: the NCHW one runs a thread per
# *output pixel* that loops over every (image, channel) plane, so resizing (B, 256, 128, 128) to 16×16 is 256
# threads each walking B·256 planes one dependent read after another, whatever the GPU; the channels-last one runs a
# thread per output element. On CPU the channels-last depthwise convolutions of the refinement run about twice as
# fast (same values up to fp32 rounding). PyTorch itself takes the channels-last resize for inputs of at least this
# many channels.
CHANNELS_LAST_MIN = 16


class Mlp(nn.Module):
    """Linear → activation → Linear. Names ``fc1``/``fc2`` match DINOv2 checkpoints."""

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) → (..., out)."""
        return self.fc2(self.act(self.fc1(x)))


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections, routed through ``qd_core.attention``.

    ``kind`` picks the entry point: ``plain`` (self/cross attention), ``agent`` (many queries over few keys, keys
    may be shared over the batch), ``masked`` (Mask2Former masked cross-attention).
    """

    def __init__(self, dim: int, num_heads: int, kind: Literal["plain", "agent", "masked"] = "plain",
                 kdim: int | None = None, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.kind = num_heads, kind
        kdim = kdim or dim
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(kdim, dim, bias=bias)
        self.v_proj = nn.Linear(kdim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask_embed: Tensor | None = None,
                mask_feats: Tensor | None = None) -> Tensor:
        """query: (B, N, dim); key, value: (B, M, kdim), or (1, M, kdim) for ``agent``.

        For ``masked``: mask_embed (B, N, C) and mask_feats (B, C, M). Returns (B, N, dim).
        """
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if self.kind == "agent":
            out = agent_attention(q, k, v)
        elif self.kind == "masked":
            if mask_embed is None or mask_feats is None:
                raise ValueError("masked attention needs mask_embed and mask_feats")
            out = masked_attention(q, k, v, mask_embed, mask_feats)
        else:
            out = attention(q, k, v)
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def channels_last(x: Tensor) -> Tensor:
    """x (N, C, H, W) in channels-last memory that PyTorch recognises as such: a view when x already lies that way
    in memory, else a copy. Same values, same shape.

    A (1, C, h, w) view of (1, h·w, C) tokens is channels-last in memory, but its batch stride (C, not h·w·C) makes
    PyTorch's memory-format guess say NCHW, so every kernel that picks its layout from that guess (resize, conv,
    cat) takes the NCHW path at batch 1 and the channels-last one at batch 8. Re-viewing it through (N·H·W, C)
    gives it canonical strides without a copy.
    """
    n, c, h, w = x.shape
    if x.stride() == (h * w * c, 1, w * c, c):
        return x  # already canonical: map_layout then resize, or a concatenation of such maps
    if x.is_contiguous(memory_format=torch.channels_last):  # ignores the strides of size-1 dims
        return x.permute(0, 2, 3, 1).reshape(n * h * w, c).view(n, h, w, c).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def prefers_channels_last(x: Tensor) -> bool:
    """Whether the model lays map x out channels-last (``channels_last``) before resizing or convolving it: maps of
    ≥ CHANNELS_LAST_MIN channels, except while tracing or compiling (export keeps its graph; Inductor picks its own
    layouts)."""
    return x.dim() == 4 and x.shape[1] >= CHANNELS_LAST_MIN and not is_tracing()


def map_layout(x: Tensor) -> Tensor:
    """Map x in the layout the model runs its maps in: ``channels_last(x)`` where ``prefers_channels_last(x)``
    (a view when x already lies channels-last in memory), else x itself."""
    return channels_last(x) if prefers_channels_last(x) else x


def resize(x: Tensor, size: tuple[int, int] | torch.Size | None = None, *,
           scale_factor: float | None = None) -> Tensor:
    """Bilinear resize with align_corners=False, no antialias (the reference code's default everywhere).

    x: (N, C, H, W); give ``size`` (h, w) or ``scale_factor`` (as F.interpolate: the scale itself, not the size
    ratio, sets the source coordinates). Outside tracing (``prefers_channels_last``) x goes to PyTorch's
    channels-last kernel, which computes every output element with the NCHW kernel's arithmetic (bit for bit on
    CUDA, within an fp32 ulp on CPU); the result is then channels-last too.
    """
    if size is not None and tuple(x.shape[-2:]) == tuple(size):
        return x
    return nn.functional.interpolate(map_layout(x), size=None if size is None else tuple(size),
                                     scale_factor=scale_factor, mode="bilinear", align_corners=False)


def class_argmax(scores: Tensor) -> Tensor:
    """scores (B, K, H, W) → (B, H, W) int64 index of the first maximum over K (NaN counts as the maximum), as
    ``scores.argmax(dim=1)``.

    On CPU that is ``max(dim=1).indices``: same rule, same indices, but PyTorch's CPU argmax over a non-innermost
    dim runs about 7× slower than max's (19 classes at 128×128: 3.0 against 0.41 ms on two cores,
    ``bench/test_kernels.py::test_class_argmax``), a fifth of the tiny student's whole forward. Traced graphs keep
    the single ArgMax node.
    """
    if scores.is_cuda or is_tracing():
        return scores.argmax(dim=1)
    return scores.max(dim=1).indices

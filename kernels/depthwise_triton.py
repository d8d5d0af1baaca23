"""3×3 depthwise convolutions of one channels-last map at several dilations, in one Triton kernel (inference).

The refinement module fuses its four attended maps with four depthwise-separable convolutions that all start from
the same (B, 4d, H/4, W/4) input, at dilations 1, 2, 3 and 4 (``qd_core.head.refine``). In PyTorch those are four
convolutions, each reading the whole input from memory once more (4 × 268 MB at the ViT-L student's batch 8, bf16),
and which kernel runs them is PyTorch's and cuDNN's choice per layout (cuDNN for channels-last maps, PyTorch's own
depthwise kernel for NCHW ones), made by heuristics. Here one program owns a tile of pixels × channels and writes
its tile of every dilation's output: the input tile and its halo come from L1/L2 for all the dilations' taps, so
the input is read from memory about once, and the work is a plain memory-bound kernel whose cost does not depend on
a library heuristic.

Channels-last (NHWC) in and out: along a pixel's channels the loads and stores are contiguous. Products and sums
in fp32 (nine taps), one rounding to the output dtype, as cuDNN's and PyTorch's kernels do. Forward only: training
needs the weight gradient and the batch statistics of the BatchNorm that follows, and takes PyTorch's path.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton_utils import AUTOTUNE, INTERPRET, Launcher, autotune_bench, cdiv, check_float, checked_once
from kernels.ops import unstack

MAX_OUTPUTS = 4  # dilations per launch (one weight pointer each); more are done in further launches


def _configs() -> list[triton.Config]:
    """Pixels × channels per program. A row of 64 bf16 channels is one 128-byte line. The compiler issues a tap's
    loads ahead of the sums, so registers grow with the values per thread (sm_90, bf16, ``python -m
    kernels.resources``): 64 × 64 on 4 warps (32 per thread) 220 registers, 2 programs per SM; 32 × 64 on 4 warps
    (16) 145, 3 per SM; 64 × 64 on 8 warps 148; 16 × 128 on 4 warps 158. Which hides the load latency best is
    the GPU's call: all four are tuned per shape. The interpreter runs programs one by one: fewer, larger ones."""
    if INTERPRET:
        return [triton.Config({"BLOCK_P": 1024, "BLOCK_C": 64}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_P": 32, "BLOCK_C": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_P": p, "BLOCK_C": c}, num_warps=w, num_stages=1)
            for p, c, w in ((64, 64, 4), (32, 64, 4), (64, 64, 8), (16, 128, 4))]


@triton.jit
def _depthwise_one(X, Wt, Y, out_index, dilation, offs_p, offs_c, yy, xx, p_ok, c_ok, NPIX, H, W, C,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One dilation's output tile: Σ over the 3 × 3 taps of x[pixel + tap offset, c] · w[c, tap], zero padding."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    cols = offs_c[None, :]
    for ky in tl.static_range(3):
        sy = yy + (ky - 1) * dilation
        row_ok = p_ok & (sy >= 0) & (sy < H)
        for kx in tl.static_range(3):
            sx = xx + (kx - 1) * dilation
            ok = row_ok & (sx >= 0) & (sx < W)
            # The tap's flat pixel index: the same image whenever ``ok`` (the row and column stay inside it).
            src = offs_p + ((ky - 1) * dilation) * W + (kx - 1) * dilation
            v = tl.load(X + src.to(tl.int64)[:, None] * C + cols, mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(Wt + offs_c * 9 + (ky * 3 + kx), mask=c_ok, other=0.0)
            acc += v.to(tl.float32) * w.to(tl.float32)[None, :]
    dst = (out_index * NPIX + offs_p).to(tl.int64)[:, None] * C + cols
    tl.store(Y + dst, acc.to(Y.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.autotune(configs=_configs(), key=["NPIX", "C", "NUM_OUT"], do_bench=autotune_bench)
@triton.jit
def _depthwise_kernel(X, W0, W1, W2, W3, Y, NPIX, H, W, C, D0, D1, D2, D3, NUM_OUT: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (cdiv(B·H·W, BLOCK_P), cdiv(C, BLOCK_C)). X: (B·H·W, C) channels-last pixels; Wk: (C, 1, 3, 3)
    contiguous weights of dilation Dk; Y: (NUM_OUT, B·H·W, C)."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < NPIX
    c_ok = offs_c < C
    xx = offs_p % W
    yy = (offs_p // W) % H
    _depthwise_one(X, W0, Y, 0, D0, offs_p, offs_c, yy, xx, p_ok, c_ok, NPIX, H, W, C, BLOCK_P, BLOCK_C)
    if NUM_OUT > 1:
        _depthwise_one(X, W1, Y, 1, D1, offs_p, offs_c, yy, xx, p_ok, c_ok, NPIX, H, W, C, BLOCK_P, BLOCK_C)
    if NUM_OUT > 2:
        _depthwise_one(X, W2, Y, 2, D2, offs_p, offs_c, yy, xx, p_ok, c_ok, NPIX, H, W, C, BLOCK_P, BLOCK_C)
    if NUM_OUT > 3:
        _depthwise_one(X, W3, Y, 3, D3, offs_p, offs_c, yy, xx, p_ok, c_ok, NPIX, H, W, C, BLOCK_P, BLOCK_C)


@checked_once
def _check_input(x: Tensor) -> None:
    check_float("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected (B, C, H, W), got shape {tuple(x.shape)}")


@checked_once
def _check_weight(weight: Tensor, x: Tensor) -> None:
    check_float("weights", weight)
    c = x.shape[1]
    if tuple(weight.shape) != (c, 1, 3, 3):
        raise ValueError(f"weights: expected ({c}, 1, 3, 3) for x's {c} channels, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weights: expected x's device ({x.device}), got {weight.device}")


_launch = Launcher(_depthwise_kernel)


def depthwise_conv3x3(x: Tensor, weights: Sequence[Tensor], dilations: Sequence[int]) -> list[Tensor]:
    """[conv2d(x, w, padding=d, dilation=d, groups=C) for w, d in zip(weights, dilations)], not differentiable.

    Args:
        x: (B, C, H, W) fp32/fp16/bf16, any layout (copied to channels-last unless it is).
        weights: (C, 1, 3, 3) depthwise weights, one per dilation, fp32, fp16 or bf16 (read as fp32).
        dilations: positive ints, one per weight; the padding equals the dilation (same-size outputs).
    Returns:
        One (B, C, H, W) channels-last tensor in x's dtype per dilation.
    """
    return unstack(depthwise_conv3x3_stacked(x, weights, dilations))


def depthwise_conv3x3_stacked(x: Tensor, weights: Sequence[Tensor], dilations: Sequence[int]) -> Tensor:
    """``depthwise_conv3x3``'s outputs as the one (K, B, H, W, C) tensor they are views of (what the custom
    operator of ``kernels.ops`` returns: an operator's outputs may not share storage)."""
    _check_input(x)
    if len(weights) != len(dilations) or not weights:
        raise ValueError(f"weights and dilations: expected as many of each (≥ 1), got {len(weights)} and "
                         f"{len(dilations)}")
    for w in weights:
        _check_weight(w, x)
    for d in dilations:
        if int(d) != d or d < 1:
            raise ValueError(f"dilations: expected positive ints, got {list(dilations)}")
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        raise ValueError("depthwise_conv3x3: inference only (no backward); call it under torch.no_grad() or "
                         "torch.inference_mode(), or use F.conv2d where gradients are needed")
    b, c, h, w = x.shape
    x = x.contiguous(memory_format=torch.channels_last)
    weights = [wt.contiguous() for wt in weights]
    npix = b * h * w
    out = torch.empty((len(weights), b, h, w, c), dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int, int]:
        return cdiv(npix, meta["BLOCK_P"]), cdiv(c, meta["BLOCK_C"])

    for start in range(0, len(weights), MAX_OUTPUTS):
        ws = list(weights[start:start + MAX_OUTPUTS])
        ds = [int(d) for d in dilations[start:start + MAX_OUTPUTS]]
        n = len(ws)
        # Unused slots repeat the first weight and dilation; NUM_OUT keeps the kernel from touching them.
        ws += [ws[0]] * (MAX_OUTPUTS - n)
        ds += [ds[0]] * (MAX_OUTPUTS - n)
        _launch(grid, (x, *ws, out[start:start + n]), (npix, h, w, c, *ds), NUM_OUT=n)
    return out

"""Multi-scale deformable attention's sampling core in Triton, forward and backward.

Each (query, head) reads P points on each of L levels by bilinear interpolation (zero padding outside the level,
pixel centres at integers: x = loc_x · w − 0.5, as ``grid_sample`` with ``align_corners=False``) and sums them with
its attention weights. The PyTorch paths (``qd_core.head.msda``) gather or ``grid_sample`` every sample into
(B·H, dh, Nq, L·P) tensors, stack, weight and reduce them: at the pixel decoder's shapes (5376 queries over three
levels, 8 heads × 32 channels, 4 points) that is several GB of fp32 traffic per layer at batch 8. Here one program
owns a block of queries of one (batch, head) and keeps their (BLOCK_Q, dh) sums in registers: each sample costs
four row loads of the value map and nothing is written but the output.

Backward, one program per block of queries again: for each sample and corner, ⟨value row, dOut row⟩ gives the
attention weight's and the location's gradients (the location through the bilinear weights only, as in the
reference: the floor has no gradient), and dValue receives weight · dOut by fp32 atomic adds (queries share corners).

Inputs: value (B, S, H, dh) fp32, fp16 or bf16 (read as fp32), the level shapes (L, 2) and start offsets (L,) as int
tensors on the device (no host reads: the call is capturable in a CUDA graph), locations (B, Nq, H, L, P, 2) and
weights (B, Nq, H, L, P) in fp32. Output (B, Nq, H·dh) fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels._triton_utils import INTERPRET, Launcher, cdiv, check_float, checked_once, next_power_of_2

MAX_HEAD_DIM = 256
_BLOCK_Q = 64 if INTERPRET else 32  # queries per program (the interpreter runs programs one by one: fewer, larger)


@triton.jit
def _corner(b, h, S, H, start, xi, yi, wl, hl, q_ok, offs_d, d_ok, HEAD_DIM: tl.constexpr):
    """Element offsets of the (BLOCK_Q, BLOCK_D) value rows of one bilinear corner per query in (B, S, H, dh), and
    their mask (a corner outside its level reads nothing)."""
    inside = (xi >= 0) & (xi < wl) & (yi >= 0) & (yi < hl) & q_ok
    key = start + yi * wl + xi
    row = ((b * S + key).to(tl.int64) * H + h) * HEAD_DIM
    return row[:, None] + offs_d[None, :], inside[:, None] & d_ok[None, :]


@triton.jit
def _sample(LOC, W, sample, wl, hl, q_ok):
    """One sampling point per query: (weight, fractional x and y, integer top-left corner x and y), pixel centres at
    integers (x = loc_x · w − 0.5)."""
    x = tl.load(LOC + 2 * sample, mask=q_ok, other=0.0) * wl.to(tl.float32) - 0.5
    y = tl.load(LOC + 2 * sample + 1, mask=q_ok, other=0.0) * hl.to(tl.float32) - 0.5
    a = tl.load(W + sample, mask=q_ok, other=0.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    return a, x - x0, y - y0, x0.to(tl.int32), y0.to(tl.int32)


@triton.jit
def _program_rows(NQ, H, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, head), query mask, channel offsets and mask, and the (batch, query, head) row of each
    of its queries in the locations, weights and output (grid: query blocks × batch·heads)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    return b, h, offs_q < NQ, offs_d, offs_d < HEAD_DIM, (b * NQ + offs_q) * H + h


@triton.jit
def _msda_fwd_kernel(V, SHAPES, STARTS, LOC, W, OUT, S, NQ, H, NUM_LEVELS, NUM_POINTS,
                     HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, q_ok, offs_d, d_ok, row = _program_rows(NQ, H, HEAD_DIM, BLOCK_Q, BLOCK_D)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for lvl in range(NUM_LEVELS):
        hl = tl.load(SHAPES + 2 * lvl)
        wl = tl.load(SHAPES + 2 * lvl + 1)
        start = tl.load(STARTS + lvl)
        for p in range(NUM_POINTS):
            sample = (row * NUM_LEVELS + lvl) * NUM_POINTS + p
            a, fx, fy, xi, yi = _sample(LOC, W, sample, wl, hl, q_ok)
            for dy in tl.static_range(2):
                wy = fy if dy else 1.0 - fy
                for dx in tl.static_range(2):
                    wx = fx if dx else 1.0 - fx
                    offs, ok = _corner(b, h, S, H, start, xi + dx, yi + dy, wl, hl, q_ok, offs_d, d_ok, HEAD_DIM)
                    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
                    acc += (a * wx * wy)[:, None] * v
    tl.store(OUT + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], acc,
             mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _msda_bwd_kernel(V, SHAPES, STARTS, LOC, W, DOUT, DV, DLOC, DW, S, NQ, H, NUM_LEVELS, NUM_POINTS,
                     HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    b, h, q_ok, offs_d, d_ok, row = _program_rows(NQ, H, HEAD_DIM, BLOCK_Q, BLOCK_D)
    dout = tl.load(DOUT + row.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=q_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    for lvl in range(NUM_LEVELS):
        hl = tl.load(SHAPES + 2 * lvl)
        wl = tl.load(SHAPES + 2 * lvl + 1)
        start = tl.load(STARTS + lvl)
        for p in range(NUM_POINTS):
            sample = (row * NUM_LEVELS + lvl) * NUM_POINTS + p
            a, fx, fy, xi, yi = _sample(LOC, W, sample, wl, hl, q_ok)
            d_a = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            d_fx = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            d_fy = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            for dy in tl.static_range(2):
                wy = fy if dy else 1.0 - fy
                for dx in tl.static_range(2):
                    wx = fx if dx else 1.0 - fx
                    offs, ok = _corner(b, h, S, H, start, xi + dx, yi + dy, wl, hl, q_ok, offs_d, d_ok, HEAD_DIM)
                    v = tl.load(V + offs, mask=ok, other=0.0).to(tl.float32)
                    dot = tl.sum(v * dout, axis=1)  # ⟨value row, dOut row⟩; 0 for a corner outside the level
                    d_a += wx * wy * dot
                    d_fx += (wy if dx else -wy) * dot
                    d_fy += (wx if dy else -wx) * dot
                    # Relaxed: a sum needs no ordering against other memory (the default acq_rel fences each add).
                    tl.atomic_add(DV + offs, (a * wx * wy)[:, None] * dout, mask=ok, sem="relaxed")
            tl.store(DW + sample, d_a, mask=q_ok)
            # x = loc_x · w − 0.5 and fx = x − floor(x): d fx / d loc_x = w (the floor contributes nothing).
            tl.store(DLOC + 2 * sample, a * d_fx * wl.to(tl.float32), mask=q_ok)
            tl.store(DLOC + 2 * sample + 1, a * d_fy * hl.to(tl.float32), mask=q_ok)


@checked_once
def _check_inputs(value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> None:
    check_float("value", value)
    if value.dim() != 4:
        raise ValueError(f"value: expected (B, S, H, dh), got shape {tuple(value.shape)}")
    b, _, h, d = value.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"value: expected a head width (dim 3) of 1 to {MAX_HEAD_DIM}, got {d}")
    if locations.dim() != 6 or locations.shape[0] != b or locations.shape[2] != h or locations.shape[5] != 2:
        raise ValueError(f"sampling_locations: expected ({b}, Nq, {h}, L, P, 2), got shape {tuple(locations.shape)}")
    if weights.shape != locations.shape[:5]:
        raise ValueError(f"attention_weights: expected shape {tuple(locations.shape[:5])}, got "
                         f"{tuple(weights.shape)}")
    levels = locations.shape[3]
    if tuple(shapes.shape) != (levels, 2) or tuple(starts.shape) != (levels,):
        raise ValueError(f"spatial_shapes / level_start_index: expected ({levels}, 2) and ({levels},), got "
                         f"{tuple(shapes.shape)} and {tuple(starts.shape)}")
    for name, t in (("spatial_shapes", shapes), ("level_start_index", starts)):
        if t.dtype.is_floating_point or t.device != value.device:
            raise ValueError(f"{name}: expected an integer tensor on {value.device}, got {t.dtype} on {t.device}")
    for name, t in (("sampling_locations", locations), ("attention_weights", weights)):
        if t.dtype != torch.float32 or t.device != value.device:
            raise ValueError(f"{name}: expected float32 on {value.device}, got {t.dtype} on {t.device}")


def _launch_shape(value: Tensor, locations: Tensor) -> tuple[tuple[int, int], dict]:
    b, _, h, d = value.shape
    grid = (cdiv(locations.shape[1], _BLOCK_Q), b * h)
    return grid, dict(HEAD_DIM=d, BLOCK_Q=_BLOCK_Q, BLOCK_D=max(16, next_power_of_2(d)))


def _forward(value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    b, s, h, d = value.shape
    _, nq, _, levels, points, _ = locations.shape
    out = torch.empty((b, nq, h * d), dtype=torch.float32, device=value.device)
    grid, meta = _launch_shape(value, locations)
    _fwd_launch(grid, (value, shapes, starts, locations, weights, out), (s, nq, h, levels, points), **meta,
                num_warps=4)
    return out


_fwd_launch = Launcher(_msda_fwd_kernel)
_bwd_launch = Launcher(_msda_bwd_kernel)


class MSDeformAttnCore(torch.autograd.Function):
    """The sampling core with the Triton forward and backward; see the module docstring."""

    @staticmethod
    def forward(ctx, value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor,  # type: ignore[override]
                weights: Tensor) -> Tensor:
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        return _forward(value, shapes, starts, locations, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor, None, None, Tensor, Tensor]:  # type: ignore[override]
        value, shapes, starts, locations, weights = ctx.saved_tensors
        b, s, h, _ = value.shape
        _, nq, _, levels, points, _ = locations.shape
        dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        dloc = torch.empty_like(locations)
        dw = torch.empty_like(weights)
        grid, meta = _launch_shape(value, locations)
        _bwd_launch(grid, (value, shapes, starts, locations, weights, dout.contiguous(), dv, dloc, dw),
                    (s, nq, h, levels, points), **meta, num_warps=4)
        return dv.to(value.dtype), None, None, dloc, dw


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention's sampling core (see the module docstring).

    Args:
        value: (B, S, H, dh) per-head values of all levels, flattened row-major per level and concatenated; any
            float dtype, read as fp32; dh ≤ 256.
        spatial_shapes: (L, 2) integer (h, w) per level, on value's device.
        level_start_index: (L,) integer offset of each level in S, on value's device.
        sampling_locations: (B, Nq, H, L, P, 2) fp32 normalised (x, y); corners outside the level read zero.
        attention_weights: (B, Nq, H, L, P) fp32.
    Returns:
        (B, Nq, H·dh) fp32, differentiable in value, sampling_locations and attention_weights.
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    args = (value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
            sampling_locations.contiguous(), attention_weights.contiguous())
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (value, sampling_locations,
                                                                      attention_weights))):
        return _forward(*args)
    return MSDeformAttnCore.apply(*args)

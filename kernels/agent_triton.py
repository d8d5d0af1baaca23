"""Agent attention in Triton: many queries (pixel tokens, N up to 16384+) over a few keys (M ≤ 256).

Forward tiling. All M keys of one (batch, head), padded to BLOCK_M (a power of two ≥ 16, tl.dot's smallest side),
fit in one tile, so a program owns BLOCK_N query rows and does the whole softmax in registers: no online
rescaling, q/k/v read once, o written once. The kernel is memory-bound (it moves ~2·N·d elements for 4·N·M·d
flops), which is why scale, softmax and the value product are fused. For wide heads (the Rein attention: one
head of d = 1024) a (BLOCK_N, 1024) tile would not fit in registers, so QKᵀ is accumulated over BLOCK_D-wide
chunks of d and P·V is produced and stored chunk by chunk; the (BLOCK_N, BLOCK_M) probability tile stays resident.

Backward. With S = scale·QKᵀ, P = softmax(S), dP = dO·Vᵀ and δ = rowsum(P ∘ dP) (= rowsum(dO ∘ O), since
O = PV, so O need not be read), dS = P ∘ (dP − δ); dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
dQ belongs to one query block and is written directly. dK and dV are sums over all N rows (and over the batch
when the keys are shared), so the N rows are cut into splits; each program walks the query blocks of one split
and writes one fp32 partial per (split, batch, head), which torch then sums. With a single d-chunk the partial is
accumulated in registers across the split's blocks; with several chunks it is accumulated in place with atomic
adds into the program's own slot (no contention: nobody else writes it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels._triton_utils import (INTERPRET, LOG2E, check_float, check_scale, dot_precision, mm, needs_upcast,
                                   split_extent, tile)

MAX_KEYS = 256  # the key tile is held whole in registers
# Widest d-chunk in bytes per row: 128 elements in fp16/bf16, 64 in fp32, so a (128, BLOCK_D) key or value chunk is
# 32 KiB in any dtype and the backward's pipelined chunk loads stay inside an H100 block's 227 KiB of shared memory.
_MAX_BLOCK_D_BYTES = 256
_ROW_QUANTUM = 128  # every BLOCK_N below divides it, so a split's rows are whole query blocks for any config
_PARTIAL_BUDGET = 1 << 28  # bytes of fp32 dK/dV partials the backward may allocate (caps the split count)


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": _ROW_QUANTUM}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2))]


def _bwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": _ROW_QUANTUM}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 1), (32, 4, 2), (64, 4, 2), (64, 8, 2))]


@triton.autotune(configs=_fwd_configs(), key=["N", "M", "HEAD_DIM"])
@triton.jit
def _agent_fwd_kernel(Q, K, V, O, LSE,
                      sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sob, soh, son, sod,
                      H, N, M, scale_log2e,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < N
    key_ok = offs_m < M
    q_ptrs = Q + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd
    k_ptrs = K + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd  # skb = 0: keys shared

    s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c in range(0, HEAD_DIM, BLOCK_D):
        d_ok = (c + offs_d) < HEAD_DIM
        q = tl.load(q_ptrs + c * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k = tl.load(k_ptrs + c * skd, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s += mm(q, tl.trans(k), PRECISION, UPCAST)

    s = tl.where(key_ok[None, :], s * scale_log2e, float("-inf"))
    row_max = tl.max(s, axis=1)
    p = tl.exp2(s - row_max[:, None])
    denom = tl.sum(p, axis=1)
    # Normalising P (BLOCK_N·BLOCK_M divides) instead of O (BLOCK_N·d) is cheaper for the wide Rein head and
    # gives the backward the same P it recomputes from the log-sum-exp.
    p = p / denom[:, None]
    tl.store(LSE + pid_bh * N + offs_n, row_max + tl.log2(denom), mask=row_ok)

    p_in = p.to(V.dtype.element_ty)
    v_ptrs = V + b * svb + h * svh + offs_m[:, None] * svm + offs_d[None, :] * svd
    o_ptrs = O + b * sob + h * soh + offs_n[:, None] * son + offs_d[None, :] * sod
    for c in range(0, HEAD_DIM, BLOCK_D):
        d_ok = (c + offs_d) < HEAD_DIM
        v = tl.load(v_ptrs + c * svd, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        o = mm(p_in, v, PRECISION, UPCAST)
        tl.store(o_ptrs + c * sod, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _prune_bwd_configs(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    # fp32 wide heads: tf32x3 splits every chunk operand in two, and 64-row tiles no longer fit shared memory.
    if nargs["Q"].dtype == torch.float32 and kwargs["HEAD_DIM"] > kwargs["BLOCK_D"]:
        return [c for c in configs if c.kwargs["BLOCK_N"] == 32]
    return configs


@triton.autotune(configs=_bwd_configs(), key=["N", "M", "HEAD_DIM"], reset_to_zero=["DK", "DV"],
                 prune_configs_by={"early_config_prune": _prune_bwd_configs})
@triton.jit
def _agent_bwd_kernel(Q, K, V, DO, LSE, DQ, DK, DV,
                      sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                      sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
                      H, N, M, rows_per_split, scale, scale_log2e,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row_lo = split * rows_per_split
    row_hi = tl.minimum(row_lo + rows_per_split, N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_m < M
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    k_ptrs = K + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_m[:, None] * svm + offs_d[None, :] * svd
    # dK/dV partials: (splits, B·H, M, HEAD_DIM) fp32, this program's slot
    part = (split * tl.num_programs(1) + pid_bh) * M * HEAD_DIM
    part_ptrs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]

    if BLOCK_D >= HEAD_DIM:
        d_ok = offs_d < HEAD_DIM
        kd_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kd_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kd_mask, other=0.0)
        dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(row_lo, row_hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            row_ok = offs_n < row_hi
            nd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask, other=0.0)
            do = tl.load(do_base + offs_n[:, None] * sdon + offs_d[None, :] * sdod, mask=nd_mask, other=0.0)
            lse = tl.load(LSE + pid_bh * N + offs_n, mask=row_ok, other=0.0)
            s = mm(q, tl.trans(k), PRECISION, UPCAST)
            p = tl.exp2(s * scale_log2e - lse[:, None])
            p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
            dp = mm(do, tl.trans(v), PRECISION, UPCAST)
            delta = tl.sum(p * dp, axis=1)
            ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
            dq = mm(ds, k, PRECISION, UPCAST) * scale
            tl.store(dq_base + offs_n[:, None] * sdqn + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
                     mask=nd_mask)
            dk += mm(tl.trans(ds), q, PRECISION, UPCAST)
            dv += mm(tl.trans(p.to(DO.dtype.element_ty)), do, PRECISION, UPCAST)
        tl.store(DK + part + part_ptrs, dk * scale, mask=kd_mask)
        tl.store(DV + part + part_ptrs, dv, mask=kd_mask)
    else:
        for start in range(row_lo, row_hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            row_ok = offs_n < row_hi
            lse = tl.load(LSE + pid_bh * N + offs_n, mask=row_ok, other=0.0)
            q_ptrs = q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd
            do_ptrs = do_base + offs_n[:, None] * sdon + offs_d[None, :] * sdod
            s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            dp = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for c in range(0, HEAD_DIM, BLOCK_D):
                d_ok = (c + offs_d) < HEAD_DIM
                nd_mask = row_ok[:, None] & d_ok[None, :]
                kd_mask = key_ok[:, None] & d_ok[None, :]
                q = tl.load(q_ptrs + c * sqd, mask=nd_mask, other=0.0)
                k = tl.load(k_ptrs + c * skd, mask=kd_mask, other=0.0)
                s += mm(q, tl.trans(k), PRECISION, UPCAST)
                do = tl.load(do_ptrs + c * sdod, mask=nd_mask, other=0.0)
                v = tl.load(v_ptrs + c * svd, mask=kd_mask, other=0.0)
                dp += mm(do, tl.trans(v), PRECISION, UPCAST)
            p = tl.exp2(s * scale_log2e - lse[:, None])
            p = tl.where(row_ok[:, None] & key_ok[None, :], p, 0.0)
            delta = tl.sum(p * dp, axis=1)
            ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
            p_in = p.to(DO.dtype.element_ty)
            for c in range(0, HEAD_DIM, BLOCK_D):
                d_ok = (c + offs_d) < HEAD_DIM
                nd_mask = row_ok[:, None] & d_ok[None, :]
                kd_mask = key_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptrs + c * skd, mask=kd_mask, other=0.0)
                dq = mm(ds, k, PRECISION, UPCAST) * scale
                tl.store(dq_base + offs_n[:, None] * sdqn + (c + offs_d)[None, :] * sdqd,
                         dq.to(DQ.dtype.element_ty), mask=nd_mask)
                q = tl.load(q_ptrs + c * sqd, mask=nd_mask, other=0.0)
                do = tl.load(do_ptrs + c * sdod, mask=nd_mask, other=0.0)
                tl.atomic_add(DK + part + c + part_ptrs, mm(tl.trans(ds), q, PRECISION, UPCAST) * scale,
                              mask=kd_mask, sem="relaxed")
                tl.atomic_add(DV + part + c + part_ptrs, mm(tl.trans(p_in), do, PRECISION, UPCAST),
                              mask=kd_mask, sem="relaxed")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-d tensor (B, H, rows, d), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    b, h, n, d = q.shape
    if k.shape[0] not in (1, b) or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k: expected shape ({b} or 1, {h}, M, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if not 1 <= k.shape[2] <= MAX_KEYS:
        raise ValueError(f"k: expected 1 to {MAX_KEYS} keys (dim 2), got {k.shape[2]}")
    if min(b, h, n, d) < 1:
        raise ValueError(f"q: expected non-empty (B, H, N, d), got {tuple(q.shape)}")


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    b, h, n, d = q.shape
    m = k.shape[2]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device)
    kb = 0 if k.shape[0] == 1 else k.stride(0)
    vb = 0 if v.shape[0] == 1 else v.stride(0)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)  # noqa: E731
    _agent_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), kb, *k.stride()[1:], vb, *v.stride()[1:], *o.stride(),
        h, n, m, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=tile(m), BLOCK_D=tile(d, _MAX_BLOCK_D_BYTES // q.element_size()),
        PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype))
    return o, lse


def _backward(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, do: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n, d = q.shape
    m = k.shape[2]
    max_splits = max(1, _PARTIAL_BUDGET // (2 * 4 * b * h * m * d))
    splits, rows_per_split = split_extent(n, _ROW_QUANTUM, b * h, q.device, max_splits)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk_part = torch.zeros((splits, b, h, m, d), dtype=torch.float32, device=q.device)
    dv_part = torch.zeros_like(dk_part)
    kb = 0 if k.shape[0] == 1 else k.stride(0)
    vb = 0 if v.shape[0] == 1 else v.stride(0)
    _agent_bwd_kernel[(splits, b * h)](
        q, k, v, do, lse, dq, dk_part, dv_part,
        *q.stride(), kb, *k.stride()[1:], vb, *v.stride()[1:], *do.stride(), *dq.stride(),
        h, n, m, rows_per_split, scale, scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=tile(m), BLOCK_D=tile(d, _MAX_BLOCK_D_BYTES // q.element_size()),
        PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype))
    # Shared keys received a contribution from every image: reduce the batch too.
    dims = (0, 1) if k.shape[0] == 1 else (0,)
    dk = dk_part.sum(dim=dims).reshape(k.shape).to(k.dtype)
    dv = dv_part.sum(dim=dims).reshape(v.shape).to(v.dtype)
    return dq, dk, dv


class AgentAttention(torch.autograd.Function):
    """softmax(scale·QKᵀ)·V with one key tile per (batch, head); see the module docstring for the tiling."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        q, k, v, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, lse, do, ctx.scale)
        return dq, dk, dv, None


def agent_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Softmax attention of many queries over a few keys, Triton forward and backward.

    Args:
        q: (B, H, N, d) queries, fp32/fp16/bf16; N any length, d any width (chunked above 128, 64 for fp32).
        k: (B, H, M, d) or (1, H, M, d) keys shared over the batch; 1 ≤ M ≤ 256; q's dtype and device.
        v: same shape as k.
        scale: logit scale; default d ** -0.5.
    Returns:
        (B, H, N, d) in q's dtype, differentiable in q, k and v (accumulation in fp32).
    """
    _check_inputs(q, k, v)
    return AgentAttention.apply(q, k, v, check_scale(scale, q.shape[-1]))

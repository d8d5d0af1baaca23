"""Agent attention in Triton: many queries (pixel tokens, N up to 16384+) over a few keys (M ≤ 256).

Forward tiling. All M keys of one (batch, head), padded to BLOCK_M (a power of two ≥ 16, tl.dot's smallest side),
fit in one tile, so a query block's whole softmax is done in registers: no online rescaling, q/k/v read once,
o written once. The kernel is memory-bound (it moves ~2·N·d elements for 4·N·M·d flops), which is why scale,
softmax and the value product are fused. A program either owns one query block, or (autotuned, ``WAVES`` > 0) a
few programs per SM stride over the blocks with K and V held in registers, so Triton can pipeline the next
block's q load under the current block's math. The log-sum-exp (for the backward) is only written when a
backward can follow. For wide heads (the Rein attention: one head of d = 1024) a (BLOCK_N, 1024) tile would not
fit in registers, so QKᵀ is accumulated over BLOCK_D-wide chunks of d and P·V is produced and stored chunk by
chunk; the (BLOCK_N, BLOCK_M) probability tile stays resident. When the query blocks alone leave the GPU short of
programs (Rein at batch 1: 16 blocks), O's d-chunks are split across programs too, each recomputing S.

Backward. With S = scale·QKᵀ, P = softmax(S), dP = dO·Vᵀ and δ = rowsum(P ∘ dP) (= rowsum(dO ∘ O), since
O = PV, so O need not be read), dS = P ∘ (dP − δ); dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO.
dQ belongs to one query block and is written directly. dK and dV are sums over all N rows (and over the batch
when the keys are shared), so the N rows are cut into splits; each program walks the query blocks of one split
and writes one fp32 partial per (split, batch, head), which one more launch sums and casts. With a single
d-chunk the partial is accumulated in registers across the split's blocks; with several chunks it is accumulated
in place with atomic adds into the program's own slot (no contention: nobody else writes it), and when the
splits are few the chunks are divided among programs as in the forward (disjoint columns of the same slot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels._triton_utils import (AUTOTUNE, INTERPRET, LOG2E, autotune_bench, cdiv, check_float, check_scale,
                                   checked_once, dot_precision, Launcher, mm, needs_upcast, persistent_programs,
                                   row_log2, row_reciprocal, split_extent, sum_partials, target_programs, tile)
from kernels.fit import counted_tile_bytes

MAX_KEYS = 256  # the key tile is held whole in registers
# Head widths up to this many bytes per row (128 elements in fp16/bf16, 64 in fp32) are one d-chunk: q, K and V
# tiles stay whole. Wider heads (Rein: d = 1024) are cut into chunks of _WIDE_CHUNK_BYTES, narrower in the backward,
# which holds more tiles per chunk: with 256-byte chunks every bf16 Rein config spilled registers on sm_90 (80–3200
# bytes per thread), with these none does (python -m kernels.resources).
_MAX_BLOCK_D_BYTES = 256
_WIDE_CHUNK_BYTES = {"fwd": 128, "bwd": 64}
# Whole K and V tiles (tile(M) × tile(d)) are only taken up to these sizes, counted ×3 in fp32 (tf32x3 splits
# every operand in three). Beyond them no config fits an sm_90 SM's 227 KiB of shared memory (compiled offline,
# python -m kernels.resources): in fp32 the backward at M = 100, d = 64 (96 KiB counted) or M = 256, d = 32, and
# the forward at M = 256, d = 64 (192 KiB), all of which the chunked path runs; bf16 at M = 256, d = 128 (64 KiB)
# still fits both.
_WHOLE_KV_BYTES = {"fwd": 96 * 1024, "bwd": 64 * 1024}
# Every backward BLOCK_N divides it, so a split's rows are whole query blocks for any config. Kept at the largest
# backward block so that short sequences still split finely: Rein's 1024 rows of one head give 16 programs.
_ROW_QUANTUM = 64
_BWD_CAPPED_REGS = 168  # see _bwd_configs
_PARTIAL_BUDGET = 1 << 28  # bytes of fp32 dK/dV partials the backward may allocate (caps the split count)


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:  # 64-row blocks and one program per few blocks: the tests cover ragged and strided blocks
        return [triton.Config({"BLOCK_N": 64, "WAVES": 1}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:  # valid for every dtype and head width (see kernels._triton_utils.AUTOTUNE)
        return [triton.Config({"BLOCK_N": 64, "WAVES": 4}, num_warps=4, num_stages=3)]
    # WAVES = 0: one query block per program, latency hidden only by other resident programs. WAVES > 0: each
    # program strides over several blocks with K and V kept in registers, and num_stages ≥ 3 pipelines the next
    # block's q load under the current block's math (the kernel is bound by load latency, not by flops).
    one_block = [(32, 4, 2, 0), (64, 4, 2, 0), (64, 8, 2, 0), (128, 8, 2, 0)]
    strided = [(32, 4, 4, 8), (64, 4, 3, 4), (128, 8, 3, 2)]  # few: each config is one more compile per shape
    configs = [triton.Config({"BLOCK_N": bn, "WAVES": waves}, num_warps=w, num_stages=st)
               for bn, w, st, waves in one_block + strided]
    # No register-capped variants: with the row sums on the tensor cores the 4-warp configs take 111–128 registers
    # per thread at d = 32 (four programs per SM, what a cap of 112 used to buy from 130–210), and a cap of 96
    # spills (python -m kernels.resources, sm_90).
    return configs


def _bwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": _ROW_QUANTUM}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3)]
    # (16, 4 warps, 3 stages): ~170 registers per thread instead of 255 at d = 32; capped at 168 (what 3 programs
    # per SM allow) it does not spill at d = 32 nor in the Rein head's chunks (252 uncapped), so 3 programs share
    # an SM, not 2 (python -m kernels.resources, sm_90).
    configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bn, w, s in ((16, 4, 3), (32, 4, 1), (32, 4, 2), (64, 4, 2), (64, 8, 2))]
    return configs + [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3, maxnreg=_BWD_CAPPED_REGS)]


@triton.jit
def _column_range(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[lo, hi) of the d-columns this program writes: its share, in whole BLOCK_D chunks, of the head's chunks
    divided among the programs of grid axis 2 (the wide-head column splits; one split: all of d)."""
    chunks_per_split = tl.cdiv(tl.cdiv(HEAD_DIM, BLOCK_D), tl.num_programs(2))
    lo = tl.program_id(2) * chunks_per_split * BLOCK_D
    return lo, tl.minimum(lo + chunks_per_split * BLOCK_D, HEAD_DIM)


@triton.jit
def _softmax_rows(s, key_ok, scale_log2e):
    """(BLOCK_N, BLOCK_M) raw logits → (unnormalised probabilities, 1 / their row sum, base-2 log-sum-exp per
    row); padded keys get 0.

    The row maximum is taken on the raw logits (the scale is positive), so scaling and shifting are one fused
    multiply-add per element. Per element the tile then costs a select, a max, an FMA, an exp2 and an add; the
    caller normalises whichever of P (BLOCK_N·BLOCK_M) and O (BLOCK_N·d) is smaller.
    """
    s = tl.where(key_ok[None, :], s, float("-inf"))
    shift = tl.max(s, axis=1) * scale_log2e
    p = tl.exp2(s * scale_log2e - shift[:, None])
    denom = tl.sum(p, axis=1)
    return p, row_reciprocal(denom), shift + row_log2(denom)


@triton.jit
def _softmax_rows_tensor_core_sums(s, key_ones, scale_log2e, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """_softmax_rows for 16-bit tiles whose padded keys repeat the last real key: (BLOCK_N, BLOCK_M) raw logits →
    (unnormalised probabilities in ``key_ones``' dtype, 1 / their row sum, base-2 log-sum-exp per row).

    A padded logit then equals a real one, so it never raises the row maximum and needs no select; the row sums
    are taken on the tensor cores as P · key_ones, whose (BLOCK_M, 16) columns are 1 for real keys and 0 for
    padding, instead of an add per element. Per element that leaves a max, an FMA, an exp2 and half a conversion
    (sm_90 SASS of the refinement's bf16 forward loop: 604 → 474 instructions per 64 × 128 tile, 162 → 113
    registers; python -m kernels.resources; 404 with the approximate row log2 and reciprocal). The sums are of the
    rounded probabilities that P · V multiplies. Not for fp32 tiles, where tf32x3 splits P in three for that
    product: more work than the adds it saves.
    """
    shift = tl.max(s, axis=1) * scale_log2e
    p = tl.exp2(s * scale_log2e - shift[:, None]).to(key_ones.dtype)
    denom = tl.max(mm(p, key_ones, PRECISION, UPCAST), axis=1)  # every column holds the row sum
    return p, row_reciprocal(denom), shift + row_log2(denom)


@triton.autotune(configs=_fwd_configs(), key=["N", "M", "HEAD_DIM", "STORE_LSE"],
                 do_bench=autotune_bench)
@triton.jit
def _agent_fwd_kernel(Q, K, V, O, LSE,
                      sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sob, soh, son, sod,
                      H, N, M, scale_log2e,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr, UPCAST: tl.constexpr, STORE_LSE: tl.constexpr,
                      BLOCK_N: tl.constexpr, WAVES: tl.constexpr):
    # Grid (programs ≤ query blocks, B·H, d-splits); program p handles blocks p, p + programs, … (WAVES sizes the
    # grid); with several d-splits (wide heads only) each computes the whole softmax and its share of O's columns.
    pid_n = tl.program_id(0)
    n_programs = tl.num_programs(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n_blocks = tl.cdiv(N, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_m < M
    q_base = Q + b * sqb + h * sqh
    o_base = O + b * sob + h * soh
    k_ptrs = K + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd  # skb = 0: keys shared
    v_ptrs = V + b * svb + h * svh + offs_m[:, None] * svm + offs_d[None, :] * svd

    if BLOCK_D >= HEAD_DIM:
        # One d-chunk: K and V are loaded once and stay in registers for every block of the program. K's padded
        # rows repeat the last key (see _softmax_rows_tensor_core_sums); V's are 0, so they add nothing to P · V.
        d_ok = offs_d < HEAD_DIM
        k = tl.load(K + b * skb + h * skh + tl.minimum(offs_m, M - 1)[:, None] * skm + offs_d[None, :] * skd,
                    mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        key_ones = (tl.zeros((BLOCK_M, 16), dtype=tl.float32) + key_ok[:, None].to(tl.float32)).to(v.dtype)
        for blk in range(pid_n, n_blocks, n_programs):
            offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            nd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd, mask=nd_mask, other=0.0)
            s = mm(q, tl.trans(k), PRECISION, UPCAST)
            if V.dtype.element_ty == tl.float32:
                p, inv_sum, lse = _softmax_rows(s, key_ok, scale_log2e)
            else:
                p, inv_sum, lse = _softmax_rows_tensor_core_sums(s, key_ones, scale_log2e, PRECISION, UPCAST)
            if STORE_LSE:
                tl.store(LSE + pid_bh * N + offs_n, lse, mask=row_ok)
            if BLOCK_D < BLOCK_M:  # normalise the narrower tile: O (e.g. d = 32 over 128 padded keys)
                o = mm(p.to(V.dtype.element_ty), v, PRECISION, UPCAST) * inv_sum[:, None]
            else:
                o = mm((p.to(tl.float32) * inv_sum[:, None]).to(V.dtype.element_ty), v, PRECISION, UPCAST)
            tl.store(o_base + offs_n[:, None] * son + offs_d[None, :] * sod, o.to(O.dtype.element_ty), mask=nd_mask)
    else:
        # Wide heads (Rein: d = 1024): a (BLOCK_N, d) tile would not fit in registers, so QKᵀ is accumulated
        # over d-chunks and P·V produced and stored chunk by chunk; K/V chunks come from L2 for every block.
        # Rein at batch 1 has only N / BLOCK_N = 16 query blocks for a GPU of 132 SMs, so the output columns are
        # also split across programs (grid axis 2): each recomputes S over all of d (its q block and K are read
        # from L2 by the programs beside it) and writes its own column range of O.
        d_lo, d_hi = _column_range(HEAD_DIM, BLOCK_D)
        for blk in range(pid_n, n_blocks, n_programs):
            offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            q_ptrs = q_base + offs_n[:, None] * sqn + offs_d[None, :] * sqd
            s = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for c in range(0, HEAD_DIM, BLOCK_D):
                d_ok = (c + offs_d) < HEAD_DIM
                q = tl.load(q_ptrs + c * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                k = tl.load(k_ptrs + c * skd, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
                s += mm(q, tl.trans(k), PRECISION, UPCAST)
            p, inv_sum, lse = _softmax_rows(s, key_ok, scale_log2e)
            if STORE_LSE:
                # Every column split computes the same log-sum-exp; the first one stores it.
                tl.store(LSE + pid_bh * N + offs_n, lse, mask=row_ok & (tl.program_id(2) == 0))
            p_in = (p * inv_sum[:, None]).to(V.dtype.element_ty)  # P is narrower than the whole of O here
            o_ptrs = o_base + offs_n[:, None] * son + offs_d[None, :] * sod
            for c in range(d_lo, d_hi, BLOCK_D):
                d_ok = (c + offs_d) < HEAD_DIM
                v = tl.load(v_ptrs + c * svd, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
                o = mm(p_in, v, PRECISION, UPCAST)
                tl.store(o_ptrs + c * sod, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _prune_bwd_configs(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    # fp32 (tf32x3 splits every operand) takes 255 registers in most configs: a register cap would only spill.
    if nargs["Q"].dtype == torch.float32:
        configs = [c for c in configs if not getattr(c, "maxnreg", None)]
    # fp32 wide heads: 64-row tiles spill 1–2 KiB per thread or fill shared memory (python -m kernels.resources,
    # sm_90).
    if nargs["Q"].dtype == torch.float32 and kwargs["HEAD_DIM"] > kwargs["BLOCK_D"]:
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 32]
    return configs


@triton.autotune(configs=_bwd_configs(), key=["N", "M", "HEAD_DIM"], reset_to_zero=["PART"],
                 prune_configs_by={"early_config_prune": _prune_bwd_configs}, do_bench=autotune_bench)
@triton.jit
def _agent_bwd_kernel(Q, K, V, DO, LSE, DQ, PART,
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
    # dK/dV partials: (2, splits, B·H, M, HEAD_DIM) fp32 (dK first), this program's slot in each half
    dk_ptrs = PART + (split * tl.num_programs(1) + pid_bh) * M * HEAD_DIM + offs_m[:, None] * HEAD_DIM \
        + offs_d[None, :]
    dv_ptrs = dk_ptrs + tl.num_programs(0) * tl.num_programs(1) * M * HEAD_DIM

    if BLOCK_D >= HEAD_DIM:
        # No per-element mask: as in the forward, the logits take padded keys from K's last row (k_s), so every
        # probability is finite (at most ~1: the forward's log-sum-exp covers that key), and padded keys or rows
        # then contribute nothing: V's padded rows are 0 (dP = 0 there, so δ is untouched), dQ takes its keys from
        # the zero-padded k, rows past the end load q = dO = 0 (their dK, dV terms are 0), and padded rows of dK
        # and dV are not stored.
        d_ok = offs_d < HEAD_DIM
        kd_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kd_mask, other=0.0)
        k_s = tl.load(K + b * skb + h * skh + tl.minimum(offs_m, M - 1)[:, None] * skm + offs_d[None, :] * skd,
                      mask=d_ok[None, :], other=0.0)
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
            s = mm(q, tl.trans(k_s), PRECISION, UPCAST)
            p = tl.exp2(s * scale_log2e - lse[:, None])
            dp = mm(do, tl.trans(v), PRECISION, UPCAST)
            delta = tl.sum(p * dp, axis=1)
            ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
            dq = mm(ds, k, PRECISION, UPCAST) * scale
            tl.store(dq_base + offs_n[:, None] * sdqn + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
                     mask=nd_mask)
            dk += mm(tl.trans(ds), q, PRECISION, UPCAST)
            dv += mm(tl.trans(p.to(DO.dtype.element_ty)), do, PRECISION, UPCAST)
        tl.store(dk_ptrs, dk * scale, mask=kd_mask)
        tl.store(dv_ptrs, dv, mask=kd_mask)
    else:
        # As in the forward, few row splits (Rein at batch 1: 16) also split the d-chunks of dQ, dK and dV across
        # programs (grid axis 2), each recomputing S and dP over all of d; their column ranges are disjoint.
        d_lo, d_hi = _column_range(HEAD_DIM, BLOCK_D)
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
            for c in range(d_lo, d_hi, BLOCK_D):
                d_ok = (c + offs_d) < HEAD_DIM
                nd_mask = row_ok[:, None] & d_ok[None, :]
                kd_mask = key_ok[:, None] & d_ok[None, :]
                k = tl.load(k_ptrs + c * skd, mask=kd_mask, other=0.0)
                dq = mm(ds, k, PRECISION, UPCAST) * scale
                tl.store(dq_base + offs_n[:, None] * sdqn + (c + offs_d)[None, :] * sdqd,
                         dq.to(DQ.dtype.element_ty), mask=nd_mask)
                q = tl.load(q_ptrs + c * sqd, mask=nd_mask, other=0.0)
                do = tl.load(do_ptrs + c * sdod, mask=nd_mask, other=0.0)
                tl.atomic_add(dk_ptrs + c, mm(tl.trans(ds), q, PRECISION, UPCAST) * scale, mask=kd_mask,
                              sem="relaxed")
                tl.atomic_add(dv_ptrs + c, mm(tl.trans(p_in), do, PRECISION, UPCAST), mask=kd_mask,
                              sem="relaxed")


@checked_once
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


def block_d(d: int, m: int, element_size: int, direction: str) -> int:
    """The d-chunk width for a head of width d over m keys: the whole (padded) head where its rows fit
    _MAX_BLOCK_D_BYTES and its K and V tiles _WHOLE_KV_BYTES, else the wide-head chunk of ``direction`` ("fwd" or
    "bwd")."""
    if (tile(d) * element_size <= _MAX_BLOCK_D_BYTES
            and counted_tile_bytes(m, d, element_size) <= _WHOLE_KV_BYTES[direction]):
        return tile(d)
    return max(16, _WIDE_CHUNK_BYTES[direction] // element_size)  # 16: tl.dot's smallest operand side


_MAX_D_SPLITS = 8  # each split re-reads its q block and K (from L2) and recomputes S over the whole of d


def d_splits(programs: int, chunks: int, device: torch.device) -> int:
    """How many ways the forward splits O's d-chunks when ``programs`` (query-block programs × B·H) leave the GPU
    short of its target (two waves of its SMs): 1 for narrow heads (one chunk) or a full GPU, at most
    _MAX_D_SPLITS (Rein at batch 1: 16 query blocks × 8 = 128 programs, about one per SM of an H100)."""
    return max(1, min(chunks, _MAX_D_SPLITS, target_programs(device) // programs))


def _forward(q: Tensor, k: Tensor, v: Tensor, scale: float, store_lse: bool) -> tuple[Tensor, Tensor | None]:
    b, h, n, d = q.shape
    m = k.shape[2]
    # O in q's memory layout (the model's q is a (B, N, H, d) tensor seen as (B, H, N, d)): its transpose back to
    # (B, N, H·d) is then a view, not a copy, as after SDPA. The kernels take any strides.
    o = torch.empty_like(q)
    # Without a backward to come the log-sum-exp is neither allocated nor written (o stands in for the pointer).
    lse = torch.empty((b, h, n), dtype=torch.float32, device=q.device) if store_lse else None
    kb = 0 if k.shape[0] == 1 else k.stride(0)
    vb = 0 if v.shape[0] == 1 else v.stride(0)

    chunk = block_d(d, m, q.element_size(), "fwd")

    def grid(meta: dict) -> tuple[int, int, int]:
        programs = persistent_programs(cdiv(n, meta["BLOCK_N"]), meta["WAVES"], b * h, q.device)
        return programs, b * h, d_splits(programs * b * h, cdiv(d, chunk), q.device)

    _fwd_launch(
        grid, (q, k, v, o, lse if store_lse else o),
        (*q.stride(), kb, *k.stride()[1:], vb, *v.stride()[1:], *o.stride(), h, n, m, scale * LOG2E),
        HEAD_DIM=d, BLOCK_M=tile(m), BLOCK_D=chunk,
        PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype), STORE_LSE=store_lse)
    return o, lse


def _backward(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, do: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, h, n, d = q.shape
    m = k.shape[2]
    max_splits = max(1, _PARTIAL_BUDGET // (2 * 4 * b * h * m * d))
    splits, rows_per_split = split_extent(n, _ROW_QUANTUM, b * h, q.device, max_splits)
    chunk = block_d(d, m, q.element_size(), "bwd")
    dq = torch.empty_like(q)
    # dK and dV partials, (2, splits, B, H, M, d) fp32. With one d-chunk every program writes its whole slot; with
    # several it accumulates into it atomically, which needs zeros to start from.
    alloc = torch.empty if chunk >= d else torch.zeros
    part = alloc((2, splits, b, h, m, d), dtype=torch.float32, device=q.device)
    kb = 0 if k.shape[0] == 1 else k.stride(0)
    vb = 0 if v.shape[0] == 1 else v.stride(0)
    _bwd_launch(
        (splits, b * h, d_splits(splits * b * h, cdiv(d, chunk), q.device)), (q, k, v, do, lse, dq, part),
        (*q.stride(), kb, *k.stride()[1:], vb, *v.stride()[1:], *do.stride(), *dq.stride(),
         h, n, m, rows_per_split, scale, scale * LOG2E),
        HEAD_DIM=d, BLOCK_M=tile(m), BLOCK_D=chunk,
        PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype))
    # Sum the splits, and for keys shared by the batch the images too: rows (split[, image]) of (2, rows, elems).
    if k.shape[0] == 1:
        grads = sum_partials(part.view(2, splits * b, h * m * d), k.dtype)
    else:
        grads = sum_partials(part.view(2, splits, b * h * m * d), k.dtype)
    return dq, grads[0].view(k.shape), grads[1].view(v.shape)


_fwd_launch = Launcher(_agent_fwd_kernel)
_bwd_launch = Launcher(_agent_bwd_kernel)


class AgentAttention(torch.autograd.Function):
    """softmax(scale·QKᵀ)·V with one key tile per (batch, head); see the module docstring for the tiling."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        o, lse = _forward(q, k, v, scale, store_lse=True)
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
        scale: logit scale, positive; default d ** -0.5.
    Returns:
        (B, H, N, d) in q's dtype, differentiable in q, k and v (accumulation in fp32).
    """
    _check_inputs(q, k, v)
    # Function.forward runs with grad mode off, so whether a backward can follow is decided here; without one the
    # Function (a few µs of host time per call) is skipped too.
    scale = check_scale(scale, q.shape[-1])
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _forward(q, k, v, scale, store_lse=False)[0]
    return AgentAttention.apply(q, k, v, scale)

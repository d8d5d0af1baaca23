"""Mask2Former masked cross-attention in Triton: ~100 queries over L = 256–4096+ keys, the mask built in-kernel.

The mask. Key l is blocked for query i when mask_embed[b, i] · mask_feats[b, :, l] < 0 (sigmoid of the mask logit
below 0.5). The (B·H, Q, L) boolean that Mask2Former materialises is never written; the kernels decide the mask
one of two ways:

- Short memories (L < BITS_MIN_KEYS): each key tile costs one extra (BLOCK_Q, C) × (C, BLOCK_L) product next to
  QKᵀ, per head, in the forward and again in the backward. At these sizes the repeated products are cheap and the
  factors' re-reads hit L2.
- Long memories: one launch decides every (query, key) pair of an image once, into a bit mask (B, Q, ⌈L/32⌉) int32
  (bit j of word w: key 32·w + j is open), 1/8 of a byte per pair and shared by the heads (0.4 MB at B = 8,
  Q = 100, L = 4096, against 26 MB for a boolean (B·H, Q, L) mask). The attention kernels then read one word per
  32 keys instead of the C-wide product, which with C = 256 against d = 32 is most of their tensor-core work
  (~60 % in the backward) and most of the bytes each key tile loads. The backward reuses the forward's bit mask,
  so the two passes take the same decisions.

When the factors are recomputed, the backward's channel chunking and MMA shapes may differ from the forward's,
so a logit within float rounding of 0 can be decided differently by the two (the reference decides once); only
such keys' gradient terms are affected, and integer-valued factors, as in the tests, give exact logits and
identical decisions.

Forward tiling (flash-decoding). With Q ≈ 100 all queries of a (batch, head) fit one BLOCK_Q tile, so a grid over
query blocks would leave batch 1 with 8 programs; instead the keys are cut into splits and each program runs an
online softmax over the key tiles of one split, writing an fp32 partial output normalised by its own sum, and its
log-sum-exp. A combine kernel merges the splits: O = Σ_s exp2(lse_s − lse) · O_s with lse = log2 Σ_s exp2(lse_s).

Fully blocked rows. Whether query i has any open key is only known after all splits. A split's masked state
needs no count for it: its row sum is at least 1 (the row maximum's own exp2(0)) where it saw an open key and 0
where it saw none, so its log-sum-exp is finite exactly where it did (-inf is stored otherwise; counting opens per
element cost an integer add and a warp reduction per key tile). The combine calls a row open when any split's
log-sum-exp is finite. Rows open nowhere attend to every key: when a (batch, head) has any, its combine program
runs a plain online softmax over the whole memory for them. That pass is
serial in L, but such rows are rare in a trained decoder, and keeping a second, unmasked softmax state in every
split instead would cost an extra exponential tile and P·V product per key tile and double the fp32 partials.

Backward. dS = P ∘ (dP − δ), δ = rowsum(dO ∘ O) computed in-kernel; P is recomputed from the saved
log-sum-exp with the mask (the forward's bit mask, or recomputed from its factors) and the saved per-row "has
open keys" flag. Keys are split across programs as in the forward: each key tile's dK and dV are complete after
one sweep over the (single) query tile and are written directly; dQ sums over all keys, so each program keeps it
in registers across its split and adds it into one fp32 (B, H, Q, d) buffer with atomic adds (a plain store when
there is one split), cast to q's dtype by one more launch. Per-split partials would cost splits × that buffer (up to
32× at batch 1 and 4096 keys), more than the materialised mask SDPA needs; the price is an fp32 summation order
that varies between runs (dQ agrees to rounding, not bit for bit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels._triton_utils import (AUTOTUNE, INTERPRET, LOG2E, autotune_bench, cdiv, check_float, check_scale,
                                   checked_once, dot_precision, Launcher, mm, needs_upcast, split_extent, tile)
from kernels.fit import masked_tiles_fit

MAX_QUERIES = 256  # all queries of a (batch, head) are one register tile
MAX_HEAD_DIM = 256  # q, dO and the accumulators are (BLOCK_Q, d) register tiles
_KEY_QUANTUM = 64 if INTERPRET else 128  # every BLOCK_L below divides it, so splits hold whole key tiles
# Mask-channel chunk of the in-kernel mask product. The forward may instead take all channels in one product
# (WHOLE_C, autotuned): the mask embeddings are then loop-invariant and loaded once, not once per key tile.
_MAX_BLOCK_C = 64
_MAX_WHOLE_C = 256  # widest channel count taken whole (a (128, 256) bf16 tile is 64 KiB of shared memory)
_FALLBACK_BLOCK_L = 64  # key tile of the combine step's softmax over all keys, for rows with every key blocked
# From this many keys on, the mask is decided once per image into a bit mask (see the module docstring) instead of
# once per head in every key tile of the forward and again in the backward. Below it the per-head products are
# small and the extra launch would cost more than it saves.
BITS_MIN_KEYS = 1024
_BITS_WORDS = 2  # 32-key words per program of the bit-mask kernel (a (Q, 64) logit tile)


def _fwd_configs() -> list[triton.Config]:
    if INTERPRET:  # the whole-channel product here; the backward's tests cover the chunked one
        return [triton.Config({"BLOCK_L": _KEY_QUANTUM, "WHOLE_C": True}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:  # valid for every dtype and channel count (see kernels._triton_utils.AUTOTUNE)
        return [triton.Config({"BLOCK_L": 32, "WHOLE_C": False}, num_warps=8, num_stages=2)]
    # (32, 8 warps) needs only ~105 registers per thread in bf16, so two programs share an SM. (64, 8 warps) takes
    # ~138 computing the mask from its factors (98 reading the bit mask), one program per SM; capped at 128 it
    # spills at most 16 B and two fit. With all 256 mask channels in one
    # product the loop body of those two shrinks by 15–20 % (445 → 358 and 636 → 540 SASS instructions), for
    # 112 and 152 KiB of shared memory: two and one programs per SM (python -m kernels.resources, sm_90).
    configs = [triton.Config({"BLOCK_L": bl, "WHOLE_C": False}, num_warps=w, num_stages=s)
               for bl, w, s in ((32, 4, 2), (32, 8, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2))]
    return configs + [triton.Config({"BLOCK_L": 64, "WHOLE_C": False}, num_warps=8, num_stages=2, maxnreg=128),
                      triton.Config({"BLOCK_L": 32, "WHOLE_C": True}, num_warps=8, num_stages=2),
                      triton.Config({"BLOCK_L": 64, "WHOLE_C": True}, num_warps=8, num_stages=2, maxnreg=128)]


def _prune_fwd_configs(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    # fp32 inputs (tf32x3 splits every operand) spill even at 255 registers: a register cap would only spill more,
    # and their whole-channel tiles need more shared memory than an SM has (392 KiB at 256 channels).
    if nargs["Q"].dtype == torch.float32:
        configs = [c for c in configs if not getattr(c, "maxnreg", None) and not c.kwargs["WHOLE_C"]]
    # The whole-channel product only differs from the chunked one above one chunk, and only fits up to a bound;
    # reading a bit mask, neither runs.
    if kwargs.get("FROM_BITS") or not kwargs["BLOCK_C"] < tile(kwargs["MASK_DIM"]) <= _MAX_WHOLE_C:
        configs = [c for c in configs if not c.kwargs["WHOLE_C"]]
    return configs


def _bwd_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_L": _KEY_QUANTUM}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_L": 64}, num_warps=8, num_stages=2)]
    # In bf16 on sm_90 (python -m kernels.resources): (32, 4 warps) spills 56 B per thread and (64, 4) 588 B at
    # 255 registers; (64, 8) does not spill but fits one program per SM. (16, 4) takes 205 registers without
    # spilling, two per SM. Narrower key tiles do not shrink the kernel much: its registers go to the per-program
    # (Q, d) tiles (q, dO, the dQ accumulator), which a register cap only spills (128: 224–444 B).
    return [triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=s)
            for bl, w, s in ((32, 4, 2), (64, 4, 2), (64, 8, 2), (16, 4, 2))]


@triton.jit
def _mask_logits(ME, MF, b, offs_q, q_ok, offs_l, l_ok, smeb, smeq, smec, smfb, smfc, smfl,
                 MASK_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
                 MASK_PRECISION: tl.constexpr, MASK_UPCAST: tl.constexpr):
    """(BLOCK_Q, BLOCK_L) fp32 tile of mask_embed[b] · mask_feats[b], summed over BLOCK_C-wide channel chunks."""
    offs_c = tl.arange(0, BLOCK_C)
    logits = tl.zeros((BLOCK_Q, BLOCK_L), dtype=tl.float32)
    for c in range(0, MASK_DIM, BLOCK_C):
        c_ok = (c + offs_c) < MASK_DIM
        me = tl.load(ME + b * smeb + offs_q[:, None] * smeq + (c + offs_c)[None, :] * smec,
                     mask=q_ok[:, None] & c_ok[None, :], other=0.0)
        mf = tl.load(MF + b * smfb + (c + offs_c)[:, None] * smfc + offs_l[None, :] * smfl,
                     mask=c_ok[:, None] & l_ok[None, :], other=0.0)
        logits += mm(me, mf, MASK_PRECISION, MASK_UPCAST)
    return logits


@triton.jit
def _mask_bits_kernel(ME, MF, BITS, smeb, smeq, smec, smfb, smfc, smfl, sbb, sbq, NQ, L,
                      MASK_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, WORDS: tl.constexpr,
                      MASK_PRECISION: tl.constexpr, MASK_UPCAST: tl.constexpr):
    """BITS[b, i, w] bit j = key 32·w + j is open for query i (its mask logit ≥ 0); grid (cdiv(L, 32·WORDS), B).
    Bits past L are 0."""
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    BLOCK_L: tl.constexpr = WORDS * 32
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < NQ
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    l_ok = offs_l < L
    logits = _mask_logits(ME, MF, b, offs_q, q_ok, offs_l, l_ok, smeb, smeq, smec, smfb, smfc, smfl,
                          MASK_DIM, BLOCK_Q, BLOCK_L, BLOCK_C, MASK_PRECISION, MASK_UPCAST)
    # Open unless negative (``kernels.blocked_keys``: blocked where logit < 0): a NaN logit leaves its key open.
    bit = ((~(logits < 0)) & l_ok[None, :]).to(tl.int32)
    # Distinct powers of two: their sum is their bitwise or (bit 31 included, as int32 wraps).
    shifted = tl.reshape(bit, (BLOCK_Q, WORDS, 32)) << tl.arange(0, 32)[None, None, :]
    words = tl.sum(shifted, axis=2)
    offs_w = pid_l * WORDS + tl.arange(0, WORDS)
    tl.store(BITS + b * sbb + offs_q[:, None] * sbq + offs_w[None, :], words,
             mask=q_ok[:, None] & (offs_w < (L + 31) // 32)[None, :])


@triton.jit
def _open_keys(ME, MF, BITS, b, offs_q, q_ok, start, offs_l, l_ok, L, smeb, smeq, smec, smfb, smfc, smfl, sbb, sbq,
               MASK_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
               MASK_PRECISION: tl.constexpr, MASK_UPCAST: tl.constexpr, FROM_BITS: tl.constexpr):
    """(BLOCK_Q, BLOCK_L) boolean for the key tile at ``start``: key l is open for query i (and is a real key);
    read from the bit mask, or computed from the factors.

    The bit mask is read as one (BLOCK_Q,) column of words per 32 keys, each broadcast over its 32 columns: a
    (BLOCK_Q, BLOCK_L) gather would hold a pointer per element in registers (compiled for sm_90, that raised the
    forward's registers from 140 to 254 and made the backward spill). ``start`` is a multiple of 32 when
    BLOCK_L ≥ 32 (key splits are whole 128-key quanta), and a narrower tile lies inside one word."""
    if FROM_BITS:
        WORDS: tl.constexpr = (BLOCK_L + 31) // 32
        first = start // 32
        word_of_col = tl.arange(0, BLOCK_L) // 32
        for i in tl.static_range(WORDS):
            w = tl.load(BITS + b * sbb + offs_q * sbq + first + i, mask=q_ok & (first + i < (L + 31) // 32), other=0)
            if i == 0:  # the first word as it is: no select for the columns it covers
                words = tl.broadcast_to(w[:, None], (BLOCK_Q, BLOCK_L))
            else:
                words = tl.where((word_of_col == i)[None, :], w[:, None], words)
        if BLOCK_L >= 32:
            # start is a multiple of 32, so each column's bit is its position in its word: a constant mask per
            # column, one and-test per element instead of a shift, an and and a compare.
            is_open = (words & (1 << (tl.arange(0, BLOCK_L) % 32))[None, :]) != 0
        else:
            is_open = ((words >> (offs_l % 32)[None, :]) & 1) != 0
        # Keys past L have no bit set, and a key tile never crosses a split's end (BLOCK_L divides the split
        # length), so no key-range test is needed here.
        return is_open
    logits = _mask_logits(ME, MF, b, offs_q, q_ok, offs_l, l_ok, smeb, smeq, smec, smfb, smfc, smfl,
                          MASK_DIM, BLOCK_Q, BLOCK_L, BLOCK_C, MASK_PRECISION, MASK_UPCAST)
    return (~(logits < 0)) & l_ok[None, :]  # NaN open, as in kernels.blocked_keys


@triton.autotune(configs=_fwd_configs(), key=["L", "NQ", "HEAD_DIM", "MASK_DIM", "FROM_BITS"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs}, do_bench=autotune_bench)
@triton.jit
def _masked_fwd_kernel(Q, K, V, ME, MF, BITS, O_PART, LSE_PART,
                       sqb, sqh, sqq, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                       smeb, smeq, smec, smfb, smfc, smfl, sbb, sbq,
                       H, NQ, L, keys_per_split, scale_log2e,
                       HEAD_DIM: tl.constexpr, MASK_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_C: tl.constexpr, MASK_TILE: tl.constexpr, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr, MASK_PRECISION: tl.constexpr, MASK_UPCAST: tl.constexpr,
                       FROM_BITS: tl.constexpr, BLOCK_L: tl.constexpr, WHOLE_C: tl.constexpr):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_bh = tl.num_programs(1)
    CHUNK: tl.constexpr = MASK_TILE if WHOLE_C else BLOCK_C
    b = pid_bh // H
    h = pid_bh % H
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < NQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqq + offs_d[None, :] * sqd,
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, L)

    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < hi
        is_open = _open_keys(ME, MF, BITS, b, offs_q, q_ok, start, offs_l, l_ok, L, smeb, smeq, smec, smfb, smfc,
                             smfl, sbb, sbq, MASK_DIM, BLOCK_Q, BLOCK_L, CHUNK, MASK_PRECISION, MASK_UPCAST,
                             FROM_BITS)

        ld_mask = l_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :] * svd, mask=ld_mask, other=0.0)
        # Running maxima on the unscaled logits (scale > 0), so scaling and shifting are one FMA per element.
        s = tl.where(is_open, mm(q, tl.trans(k), PRECISION, UPCAST), float("-inf"))
        # A row may have seen no open key yet (max = -inf): shift by 0 then, so exp2 gives 0, not NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new) * scale_log2e
        alpha = tl.exp2(m_i * scale_log2e - shift)
        p = tl.exp2(s * scale_log2e - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mm(p.to(V.dtype.element_ty), v, PRECISION, UPCAST)
        m_i = m_new

    # Partials: (splits, B·H, NQ, HEAD_DIM) outputs normalised by their own sum, and (splits, B·H, NQ) log-sum-exps,
    # -inf where the split saw no open key (l_i is then 0; with one it is at least 1, see the module docstring).
    row = (split * n_bh + pid_bh) * NQ + offs_q
    has_open = l_i > 0
    l_safe = tl.where(has_open, l_i, 1.0)
    tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + row, tl.where(has_open, m_i * scale_log2e + tl.log2(l_safe), float("-inf")), mask=q_ok)


@triton.jit
def _masked_combine_kernel(O_PART, LSE_PART, Q, K, V, O, LSE, ROW_OPEN,
                           sqb, sqh, sqq, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, soq, sod,
                           H, NQ, L, N_SPLITS, scale_log2e,
                           HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    pid_bh = tl.program_id(0)
    n_bh = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < NQ
    d_ok = offs_d < HEAD_DIM
    od_mask = q_ok[:, None] & d_ok[None, :]

    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    w_sum = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for s in range(N_SPLITS):
        row = (s * n_bh + pid_bh) * NQ + offs_q
        lse_s = tl.load(LSE_PART + row, mask=q_ok, other=float("-inf"))
        o_s = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=od_mask, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse_s - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        w_sum = w_sum * alpha + w
        m = m_new
    row_open = m > float("-inf")  # some split saw an open key; then w_sum ≥ 1 (its own term is exp2(0))
    w_safe = tl.where(row_open, w_sum, 1.0)
    out = acc / w_safe[:, None]
    lse = m + tl.log2(w_safe)

    if tl.sum((q_ok & ~row_open).to(tl.int32), axis=0) > 0:
        # Some query has every key blocked: it attends to all keys (plain online softmax over the whole memory).
        # Rare, so it runs here, once per (batch, head), rather than as a second softmax state in every split.
        q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqq + offs_d[None, :] * sqd, mask=od_mask, other=0.0)
        m_all = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
        l_all = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        acc_all = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
        for start in range(0, L, BLOCK_L):
            offs_l = start + tl.arange(0, BLOCK_L)
            l_ok = offs_l < L
            ld_mask = l_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :] * skd, mask=ld_mask,
                        other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :] * svd, mask=ld_mask,
                        other=0.0)
            s_all = tl.where(l_ok[None, :], mm(q, tl.trans(k), PRECISION, UPCAST) * scale_log2e, float("-inf"))
            m_new = tl.maximum(m_all, tl.max(s_all, axis=1))  # finite: every tile has a real key
            alpha = tl.exp2(m_all - m_new)
            p = tl.exp2(s_all - m_new[:, None])
            l_all = l_all * alpha + tl.sum(p, axis=1)
            acc_all = acc_all * alpha[:, None] + mm(p.to(V.dtype.element_ty), v, PRECISION, UPCAST)
            m_all = m_new
        out = tl.where(row_open[:, None], out, acc_all / l_all[:, None])
        lse = tl.where(row_open, lse, m_all + tl.log2(l_all))

    tl.store(O + b * sob + h * soh + offs_q[:, None] * soq + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=od_mask)
    tl.store(LSE + pid_bh * NQ + offs_q, lse, mask=q_ok)
    tl.store(ROW_OPEN + pid_bh * NQ + offs_q, row_open.to(tl.int8), mask=q_ok)


# DQ is summed over the key splits with atomic adds: the autotuner must zero it before each of its timing runs and
# before the run that counts, or the first backward of each shape would return the sum of all of them.
@triton.autotune(configs=_bwd_configs(), key=["L", "NQ", "HEAD_DIM", "MASK_DIM", "FROM_BITS"], reset_to_zero=["DQ"],
                 do_bench=autotune_bench)
@triton.jit
def _masked_bwd_kernel(Q, K, V, ME, MF, BITS, O, DO, LSE, ROW_OPEN, DQ, DK, DV,
                       sqb, sqh, sqq, sqd, skb, skh, skl, skd, svb, svh, svl, svd,
                       smeb, smeq, smec, smfb, smfc, smfl, sbb, sbq, sob, soh, soq, sod, sdob, sdoh, sdoq, sdod,
                       sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
                       H, NQ, L, keys_per_split, scale, scale_log2e,
                       HEAD_DIM: tl.constexpr, MASK_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       MASK_PRECISION: tl.constexpr, MASK_UPCAST: tl.constexpr, FROM_BITS: tl.constexpr,
                       BLOCK_L: tl.constexpr):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < NQ
    d_ok = offs_d < HEAD_DIM
    qd_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_q[:, None] * sqq + offs_d[None, :] * sqd, mask=qd_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_q[:, None] * sdoq + offs_d[None, :] * sdod, mask=qd_mask,
                 other=0.0)
    lse = tl.load(LSE + pid_bh * NQ + offs_q, mask=q_ok, other=0.0)
    # δ = rowsum(dO ∘ O) = rowsum(P ∘ dP): every program of the (batch, head) recomputes it from its single
    # (Q, d) tile, which costs less than the separate torch launches that would precompute it.
    o = tl.load(O + b * sob + h * soh + offs_q[:, None] * soq + offs_d[None, :] * sod, mask=qd_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    unmasked_row = tl.load(ROW_OPEN + pid_bh * NQ + offs_q, mask=q_ok, other=1) == 0
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, L)

    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for start in range(lo, hi, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < hi
        is_open = _open_keys(ME, MF, BITS, b, offs_q, q_ok, start, offs_l, l_ok, L, smeb, smeq, smec, smfb, smfc,
                             smfl, sbb, sbq, MASK_DIM, BLOCK_Q, BLOCK_L, BLOCK_C, MASK_PRECISION, MASK_UPCAST,
                             FROM_BITS)
        keep = (is_open | unmasked_row[:, None]) & q_ok[:, None] & l_ok[None, :]

        ld_mask = l_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + offs_l[:, None] * skl + offs_d[None, :] * skd, mask=ld_mask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_l[:, None] * svl + offs_d[None, :] * svd, mask=ld_mask, other=0.0)
        s = mm(q, tl.trans(k), PRECISION, UPCAST)
        p = tl.where(keep, tl.exp2(s * scale_log2e - lse[:, None]), 0.0)
        dp = mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = (p * (dp - delta[:, None])).to(Q.dtype.element_ty)
        dv = mm(tl.trans(p.to(DO.dtype.element_ty)), do, PRECISION, UPCAST)
        dk = mm(tl.trans(ds), q, PRECISION, UPCAST) * scale
        tl.store(DV + b * sdvb + h * sdvh + offs_l[:, None] * sdvl + offs_d[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=ld_mask)
        tl.store(DK + b * sdkb + h * sdkh + offs_l[:, None] * sdkl + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=ld_mask)
        dq += mm(ds, k, PRECISION, UPCAST)
    # dQ: (B·H, NQ, HEAD_DIM) fp32, zeroed by the host when several splits add into it
    dq_ptrs = DQ + (pid_bh * NQ + offs_q)[:, None] * HEAD_DIM + offs_d[None, :]
    if tl.num_programs(0) == 1:
        tl.store(dq_ptrs, dq * scale, mask=qd_mask)
    else:
        tl.atomic_add(dq_ptrs, dq * scale, mask=qd_mask, sem="relaxed")  # a sum: no ordering needed


@checked_once
def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor) -> None:
    for name, t, dims in (("q", q, "(B, H, Q, d)"), ("k", k, "(B, H, L, d)"), ("v", v, "(B, H, L, d)"),
                          ("mask_embed", mask_embed, "(B, Q, C)"), ("mask_feats", mask_feats, "(B, C, L)")):
        check_float(name, t)
        if t.dim() != len(dims.split(",")):
            raise ValueError(f"{name}: expected a tensor of shape {dims}, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected the device of q ({q.device}), got {t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, nq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"k, v: expected shape ({b}, {h}, L, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    seq = k.shape[2]
    if mask_embed.shape[:2] != (b, nq):
        raise ValueError(f"mask_embed: expected shape ({b}, {nq}, C), got {tuple(mask_embed.shape)}")
    if mask_feats.shape != (b, mask_embed.shape[2], seq):
        raise ValueError(f"mask_feats: expected shape ({b}, {mask_embed.shape[2]}, {seq}), "
                         f"got {tuple(mask_feats.shape)}")
    if not 1 <= nq <= MAX_QUERIES:
        raise ValueError(f"q: expected 1 to {MAX_QUERIES} queries (dim 2), got {nq}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head width (dim 3) of 1 to {MAX_HEAD_DIM}, got {d}")
    if min(b, h, seq, mask_embed.shape[2]) < 1:
        raise ValueError(f"expected non-empty inputs, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"mask_embed {tuple(mask_embed.shape)}")


def _mask_factors(mask_embed: Tensor, mask_feats: Tensor) -> tuple[Tensor, Tensor]:
    """Both factors in one dtype (the promoted one), detached: the mask is not differentiated."""
    dtype = torch.promote_types(mask_embed.dtype, mask_feats.dtype)
    return tuple(t if t.dtype == dtype and not t.requires_grad else t.detach().to(dtype)  # type: ignore[return-value]
                 for t in (mask_embed, mask_feats))


def _mask_args(mask_embed: Tensor) -> dict:
    """Constexprs of the in-kernel mask product for factors like ``mask_embed`` (B, Q, C)."""
    return dict(MASK_DIM=mask_embed.shape[2], BLOCK_C=tile(mask_embed.shape[2], _MAX_BLOCK_C),
                MASK_PRECISION=dot_precision(mask_embed.dtype), MASK_UPCAST=needs_upcast(mask_embed.dtype))


def mask_bits(mask_embed: Tensor, mask_feats: Tensor) -> Tensor:
    """(B, Q, C), (B, C, L) factors in one dtype → (B, Q, ⌈L/32⌉) int32: bit j of word w is set when key 32·w + j
    is open for the query (mask_embed · mask_feats ≥ 0). One launch, one mask product per image."""
    b, nq, c = mask_embed.shape
    seq = mask_feats.shape[2]
    bits = torch.empty((b, nq, cdiv(seq, 32)), dtype=torch.int32, device=mask_embed.device)
    _bits_launch((cdiv(seq, 32 * _BITS_WORDS), b), (mask_embed, mask_feats, bits),
                 (*mask_embed.stride(), *mask_feats.stride(), bits.stride(0), bits.stride(1), nq, seq),
                 MASK_DIM=c, BLOCK_Q=tile(nq), BLOCK_C=tile(c, _MAX_BLOCK_C), WORDS=_BITS_WORDS,
                 MASK_PRECISION=dot_precision(mask_embed.dtype), MASK_UPCAST=needs_upcast(mask_embed.dtype),
                 num_warps=4)
    return bits


def _bits_args(bits: Tensor | None, me: Tensor) -> tuple[Tensor, tuple[int, int], bool]:
    """(BITS tensor, its (batch, query) strides, FROM_BITS): without a bit mask the kernels take ``me`` in its
    place, never read."""
    if bits is None:
        return me, (0, 0), False
    return bits, (bits.stride(0), bits.stride(1)), True


def _forward(q: Tensor, k: Tensor, v: Tensor, me: Tensor, mf: Tensor,
             scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """→ output (B, H, Q, d), log2-sum-exp (B, H, Q) fp32, row has an open key (B, H, Q) int8, and the bit mask
    (B, Q, ⌈L/32⌉) when one was made (L ≥ BITS_MIN_KEYS), else None."""
    b, h, nq, d = q.shape
    seq = k.shape[2]
    bits = mask_bits(me, mf) if seq >= BITS_MIN_KEYS else None
    bits_t, bits_strides, from_bits = _bits_args(bits, me)
    splits, keys_per_split = split_extent(seq, _KEY_QUANTUM, b * h, q.device)
    o_part = torch.empty((splits, b * h, nq, d), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((splits, b * h, nq), dtype=torch.float32, device=q.device)
    block_q, block_d = tile(nq), tile(d)
    precision = dict(PRECISION=dot_precision(q.dtype), UPCAST=needs_upcast(q.dtype))
    _fwd_launch(
        (splits, b * h), (q, k, v, me, mf, bits_t, o_part, lse_part),
        (*q.stride(), *k.stride(), *v.stride(), *me.stride(), *mf.stride(), *bits_strides, h, nq, seq,
         keys_per_split, scale * LOG2E),
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_D=block_d, **precision, **_mask_args(me), MASK_TILE=tile(me.shape[2]),
        FROM_BITS=from_bits)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    row_open = torch.empty((b, h, nq), dtype=torch.int8, device=q.device)
    _combine_launch(
        (b * h,), (o_part, lse_part, q, k, v, o, lse, row_open),
        (*q.stride(), *k.stride(), *v.stride(), *o.stride(), h, nq, seq, splits, scale * LOG2E),
        HEAD_DIM=d, BLOCK_Q=block_q, BLOCK_D=block_d, BLOCK_L=_FALLBACK_BLOCK_L, **precision, num_warps=4)
    return o, lse, row_open, bits


def _backward(q: Tensor, k: Tensor, v: Tensor, me: Tensor, mf: Tensor, bits: Tensor | None, o: Tensor, lse: Tensor,
              row_open: Tensor, do: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients in q, k, v; the mask from the forward's bit mask when it made one (the same decisions)."""
    b, h, nq, d = q.shape
    seq = k.shape[2]
    bits_t, bits_strides, from_bits = _bits_args(bits, me)
    splits, keys_per_split = split_extent(seq, _KEY_QUANTUM, b * h, q.device)
    dq = (torch.zeros if splits > 1 else torch.empty)((b, h, nq, d), dtype=torch.float32, device=q.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    _bwd_launch(
        (splits, b * h), (q, k, v, me, mf, bits_t, o, do, lse, row_open, dq, dk, dv),
        (*q.stride(), *k.stride(), *v.stride(), *me.stride(), *mf.stride(), *bits_strides, *o.stride(),
         *do.stride(), *dk.stride(), *dv.stride(), h, nq, seq, keys_per_split, scale, scale * LOG2E),
        HEAD_DIM=d, BLOCK_Q=tile(nq), BLOCK_D=tile(d), PRECISION=dot_precision(q.dtype),
        UPCAST=needs_upcast(q.dtype), **_mask_args(me), FROM_BITS=from_bits)
    return dq.to(q.dtype), dk, dv


_bits_launch = Launcher(_mask_bits_kernel)
_fwd_launch = Launcher(_masked_fwd_kernel)
_combine_launch = Launcher(_masked_combine_kernel)
_bwd_launch = Launcher(_masked_bwd_kernel)


class MaskedAttention(torch.autograd.Function):
    """Masked cross-attention with the mask computed in-kernel; see the module docstring for the tiling."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor,  # type: ignore[override]
                scale: float) -> Tensor:
        me, mf = _mask_factors(mask_embed, mask_feats)
        o, lse, row_open, bits = _forward(q, k, v, me, mf, scale)
        ctx.save_for_backward(q, k, v, me, mf, bits, o, lse, row_open)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:  # type: ignore[override]
        q, k, v, me, mf, bits, o, lse, row_open = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, me, mf, bits, o, lse, row_open, do, ctx.scale)
        return dq, dk, dv, None, None, None


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor, *,
                     scale: float | None = None) -> Tensor:
    """Mask2Former masked cross-attention, Triton forward and backward, mask built in-kernel from its factors.

    Args:
        q: (B, H, Q, d) queries, fp32/fp16/bf16; 1 ≤ Q ≤ 256, 1 ≤ d ≤ 256, and Q × d within what the kernels'
            tiles fit (``kernels.fit.masked_tiles_fit``: e.g. Q = 100 with d ≤ 32 in fp32, ≤ 128 in bf16).
        k, v: (B, H, L, d) keys and values (flattened memory), q's dtype and device.
        mask_embed: (B, Q, C) mask embeddings; mask_feats: (B, C, L) mask features (fp32, fp16 or bf16; not
            differentiated). Key l is blocked for query i when their dot product is < 0, unless all of i's keys are.
        scale: logit scale, positive; default d ** -0.5.
    Returns:
        (B, H, Q, d) in q's dtype, differentiable in q, k and v (accumulation in fp32).
    """
    _check_inputs(q, k, v, mask_embed, mask_feats)
    scale = check_scale(scale, q.shape[-1])
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    nq, d = q.shape[2], q.shape[3]
    if not masked_tiles_fit(q.dtype, nq, d, backward=needs_grad):
        raise ValueError(f"q: {nq} queries of head width {d} in {str(q.dtype).removeprefix('torch.')} are more than "
                         f"the kernel's {'backward' if needs_grad else 'forward'} fits in an SM's shared memory "
                         f"(kernels.fit); use kernels.masked_attention_reference, narrower heads or fp16/bf16")
    if not needs_grad:
        # No backward can follow: skip the autograd Function (a few µs of host time per call).
        return _forward(q, k, v, *_mask_factors(mask_embed, mask_feats), scale)[0]
    return MaskedAttention.apply(q, k, v, mask_embed, mask_feats, scale)

"""Full-size semantic labels from the decoder's last prediction in one Triton kernel.

The label of output pixel (y, x) is argmax_k Σ_q p[q, k] · sigmoid(up(mask_logits)[q, y, x]), where ``up`` is a
bilinear resize of the stride-4 mask logits to the image size (``align_corners=False``, as ``F.interpolate``) and p
the class probabilities of the queries. In PyTorch that is four full-size passes per image: the resize writes
(Q, H, W) logits (100 × 512 × 512 at the paper's crop, 52 MB in bf16), the sigmoid reads and rewrites them, the
class product reads them again and writes (K, H, W) sums, and the argmax reads those. Here one program owns a block
of output pixels of one image: it interpolates each query's logit from the four stride-4 neighbours (read from L2:
the low-resolution map is 3 MB), applies the sigmoid, multiplies the (pixels × queries) tile by the (queries ×
classes) probabilities on the tensor cores in chunks of queries, and writes only the int32 labels.

The interpolation is PyTorch's (``upsample_bilinear2d``): source coordinate max(scale · (i + 0.5) − 0.5, 0) with
scale = input size / output size, the upper neighbour clamped to the last row/column, weights 1 − λ and λ. The
sums are accumulated in fp32 from products in the mask logits' dtype (fp32 products keep fp32 accuracy, see
``dot_precision``), so labels equal the PyTorch path's except where two classes tie to within rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._triton_utils import (INTERPRET, Launcher, cdiv, check_float, checked_once, dot_precision, mm,
                                   needs_upcast, next_power_of_2)

MAX_CLASSES = 256
# Output pixels per program; the interpreter runs programs one by one, so it gets fewer, larger ones. On sm_90
# (bf16, compiled offline): 64 pixels × 16 queries, 4 warps, no software pipelining take 167 registers without
# spills, 3 programs per SM; 128 pixels or 32 queries, or 3 pipeline stages, reach 255 registers and spill (the
# four gathered taps of each (pixel, query) pair keep their 64-bit addresses live).
_BLOCK_P = 1024 if INTERPRET else 64
_BLOCK_Q = 16  # queries per tensor-core product (a tl.dot needs ≥ 16 on every side)


@triton.jit
def _labels_kernel(P, M, OUT, NQ, K, h, w, H, W, scale_h, scale_w, spb, spq, spk, smb, smq, smh, smw,
                   BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs < H * W
    y = offs // W
    x = offs % W
    # upsample_bilinear2d, align_corners=False: the source coordinate is clamped at 0, so truncation is the floor.
    sy = tl.maximum(scale_h * (y.to(tl.float32) + 0.5) - 0.5, 0.0)
    sx = tl.maximum(scale_w * (x.to(tl.float32) + 0.5) - 0.5, 0.0)
    y0 = sy.to(tl.int32)
    x0 = sx.to(tl.int32)
    ly = sy - y0.to(tl.float32)
    lx = sx - x0.to(tl.float32)
    y1 = tl.where(y0 < h - 1, y0 + 1, y0)
    x1 = tl.where(x0 < w - 1, x0 + 1, x0)
    w00 = ((1.0 - ly) * (1.0 - lx))[:, None]
    w01 = ((1.0 - ly) * lx)[:, None]
    w10 = (ly * (1.0 - lx))[:, None]
    w11 = (ly * lx)[:, None]
    tap00 = (y0 * smh + x0 * smw)[:, None]
    tap01 = (y0 * smh + x1 * smw)[:, None]
    tap10 = (y1 * smh + x0 * smw)[:, None]
    tap11 = (y1 * smh + x1 * smw)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    acc = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for q0 in range(0, NQ, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < NQ
        pq = ok[:, None] & q_ok[None, :]
        base = M + b * smb + offs_q[None, :] * smq
        m = (w00 * tl.load(base + tap00, mask=pq, other=0.0).to(tl.float32)
             + w01 * tl.load(base + tap01, mask=pq, other=0.0).to(tl.float32)
             + w10 * tl.load(base + tap10, mask=pq, other=0.0).to(tl.float32)
             + w11 * tl.load(base + tap11, mask=pq, other=0.0).to(tl.float32))
        s = tl.where(pq, 1.0 / (1.0 + tl.exp(-m)), 0.0)
        p = tl.load(P + b * spb + offs_q[:, None] * spq + offs_k[None, :] * spk,
                    mask=q_ok[:, None] & k_ok[None, :], other=0.0)
        acc += mm(s.to(M.dtype.element_ty), p.to(M.dtype.element_ty), PRECISION, UPCAST)
    # NaN counts as the maximum and the first one wins, as in torch.argmax. Triton's argmax compares with ">" (a
    # NaN never wins, and the padded -inf classes beat it), so a NaN sum goes in as +inf: no real sum can be
    # +inf (each is at most NQ), and the tie-break picks the first +inf.
    acc = tl.where(k_ok[None, :], tl.where(acc != acc, float("inf"), acc), float("-inf"))
    tl.store(OUT + b * H * W + offs, tl.argmax(acc, axis=1).to(tl.int32), mask=ok)


@checked_once
def _check_inputs(class_probs: Tensor, mask_logits: Tensor) -> None:
    check_float("class_probs", class_probs)
    check_float("mask_logits", mask_logits)
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits: expected (B, Q, h, w), got shape {tuple(mask_logits.shape)}")
    if min(mask_logits.shape[2:]) < 1:  # the kernel would read its taps out of an empty tensor
        raise ValueError(f"mask_logits: expected a non-empty (h, w), got shape {tuple(mask_logits.shape)}")
    b, nq = mask_logits.shape[:2]
    if class_probs.dim() != 3 or tuple(class_probs.shape[:2]) != (b, nq):
        raise ValueError(f"class_probs: expected ({b}, {nq}, K), got shape {tuple(class_probs.shape)}")
    if not 1 <= class_probs.shape[2] <= MAX_CLASSES:
        raise ValueError(f"class_probs: expected 1 to {MAX_CLASSES} classes (dim 2), got {class_probs.shape[2]}")
    if class_probs.device != mask_logits.device:
        raise ValueError(f"class_probs: expected the device of mask_logits ({mask_logits.device}), got "
                         f"{class_probs.device}")


_launch = Launcher(_labels_kernel)


def semantic_labels(class_probs: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Labels (B, H, W) int32 = argmax over k of Σ_q class_probs[b, q, k] · sigmoid(resize(mask_logits)[b, q]).

    Args:
        class_probs: (B, Q, K) class probabilities of each query (the decoder's softmax without the no-object
            column), fp32, fp16 or bf16; K ≤ 256.
        mask_logits: (B, Q, h, w) mask logits, fp32, fp16 or bf16; the products are taken in this dtype.
        size: (H, W), the output size; the resize is bilinear with ``align_corners=False``.
    """
    _check_inputs(class_probs, mask_logits)
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size: expected a positive (H, W), got {tuple(size)}")
    b, nq, h, w = mask_logits.shape
    k = class_probs.shape[2]
    out = torch.empty((b, height, width), dtype=torch.int32, device=mask_logits.device)
    # Scales as PyTorch's resize takes them: input size / output size, an fp32 kernel scalar.
    _launch((cdiv(height * width, _BLOCK_P), b), (class_probs, mask_logits, out),
            (nq, k, h, w, height, width, h / height, w / width, *class_probs.stride(), *mask_logits.stride()),
            BLOCK_P=_BLOCK_P, BLOCK_Q=_BLOCK_Q, BLOCK_K=max(16, next_power_of_2(k)),
            PRECISION=dot_precision(mask_logits.dtype), UPCAST=needs_upcast(mask_logits.dtype), num_warps=4,
            num_stages=1)
    return out

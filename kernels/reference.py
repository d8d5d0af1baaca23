"""Plain-PyTorch ground truth of the attention hot paths and of the full-size labels.

These are the definitions the Triton kernels are tested against. The attention references are also the path the
model takes on CPU and in export (they trace to plain MatMul/Softmax/Where ONNX nodes); the model computes its
labels and the refinement's convolutions with its own modules. The attention and label references compute in fp32
whatever the input dtype; the depthwise reference is ``conv2d`` in the input's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor


def agent_attention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Softmax attention of many queries over a few keys.

    Args:
        q: (B, H, N, d) queries (pixel tokens; N long).
        k: (B, H, M, d) or (1, H, M, d) keys shared over the batch (M small, e.g. 100 agent queries).
        v: same shape as k.
        scale: logit scale; default d ** -0.5.
    Returns:
        (B, H, N, d) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, N, M)
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention_mask_logits(mask_embed: Tensor, mask_feats: Tensor) -> Tensor:
    """(B, Q, C) · (B, C, L) → (B, Q, L) mask logits in fp32 (detached: the mask is not differentiated)."""
    return torch.matmul(mask_embed.detach().float(), mask_feats.detach().float())


def blocked_keys(mask_embed: Tensor, mask_feats: Tensor) -> Tensor:
    """Mask2Former's rule as a (B, Q, L) bool tensor, True = blocked.

    Key l is blocked for query i when sigmoid(logit) < 0.5, i.e. logit < 0. A query whose keys are all blocked
    attends everywhere instead (otherwise its softmax would be 0/0).
    """
    blocked = attention_mask_logits(mask_embed, mask_feats) < 0
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor, *,
                               scale: float | None = None) -> Tensor:
    """Mask2Former masked cross-attention with the mask computed from its factors.

    Args:
        q: (B, H, Q, d) queries.
        k, v: (B, H, L, d) keys and values (flattened memory).
        mask_embed: (B, Q, C) mask embeddings of the previous prediction.
        mask_feats: (B, C, L) mask features resized to the memory's resolution, flattened.
        scale: logit scale; default d ** -0.5.
    Returns:
        (B, H, Q, d) in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    blocked = blocked_keys(mask_embed, mask_feats)[:, None]  # (B, 1, Q, L), broadcast over heads
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    logits = logits.masked_fill(blocked, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def semantic_labels_reference(class_probs: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, Q, K) class probabilities, (B, Q, h, w) mask logits → labels (B, H, W) int32: argmax over k of
    Σ_q class_probs[b, q, k] · sigmoid(bilinear resize of mask_logits to ``size``, align_corners=False)."""
    full = torch.nn.functional.interpolate(mask_logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return torch.einsum("bqk,bqhw->bkhw", class_probs.float(), full.sigmoid()).argmax(dim=1).to(torch.int32)


def depthwise_conv3x3_reference(x: Tensor, weights: list[Tensor], dilations: list[int]) -> list[Tensor]:
    """(B, C, H, W) input, (C, 1, 3, 3) weights and their dilations → one (B, C, H, W) depthwise convolution per
    dilation, padding = dilation (same size), no bias."""
    return [torch.nn.functional.conv2d(x, w, padding=int(d), dilation=int(d), groups=x.shape[1])
            for w, d in zip(weights, dilations)]

"""The attention entry points the model calls, and the choice of implementation behind them.

Three kinds of attention run in the student:
- ``agent_attention``: many pixel tokens over a few agent queries / Rein tokens (refinement, LoRA-Reins);
- ``masked_attention``: decoder queries over a memory, blocked by the previous prediction's mask;
- ``attention``: plain multi-head attention (backbone, decoder self-attention, agent-query encoder).

Backend choice (``QD_ATTENTION`` overrides it): ``triton`` for CUDA tensors, ``torch`` elsewhere. ``sdpa`` uses
``F.scaled_dot_product_attention`` (with a materialised mask for the masked kind); ``xformers`` and ``flex`` are
GPU-only options, refused where not installed (``flex`` applies the mask as a score modification). While tracing
for export (torch.jit / torch.onnx / torch.export) the ``torch`` path is always taken, so exported graphs never
contain a Triton call; so is it under torch.compile, unless ``QD_ATTENTION=triton`` names the kernels and no
gradient is wanted: they then enter the compiled graph as custom operators (``kernels.ops``, ``torch.ops.qd.*``),
which Inductor calls between the kernels it fuses around them. The pixel decoder's deformable attention
(``qd_core.head.msda``) follows the same choice: its Triton sampling core wherever ``backend_for`` says ``triton``;
so do the refinement's depthwise convolutions (``qd_core.head.refine``) where no gradient is wanted, and the
full-size labels (``QueryDiffStudent.full_size_labels``).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import agent_attention_reference, blocked_keys, masked_attention_reference
from kernels.fit import masked_tiles_fit

BACKENDS = ("torch", "triton", "sdpa", "xformers", "flex")


def is_tracing() -> bool:
    """Whether the model is being traced for export (torch.jit / torch.onnx / torch.export) or compiled: the
    graph then takes the PyTorch paths and makes its constants itself."""
    # Cheapest checks first: this runs on every attention call (is_in_onnx_export alone costs ~1 µs).
    return (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export())


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    """Whether ``module`` can be imported (looked up once: backend_for runs on every attention call)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def _exporting() -> bool:
    """Whether torch.export is tracing. The flag is read itself: under torch.compile, Dynamo of torch 2.11 folds
    ``torch.compiler.is_exporting()`` to True (2.13 reads the flag), which would keep the Triton kernels out of
    every compiled graph."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def backend_for(t: Tensor) -> str:
    """The implementation used for tensor ``t`` (see module docstring)."""
    forced = os.environ.get("QD_ATTENTION", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"QD_ATTENTION={forced!r}: expected one of {', '.join(BACKENDS)}")
    if is_tracing():
        # torch.compile (not an export) with the kernels named and no gradient wanted: they enter the graph as
        # custom operators (kernels.ops, forward only); every other traced or compiled graph is plain PyTorch.
        if (forced == "triton" and not torch.is_grad_enabled() and torch.compiler.is_compiling()
                and not _exporting()):
            return "triton"
        return "torch"
    if forced:
        module = {"xformers": "xformers.ops", "flex": "torch.nn.attention.flex_attention"}.get(forced)
        if module is not None and not _importable(module):
            raise ValueError(f"QD_ATTENTION={forced}: {module} is not installed here")
        if module is not None and not t.is_cuda:
            raise ValueError(f"QD_ATTENTION={forced}: this backend needs CUDA tensors, got {t.device}")
        return forced
    return "triton" if t.is_cuda else "torch"


def _kernel_dtype(*tensors: Tensor) -> torch.dtype:
    """The one dtype the Triton kernels get: autocast's where it is on (as a matmul would run under it), else the
    widest of the inputs. Under autocast the model hands over mixed inputs (e.g. fp32 queries from a LayerNorm
    beside bf16 keys from a Linear), which the kernels, like SDPA under autocast, take in one dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` (no call at all when it already is: these run several dozen times per forward)."""
    return t if t.dtype == dtype else t.to(dtype)


def agent_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Softmax(q kᵀ·scale) v with keys shared over the batch allowed.

    q: (B, H, N, d); k, v: (B, H, M, d) or (1, H, M, d). Returns (B, H, N, d).
    """
    backend = backend_for(q)
    if backend == "triton":
        import kernels

        dtype = _kernel_dtype(q, k, v)
        return kernels.agent_attention(_as(q, dtype), _as(k, dtype), _as(v, dtype), scale=scale)
    if backend == "torch":
        return agent_attention_reference(q, k, v, scale=scale)
    return attention(q, k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1), scale=scale)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor, *,
                     scale: float | None = None) -> Tensor:
    """Mask2Former masked cross-attention with the mask built from its factors.

    q: (B, H, Q, d); k, v: (B, H, L, d); mask_embed: (B, Q, C); mask_feats: (B, C, L). Key l is blocked for query
    i when ``mask_embed[b, i] · mask_feats[b, :, l] < 0`` (sigmoid < 0.5), unless all of i's keys are blocked.
    Returns (B, H, Q, d).
    """
    backend = backend_for(q)
    if backend == "triton":
        import kernels

        dtype = _kernel_dtype(q, k, v)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if not masked_tiles_fit(dtype, q.shape[2], q.shape[3], backward=needs_grad):
            # Heads wider than the kernels' tiles fit (kernels.fit): the PyTorch path, as on CPU.
            return masked_attention_reference(q, k, v, mask_embed, mask_feats, scale=scale)
        return kernels.masked_attention(_as(q, dtype), _as(k, dtype), _as(v, dtype), mask_embed, mask_feats,
                                        scale=scale)
    if backend == "torch":
        return masked_attention_reference(q, k, v, mask_embed, mask_feats, scale=scale)
    allowed = ~blocked_keys(mask_embed, mask_feats)[:, None]  # SDPA: True = may attend
    return attention(q, k, v, scale=scale, allowed=allowed)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, allowed: Tensor | None = None) -> Tensor:
    """Plain multi-head attention. q: (B, H, N, d); k, v: (B, H, M, d); allowed: bool broadcastable to (B, H, N, M)."""
    backend = backend_for(q)
    if backend == "xformers":
        import xformers.ops as xops

        bias = None
        if allowed is not None:
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
    if backend == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        if allowed is None:
            return flex_attention(q, k, v, scale=scale)
        # The mask as a score modification read from the (broadcast, not copied) boolean tensor.
        full = allowed.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

        def blocked_to_minus_inf(score: Tensor, b: Tensor, h: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
            return torch.where(full[b, h, qi, kv], score, -float("inf"))

        return flex_attention(q, k, v, score_mod=blocked_to_minus_inf, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)

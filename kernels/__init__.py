"""Attention kernels, the full-size label head and the refinement's depthwise convolutions: Triton implementations
and their PyTorch references. Imports nothing of this project.

(The deformable attention's sampling core, ``ms_deform_attn``, has its PyTorch references in
``qd_core.head.msda``, where the model's two other implementations of it live.)

The Triton modules are imported on first call, not here: ``qd_core`` imports this package for the references on
machines without Triton or a GPU, and Triton fixes at import (decoration) time whether a kernel is compiled or run
by its interpreter. On a machine without CUDA the first call with CPU tensors therefore sets
``TRITON_INTERPRET=1`` before importing the kernels, so the same code runs (slowly) on CPU for tests.

Under torch.compile each function calls its custom operator (``kernels.ops``, ``torch.ops.qd.*``) instead: the
kernel becomes one opaque node of the compiled graph. The operators are forward only: a compiled call that needs
gradients runs the kernel eagerly between two graphs (a graph break), with its autograd Function.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any, Callable

import torch
from torch import Tensor

from kernels.reference import (agent_attention_reference, blocked_keys, depthwise_conv3x3_reference,
                               masked_attention_reference, semantic_labels_reference)

__all__ = ["agent_attention", "masked_attention", "ms_deform_attn", "semantic_labels", "depthwise_conv3x3",
           "agent_attention_reference", "masked_attention_reference", "semantic_labels_reference",
           "depthwise_conv3x3_reference", "blocked_keys"]


def _triton_module(name: str, t: Tensor, arg: str = "q") -> ModuleType:
    """Import ``kernels.<name>`` so that it can run on ``t`` (argument ``arg``)'s device (see the module docstring)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_cuda:  # the common case, checked first: it is paid on every call
        module = sys.modules.get(f"kernels.{name}")
        if module is not None:
            return module
    utils = sys.modules.get("kernels._triton_utils")
    if t.device.type == "cpu":
        if utils is None and os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "on"):
            if torch.cuda.is_available():
                raise ValueError("Triton kernels: got CPU tensors on a CUDA machine; move them to CUDA, or set "
                                 "TRITON_INTERPRET=1 before the first kernel call to run Triton's interpreter")
            if "torch._dynamo" in sys.modules or "torch._inductor" in sys.modules:
                # torch.compile's import sets Triton up in compiled mode; interpreted kernels would then fail
                # deep inside Triton with "Cannot call @triton.jit'd outside of the scope of a kernel".
                raise ValueError("Triton kernels on CPU run under Triton's interpreter, which must be chosen before "
                                 "torch.compile / diffusers is imported: start the process with TRITON_INTERPRET=1")
            os.environ["TRITON_INTERPRET"] = "1"
        elif utils is not None and not utils.INTERPRET and not _offline():
            raise ValueError("Triton kernels: got CPU tensors but the kernels were built for CUDA; set "
                             "TRITON_INTERPRET=1 before the first kernel call to run them on CPU")
    return importlib.import_module(f"kernels.{name}")


def _wants_grad(*tensors: Tensor) -> bool:
    """Whether a compiled call needs gradients: the ``kernels.ops`` operators have no autograd formula, so such a
    call runs the kernel outside the graph (``_outside_graph``) instead of as its operator."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


@torch.compiler.disable
def _outside_graph(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run eagerly between two compiled graphs (a graph break): how a compiled call that
    needs gradients runs a kernel, with its autograd Function."""
    return fn(*args, **kwargs)


def _offline() -> bool:
    """Whether ``kernels.offline_driver`` stands in for CUDA (CPU tensors then go to the compiled kernels)."""
    offline = sys.modules.get("kernels.offline_driver")
    return offline is not None and offline.INSTALLED


def agent_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None) -> Tensor:
    """Triton softmax attention of many queries over a few keys (pixel tokens over agent queries / Rein tokens).

    Args:
        q: (B, H, N, d) queries, fp32/fp16/bf16.
        k: (B, H, M, d) or (1, H, M, d) keys shared over the batch; 1 ≤ M ≤ 256.
        v: same shape as k.
        scale: logit scale, positive; default d ** -0.5.
    Returns:
        (B, H, N, d) in q's dtype, differentiable in q, k and v. Same result as ``agent_attention_reference``.
    """
    if torch.compiler.is_compiling():
        if _wants_grad(q, k, v):
            return _outside_graph(agent_attention, q, k, v, scale=scale)
        return torch.ops.qd.agent_attention(q, k, v, scale)
    return _triton_module("agent_triton", q).agent_attention(q, k, v, scale=scale)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor, *,
                     scale: float | None = None) -> Tensor:
    """Triton Mask2Former masked cross-attention, the mask computed inside the kernel from its two factors.

    Args:
        q: (B, H, Q, d) queries, fp32/fp16/bf16; Q ≤ 256, d ≤ 256, and Q × d within what the kernels' tiles fit
            in shared memory (``kernels.fit.masked_tiles_fit``; e.g. Q = 100 with d ≤ 32 in fp32, ≤ 128 in bf16).
        k, v: (B, H, L, d) keys and values.
        mask_embed: (B, Q, C) mask embeddings; mask_feats: (B, C, L) mask features. Key l is blocked for query i
            when mask_embed[b, i] · mask_feats[b, :, l] < 0, unless every key is blocked for i (then none is).
            Not differentiated.
        scale: logit scale, positive; default d ** -0.5.
    Returns:
        (B, H, Q, d) in q's dtype, differentiable in q, k and v. Same result as ``masked_attention_reference``.
    """
    if torch.compiler.is_compiling():
        if _wants_grad(q, k, v):
            return _outside_graph(masked_attention, q, k, v, mask_embed, mask_feats, scale=scale)
        return torch.ops.qd.masked_attention(q, k, v, mask_embed, mask_feats, scale)
    return _triton_module("masked_triton", q).masked_attention(q, k, v, mask_embed, mask_feats, scale=scale)


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Triton sampling core of multi-scale deformable attention (Deformable DETR), forward and backward.

    Args:
        value: (B, S, H, dh) per-head values of all levels (row-major per level, concatenated), fp32, fp16 or bf16,
            read as fp32; dh ≤ 256.
        spatial_shapes: (L, 2) integer (h, w) per level; level_start_index: (L,) integer offsets in S; both on
            value's device.
        sampling_locations: (B, Nq, H, L, P, 2) fp32 normalised (x, y); bilinear with zero padding: the corners
            that fall outside the level read zero.
        attention_weights: (B, Nq, H, L, P) fp32.
    Returns:
        (B, Nq, H·dh) fp32, differentiable in value, sampling_locations and attention_weights. Same result as
        ``qd_core.head.msda.ms_deform_attn_core`` (bilinear, zero padding, ``align_corners=False``).
    """
    if torch.compiler.is_compiling():
        if _wants_grad(value, sampling_locations, attention_weights):
            return _outside_graph(ms_deform_attn, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)
        return torch.ops.qd.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights)
    return _triton_module("msda_triton", value, "value").ms_deform_attn(value, spatial_shapes, level_start_index,
                                                               sampling_locations, attention_weights)


def semantic_labels(class_probs: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Triton full-size labels: resize, sigmoid, class product and argmax in one pass, only the labels written.

    Args:
        class_probs: (B, Q, K) class probabilities per query (no no-object column), fp32, fp16 or bf16; K ≤ 256.
        mask_logits: (B, Q, h, w) mask logits, fp32, fp16 or bf16.
        size: (H, W) of the labels; the mask logits are resized bilinearly (``align_corners=False``).
    Returns:
        (B, H, W) int32, as ``semantic_labels_reference`` (except where two classes tie to within rounding).
    """
    if torch.compiler.is_compiling():  # labels: nothing to differentiate
        return torch.ops.qd.semantic_labels(class_probs, mask_logits, [int(size[0]), int(size[1])])
    return _triton_module("labels_triton", mask_logits, "mask_logits").semantic_labels(class_probs, mask_logits,
                                                                                        size)


def depthwise_conv3x3(x: Tensor, weights: list[Tensor], dilations: list[int]) -> list[Tensor]:
    """Triton 3×3 depthwise convolutions of one map at several dilations in one pass over it (inference only).

    Args:
        x: (B, C, H, W) fp32/fp16/bf16, best channels-last (other layouts are copied to it).
        weights: (C, 1, 3, 3) depthwise weights, one per dilation, fp32, fp16 or bf16.
        dilations: positive ints; padding = dilation, stride 1, no bias.
    Returns:
        One (B, C, H, W) channels-last tensor in x's dtype per dilation, as ``depthwise_conv3x3_reference``. Not
        differentiable: raises when called with gradients enabled on inputs that require them.
    """
    if torch.compiler.is_compiling():
        if _wants_grad(x, *weights):  # the eager function refuses the call in one line
            return _outside_graph(depthwise_conv3x3, x, weights, dilations)
        # The operator returns the (K, B, H, W, C) tensor the outputs are views of (an operator's outputs may not
        # share storage); the views are taken here, in the graph.
        return _ops.unstack(torch.ops.qd.depthwise_conv3x3(x, list(weights), [int(d) for d in dilations]))
    return _triton_module("depthwise_triton", x, "x").depthwise_conv3x3(x, weights, dilations)


# Registers the torch.ops.qd operators (torch.compile's path to the kernels); imports no Triton.
from kernels import ops as _ops  # noqa: E402,F401

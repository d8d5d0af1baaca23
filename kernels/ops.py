"""The Triton kernels as PyTorch custom operators (``torch.ops.qd.*``), which is how torch.compile runs them.

Dynamo cannot trace into a kernel call (the launcher hands Triton's compiled binary raw pointers and reads device
properties), so while compiling, each public function of ``kernels`` calls its operator here instead: one opaque
node of the graph, which Inductor calls as an extern kernel between the fused kernels it generates around it, and
which CUDA graphs (``mode="reduce-overhead"``) capture like any other launch. Each operator's fake implementation
gives the output's shape, dtype and strides exactly as the kernel allocates them: Inductor plans the code around
the call from those, and checks them against the real output.

Forward only: no autograd formula is registered. A compiled call that needs gradients runs the kernel eagerly
between two graphs instead (``kernels._outside_graph``, a graph break) with its ``torch.autograd.Function``; the
model itself takes the operators only where no gradient is wanted (``qd_core.attention.backend_for``).

Importing this module registers the operators; it imports neither Triton nor a kernel module (those load on the
first real call, as for the eager functions).
"""
from __future__ import annotations

import torch
from torch import Tensor

import kernels

NAMESPACE = "qd"


@torch.library.custom_op(f"{NAMESPACE}::agent_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, float? scale) -> Tensor")
def agent_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    """q (B, H, N, d); k, v (B or 1, H, M, d) → (B, H, N, d) in q's dtype and memory layout."""
    return kernels._triton_module("agent_triton", q).agent_attention(q, k, v, scale=scale)


@agent_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
    return torch.empty_like(q)  # the kernel's own allocation: q's strides where q is dense


@torch.library.custom_op(f"{NAMESPACE}::masked_attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor mask_embed, Tensor mask_feats, float? scale) "
                                "-> Tensor")
def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor,
                     scale: float | None) -> Tensor:
    """q (B, H, Q, d); k, v (B, H, L, d); mask_embed (B, Q, C); mask_feats (B, C, L) → (B, H, Q, d)."""
    return kernels._triton_module("masked_triton", q).masked_attention(q, k, v, mask_embed, mask_feats, scale=scale)


@masked_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask_embed: Tensor, mask_feats: Tensor, scale: float | None) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op(f"{NAMESPACE}::ms_deform_attn", mutates_args=(),
                         schema="(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
                                "Tensor sampling_locations, Tensor attention_weights) -> Tensor")
def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """value (B, S, H, dh); locations (B, Nq, H, L, P, 2); weights (B, Nq, H, L, P) → (B, Nq, H·dh) fp32."""
    return kernels._triton_module("msda_triton", value, "value").ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@ms_deform_attn.register_fake
def _(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
      attention_weights: Tensor) -> Tensor:
    b, _, h, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], h * d), dtype=torch.float32)


@torch.library.custom_op(f"{NAMESPACE}::semantic_labels", mutates_args=(),
                         schema="(Tensor class_probs, Tensor mask_logits, int[] size) -> Tensor")
def semantic_labels(class_probs: Tensor, mask_logits: Tensor, size: list[int]) -> Tensor:
    """class_probs (B, Q, K); mask_logits (B, Q, h, w) → labels (B, H, W) int32 at size (H, W)."""
    return kernels._triton_module("labels_triton", mask_logits, "mask_logits").semantic_labels(
        class_probs, mask_logits, tuple(size))


@semantic_labels.register_fake
def _(class_probs: Tensor, mask_logits: Tensor, size: list[int]) -> Tensor:
    if len(size) != 2:
        raise ValueError(f"size: expected (H, W), got {list(size)}")
    return mask_logits.new_empty((mask_logits.shape[0], size[0], size[1]), dtype=torch.int32)


@torch.library.custom_op(f"{NAMESPACE}::depthwise_conv3x3", mutates_args=(),
                         schema="(Tensor x, Tensor[] weights, int[] dilations) -> Tensor")
def depthwise_conv3x3(x: Tensor, weights: list[Tensor], dilations: list[int]) -> Tensor:
    """x (B, C, H, W) → the K outputs stacked as one (K, B, H, W, C) tensor in x's dtype (K = len(weights)); the
    caller takes its channels-last (B, C, H, W) views (``unstack``)."""
    return kernels._triton_module("depthwise_triton", x, "x").depthwise_conv3x3_stacked(x, weights, dilations)


@depthwise_conv3x3.register_fake
def _(x: Tensor, weights: list[Tensor], dilations: list[int]) -> Tensor:
    b, c, h, w = x.shape
    return x.new_empty((len(weights), b, h, w, c))


def unstack(out: Tensor) -> list[Tensor]:
    """(K, B, H, W, C) → K × (B, C, H, W) views with channels-last strides (``depthwise_conv3x3``'s outputs)."""
    return [y.permute(0, 3, 1, 2) for y in out.unbind(0)]

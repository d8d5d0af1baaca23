"""MSDeformAttn as TensorRT's built-in ``MultiscaleDeformableAttnPlugin_TRT`` node (``--msda plugin``).

TensorRT's ONNX parser hands any op type it has no importer for to the plugin registry, looked up by op type
with the node attributes ``plugin_version`` and ``plugin_namespace`` (the node's domain is tried as a namespace only
when no creator is found under ``plugin_namespace``; "" finds the built-in one first). The domain used here,
``trt.plugins``, is the one ONNX Runtime's TensorRT execution provider registers the built-in plugins under, and as
a non-default domain it keeps ``onnx.checker`` and shape inference working around the node.

The plugin (TensorRT ``plugin/multiscaleDeformableAttnPlugin``) takes five inputs:

    value               (B, S, H, dh)            float32 or float16
    spatial_shapes      (L, 2)                   int32, (h, w) per level
    level_start_index   (L,)                     int32
    sampling_locations  (B, Nq, H, L, P, 2)      same float type as value, normalised (x, y)
    attention_weights   (B, Nq, H, L, P)         same float type as value

and returns (B, Nq, H, dh) — four dimensions, as its ``getOutputDimensions`` builds them — which the graph
reshapes to the (B, Nq, H·dh) that ``qd_core.head.msda.ms_deform_attn_core`` returns. All float inputs share one
type (``supportsFormatCombination``), so the FP16 graph feeds it float32 throughout.

``MSDeformAttn.forward`` looks ``ms_deform_attn_core`` up in its module at call time; ``plugin_msda`` points that
name at the plugin op for the duration of one export, so the module's own projection and location math is what
gets traced.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

import qd_core.head.msda as msda

PLUGIN_OP = "MultiscaleDeformableAttnPlugin_TRT"
PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"

# Bound once at import: while ``plugin_msda`` is active the module attribute points at ``plugin_core`` itself.
_gather_core = msda.ms_deform_attn_core


class MSDAPluginFunction(torch.autograd.Function):
    """Eager: the gather implementation reshaped to the plugin's output. Exported: one plugin node."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                sampling_locations: Tensor, attention_weights: Tensor, shapes: tuple[tuple[int, int], ...],
                static_sizes: tuple[int, int, int]) -> Tensor:
        """value (B, S, H, dh); spatial_shapes (L, 2) int32; level_start_index (L,) int32;
        sampling_locations (B, Nq, H, L, P, 2); attention_weights (B, Nq, H, L, P); shapes: the (h, w) of
        ``spatial_shapes`` as Python ints (reading the tensor on the host would break the trace);
        static_sizes: (Nq, H, dh) as Python ints → (B, Nq, H, dh)."""
        b, _, heads, head_dim = value.shape
        if torch.onnx.is_in_onnx_export():
            # The exporter replaces this call by ``symbolic``; it only needs a tensor of the right shape, and
            # tracing the real computation into the Function's body trips the exporter's peephole pass.
            return value.new_zeros(b, sampling_locations.shape[1], heads, head_dim)
        out = _gather_core(value, list(shapes), level_start_index.long(), sampling_locations, attention_weights,
                           sampling="gather")
        return out.view(b, -1, heads, head_dim)

    @staticmethod
    def symbolic(g: Any, value: Any, spatial_shapes: Any, level_start_index: Any, sampling_locations: Any,
                 attention_weights: Any, shapes: tuple[tuple[int, int], ...],
                 static_sizes: tuple[int, int, int]) -> Any:
        out = g.op(f"{PLUGIN_DOMAIN}::{PLUGIN_OP}", value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, plugin_version_s=PLUGIN_VERSION, plugin_namespace_s="")
        # A custom op has no ONNX shape function: declaring the output type and shape here is what lets shape
        # inference flow past the node. Batch stays symbolic; Nq, H and dh are static. The traced value types
        # carry no sizes under dynamic axes, so the sizes come in as Python ints.
        num_queries, heads, head_dim = static_sizes
        out.setType(value.type().with_dtype(torch.float32).with_sizes([None, num_queries, heads, head_dim]))
        return out


def plugin_core(value: Tensor, spatial_shapes: Sequence[Sequence[int]] | Tensor,
                level_start_index: Tensor | Sequence[int], sampling_locations: Tensor, attention_weights: Tensor,
                *, sampling: str = "gather") -> Tensor:
    """Drop-in for ``ms_deform_attn_core`` (same arguments and result) that exports as one plugin node.

    value (B, S, H, dh), sampling_locations (B, Nq, H, L, P, 2), attention_weights (B, Nq, H, L, P) →
    (B, Nq, H·dh). ``sampling`` is accepted for signature compatibility; the eager path always gathers.
    """
    if isinstance(spatial_shapes, Tensor):
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
    else:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    # Static sizes as Python ints, so the reshapes below carry constant shapes into the graph and ONNX shape
    # inference sees the plugin inputs as (B, S, H, dh), (B, Nq, H, L, P, 2), (B, Nq, H, L, P) with only B
    # symbolic. At run time the reshapes are no-ops.
    num_keys = sum(h * w for h, w in shapes)
    heads, head_dim = int(value.shape[2]), int(value.shape[3])
    num_queries, _, levels, points = (int(d) for d in sampling_locations.shape[1:5])
    value = value.reshape(-1, num_keys, heads, head_dim)
    sampling_locations = sampling_locations.reshape(-1, num_queries, heads, levels, points, 2)
    attention_weights = attention_weights.reshape(-1, num_queries, heads, levels, points)
    shapes_t = torch.tensor(shapes, dtype=torch.int32, device=value.device)
    starts_t = torch.as_tensor(level_start_index, device=value.device).to(torch.int32)
    out = MSDAPluginFunction.apply(value, shapes_t, starts_t, sampling_locations, attention_weights, shapes,
                                   (num_queries, heads, head_dim))
    return out.reshape(-1, num_queries, heads * head_dim)


@contextlib.contextmanager
def plugin_msda() -> Iterator[None]:
    """Within the block, every ``MSDeformAttn`` samples through ``plugin_core`` (and exports as the plugin)."""
    original = msda.ms_deform_attn_core
    msda.ms_deform_attn_core = plugin_core
    try:
        yield
    finally:
        msda.ms_deform_attn_core = original

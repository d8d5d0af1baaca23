"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) as used by Mask2Former's pixel decoder.

Each query looks at a few points per head and per level around its reference point; the points are read from
the value maps by bilinear interpolation with zero padding outside the map (``grid_sample`` with
``align_corners=False``) and summed with softmax weights.

Three interchangeable implementations of the sampling core:

* ``"grid_sample"``: one ``F.grid_sample`` per level, Mask2Former's pure-PyTorch reference. The module's default;
  where ``qd_core.attention`` picks the Triton kernels (CUDA tensors, ``QD_ATTENTION`` unset or ``triton``) the
  module runs ``"triton"`` instead.
* ``"triton"``: ``kernels.ms_deform_attn``, one Triton kernel forward and one backward, the samples summed in
  registers instead of being materialised.
* ``"gather"``: the same bilinear interpolation written with floor, explicit corner weights and one row gather
  (``index_select``) over the flattened values of all levels. It has no Python-side data-dependent control flow,
  so it traces with a dynamic batch into plain ONNX ops (Gather, Range, Floor, Where …); export uses it
  because TensorRT has miscompiled GridSample decompositions.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from qd_core.attention import backend_for
from qd_core.constants import device_constant

SAMPLING_MODES = ("grid_sample", "gather", "triton")

# Level shapes: a (L, 2) long tensor of (h, w) rows, or a Python sequence of (h, w) int pairs.
SpatialShapes = Tensor | Sequence[Sequence[int]]


def _shapes_as_ints(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        # Reads the tensor on the host: fine in eager mode, a constant when traced (use the list form there).
        return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return [(int(h), int(w)) for h, w in spatial_shapes]


def _shapes_as_tensor(spatial_shapes: SpatialShapes, device: torch.device) -> Tensor:
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(device=device, dtype=torch.long)
    return device_constant(tuple((int(h), int(w)) for h, w in spatial_shapes), torch.long, device)


def _inverse_sizes_xy(spatial_shapes: SpatialShapes, device: torch.device) -> Tensor:
    """(L, 2) float32 (1/w, 1/h) of each level: what pixel offsets are multiplied by to become normalised (x, y).
    The level sizes are powers of two at the usual input sizes, where this equals dividing exactly."""
    if isinstance(spatial_shapes, Tensor):
        return spatial_shapes.to(device).flip(-1).float().reciprocal()
    return device_constant(tuple((1.0 / w, 1.0 / h) for h, w in spatial_shapes), torch.float32, device)


def _starts_as_tensor(level_start_index: Tensor | Sequence[int], device: torch.device) -> Tensor:
    if isinstance(level_start_index, Tensor):
        return level_start_index.to(device=device, dtype=torch.long)
    return device_constant(tuple(int(i) for i in level_start_index), torch.long, device)


def _check_core_inputs(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                       attention_weights: Tensor, sampling: str) -> None:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling={sampling!r}: expected one of {SAMPLING_MODES}")
    if value.dim() != 4:
        raise ValueError(f"value: expected (B, S, H, dh), got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations: expected (B, Nq, H, L, P, 2), got shape "
                         f"{tuple(sampling_locations.shape)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights: expected shape {tuple(sampling_locations.shape[:-1])} "
                         f"(B, Nq, H, L, P), got {tuple(attention_weights.shape)}")
    if sampling_locations.shape[2] != value.shape[2]:
        raise ValueError(f"sampling_locations: expected {value.shape[2]} heads (value's H) in dim 2, got "
                         f"{sampling_locations.shape[2]}")
    num_levels = sampling_locations.shape[3]
    if isinstance(spatial_shapes, Tensor):
        if tuple(spatial_shapes.shape) != (num_levels, 2):
            raise ValueError(f"spatial_shapes: expected a ({num_levels}, 2) tensor of (h, w), got shape "
                             f"{tuple(spatial_shapes.shape)}")
    else:
        shapes = _shapes_as_ints(spatial_shapes)
        if len(shapes) != num_levels:
            raise ValueError(f"spatial_shapes: expected {num_levels} (h, w) pairs, got {len(shapes)}")
        if sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"spatial_shapes: Σ h·w = {sum(h * w for h, w in shapes)} must equal value's S = "
                             f"{value.shape[1]}")


def _core_grid_sample(value: Tensor, spatial_shapes: SpatialShapes, sampling_locations: Tensor,
                      attention_weights: Tensor) -> Tensor:
    _, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = _shapes_as_ints(spatial_shapes)
    per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample's grid is in [-1, 1] with -1/+1 on the outer pixel edges (align_corners=False).
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(-1, head_dim, h, w)  # (B·H, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B·H, Nq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B·H, dh, Nq, L·P)
    weights = attention_weights.transpose(1, 2).reshape(-1, 1, num_queries, num_levels * num_points)
    out = (stacked * weights).sum(-1)  # (B·H, dh, Nq)
    return out.view(-1, num_heads * head_dim, num_queries).transpose(1, 2)


def _core_gather(value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Tensor | Sequence[int],
                 sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    _, num_keys, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = _shapes_as_tensor(spatial_shapes, value.device)
    starts = _starts_as_tensor(level_start_index, value.device).view(num_levels, 1)
    # (L, 1) so they broadcast against the trailing (L, P) dims of the locations.
    heights, widths = shapes[:, 0:1], shapes[:, 1:2]
    h_f, w_f = heights.to(sampling_locations.dtype), widths.to(sampling_locations.dtype)

    # Pixel coordinates with pixel centres at integers: x = loc_x·w − 0.5 (align_corners=False).
    x = sampling_locations[..., 0] * w_f - 0.5
    y = sampling_locations[..., 1] * h_f - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0  # the only path of the gradient w.r.t. the locations
    x0_i, y0_i = x0.long(), y0.long()

    indices, weights = [], []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0_i + dx, y0_i + dy
        # Zero padding: a corner outside its level contributes nothing (its index is redirected to 0).
        inside = (xi >= 0) & (xi < widths) & (yi >= 0) & (yi < heights)
        wx = fx if dx else 1 - fx
        wy = fy if dy else 1 - fy
        weights.append(wx * wy * attention_weights * inside.to(attention_weights.dtype))
        indices.append(torch.where(inside, starts + yi * widths + xi, torch.zeros_like(xi)))
    corner_weights = torch.stack(weights, dim=-1)  # (B, Nq, H, L, P, 4)
    corner_index = torch.stack(indices, dim=-1)

    # Heads to the front: row r of the (B·H·S, dh) value table is key r mod S of (batch, head) slab r div S, so
    # one row gather (ONNX Gather on axis 0) reads every sample. Gathering elements from (B·H, S, dh) slabs
    # instead needs the index expanded over dh: an int64 tensor dh times the size of the samples' own index,
    # which ONNX Runtime materialises (at batch 4 of the tiny config that Expand alone took 10 of its 57 ms).
    samples_per_query = num_levels * num_points * 4
    corner_index = corner_index.permute(0, 2, 1, 3, 4, 5).reshape(-1, num_queries * samples_per_query)
    corner_weights = corner_weights.permute(0, 2, 1, 3, 4, 5).reshape(-1, num_queries, samples_per_query, 1)
    slab_starts = torch.arange(corner_index.shape[0], device=value.device).unsqueeze(1) * num_keys  # (B·H, 1)
    flat_value = value.permute(0, 2, 1, 3).reshape(-1, head_dim)  # (B·H·S, dh)
    picked = flat_value.index_select(0, (corner_index + slab_starts).flatten())
    picked = picked.view(-1, num_queries, samples_per_query, head_dim)
    # Weighted sum over the samples as one small product per query (a multiply + sum would write the products).
    out = torch.matmul(corner_weights.transpose(-1, -2), picked).flatten(2)  # (B·H, Nq, dh)
    return out.view(-1, num_heads, num_queries, head_dim).transpose(1, 2).reshape(-1, num_queries,
                                                                                  num_heads * head_dim)


def ms_deform_attn_core(value: Tensor, spatial_shapes: SpatialShapes, level_start_index: Tensor | Sequence[int],
                        sampling_locations: Tensor, attention_weights: Tensor, *,
                        sampling: str = "grid_sample") -> Tensor:
    """Sample every level at the given locations and sum with the attention weights.

    Args:
        value: (B, S, H, dh) per-head values of all levels, flattened row-major per level and concatenated;
            S = Σ_l h_l·w_l.
        spatial_shapes: (L, 2) long tensor of (h, w) per level, or a Python sequence of (h, w) ints. The list
            form keeps both paths free of host reads; with a tensor the ``grid_sample`` path reads it on the
            host (``.tolist()``), the ``gather`` path never does.
        level_start_index: (L,) long, offset of each level in S (a sequence of ints is accepted too). The
            ``gather`` and ``triton`` paths use it.
        sampling_locations: (B, Nq, H, L, P, 2) normalised (x, y); (0, 0) is the top-left corner and (1, 1)
            the bottom-right corner of the level. Bilinear with zero padding: the corners that fall outside
            the level read zero (a point just outside still reads the border pixels in part).
        attention_weights: (B, Nq, H, L, P), usually softmax-normalised over (L, P).
        sampling: ``"grid_sample"``, ``"gather"`` or ``"triton"``; they agree to float rounding. ``"triton"``
            reads value in its own dtype (as fp32), the others take it as given.
    Returns:
        (B, Nq, H·dh), heads concatenated along channels.
    """
    _check_core_inputs(value, spatial_shapes, sampling_locations, attention_weights, sampling)
    if sampling == "triton":
        return kernels.ms_deform_attn(value, _shapes_as_tensor(spatial_shapes, value.device),
                                      _starts_as_tensor(level_start_index, value.device), sampling_locations,
                                      attention_weights)
    if sampling == "gather":
        return _core_gather(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _core_grid_sample(value, spatial_shapes, sampling_locations, attention_weights)


class MSDeformAttn(nn.Module):
    """Deformable-DETR multi-scale deformable attention (parameter names as in Deformable DETR / Mask2Former).

    Set ``self.sampling`` to ``"gather"`` (export), ``"triton"`` or ``"grid_sample"`` (default) to pick the
    sampling core; the default becomes ``"triton"`` wherever ``qd_core.attention`` picks the Triton kernels.
    The sampling locations, the attention softmax and the sampling itself run in fp32 for any module dtype; the
    result is cast back to the value dtype before ``output_proj``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        for name, v in (("dim", dim), ("num_heads", num_heads), ("num_levels", num_levels),
                        ("num_points", num_points)):
            if v <= 0:
                raise ValueError(f"MSDeformAttn {name}={v}: expected a positive integer")
        if dim % num_heads:
            raise ValueError(f"MSDeformAttn num_heads={num_heads}: expected a divisor of dim={dim}")
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.sampling = "grid_sample"
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: at start every head samples along its own direction, spread by point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (H, 2)
        # Scale so the larger component is 1: head directions land on the square ring of pixel neighbours.
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        point_scale = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).expand(-1, self.num_levels, self.num_points, -1) * point_scale
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor, spatial_shapes: SpatialShapes,
                level_start_index: Tensor | Sequence[int]) -> Tensor:
        """Attend from each query to P points per head and level around its reference point.

        Args:
            query: (B, Nq, C) queries (with positional encoding already added).
            reference_points: (B, Nq, L, 2) normalised (x, y) reference point of each query on each level; pass
                them in fp32 (in bf16 they are already off by up to half a pixel on a 128-wide level).
            value_input: (B, S, C) flattened features of all levels, S = Σ_l h_l·w_l.
            spatial_shapes: (L, 2) long tensor or sequence of (h, w) per level (see ``ms_deform_attn_core``).
            level_start_index: (L,) offset of each level in S.
        Returns:
            (B, Nq, C).
        """
        if query.dim() != 3 or query.shape[-1] != self.dim:
            raise ValueError(f"query: expected (B, Nq, {self.dim}), got shape {tuple(query.shape)}")
        if value_input.dim() != 3 or value_input.shape[-1] != self.dim:
            raise ValueError(f"value_input: expected (B, S, {self.dim}), got shape {tuple(value_input.shape)}")
        if reference_points.dim() != 4 or tuple(reference_points.shape[2:]) != (self.num_levels, 2):
            raise ValueError(f"reference_points: expected (B, Nq, {self.num_levels}, 2), got shape "
                             f"{tuple(reference_points.shape)}")
        b, nq, _ = query.shape
        h, l, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(b, -1, h, self.dim // h)
        # Sampling runs in fp32 whatever the module dtype (as Mask2Former's CUDA op under AMP): a normalised
        # location in bf16/fp16 is off by up to ~1/256 of the map, i.e. pixels on a 128-wide level.
        offsets = self.sampling_offsets(query).view(b, nq, h, l, p, 2).float()
        weights = self.attention_weights(query).view(b, nq, h, l * p).float().softmax(-1).view(b, nq, h, l, p)
        # Offsets are in pixels of each level: scale by that level's (1/w, 1/h) to get normalised (x, y), in one
        # kernel (addcmul: torch.onnx exports it, not addcdiv) with the factors made once per input size.
        inverse = _inverse_sizes_xy(spatial_shapes, query.device)  # (L, 2) as (1/w, 1/h)
        locations = torch.addcmul(reference_points.float()[:, :, None, :, None, :], offsets,
                                  inverse[None, None, None, :, None, :])
        sampling = self.sampling
        if sampling == "grid_sample" and backend_for(value) == "triton":
            sampling = "triton"
        # The kernel reads value in its own dtype (bf16 under autocast: half the gathered bytes), as fp32.
        out = ms_deform_attn_core(value if sampling == "triton" else value.float(), spatial_shapes,
                                  level_start_index, locations, weights, sampling=sampling)
        return self.output_proj(out.to(value.dtype))

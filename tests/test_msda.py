"""Multi-scale deformable attention: the three sampling cores against a loop-by-loop bilinear reference (the Triton
one under its interpreter on CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from qd_core.head.msda import MSDeformAttn, ms_deform_attn_core

SHAPES = [(3, 4), (2, 2)]  # two levels, one non-square
HEADS, POINTS, HEAD_DIM, QUERIES, BATCH = 2, 2, 3, 4, 2
# fp32 results against an fp64 reference: a few dozen multiply-adds of O(1) numbers stay far below 1e-5.
ATOL = RTOL = 1e-5


def naive_msda(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """value (B, S, H, dh), locations (B, Nq, H, L, P, 2), weights (B, Nq, H, L, P) → (B, Nq, H·dh).

    Plain loops and hand-written bilinear interpolation: pixel (column c, row r) has its centre at
    normalised ((c + 0.5)/w, (r + 0.5)/h); corners outside the map read zero.
    """
    b_size, _, n_heads, dh = value.shape
    n_queries = locations.shape[1]
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
    rows = []
    for b in range(b_size):
        per_query = []
        for q in range(n_queries):
            per_head = []
            for hd in range(n_heads):
                acc = value.new_zeros(dh)
                for lvl, (h, w) in enumerate(shapes):
                    for p in range(locations.shape[4]):
                        x = locations[b, q, hd, lvl, p, 0] * w - 0.5
                        y = locations[b, q, hd, lvl, p, 1] * h - 0.5
                        cx, cy = math.floor(x.item()), math.floor(y.item())
                        tx, ty = x - cx, y - cy
                        for col, row, bilinear in ((cx, cy, (1 - tx) * (1 - ty)), (cx + 1, cy, tx * (1 - ty)),
                                                   (cx, cy + 1, (1 - tx) * ty), (cx + 1, cy + 1, tx * ty)):
                            if 0 <= col < w and 0 <= row < h:
                                pixel = value[b, starts[lvl] + row * w + col, hd]
                                acc = acc + weights[b, q, hd, lvl, p] * bilinear * pixel
                per_head.append(acc)
            per_query.append(torch.cat(per_head))
        rows.append(torch.stack(per_query))
    return torch.stack(rows)


def random_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(BATCH, s, HEADS, HEAD_DIM, generator=g)
    # [-0.3, 1.3]: a good share of the points falls partly or wholly outside the map.
    locations = torch.rand(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(BATCH, QUERIES, HEADS, len(SHAPES), POINTS, generator=g)
    return value, locations, weights


def level_index() -> tuple[torch.Tensor, torch.Tensor]:
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.long)
    return shapes, starts


def test_inputs_include_points_outside_the_maps() -> None:
    _, locations, _ = random_inputs()
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert 0 < outside.float().mean() < 1


@pytest.mark.parametrize("sampling", ["grid_sample", "gather", "triton"])
def test_values_match_naive_loops(sampling: str) -> None:
    value, locations, weights = random_inputs()
    shapes, starts = level_index()
    ours = ms_deform_attn_core(value, shapes, starts, locations, weights, sampling=sampling)
    ref = naive_msda(value.double(), SHAPES, locations.double(), weights.double())
    assert ours.shape == (BATCH, QUERIES, HEADS * HEAD_DIM)
    torch.testing.assert_close(ours.double(), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sampling", ["grid_sample", "gather", "triton"])
def test_gradients_match_naive_loops(sampling: str) -> None:
    value, locations, weights = random_inputs(seed=1)
    shapes, starts = level_index()
    upstream = torch.randn(BATCH, QUERIES, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2))

    ours_in = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = ms_deform_attn_core(ours_in[0], shapes, starts, ours_in[1], ours_in[2], sampling=sampling)
    ours_grads = torch.autograd.grad((out * upstream).sum(), ours_in)

    ref_in = [t.double().requires_grad_() for t in (value, locations, weights)]
    ref = naive_msda(ref_in[0], SHAPES, ref_in[1], ref_in[2])
    ref_grads = torch.autograd.grad((ref * upstream.double()).sum(), ref_in)

    for name, mine, theirs in zip(("value", "sampling_locations", "attention_weights"), ours_grads, ref_grads):
        assert theirs.abs().sum() > 0, name
        torch.testing.assert_close(mine.double(), theirs, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def test_gather_equals_grid_sample_with_list_shapes() -> None:
    value, locations, weights = random_inputs(seed=3)
    _, starts = level_index()
    a = ms_deform_attn_core(value, SHAPES, starts, locations, weights, sampling="grid_sample")
    b = ms_deform_attn_core(value, SHAPES, [0, 12], locations, weights, sampling="gather")
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sampling", ["grid_sample", "gather", "triton"])
def test_pixel_centre_reads_that_pixel_and_far_points_read_zero(sampling: str) -> None:
    value = torch.arange(2 * 12 * 1 * 1, dtype=torch.float32).view(2, 12, 1, 1)  # one 3×4 level
    # Column 2, row 1 of a 4-wide, 3-high map, then a point far outside.
    centre = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 3])
    far = torch.tensor([-2.0, 3.0])
    locations = torch.stack([centre, far]).view(1, 2, 1, 1, 1, 2).expand(2, -1, -1, -1, -1, -1)
    weights = torch.ones(2, 2, 1, 1, 1)
    out = ms_deform_attn_core(value, [(3, 4)], [0], locations, weights, sampling=sampling)
    expected = torch.tensor([[[6.0], [0.0]], [[18.0], [0.0]]])
    torch.testing.assert_close(out, expected)


def test_unknown_sampling_mode_is_rejected() -> None:
    value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="sampling"):
        ms_deform_attn_core(value, SHAPES, [0, 12], locations, weights, sampling="bilinear")


def test_shapes_that_do_not_cover_value_are_rejected() -> None:
    value, locations, weights = random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_core(value, [(3, 4), (2, 3)], [0, 12], locations, weights)


def test_module_output_shape() -> None:
    attn = MSDeformAttn(dim=8, num_heads=HEADS, num_levels=2, num_points=POINTS)
    s = sum(h * w for h, w in SHAPES)
    out = attn(torch.randn(BATCH, 5, 8), torch.rand(BATCH, 5, 2, 2), torch.randn(BATCH, s, 8), SHAPES, [0, 12])
    assert out.shape == (BATCH, 5, 8)


def test_module_init_is_uniform_weights_and_head_directions() -> None:
    attn = MSDeformAttn(dim=8, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # Heads at 0°, 90°, 180°, 270° point right, down, left, up; point k (0-based) sits k + 1 pixels away.
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for k in range(3):
        torch.testing.assert_close(bias[:, 0, k], directions * (k + 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[:, 1, k], directions * (k + 1), atol=1e-6, rtol=0)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


@pytest.mark.parametrize("sampling", ["grid_sample", "gather", "triton"])
def test_module_offsets_are_pixels_of_each_level(sampling: str) -> None:
    torch.manual_seed(4)
    attn = MSDeformAttn(dim=6, num_heads=HEADS, num_levels=2, num_points=POINTS)
    attn.sampling = sampling
    for lin in (attn.sampling_offsets, attn.attention_weights):
        torch.nn.init.normal_(lin.weight, std=0.5)
    s = sum(h * w for h, w in SHAPES)
    query, ref, value_in = torch.randn(1, 3, 6), torch.rand(1, 3, 2, 2), torch.randn(1, s, 6)
    out = attn(query, ref, value_in, SHAPES, [0, 12])

    with torch.no_grad():
        offsets = attn.sampling_offsets(query).view(1, 3, HEADS, 2, POINTS, 2)
        pixel = torch.tensor([[1.0 / w, 1.0 / h] for h, w in SHAPES])  # one pixel of level l, as (x, y)
        locations = ref[:, :, None, :, None, :] + offsets * pixel[None, None, None, :, None, :]
        weights = attn.attention_weights(query).view(1, 3, HEADS, 2 * POINTS).softmax(-1)
        value = attn.value_proj(value_in).view(1, s, HEADS, 3)
        expected = attn.output_proj(naive_msda(value.double(), SHAPES, locations.double(),
                                               weights.view(1, 3, HEADS, 2, POINTS).double()).float())
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_gather_core_exports_with_dynamic_batch() -> None:
    attn = MSDeformAttn(dim=6, num_heads=HEADS, num_levels=2, num_points=POINTS).eval()
    attn.sampling = "gather"
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.5)
    s = sum(h * w for h, w in SHAPES)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, query: torch.Tensor, ref: torch.Tensor, value_in: torch.Tensor) -> torch.Tensor:
            return self.attn(query, ref, value_in, SHAPES, [0, 12])

    def inputs(b: int) -> tuple[torch.Tensor, ...]:
        return torch.randn(b, 3, 6), torch.rand(b, 3, 2, 2) * 1.6 - 0.3, torch.randn(b, s, 6)

    batch = torch.export.Dim("batch", min=1, max=16)
    # Any host read of a data-dependent value would fail here (no guard can be built on it).
    program = torch.export.export(Wrapper(), inputs(2), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    for b in (1, 5):
        x = inputs(b)
        torch.testing.assert_close(program.module()(*x), Wrapper()(*x), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("sampling", ["grid_sample", "gather", "triton"])
def test_bfloat16_module_samples_at_fp32_locations(sampling: str) -> None:
    torch.manual_seed(5)
    shapes = [(1, 128), (2, 64)]  # wide levels: a bf16 location would be off by up to half a pixel
    s = sum(h * w for h, w in shapes)
    attn = MSDeformAttn(dim=16, num_heads=HEADS, num_levels=2, num_points=POINTS)
    attn.sampling = sampling
    torch.nn.init.normal_(attn.sampling_offsets.weight)
    query, value_in = torch.randn(1, 50, 16), torch.randn(1, s, 16)
    ref = torch.rand(1, 50, 2, 2) * 0.2 + 0.75  # fp32, as the pixel decoder passes them
    expected = attn(query, ref, value_in, shapes, [0, 128])
    attn.to(torch.bfloat16)
    out = attn(query.bfloat16(), ref, value_in.bfloat16(), shapes, [0, 128])
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: rounding of inputs and weights over 16-channel sums stays below 5e-2.
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=0)

"""fp32 ONNX export: parity with PyTorch in ONNX Runtime, graph structure of both MSDA modes, blocked queries.

Tolerances: fp32 everywhere, so logits may differ only by kernel summation order. The semantic logits are sums
of Nq products of probabilities and sigmoids (values in [0, Nq]); 1e-4 absolute is ~1000× the observed float32
rounding and far below any real discrepancy (a wrong mask or sampling point moves logits by 1e-2 or more).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from export.msda_plugin import PLUGIN_DOMAIN, PLUGIN_OP, plugin_core
from export.fp16 import convert_to_fp16
from export.onnx import check_plugin_graph, export_onnx, op_counts, plugin_nodes, plugin_signatures
from export.runtime import OrtSegmenter
from qd_core import build_student, load_config
from qd_core.data.scenes import draw_scene
from qd_core.head.msda import MSDeformAttn, ms_deform_attn_core

SIZE = 128  # the tiny config's inference window
LOGIT_TOL = 1e-4
MIN_AGREEMENT = 0.9999


def scene_batch(batch: int, seed: int) -> torch.Tensor:
    """(batch, 3, SIZE, SIZE) float RGB in [0, 255]: street scenes, not noise, so masks have structure."""
    images = [draw_scene(SIZE, SIZE, np.random.default_rng([seed, i]))[0] for i in range(batch)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()


def reference(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's own API, independent of the export wrapper: stride-4 logits and whole-image labels."""
    with torch.no_grad():
        x = model.normalize(images)
        return model.semantic_logits(x), model.predict(x, mode="whole")


@pytest.fixture(scope="module")
def student() -> nn.Module:
    torch.manual_seed(0)
    return build_student(load_config("tiny")).eval()


@pytest.fixture(scope="module")
def gather_onnx(student, tmp_path_factory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("gather") / "model.onnx"
    export_onnx(student, path, height=SIZE, width=SIZE, opset=18, msda="gather")
    return path


@pytest.fixture(scope="module")
def gather_session(gather_onnx) -> OrtSegmenter:
    return OrtSegmenter(gather_onnx, device="cpu")


@pytest.fixture(scope="module")
def plugin_onnx(student, tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "model_plugin.onnx"
    export_onnx(student, path, height=SIZE, width=SIZE, opset=17, msda="plugin")
    return path


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_onnx_matches_pytorch_from_one_file(student, gather_session, batch):
    images = scene_batch(batch, seed=batch)
    ref_logits, ref_labels = reference(student, images)
    logits, labels = gather_session.run(images)
    assert logits.shape == (batch, 19, SIZE // 4, SIZE // 4)
    assert labels.shape == (batch, SIZE, SIZE) and labels.dtype == torch.int32
    assert float((logits - ref_logits).abs().max()) <= LOGIT_TOL
    assert float((labels.long() == ref_labels).float().mean()) >= MIN_AGREEMENT


def test_onnx_file_is_self_contained_with_a_dynamic_batch_axis(gather_onnx):
    model = onnx.load(str(gather_onnx), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert not gather_onnx.with_name(gather_onnx.name + ".data").exists()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


def test_gather_graph_samples_without_grid_sample(student, gather_onnx):
    counts = op_counts(onnx.load(str(gather_onnx)))
    layers = sum(isinstance(m, MSDeformAttn) for m in student.modules())
    assert counts["GridSample"] == 0 and counts["GatherElements"] == 0
    # One float row Gather (axis 0) per deformable-attention layer is the bilinear sampling, proving the gather path
    # (the layer's other Gathers read shapes or pick x and y off the locations' last axis).
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(gather_onnx))).graph
    floats = {v.name for v in [*inferred.value_info, *inferred.input]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    row_gathers = [n for n in inferred.node if n.op_type == "Gather" and "/encoder/layers." in n.name
                   and n.input[0] in floats and next((a.i for a in n.attribute if a.name == "axis"), 0) == 0]
    assert len(row_gathers) == layers
    assert not plugin_nodes(onnx.load(str(gather_onnx)))


def _shape(info: dict[str, onnx.ValueInfoProto], inits: dict[str, onnx.TensorProto], name: str):
    if name in inits:
        return inits[name].data_type, list(inits[name].dims)
    t = info[name].type.tensor_type
    return t.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node outputs by name."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            out[node.output[0]] = node.attribute[0].t
    return out


def test_plugin_graph_has_one_documented_plugin_node_per_msda_layer(student, plugin_onnx):
    model = onnx.load(str(plugin_onnx))
    onnx.checker.check_model(model)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    inits = {t.name: t for t in inferred.graph.initializer}
    constants = _constants(inferred)
    nodes = plugin_nodes(inferred)
    msda = [m for m in student.modules() if isinstance(m, MSDeformAttn)]
    assert len(nodes) == len(msda) == 2
    heads, dh, levels, points = msda[0].num_heads, msda[0].dim // msda[0].num_heads, 3, msda[0].num_points
    level_shapes = [[SIZE // 32] * 2, [SIZE // 16] * 2, [SIZE // 8] * 2]
    keys = sum(h * w for h, w in level_shapes)
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    for node in nodes:
        assert node.domain == PLUGIN_DOMAIN and node.op_type == PLUGIN_OP
        attrs = {a.name: a.s.decode() for a in node.attribute}
        assert attrs == {"plugin_version": "1", "plugin_namespace": ""}
        value, shapes, starts, locations, weights = (_shape(info, inits, n) for n in node.input)
        assert value == (f32, [None, keys, heads, dh])
        assert shapes == (i32, [levels, 2])
        assert starts == (i32, [levels])
        assert locations == (f32, [None, keys, heads, levels, points, 2])
        assert weights == (f32, [None, keys, heads, levels, points])
        assert _shape(info, inits, node.output[0]) == (f32, [None, keys, heads, dh])
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(constants[node.input[1]]), level_shapes)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(constants[node.input[2]]), [0, 16, 80])
    counts = op_counts(model)
    assert counts["GridSample"] == 0 and counts["GatherElements"] == 0


def test_plugin_graph_check_names_a_missing_plugin_node(student, plugin_onnx):
    model = onnx.load(str(plugin_onnx))
    assert len(check_plugin_graph(model, student)) == 2
    plugin_nodes(model)[0].op_type = "Identity"
    with pytest.raises(ValueError, match="has 1 MultiscaleDeformableAttnPlugin_TRT nodes, expected one per"):
        check_plugin_graph(model, student)


def test_fp16_plugin_graph_feeds_the_plugin_float32_only(plugin_onnx):
    # The plugin requires one float type for value, locations and weights; the plan keeps all three fp32.
    converted = convert_to_fp16(onnx.load(str(plugin_onnx)))
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    for signature in plugin_signatures(converted):
        assert [t for t, _ in signature] == [f32, i32, i32, f32, f32, f32]


def test_plugin_core_computes_the_same_sampling_as_the_gather_core():
    torch.manual_seed(1)
    shapes = [(4, 4), (2, 3)]
    value = torch.randn(2, 22, 2, 8)
    locations = torch.rand(2, 5, 2, 2, 3, 2) * 1.2 - 0.1  # some points fall outside the maps
    weights = torch.rand(2, 5, 2, 2, 3)
    starts = torch.tensor([0, 16])
    expected = ms_deform_attn_core(value, shapes, starts, locations, weights, sampling="grid_sample")
    got = plugin_core(value, shapes, starts, locations, weights)
    assert got.shape == expected.shape == (2, 5, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def trt_msda_plugin_reference(value: np.ndarray, shapes: np.ndarray, starts: np.ndarray, locations: np.ndarray,
                              weights: np.ndarray) -> np.ndarray:
    """What TensorRT's MultiscaleDeformableAttnPlugin_TRT computes, written from its CUDA kernel in float64 numpy:
    per level, sampling point (x, y) ∈ [0, 1]² → pixel (x·W − 0.5, y·H − 0.5), bilinear with zero padding outside
    the map, weighted sum over levels and points. value (B, S, M, D), locations (B, Q, M, L, P, 2),
    weights (B, Q, M, L, P) → (B, Q, M, D) in value's dtype."""
    b, _, m, d = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    v = value.astype(np.float64)
    out = np.zeros((b, q, m, d))
    bi, mi = np.arange(b)[:, None, None, None], np.arange(m)[None, None, :, None]
    for level in range(levels):
        h, w, start = int(shapes[level, 0]), int(shapes[level, 1]), int(starts[level])
        maps = v[:, start:start + h * w].reshape(b, h, w, m, d)
        y = locations[:, :, :, level, :, 1].astype(np.float64) * h - 0.5  # (B, Q, M, P)
        x = locations[:, :, :, level, :, 0].astype(np.float64) * w - 0.5
        inside = (y > -1) & (x > -1) & (y < h) & (x < w)
        y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
        fy, fx = y - y0, x - x0
        sampled = np.zeros((b, q, m, points, d))
        for dy, dx, corner in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)),
                               (1, 1, fy * fx)):
            yy, xx = y0 + dy, x0 + dx
            valid = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            pixels = maps[bi, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1), mi]  # (B, Q, M, P, D)
            sampled += pixels * (corner * valid)[..., None]
        out += (sampled * weights[:, :, :, level, :, None].astype(np.float64)).sum(axis=3)
    return out.astype(value.dtype)


@pytest.mark.parametrize("fp16", [False, True])
def test_plugin_graph_computes_what_the_pytorch_student_does(student, plugin_onnx, fp16):
    """No GPU and no TensorRT here: the plugin graph (fp32, and as converted for the FP16 engine) runs in ONNX's
    reference evaluator with the plugin node given TensorRT's kernel semantics. Each plugin node's output must be
    the PyTorch student's deformable attention on the same images (a random-weight student's logits hardly
    depend on it, so the attention itself is compared), and the logits and labels the student's."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    import qd_core.head.msda as msda_module

    class MultiscaleDeformableAttnPlugin_TRT(OpRun):
        op_domain = PLUGIN_DOMAIN

        def _run(self, value, shapes, starts, locations, weights, plugin_version=None, plugin_namespace=None):
            # The plugin's contract: int32 shapes and starts, one float type for the three float inputs.
            assert shapes.dtype == starts.dtype == np.int32
            assert value.dtype == locations.dtype == weights.dtype, (value.dtype, locations.dtype, weights.dtype)
            return (trt_msda_plugin_reference(value, shapes, starts, locations, weights),)

    assert MultiscaleDeformableAttnPlugin_TRT.__name__ == PLUGIN_OP
    model = onnx.load(str(plugin_onnx))
    if fp16:
        model = convert_to_fp16(model)
    images = scene_batch(2, seed=5)
    attended: list[torch.Tensor] = []
    core = msda_module.ms_deform_attn_core

    def recording_core(*args, **kwargs):
        attended.append(core(*args, **kwargs))
        return attended[-1]

    msda_module.ms_deform_attn_core = recording_core
    try:
        with torch.no_grad():
            ref_logits = student.semantic_logits(student.normalize(images))
    finally:
        msda_module.ms_deform_attn_core = core
    ref_labels = reference(student, images)[1]
    evaluator = ReferenceEvaluator(model, new_ops=[MultiscaleDeformableAttnPlugin_TRT])
    results = evaluator.run(None, {"images": images.numpy()}, intermediate=True)
    nodes = plugin_nodes(model)
    assert len(nodes) == len(attended) == 2
    for node, expected in zip(nodes, attended):
        got = torch.from_numpy(results[node.output[0]]).float().reshape(expected.shape)
        error = float((got - expected).norm() / expected.norm())
        # fp32: summation order only; fp16: the plugin's inputs come from fp16 layers (11-bit mantissas).
        assert error < (1e-2 if fp16 else 1e-5), (node.name, error)
    tol = 5e-3 if fp16 else LOGIT_TOL  # ONNX Runtime's fp16 gather graph is off by ~6e-4 on these images
    torch.testing.assert_close(torch.from_numpy(results["logits"]).float(), ref_logits, atol=tol, rtol=0)
    assert (torch.from_numpy(results["labels"]).long() == ref_labels).double().mean() >= MIN_AGREEMENT


def test_plugin_graph_is_refused_by_onnx_runtime_with_a_clear_message(plugin_onnx):
    with pytest.raises(ValueError, match="run only in TensorRT"):
        OrtSegmenter(plugin_onnx, device="cpu")


class QueryOffset(nn.Module):
    """Adds a fixed (Nq, d) offset to the mask embeddings: forces chosen queries' masks."""

    def __init__(self, offset: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("offset", offset)

    def forward(self, embed: torch.Tensor) -> torch.Tensor:
        return embed + self.offset


def test_fully_blocked_query_is_unblocked_inside_the_graph(tmp_path):
    torch.manual_seed(2)
    model = build_student(load_config("tiny")).eval()
    nq, d = model.cfg.model.head.num_queries, model.cfg.model.head.dim
    blocked_query = 3
    with torch.no_grad():
        # The refined mask features end in ReLU(BN(·)); zero gain and unit bias make channel 0 exactly 1
        # everywhere, so a mask embedding of −1e4 on channel 0 gives that query negative logits at every key.
        norm = model.refine.fusions[0].norm
        norm.weight[0], norm.bias[0] = 0.0, 1.0
    offset = torch.zeros(nq, d)
    offset[blocked_query, 0] = -1e4
    offset[blocked_query + 1, 0] = 1e4  # and one query open everywhere, whatever the random weights give the rest
    model.decoder.mask_embed = nn.Sequential(model.decoder.mask_embed, QueryOffset(offset))
    images = scene_batch(2, seed=7)
    with torch.no_grad():
        out = model(model.normalize(images))
    # The case is really forced: query 3 is blocked everywhere, the others are not.
    for masks in out.mask_logits:
        assert bool((masks[:, blocked_query] < 0).all())
        others = torch.cat([masks[:, :blocked_query], masks[:, blocked_query + 1:]], dim=1)
        assert bool((others >= 0).any())
    ref_logits, ref_labels = reference(model, images)
    assert bool(torch.isfinite(ref_logits).all())

    path = tmp_path / "blocked.onnx"
    export_onnx(model, path, height=SIZE, width=SIZE)
    logits, labels = OrtSegmenter(path, device="cpu").run(images)
    assert bool(torch.isfinite(logits).all())
    assert float((logits - ref_logits).abs().max()) <= LOGIT_TOL
    assert float((labels.long() == ref_labels).float().mean()) >= MIN_AGREEMENT


def test_the_engine_builder_names_a_plugin_version_tensorrt_lacks(plugin_onnx, gather_onnx):
    """What a failed parse reports instead of the parser's own message for a missing creator (an assertion in its
    log)."""
    from export.tensorrt import _graph_plugins, missing_plugin_versions

    wanted = _graph_plugins(plugin_onnx)
    assert wanted == {(PLUGIN_OP, "1")} and _graph_plugins(gather_onnx) == set()
    assert missing_plugin_versions([(PLUGIN_OP, "1"), (PLUGIN_OP, "2"), ("Other", "1")], wanted) is None
    assert missing_plugin_versions(None, wanted) is None  # a registry that cannot be listed: the parser decides
    assert missing_plugin_versions([("Other", "1")], set()) is None
    problem = missing_plugin_versions([(PLUGIN_OP, "2")], wanted)
    assert problem == (f"this TensorRT has no {PLUGIN_OP} version 1 (it has: 2); export with --msda gather "
                       f"instead")

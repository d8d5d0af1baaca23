"""Export rules checked piece by piece, where a square, randomly initialised tiny student would hide them.

* The parity rule of ``export.parity`` (its module docstring): |ΔmIoU| within the precision's points, the logit
  relative error within its tolerance, each precision judged by its own numbers, "within" including the bound.
* The numbers ``export.report.evaluate_parity`` reports, on stand-in segmenters whose outputs are known exactly,
  against the definitions of the report's docstring written out here in float64.
* The FP16 pass's precision plan on hand-made graphs (``export.fp16`` docstring).
* ONNX Runtime providers and image conversion of ``export.runtime``.
* A non-square export (every other test exports 128×128, where H and W can be swapped unseen) and the CLI's
  ``--engine`` (implies ``--fp16``) run with parity on the CPU.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from test_export_fp16 import FLOAT, FLOAT16, float_io


# ---------------------------------------------------------------------------------------------------------------
# export.parity: the documented rule
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, points, logit_tol", [("fp32", 0.1, 1e-4), ("fp16", 0.5, 0.05),
                                                          ("bf16", 0.5, 0.1)])
def test_parity_rule_holds_up_to_and_including_each_bound(precision, points, logit_tol):
    from export.parity import parity_problems

    for delta in (points, -points, 0.0):
        assert parity_problems(precision, logit_tol, delta) == [], (precision, delta)
    assert parity_problems(precision, None, points) == []
    assert len(parity_problems(precision, logit_tol * 1.01, 0.0)) == 1
    for delta in (points * 1.01, -points * 1.01):
        assert len(parity_problems(precision, 0.0, delta)) == 1


def test_an_fp32_artifact_is_held_to_the_fp32_tolerances_not_the_fp16_ones():
    from export.parity import parity_problems

    # A 0.3-point drop and a 5e-4 logit error are inside fp16's bounds but outside fp32's (0.1 points, 1e-4).
    assert parity_problems("fp16", 5e-4, -0.3) == []
    mious = parity_problems("fp32", 0.0, -0.3)
    assert len(mious) == 1 and "mIoU" in mious[0]
    logits = parity_problems("fp32", 5e-4, 0.0)
    assert len(logits) == 1 and "logit" in logits[0]


# ---------------------------------------------------------------------------------------------------------------
# export.report.evaluate_parity: the reported numbers
# ---------------------------------------------------------------------------------------------------------------

N_IMAGES, SIDE, K = 5, 8, 2


def _ground_truth() -> torch.Tensor:
    label = torch.zeros(SIDE, SIDE, dtype=torch.int64)
    label[:, SIDE // 2:] = 1  # left half class 0, right half class 1
    return label


class _StandIn:
    """A segmenter whose outputs are a function of the image index (every pixel of image i holds i)."""

    def __init__(self, logits_fn, labels_fn):
        self.logits_fn, self.labels_fn = logits_fn, labels_fn

    def run(self, images):
        idx = [int(im[0, 0, 0]) for im in images]
        return (torch.stack([self.logits_fn(i) for i in idx]), torch.stack([self.labels_fn(i) for i in idx]))


def _ref_logits(i: int) -> torch.Tensor:
    # Different norms per image, so a norm taken over one batch differs from the one over all images.
    g = torch.Generator().manual_seed(i)
    return (1.0 + i) * torch.rand(K, SIDE // 4, SIDE // 4, generator=g, dtype=torch.float64).float()


def _err(i: int) -> torch.Tensor:
    e = torch.zeros(K, SIDE // 4, SIDE // 4)
    e[0, 0, 0] = 0.01 * (i + 1)
    if i == 3:
        e[1, 1, 1] = -0.5  # the one large error: max |Δ| ≠ mean |Δ|
    return e


def _artifact_labels(i: int) -> torch.Tensor:
    label = _ground_truth()
    if i == 3:
        label[:2, :4] = 1  # 8 class-0 pixels predicted as class 1
    return label


def test_evaluate_parity_reports_the_documented_numbers():
    from export.report import EvalSample, evaluate_parity

    samples = [EvalSample(torch.full((3, SIDE, SIDE), float(i)), _ground_truth(), "source", f"{i}.png")
               for i in range(N_IMAGES)]
    reference = _StandIn(_ref_logits, lambda i: _ground_truth())
    artifact = _StandIn(lambda i: _ref_logits(i) + _err(i), _artifact_labels)
    result = evaluate_parity(reference, {"x": artifact}, samples, batch_size=2, num_classes=K)  # batches 2, 2, 1
    got = result["artifacts"]["x"]

    ref = torch.stack([_ref_logits(i) for i in range(N_IMAGES)]).double()
    err = torch.stack([(_ref_logits(i) + _err(i)).double() - _ref_logits(i).double() for i in range(N_IMAGES)])
    # ‖L − L_ref‖ / ‖L_ref‖ over all images; max |L − L_ref|.
    assert got["logit_rel_error"] == pytest.approx(float(err.norm() / ref.norm()), rel=1e-6)
    assert got["max_abs_logit_error"] == pytest.approx(float(err.abs().max()), rel=1e-6)
    # Fraction of full-size pixels whose label equals the reference's.
    pixels = N_IMAGES * SIDE * SIDE
    assert got["argmax_agreement"] == pytest.approx((pixels - 8) / pixels)
    # mIoU in percent against the ground truth; the reference is perfect. IoU(0) = 152/160, IoU(1) = 160/168.
    per_class = N_IMAGES * SIDE * SIDE // 2
    miou = 100 * ((per_class - 8) / per_class + per_class / (per_class + 8)) / 2
    assert result["reference"]["miou"] == pytest.approx(100.0)
    assert got["miou"] == pytest.approx(miou)
    assert got["miou_delta"] == pytest.approx(miou - 100.0)  # artifact − reference: a drop is negative
    assert got["miou_delta"] < 0


def test_evaluation_images_are_centre_cropped_to_the_export_size():
    from export.report import fit_and_crop

    # Already covering 4×4 at scale 1 (no resize): a 4×8 image loses two columns on each side.
    columns = np.tile(np.arange(8, dtype=np.uint8), (4, 1))
    image = np.repeat(columns[:, :, None], 3, axis=2)
    cropped, label = fit_and_crop(image, columns.astype(np.int64), 4, 4)
    np.testing.assert_array_equal(label, np.tile(np.arange(2, 6), (4, 1)))
    np.testing.assert_array_equal(cropped[..., 0], label)


# ---------------------------------------------------------------------------------------------------------------
# export.fp16: the precision plan on hand-made graphs
# ---------------------------------------------------------------------------------------------------------------


# The module docstring: normalisations and softmaxes (mean/variance, exp-sums) stay fp32.
STAY_FP32 = [
    ("ReduceMean", {"keepdims": 1}), ("ReduceSumSquare", {"keepdims": 1}), ("ReduceL2", {"keepdims": 1}),
    ("ReduceLogSumExp", {"keepdims": 1}), ("Softmax", {"axis": -1}), ("LogSoftmax", {"axis": -1}),
]


def test_fp16_pass_keeps_reductions_and_softmaxes_in_fp32_and_casts_to_float16_inside_fp16_regions():
    from export.fp16 import convert_to_fp16, tensor_types

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/net/MatMul"),
             helper.make_node("Cast", ["h"], ["hc"], name="/net/Cast", to=FLOAT),
             helper.make_node("MatMul", ["hc", "w2"], ["g"], name="/net/MatMul_1")]
    outputs = []
    for op, attrs in STAY_FP32:
        nodes.append(helper.make_node(op, ["g"], [f"{op}_out"], name=f"/net/{op}", **attrs))
        outputs.append(helper.make_tensor_value_info(f"{op}_out", FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 8])], outputs, [w, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    converted = convert_to_fp16(model, keep_scopes=[])
    types = tensor_types(converted)
    by_name = {n.name: n for n in converted.graph.node}
    assert types["h"] == FLOAT16 and types["g"] == FLOAT16  # the MatMuls run in fp16
    # An fp32 cast inside an fp16 region becomes a cast to float16 (no fp32 island between the MatMuls).
    assert next(a.i for a in by_name["/net/Cast"].attribute if a.name == "to") == FLOAT16
    for op, _ in STAY_FP32:
        assert set(float_io(by_name[f"/net/{op}"], types)) == {FLOAT}, op


def test_fp16_pass_feeds_a_custom_op_float32_even_from_an_fp16_producer():
    """The docstring: a custom-domain node (the MSDA plugin) stays fp32 and its float inputs share one type; here
    its input comes straight from an fp16 MatMul, with no fp32 scope in between."""
    from export.fp16 import convert_to_fp16, tensor_types

    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/net/MatMul"),
             helper.make_node("Plugin", ["h", "x"], ["y"], name="/net/Plugin", domain="test.custom")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 8])], [w])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("test.custom", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    converted = convert_to_fp16(model, keep_scopes=[])
    types = tensor_types(converted)
    assert types["h"] == FLOAT16
    plugin = next(n for n in converted.graph.node if n.op_type == "Plugin")
    assert [types[i] for i in plugin.input] == [FLOAT, FLOAT]


def test_fp16_pass_fills_an_image_dependent_constant_of_shape_in_float16():
    """ConstantOfShape follows its node (the docstring): fed by a graph input, it is part of the fp16 region, its
    fill value becomes float16 and the graph still computes the fp32 numbers to fp16 rounding."""
    import onnxruntime as ort

    from export.fp16 import convert_to_fp16, tensor_types

    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/net/MatMul"),
             helper.make_node("ConstantOfShape", ["n"], ["c"], name="/net/Fill",
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("Add", ["h", "c"], ["y"], name="/net/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 8]),
                                           helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", FLOAT, [2, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    converted = convert_to_fp16(model, keep_scopes=[])
    types = tensor_types(converted)
    assert types["c"] == FLOAT16 and types["h"] == FLOAT16
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32), "n": np.array([2, 8])}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    np.testing.assert_allclose(run(converted), run(model), rtol=1e-2, atol=2e-2)


def test_fp16_pass_saturates_large_finite_constants_and_keeps_infinities():
    """A finite constant beyond fp16's range becomes ±65504, never ±inf (the docstring): with a plain cast, the
    weight 1e5 times x = 1e-3 would give inf instead of 65.5, and the fill -1e6 plus 1 would give -inf. An
    intended -inf (a mask fill) stays -inf."""
    import onnxruntime as ort

    from export.fp16 import as_fp16, convert_to_fp16, tensor_types

    scale = numpy_helper.from_array(np.array([1e5, -3e5, 2.0, -np.inf], np.float32), "scale")
    nodes = [helper.make_node("Mul", ["x", "scale"], ["y"], name="/net/Mul"),
             helper.make_node("ConstantOfShape", ["n"], ["c"], name="/net/Fill",
                              value=numpy_helper.from_array(np.array([-1e6], np.float32))),
             helper.make_node("Add", ["x", "c"], ["z"], name="/net/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [4]),
                                           helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", FLOAT, [4]),
                               helper.make_tensor_value_info("z", FLOAT, [4])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    converted = convert_to_fp16(model, keep_scopes=[])
    types = tensor_types(converted)
    mul = next(n for n in converted.graph.node if n.name == "/net/Mul")
    assert types[mul.output[0]] == FLOAT16 and types["c"] == FLOAT16  # both in the fp16 region
    feeds = {"x": np.array([1e-3, 1e-3, 1.0, 1.0], np.float32), "n": np.array([4])}
    y, z = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    # 65504 · 1e-3 to fp16 rounding (ONNX Runtime's CPU provider may multiply fp16 values in fp32).
    np.testing.assert_allclose(y, [65.504, -65.504, 2.0, -np.inf], rtol=1e-3)
    np.testing.assert_allclose(z, -65504.0 + feeds["x"], rtol=1e-4)  # finite: the saturated fill plus x
    assert np.isnan(as_fp16(np.array([np.nan], np.float32)))[0]
    np.testing.assert_array_equal(as_fp16(np.array([np.inf, 7e4, -7e4, 1.5], np.float32)),
                                  np.array([np.inf, 65504, -65504, 1.5], np.float16))


# ---------------------------------------------------------------------------------------------------------------
# export.runtime
# ---------------------------------------------------------------------------------------------------------------


def test_auto_device_prefers_cuda_when_onnx_runtime_has_it(monkeypatch):
    import onnxruntime as ort

    from export.runtime import ort_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert ort_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ort_providers("auto") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float64, torch.float16])
def test_image_tensors_of_any_real_dtype_become_float32(dtype):
    from export.runtime import as_image_tensor

    images = torch.arange(3 * 4 * 4).reshape(1, 3, 4, 4).to(dtype)
    x = as_image_tensor(images)
    assert x.dtype == torch.float32
    assert torch.equal(x, torch.arange(3 * 4 * 4, dtype=torch.float32).reshape(1, 3, 4, 4))


# ---------------------------------------------------------------------------------------------------------------
# A non-square export, and the CLI's --engine run with parity (tiny student, CPU)
# ---------------------------------------------------------------------------------------------------------------

HEIGHT, WIDTH = 64, 96  # not square: a swapped H and W cannot hide


@pytest.fixture(scope="module")
def student():
    from qd_core import build_student, load_config

    torch.manual_seed(0)
    return build_student(load_config("tiny")).eval()


def test_non_square_export_keeps_height_and_width_apart(student, tmp_path):
    from export.onnx import export_onnx, read_metadata
    from export.runtime import OrtSegmenter
    from qd_core.data.scenes import draw_scene

    path = tmp_path / "wide.onnx"
    export_onnx(student, path, height=HEIGHT, width=WIDTH, opset=17)
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert read_metadata(model)["opset"] == 17

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    assert [i.name for i in model.graph.input] == ["images"]
    assert dims(model.graph.input[0]) == ["batch", 3, HEIGHT, WIDTH]
    # Both outputs carry the dynamic batch axis; every other axis is declared with its fixed size.
    outputs = {o.name: dims(o) for o in model.graph.output}
    assert outputs == {"logits": ["batch", 19, HEIGHT // 4, WIDTH // 4], "labels": ["batch", HEIGHT, WIDTH]}

    seg = OrtSegmenter(path, device="cpu")
    assert seg.input_size == (HEIGHT, WIDTH)
    images = np.stack([draw_scene(HEIGHT, WIDTH, np.random.default_rng([9, i]))[0] for i in range(3)])
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    logits, labels = seg.run(images)
    with torch.no_grad():  # the student's own API, independent of the export wrapper
        x = student.normalize(images)
        ref_logits, ref_labels = student.semantic_logits(x), student.predict(x, mode="whole")
    assert logits.shape == (3, 19, HEIGHT // 4, WIDTH // 4) and labels.shape == (3, HEIGHT, WIDTH)
    assert float((logits - ref_logits).abs().max()) <= 1e-4
    assert float((labels.long() == ref_labels).float().mean()) >= 0.9999


def test_engine_flag_implies_fp16_and_parity_runs_on_the_asked_device(tmp_path, monkeypatch):
    import re

    from export import cli
    from export.fp16 import tensor_types
    from export.runtime import OrtSegmenter
    from qd_core.data.synthetic import ensure_synthetic

    devices: list[str] = []
    init = OrtSegmenter.__init__

    def recording_init(self, path, *args, **kwargs):
        devices.append(kwargs.get("device", "auto"))
        init(self, path, *args, **kwargs)

    monkeypatch.setattr(OrtSegmenter, "__init__", recording_init)
    data = ensure_synthetic(tmp_path / "synthetic", num_train=1, num_val=1, size=(64, 128), progress=False)
    out = tmp_path / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["--random-init", "--config", "tiny", "--height", "64", "--width", "64", "--engine",
                         "--max-images", "1", "--data", str(data), "--device", "cpu", "--out", str(out)])
    assert code == 0, stdout.getvalue()
    report = json.loads((out / "report.json").read_text())
    names = [a["name"] for a in report["artifacts"]]
    assert names[:2] == ["onnx_fp32", "onnx_fp16"] and (out / "model_fp16.onnx").is_file()
    assert devices == ["cpu", "cpu"]  # --device cpu: ONNX Runtime on the CPU even where CUDA exists
    fp16_parity = report["artifacts"][1]["parity"]
    assert fp16_parity["tolerance"]["precision"] == "fp16" and fp16_parity["passed"] is True

    model = onnx.load(str(out / "model_fp16.onnx"))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18  # the default
    types = tensor_types(model)
    # The wrapper's own nodes (normalisation, class × mask sum, upsampling, argmax) stay fp32 ...
    own = [n for n in model.graph.node if re.fullmatch(r"/[^/]+", n.name)
           and any(types.get(o) in (FLOAT, FLOAT16) for o in n.output)]
    assert {n.op_type for n in own} >= {"Sub", "Div", "Softmax", "Einsum", "Resize", "Sigmoid"}
    for node in own:
        assert set(float_io(node, types)) == {FLOAT}, node.name
    # ... while deformable attention's value and output projections are fp16 (only its sampling stays fp32).
    projections = [n for n in model.graph.node if n.op_type == "MatMul"
                   and re.search(r"/attn/(value_proj|output_proj)/", n.name)]
    assert projections and all(set(float_io(n, types)) == {FLOAT16} for n in projections)

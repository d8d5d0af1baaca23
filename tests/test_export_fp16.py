"""The full ``python -m export --fp16`` pipeline on a tiny student checkpoint: FP16 parity and precision plan.

The student is the tiny config at its random initialisation, saved as a checkpoint under ``runs/`` so the CLI
finds it by itself. Its queries are near-identical at initialisation, so it predicts few classes with wide
margins; the argmax and mIoU criteria below are the acceptance bar, and the logit bound and the precision-plan
tests are what would catch a wrong conversion on such a model.

Tolerances: FP16 in ONNX Runtime agrees with the fp32 PyTorch labels on ≥ 99.5 % of pixels and moves the mIoU by
≤ 0.5 points (acceptance criteria); its logits (values in [0, Nq]) stay within 5e-3 of fp32, a few fp16 ulps at
the logits' scale summed over the graph. fp32 ONNX stays within 1e-4 (float rounding only).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re

import onnx
import pytest
import torch

import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

from export import cli
from export.fp16 import KEEP_FP32_OPS, convert_to_fp16, tensor_types
from export.onnx import read_metadata
from export.tensorrt import tensorrt_status
from qd_core import build_student, load_config
from qd_core.checkpoint import save_student
from qd_core.data.synthetic import ensure_synthetic

SIZE = 128
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Checkpoint a tiny student under runs/ and run ``python -m export --fp16 --engine`` without --checkpoint."""
    root = tmp_path_factory.mktemp("fp16")
    data = ensure_synthetic(root / "synthetic", num_train=1, num_val=3, size=(SIZE, 2 * SIZE), progress=False)
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_student(cfg).eval()
    checkpoint = save_student(model, cfg, root / "runs" / "tiny" / "best")
    out = root / "export"
    cwd = os.getcwd()
    os.chdir(root)  # the CLI looks for runs/*/best.safetensors in the working folder
    try:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = cli.main(["--out", str(out), "--fp16", "--engine", "--data", str(data), "--max-images", "3",
                             "--batch", "1:4:4"])
    finally:
        os.chdir(cwd)
    assert code == 0, stdout.getvalue()
    report = json.loads((out / "report.json").read_text())
    return {"out": out, "report": report, "stdout": stdout.getvalue(), "checkpoint": checkpoint}


def artifact(report, name):
    return next(a for a in report["artifacts"] if a["name"] == name)


def test_fp16_onnx_matches_pytorch_labels_and_miou(pipeline):
    parity = artifact(pipeline["report"], "onnx_fp16")["parity"]
    assert parity["argmax_agreement"] >= 0.995
    assert abs(parity["miou_delta"]) <= 0.5
    assert 0 < parity["max_abs_logit_error"] <= 5e-3


def test_fp32_onnx_matches_pytorch_on_the_evaluation_set(pipeline):
    parity = artifact(pipeline["report"], "onnx_fp32")["parity"]
    assert parity["max_abs_logit_error"] <= 1e-4
    assert parity["argmax_agreement"] >= 0.9999
    assert abs(parity["miou_delta"]) <= 0.01


@pytest.mark.parametrize("name, precision", [("onnx_fp32", "fp32"), ("onnx_fp16", "fp16")])
def test_report_judges_each_artifact_by_its_precisions_tolerance(pipeline, name, precision):
    from export.parity import LOGIT_TOLERANCE, TOLERANCE_POINTS

    parity = artifact(pipeline["report"], name)["parity"]
    assert parity["tolerance"] == {"precision": precision, "logit_rel_error": LOGIT_TOLERANCE[precision],
                                   "miou_points": TOLERANCE_POINTS[precision]}
    assert parity["passed"] is True and parity["problems"] == []
    assert 0 <= parity["logit_rel_error"] <= LOGIT_TOLERANCE[precision]
    assert " pass" in pipeline["stdout"]


def test_report_records_versions_sizes_times_and_data(pipeline):
    report, out = pipeline["report"], pipeline["out"]
    assert report["format"] == "querydiff-export-report"
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["onnx"] == onnx.__version__
    assert report["opset"] == 18 and report["msda"] == "gather" and report["random_init"] is False
    assert report["checkpoint"].endswith(os.path.join("runs", "tiny", "best.safetensors"))
    for name in ("onnx_fp32", "onnx_fp16"):
        entry = artifact(report, name)
        assert entry["bytes"] == (out / entry["path"]).stat().st_size
        assert entry["export_seconds"] > 0
    assert artifact(report, "onnx_fp16")["bytes"] < artifact(report, "onnx_fp32")["bytes"]
    assert report["parity"]["images"] == 3 * 7  # 3 per domain: source + 6 target domains
    assert set(report["parity"]["domains"]) == {"source", "fog", "snow", "frost", "night", "rain", "art"}
    assert "pytorch fp32 (ref)" in pipeline["stdout"] and "onnx_fp16" in pipeline["stdout"]


def test_engine_is_built_or_its_trtexec_command_printed(pipeline):
    report, stdout = pipeline["report"], pipeline["stdout"]
    if tensorrt_status() is None:
        assert report["engine"]["built"] is True and (pipeline["out"] / report["engine"]["path"]).is_file()
    else:
        assert report["engine"]["built"] is False and report["engine"]["reason"]
        assert "no engine built" in stdout and "trtexec --onnx=" in stdout and "--stronglyTyped" in stdout
    # Absolute paths: the command runs later, from any folder.
    assert f"--onnx={(pipeline['out'] / 'model_fp16.onnx').resolve()}" in report["engine"]["trtexec"].split()
    assert os.path.isabs(report["checkpoint"])
    assert (pipeline["out"] / "model_fp16.onnx").is_file()


@pytest.fixture(scope="module")
def fp16_graph(pipeline):
    model = onnx.load(str(pipeline["out"] / "model_fp16.onnx"))
    return model, tensor_types(model)


def gather_axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def float_io(node, types):
    return [types[n] for n in list(node.input) + list(node.output) if types.get(n) in (FLOAT, FLOAT16)]


def test_fp16_graph_is_strongly_typed_and_type_checks(fp16_graph):
    model, _ = fp16_graph
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert read_metadata(model)["precision"] == "fp16"
    assert model.graph.input[0].type.tensor_type.elem_type == FLOAT
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"logits": FLOAT, "labels": onnx.TensorProto.INT32}


def test_fp16_graph_keeps_normalisation_and_softmax_in_fp32(fp16_graph):
    model, types = fp16_graph
    kept = [n for n in model.graph.node if n.op_type in KEEP_FP32_OPS]
    assert {n.op_type for n in kept} >= {"LayerNormalization", "Softmax", "InstanceNormalization"}
    for node in kept:
        assert set(float_io(node, types)) == {FLOAT}, node.name


def test_fp16_graph_keeps_msda_sampling_in_fp32(fp16_graph):
    model, types = fp16_graph
    msda = re.compile(r"/pixel_decoder/encoder/layers\.\d+/attn/")
    # Per layer: the row gather of the value samples (the one float Gather on axis 0), floor of x and of y.
    sampling = [n for n in model.graph.node if msda.search(n.name)
                and (n.op_type == "Floor" or (n.op_type == "Gather" and float_io(n, types) and gather_axis(n) == 0))]
    assert len(sampling) == 2 * 3
    for node in sampling:
        assert FLOAT16 not in float_io(node, types), node.name
    offsets = [n for n in model.graph.node if msda.search(n.name) and "/sampling_offsets/" in n.name]
    assert offsets and all(FLOAT16 not in float_io(n, types) for n in offsets)


def test_fp16_graph_runs_the_heavy_matmuls_and_convs_in_fp16(fp16_graph):
    model, types = fp16_graph
    heavy = [n for n in model.graph.node if n.op_type in ("MatMul", "Conv") and "/backbone/blocks" in n.name]
    assert heavy and all(set(float_io(n, types)) == {FLOAT16} for n in heavy)
    weight_bytes = {FLOAT: 0, FLOAT16: 0}
    for init in model.graph.initializer:
        if init.data_type in weight_bytes:
            weight_bytes[init.data_type] += len(init.raw_data)
    assert weight_bytes[FLOAT16] > 2 * weight_bytes[FLOAT]


def test_fp16_weight_shared_by_several_calls_is_stored_once(fp16_graph):
    # The agent-query aggregation runs once per backbone layer with the same weights; the exporter names them
    # through Identity aliases, and each alias must not get its own fp16 copy.
    # Only matrices count: zero-initialised biases of equal shape are legitimately byte-identical.
    model, _ = fp16_graph
    contents = [init.raw_data for init in model.graph.initializer
                if init.data_type == FLOAT16 and len(init.dims) == 2 and init.raw_data.strip(b"\0")]
    assert len(contents) > 20 and len(contents) == len(set(contents))


def small_graph() -> onnx.ModelProto:
    """x (1, 4, 8, 8) → MatMul by a weight → Resize ×2 → Softmax; plus a branch computed from shapes only, and a
    node named inside a scope that is to stay fp32."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="/net/MatMul"),
        helper.make_node("Resize", ["h", "", "scales"], ["r"], name="/net/Resize", mode="linear"),
        helper.make_node("Shape", ["x"], ["shape"], name="/net/Shape"),
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], name="/net/Ones",
                         value=numpy_helper.from_array(np.ones(1, np.float32))),
        helper.make_node("CumSum", ["ones", "axis"], ["pos"], name="/net/CumSum"),
        helper.make_node("Mul", ["h", "pos"], ["hp"], name="/keep/Mul"),
        helper.make_node("Softmax", ["r"], ["y"], name="/net/Softmax", axis=-1),
        helper.make_node("ReduceSum", ["hp"], ["z"], name="/net/ReduceSum", keepdims=0),
    ]
    axis = numpy_helper.from_array(np.array(3, np.int64), "axis")
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", FLOAT, [1, 4, 16, 16]), helper.make_tensor_value_info("z", FLOAT, [])],
        [weight, scales, axis])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_pass_plans_precision_from_schemas_scopes_and_image_dependence():
    model = small_graph()
    converted = convert_to_fp16(model, keep_scopes=[r"^/keep/"])
    types = tensor_types(converted)
    by_name = {n.name: n for n in converted.graph.node}
    inits = {i.name: i.data_type for i in converted.graph.initializer}
    assert types["h"] == FLOAT16 and inits[by_name["/net/MatMul"].input[1]] == FLOAT16  # fp16 weight
    assert inits[by_name["/net/Resize"].input[2]] == FLOAT  # Resize scales are float32 by schema
    assert types["r"] == FLOAT16 and float_io(by_name["/net/Softmax"], types) == [FLOAT, FLOAT]
    assert types["pos"] == FLOAT  # depends on the input's shape only: a constant of the graph
    assert set(float_io(by_name["/keep/Mul"], types)) == {FLOAT}
    assert [o.type.tensor_type.elem_type for o in converted.graph.output] == [FLOAT, FLOAT]
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for got, want in zip(run(converted), run(model)):
        # fp16 weights and MatMul: ~1e-3 relative on values of order 1-10.
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=2e-2)

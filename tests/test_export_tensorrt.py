"""TensorRT engines built from the exported ONNX (both MSDA modes), run through ``TrtSegmenter``.

Skipped, with the reason, wherever the tensorrt package or a CUDA device is missing. Tolerances: the engines
are FP16 (strongly typed), so they are held to the FP16 acceptance bar against the fp32 PyTorch labels:
≥ 99.5 % argmax agreement (logits differ by fp16 rounding, ~1e-3 relative).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.fp16 import convert_to_fp16
from export.onnx import export_onnx, save_model
from export.runtime import TorchSegmenter, TrtSegmenter
from export.tensorrt import EngineError, build_engine, read_engine_metadata, tensorrt_status
from qd_core import build_student, load_config
from qd_core.data.scenes import draw_scene

REASON = tensorrt_status()
pytestmark = [pytest.mark.trt, pytest.mark.skipif(REASON is not None, reason=f"TensorRT unavailable: {REASON}")]

SIZE = 128
BATCH = (1, 2, 4)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    return build_student(load_config("tiny")).eval()


def images(n: int) -> torch.Tensor:
    scenes = [draw_scene(SIZE, SIZE, np.random.default_rng([5, i]))[0] for i in range(n)]
    return torch.from_numpy(np.stack(scenes)).permute(0, 3, 1, 2).float()


def fp16_engine(student, folder, msda: str):
    onnx_path = folder / f"{msda}.onnx"
    export_onnx(student, onnx_path, height=SIZE, width=SIZE, msda=msda)
    fp16_path = folder / f"{msda}_fp16.onnx"
    save_model(convert_to_fp16(onnx.load(str(onnx_path))), fp16_path)
    engine = folder / f"{msda}_fp16.engine"
    build_engine(fp16_path, engine, batch=BATCH, height=SIZE, width=SIZE, strongly_typed=True,
                 timing_cache=folder / "timing.cache", log=lambda _: None)
    return engine


@pytest.fixture(scope="module")
def gather_engine(student, tmp_path_factory):
    return fp16_engine(student, tmp_path_factory.mktemp("trt_gather"), "gather")


@pytest.mark.parametrize("msda", ["gather", "plugin"])
def test_fp16_engine_matches_pytorch_labels(student, tmp_path, msda, gather_engine):
    engine = gather_engine if msda == "gather" else fp16_engine(student, tmp_path, msda)
    seg = TrtSegmenter(engine)
    x = images(3)
    logits, labels = seg.run(x)
    ref_logits, ref_labels = TorchSegmenter(student).run(x)
    assert logits.is_cuda and logits.shape == ref_logits.shape and labels.shape == ref_labels.shape
    assert float((labels.cpu().long() == ref_labels.long()).float().mean()) >= 0.995
    assert float((logits.cpu() - ref_logits).abs().max()) < 5e-2


def test_engine_metadata_describes_the_build(gather_engine):
    meta = read_engine_metadata(gather_engine)
    assert meta["precision"] == "fp16" and meta["strongly_typed"] is True
    assert meta["inputs"]["images"]["min"] == [1, 3, SIZE, SIZE]
    assert meta["inputs"]["images"]["max"] == [4, 3, SIZE, SIZE]
    major, minor = torch.cuda.get_device_capability()
    assert meta["gpu"]["compute_capability"] == f"{major}.{minor}"
    assert (gather_engine.parent / "timing.cache").stat().st_size > 0


def test_batch_outside_the_profile_runs_as_calls_inside_it(gather_engine):
    """Profile 1..4: five images run as 4 + 1 through TrtSegmenter; the engine runner itself refuses them."""
    seg = TrtSegmenter(gather_engine)
    x = images(5)
    with pytest.raises(ValueError, match="batch 5 is outside the optimisation profile"):
        seg.runner.run(x)
    logits, labels = seg.run(x)
    first, rest = seg.run(x[:4]), seg.run(x[4:])
    torch.testing.assert_close(logits, torch.cat([first[0], rest[0]]))
    assert torch.equal(labels, torch.cat([first[1], rest[1]]))


def test_weakly_typed_fp16_build_exists_only_before_tensorrt_11(student, tmp_path):
    import tensorrt as trt

    onnx_path = tmp_path / "fp32.onnx"
    export_onnx(student, onnx_path, height=SIZE, width=SIZE)
    if hasattr(trt.BuilderFlag, "FP16"):
        build_engine(onnx_path, tmp_path / "weak.engine", batch=BATCH, height=SIZE, width=SIZE,
                     strongly_typed=False, log=lambda _: None)
        assert (tmp_path / "weak.engine").stat().st_size > 0
    else:
        with pytest.raises(EngineError, match="strongly typed networks only"):
            build_engine(onnx_path, tmp_path / "weak.engine", batch=BATCH, height=SIZE, width=SIZE,
                         strongly_typed=False, log=lambda _: None)


def test_engine_without_metadata_takes_its_profile_from_the_engine(gather_engine, tmp_path):
    """An engine built by the printed trtexec command has no metadata file: it still runs, its profile read from
    the engine itself, with a warning."""
    import shutil

    bare = tmp_path / "bare.engine"
    shutil.copyfile(gather_engine, bare)
    with pytest.warns(UserWarning, match="no metadata file"):
        seg = TrtSegmenter(bare)
    assert seg.runner.meta["inputs"]["images"]["max"] == [4, 3, SIZE, SIZE]
    assert seg.predict(images(2)).shape == (2, SIZE, SIZE)

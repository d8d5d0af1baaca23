"""Segmenter backends, engine metadata and profile checks (no TensorRT needed), and the infer CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from export import infer
from export.onnx import export_onnx
from export.runtime import OrtSegmenter, Segmenter, TorchSegmenter, load_segmenter
from export.tensorrt import (
    EngineError,
    check_engine_compatibility,
    check_input_shape,
    engine_metadata_path,
    profile_shapes,
    read_engine_metadata,
    tensorrt_status,
    trtexec_command,
    write_engine_metadata,
)
from qd_core import build_student, load_config
from qd_core.checkpoint import save_student
from qd_core.data.scenes import draw_scene

SIZE = 128
H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A10 = {"name": "NVIDIA A10", "compute_capability": "8.6"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random student saved as a checkpoint and exported to fp32 ONNX."""
    torch.manual_seed(0)
    cfg = load_config("tiny")
    model = build_student(cfg).eval()
    root = tmp_path_factory.mktemp("runtime")
    checkpoint = save_student(model, cfg, root / "tiny")
    onnx_path = root / "model.onnx"
    export_onnx(model, onnx_path, height=SIZE, width=SIZE)
    return model, checkpoint, onnx_path


@pytest.fixture(scope="module")
def ort_segmenter(exported) -> OrtSegmenter:
    return OrtSegmenter(exported[2], device="cpu")


def scenes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3, SIZE, SIZE) uint8 street scenes."""
    return np.stack([draw_scene(SIZE, SIZE, np.random.default_rng([seed, i]))[0] for i in range(n)]).transpose(
        0, 3, 1, 2)


def test_load_segmenter_chooses_the_backend_by_suffix(exported, tmp_path):
    _, checkpoint, onnx_path = exported
    assert isinstance(load_segmenter(onnx_path, device="cpu"), OrtSegmenter)
    torch_seg = load_segmenter(checkpoint)
    assert isinstance(torch_seg, TorchSegmenter) and isinstance(torch_seg, Segmenter)
    with pytest.raises(ValueError, match=r"\.onnx.*\.engine.*\.pt2.*\.safetensors"):
        load_segmenter(tmp_path / "model.pt")


def test_onnx_and_torch_segmenters_agree_on_numpy_and_tensor_input(exported, ort_segmenter):
    model = exported[0]
    images = scenes(2)
    torch_seg = TorchSegmenter(model)
    labels_np = ort_segmenter.predict(images)  # uint8 numpy straight from an image decoder
    labels_t = ort_segmenter.predict(torch.from_numpy(images).float())
    logits = ort_segmenter.logits(images)
    assert labels_np.shape == (2, SIZE, SIZE) and labels_np.dtype == torch.int32
    assert logits.shape == (2, 19, SIZE // 4, SIZE // 4) and logits.dtype == torch.float32
    assert torch.equal(labels_np, labels_t)
    # fp32 on both sides: logits agree to float rounding (see test_export_onnx for the tolerance).
    torch.testing.assert_close(logits, torch_seg.logits(images), rtol=0, atol=1e-4)
    assert float((labels_np == torch_seg.predict(images)).float().mean()) >= 0.9999


def test_onnx_segmenter_names_the_export_size_for_another_size(ort_segmenter):
    with pytest.raises(ValueError, match=f"exported for {SIZE}x{SIZE} inputs, got 96x96"):
        ort_segmenter.predict(np.zeros((1, 3, 96, 96), dtype=np.float32))


def test_segmenters_reject_images_that_are_not_rgb_batches(ort_segmenter):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ort_segmenter.predict(np.zeros((SIZE, SIZE, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Engine metadata: written by the build, checked on load. Fake metadata, no TensorRT needed.
# ---------------------------------------------------------------------------------------------------------------


def fake_engine(tmp_path, gpu=H100, version="10.3.0", batch=(1, 2, 8)):
    engine = tmp_path / "model_fp16.engine"
    engine.write_bytes(b"not a real engine")
    write_engine_metadata(engine, {"tensorrt": version, "gpu": gpu,
                                   "inputs": {"images": profile_shapes(batch, SIZE, SIZE)}})
    return engine


def test_engine_metadata_round_trips_beside_the_engine(tmp_path):
    engine = fake_engine(tmp_path)
    assert engine_metadata_path(engine) == tmp_path / "model_fp16.json"
    meta = read_engine_metadata(engine)
    assert meta["tensorrt"] == "10.3.0" and meta["gpu"] == H100
    assert meta["inputs"]["images"]["max"] == [8, 3, SIZE, SIZE]


def test_engine_for_another_gpu_is_one_clear_message(tmp_path):
    meta = read_engine_metadata(fake_engine(tmp_path, gpu=H100))
    with pytest.raises(EngineError, match=r"built for NVIDIA H100.*9\.0.*this machine has NVIDIA A10.*8\.6") as e:
        check_engine_compatibility(meta, tensorrt_version="10.3.0", gpu=A10, engine_path="m.engine")
    assert "\n" not in str(e.value)


def test_engine_for_another_tensorrt_version_is_one_clear_message(tmp_path):
    meta = read_engine_metadata(fake_engine(tmp_path, version="10.3.0"))
    with pytest.raises(EngineError, match=r"TensorRT 10\.3\.0.*TensorRT 11\.0\.1"):
        check_engine_compatibility(meta, tensorrt_version="11.0.1", gpu=H100)


def test_engine_built_here_passes_the_check(tmp_path):
    meta = read_engine_metadata(fake_engine(tmp_path, version="10.3.0"))
    # Same major.minor.patch: TensorRT's build number does not change engine compatibility.
    check_engine_compatibility(meta, tensorrt_version="10.3.0.26", gpu=dict(H100, name="NVIDIA H100 PCIe"))


def test_engine_without_or_with_broken_metadata_is_refused(tmp_path):
    engine = tmp_path / "x.engine"
    engine.write_bytes(b"")
    with pytest.raises(EngineError, match="no metadata file"):
        read_engine_metadata(engine)
    engine_metadata_path(engine).write_text("{not json")
    with pytest.raises(EngineError, match="could not be read"):
        read_engine_metadata(engine)
    engine_metadata_path(engine).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(EngineError, match="format"):
        read_engine_metadata(engine)


def test_input_outside_the_profile_is_one_clear_message(tmp_path):
    meta = read_engine_metadata(fake_engine(tmp_path, batch=(1, 2, 8)))
    check_input_shape(meta, (8, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"batch 9 is outside the optimisation profile.*batch 1\.\.8"):
        check_input_shape(meta, (9, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=f"resize the images to {SIZE}x{SIZE}"):
        check_input_shape(meta, (1, 3, 256, 256))


def test_trtexec_command_describes_the_same_build():
    cmd = trtexec_command("out/m_fp16.onnx", "out/m_fp16.engine", batch=(1, 4, 8), height=SIZE, width=SIZE,
                          timing_cache="out/timing.cache")
    for part in ("trtexec", "--onnx=out/m_fp16.onnx", "--saveEngine=out/m_fp16.engine", "--stronglyTyped",
                 f"--minShapes=images:1x3x{SIZE}x{SIZE}", f"--optShapes=images:4x3x{SIZE}x{SIZE}",
                 f"--maxShapes=images:8x3x{SIZE}x{SIZE}", "--timingCacheFile=out/timing.cache", "--noTF32"):
        assert part in cmd.split()


def test_one_tensorrt_logger_outlives_every_build_and_engine():
    """The plugin library keeps the logger it is initialised with: every build and engine must share one, made and
    registered once (a stand-in for the tensorrt module records the calls)."""
    from export.tensorrt import _trt_logger

    class StandInTensorRT:
        class Logger:
            WARNING = 2

            def __init__(self, severity: int) -> None:
                self.severity = severity

        def __init__(self) -> None:
            self.plugin_inits: list[tuple[object, str]] = []

        def init_libnvinfer_plugins(self, logger: object, namespace: str) -> bool:
            self.plugin_inits.append((logger, namespace))
            return True

    trt = StandInTensorRT()
    first, second = _trt_logger(trt), _trt_logger(trt)
    assert first is second and first.severity == StandInTensorRT.Logger.WARNING
    assert trt.plugin_inits == [(first, "")]


def test_engine_backend_says_why_it_cannot_run_without_tensorrt(tmp_path):
    reason = tensorrt_status()
    if reason is None:
        pytest.skip("TensorRT and CUDA are present: the engine path is covered by test_export_tensorrt")
    with pytest.raises(EngineError, match="cannot run engine"):
        load_segmenter(fake_engine(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# python -m export.infer
# ---------------------------------------------------------------------------------------------------------------


def write_scene(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw_scene(h, w, np.random.default_rng(seed))[0]).save(path)


def test_infer_writes_a_mask_and_an_overlay_per_image_at_its_own_size(exported, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    write_scene(images / "a.png", 96, 160, 1)
    write_scene(images / "sub" / "b.jpg", SIZE, SIZE, 2)
    assert infer.main(["--model", str(exported[2]), "--images", str(images), "--out", str(out),
                       "--batch", "2", "--device", "cpu"]) == 0
    for rel, size in (("a", (160, 96)), ("sub/b", (SIZE, SIZE))):
        for kind in ("mask", "overlay"):
            with Image.open(out / f"{rel}_{kind}.png") as im:
                assert im.size == size and im.mode == "RGB"
    assert "wrote 2 mask/overlay pairs" in capsys.readouterr().out


def test_infer_with_a_checkpoint_uses_the_pytorch_wrapper(exported, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_scene(images / "a.png", SIZE, SIZE, 3)
    assert infer.main(["--model", str(exported[1]), "--images", str(images), "--out", str(out)]) == 0
    assert (out / "a_mask.png").is_file() and (out / "a_overlay.png").is_file()


def test_infer_skips_an_unreadable_image_and_still_writes_the_good_ones(exported, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    write_scene(images / "good.png", SIZE, SIZE, 4)
    (images / "broken.png").write_bytes(b"this is not a png")
    code = infer.main(["--model", str(exported[2]), "--images", str(images), "--out", str(out), "--device", "cpu"])
    assert code == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.out + captured.err and "unreadable image" in captured.out + captured.err
    assert (out / "good_mask.png").is_file() and not (out / "broken_mask.png").exists()


def test_infer_on_a_folder_without_images_is_a_clear_error(exported, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    code = infer.main(["--model", str(exported[2]), "--images", str(tmp_path / "empty"), "--out",
                       str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no images" in err and err.count("\n") == 1


def test_engine_calls_split_and_pad_batches_into_the_profile():
    """A TensorRT segmenter takes any batch: calls of at most the profile's maximum, a short one padded with copies
    of its last image up to the minimum, the padding's outputs dropped (a stand-in runner: no TensorRT here)."""
    from export.runtime import TrtSegmenter, profile_calls

    assert profile_calls(7, 2, 3) == [(0, 3, 0), (3, 6, 0), (6, 7, 1)]
    assert profile_calls(1, 1, 8) == [(0, 1, 0)]
    assert profile_calls(9, 4, 4) == [(0, 4, 0), (4, 8, 0), (8, 9, 3)]

    class Runner:
        meta = {"inputs": {"images": {"min": [2, 3, 8, 8], "opt": [2, 3, 8, 8], "max": [3, 3, 8, 8]}}}
        calls: list[int] = []

        def run(self, x):
            assert 2 <= len(x) <= 3
            self.calls.append(len(x))
            # Per-image outputs that identify the image: its mean as a logit map, its first pixel as labels.
            return {"logits": x.mean(dim=(1, 2, 3))[:, None, None, None].expand(-1, 19, 2, 2).half(),
                    "labels": x[:, 0].to(torch.int32)}

    seg = object.__new__(TrtSegmenter)
    seg.runner, seg.name, seg.input_size = Runner(), "fake", (8, 8)
    x = torch.rand(7, 3, 8, 8) * 255
    logits, labels = seg.run(x)
    assert Runner.calls == [3, 3, 2]
    assert logits.dtype == torch.float32 and logits.shape == (7, 19, 2, 2)
    torch.testing.assert_close(logits[:, 0, 0, 0], x.mean(dim=(1, 2, 3)).half().float())
    assert torch.equal(labels, x[:, 0].to(torch.int32))
    Runner.calls.clear()
    seg.run(x[:2])
    assert Runner.calls == [2]


def _infer_error(argv: list[str], capsys) -> str:
    """Run the infer CLI, assert it refused with exit code 2, return its single stderr line."""
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_infer_says_images_is_a_file_and_a_folder_is_expected(exported, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    write_scene(photo, SIZE, SIZE, 5)
    err = _infer_error(["--model", str(exported[2]), "--images", str(photo), "--out", str(tmp_path / "out")], capsys)
    assert f"--images '{photo}': is a file; expected a folder of images" in err and "not found" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("alpha", ["5", "-0.1", "nan"])
def test_infer_refuses_an_overlay_opacity_outside_0_1(exported, tmp_path, capsys, alpha):
    write_scene(tmp_path / "images" / "a.png", SIZE, SIZE, 6)
    err = _infer_error(["--model", str(exported[2]), "--images", str(tmp_path / "images"), "--out",
                        str(tmp_path / "out"), "--alpha", alpha], capsys)
    assert f"--alpha {float(alpha)}: expected an opacity in [0, 1]" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, device, expected", [
    ("onnx", "foo", "--device 'foo': expected cpu, cuda, cuda:N or auto"),
    ("onnx", "cuda:1", "--device 'cuda:1': ONNX Runtime takes cpu, cuda or auto"),
    ("checkpoint", "gpu", "--device 'gpu': expected cpu, cuda, cuda:N or auto"),
])
def test_infer_checks_the_device_before_loading_the_model(exported, tmp_path, capsys, monkeypatch, model, device,
                                                          expected):
    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before --device was checked")

    monkeypatch.setattr("export.runtime.load_segmenter", no_loading)
    write_scene(tmp_path / "images" / "a.png", SIZE, SIZE, 7)
    path = exported[2] if model == "onnx" else exported[1]
    err = _infer_error(["--model", str(path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                        "--device", device], capsys)
    assert err == f"error: {expected}\n"


def test_infer_auto_device_runs_a_checkpoint(exported, tmp_path):
    """'auto' is ONNX Runtime's word; for a checkpoint it is CUDA when present, else the CPU (not torch.device)."""
    write_scene(tmp_path / "images" / "a.png", SIZE, SIZE, 8)
    assert infer.main(["--model", str(exported[1]), "--images", str(tmp_path / "images"), "--out",
                       str(tmp_path / "out"), "--device", "auto"]) == 0
    assert (tmp_path / "out" / "a_mask.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_infer_refuses_cuda_for_a_checkpoint_on_a_machine_without_it(exported, tmp_path, capsys):
    write_scene(tmp_path / "images" / "a.png", SIZE, SIZE, 9)
    err = _infer_error(["--model", str(exported[1]), "--images", str(tmp_path / "images"), "--out",
                        str(tmp_path / "out"), "--device", "cuda"], capsys)
    assert err == "error: --device 'cuda': this machine has no CUDA device; use --device cpu\n"


def test_infer_refuses_a_non_empty_out_unless_overwrite_and_never_reads_its_own_outputs(exported, tmp_path, capsys):
    images = tmp_path / "images"
    write_scene(images / "a.png", SIZE, SIZE, 10)
    out = images / "masks"  # inside --images: its masks must not be taken for photos on the next run
    argv = ["--model", str(exported[2]), "--images", str(images), "--out", str(out), "--device", "cpu"]
    assert infer.main(argv) == 0
    first = (out / "a_mask.png").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png"]
    capsys.readouterr()
    err = _infer_error(argv, capsys)
    assert err == f"error: --out '{out}' is not empty: pass --overwrite to write into it\n"
    assert infer.main(argv + ["--overwrite"]) == 0
    assert "wrote 1 mask/overlay pairs" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.png", "a_overlay.png"]
    assert (out / "a_mask.png").read_bytes() == first


def test_infer_refuses_two_images_that_would_write_the_same_mask(exported, tmp_path, capsys, monkeypatch):
    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the model was loaded before the clash was found")

    monkeypatch.setattr("export.runtime.load_segmenter", no_loading)
    images = tmp_path / "images"
    write_scene(images / "sub" / "a.png", SIZE, SIZE, 11)
    write_scene(images / "sub" / "a.jpg", SIZE, SIZE, 12)
    err = _infer_error(["--model", str(exported[2]), "--images", str(images), "--out", str(tmp_path / "out")],
                       capsys)
    assert f"'{images / 'sub' / 'a.jpg'}' and '{images / 'sub' / 'a.png'}' would both write 'sub/a_mask.png'" in err
    assert not (tmp_path / "out").exists()

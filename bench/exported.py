"""Build the exported backends from the benchmark's model with the ``export`` package, once per session.

    ort-fp32   export.onnx.export_onnx → model-fp32.onnx                → export.runtime.OrtSegmenter
    ort-fp16   export.fp16.convert_to_fp16(model-fp32.onnx) → .onnx    → OrtSegmenter
    trt-fp16   export.tensorrt.build_engine(model-fp16.onnx) → .engine  → export.runtime.TrtSegmenter
    aoti       export.aoti (torch.export + AOTInductor .pt2)            → export.aoti.AotiSegmenter
    qd-infer   the same .pt2                                            → bench.native.NativeSegmenter (C++)

Nothing here re-implements an export step; this module only names the files and feeds one step's output to the
next. Files are written afresh by each process (a file left in the work folder by an earlier run may come from
other weights) and reused within it only for what they were made from: the same model object and size (the ONNX
files, whose batch axis is dynamic), and batch and device too (the TensorRT engine, the AOTInductor package); two
sessions in one process may share a work folder. ONNX Runtime gets as many threads as torch uses, so CPU latencies
compare like with like.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.settings import REPO_ROOT
from export.runtime import Segmenter

# Artifacts this process wrote, each with what it was made from: (model, size, batch, device). The model itself
# is kept, not its id(), which a later model could reuse.
_written: dict[Path, tuple[object, ...]] = {}


def _needs_writing(path: Path, model: nn.Module, *key: object) -> bool:
    """Whether ``path`` must be (re)written for ``model`` and ``key``: this process has not written it for them.
    The caller records what it wrote in ``_written`` once the write succeeded."""
    made_from = _written.get(path)
    if made_from is not None and made_from[0] is model and made_from[1:] == key:
        return False
    _written.pop(path, None)  # until the caller's write succeeds
    return True


def onnx_fp32(model: nn.Module, size: tuple[int, int], work: Path) -> Path:
    """The fp32 ONNX of ``model`` at ``size`` = (H, W) with a dynamic batch, exported on first use."""
    from export.onnx import export_onnx

    path = work / "model-fp32.onnx"
    if _needs_writing(path, model, size):
        export_onnx(model, path, height=size[0], width=size[1])
        _written[path] = (model, size)
    return path


def onnx_fp16(model: nn.Module, size: tuple[int, int], work: Path) -> Path:
    """The strongly typed FP16 variant of ``onnx_fp32``, converted on first use."""
    import onnx

    from export.fp16 import convert_to_fp16
    from export.onnx import save_model

    path = work / "model-fp16.onnx"
    if _needs_writing(path, model, size):
        save_model(convert_to_fp16(onnx.load(str(onnx_fp32(model, size, work)))), path)
        _written[path] = (model, size)
    return path


def _ort(path: Path, device: str) -> Segmenter:
    from export.runtime import OrtSegmenter

    threads = torch.get_num_threads() if device == "cpu" else 0
    return OrtSegmenter(path, device=device, threads=threads, name=path.stem)


def build(name: str, model: nn.Module, size: tuple[int, int], batch: int, device: str, work: Path) -> Segmenter:
    """The exported backend ``name`` (ort-fp32, ort-fp16, trt-fp16, aoti or qd-infer) for batches up to ``batch``.

    Exports trace the PyTorch attention: the exporters are detected by ``qd_core.attention`` anyway, and forcing
    ``QD_ATTENTION=torch`` keeps a CUDA export from ever reaching a Triton kernel.
    """
    from bench.backends import attention_backend

    with attention_backend("torch"):
        return _build(name, model, size, batch, device, work)


def _build(name: str, model: nn.Module, size: tuple[int, int], batch: int, device: str, work: Path) -> Segmenter:
    if name == "ort-fp32":
        return _ort(onnx_fp32(model, size, work), device)
    if name == "ort-fp16":
        return _ort(onnx_fp16(model, size, work), device)
    if name == "trt-fp16":
        from export.runtime import TrtSegmenter
        from export.tensorrt import build_engine

        engine = work / "model-fp16.engine"
        if _needs_writing(engine, model, size, batch, device):
            build_engine(onnx_fp16(model, size, work), engine, batch=(1, batch, batch), height=size[0],
                         width=size[1])
            _written[engine] = (model, size, batch, device)
        return TrtSegmenter(engine, device=device)
    if name == "aoti":
        from export.aoti import AotiSegmenter

        return AotiSegmenter(aoti_package(model, size, batch, device, work), device=device)
    if name == "qd-infer":
        from bench.native import NativeSegmenter, build_qd_infer

        exe, _ = build_qd_infer(REPO_ROOT / "build" / "bench-native")
        threads = torch.get_num_threads() if device == "cpu" else 0
        return NativeSegmenter(exe, aoti_package(model, size, batch, device, work), threads=threads)
    raise ValueError(f"name: expected ort-fp32, ort-fp16, trt-fp16, aoti or qd-infer, got {name!r}")


def aoti_package(model: nn.Module, size: tuple[int, int], batch: int, device: str, work: Path) -> Path:
    """The AOTInductor package of ``model`` for batches 1..``batch`` at ``size``, compiled on first use."""
    from export.aoti import export_aoti
    from export.wrapper import ExportWrapper

    package = work / "model.pt2"
    if _needs_writing(package, model, size, batch, device):
        export_aoti(ExportWrapper(model), package, height=size[0], width=size[1], batch=(1, batch, batch),
                    device=device, overwrite=True)
        _written[package] = (model, size, batch, device)
    return package

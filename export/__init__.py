"""Deployment of the QueryDiff student: ONNX (fp32 and strongly typed FP16), TensorRT engines, runtimes.

    python -m export --checkpoint runs/tiny/best.safetensors --out exports/tiny --fp16     # the CLI
    python -m export.infer --model exports/tiny/model.onnx --images photos/ --out masks/    # segment a folder

Modules: ``wrapper`` (the exported graph as an nn.Module), ``onnx`` (fp32 export, both MSDA modes),
``msda_plugin`` (the TensorRT plugin node), ``fp16`` (strongly typed FP16 pass), ``tensorrt`` (engines and their
metadata), ``runtime`` (the Segmenter backends), ``report`` (parity and report.json), ``cli`` / ``infer``.

    from export import ExportWrapper, export_onnx, convert_to_fp16, load_segmenter
    seg = load_segmenter("exports/tiny/model_fp16.onnx")
    labels = seg.predict(images)           # images: (B, 3, H, W) RGB in [0, 255]

Consumes ``qd_core`` only. ``onnx``/``onnxruntime`` and ``tensorrt`` are imported by the modules that need them.
"""
from typing import Any

from export.runtime import OrtSegmenter, Segmenter, TorchSegmenter, TrtSegmenter, load_segmenter
from export.wrapper import INPUT_NAME, LABEL_DTYPE, OUTPUT_NAMES, ExportWrapper


def __getattr__(name: str) -> Any:
    # The ONNX-side entry points import onnx; keep ``import export`` light for runtime-only users.
    if name in ("export_onnx", "OnnxExport"):
        from export import onnx as _onnx

        return getattr(_onnx, name)
    if name == "convert_to_fp16":
        from export.fp16 import convert_to_fp16

        return convert_to_fp16
    if name in ("build_engine", "EngineError"):
        from export import tensorrt as _trt

        return getattr(_trt, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")


__all__ = ["ExportWrapper", "INPUT_NAME", "OUTPUT_NAMES", "LABEL_DTYPE", "Segmenter", "TorchSegmenter",
           "OrtSegmenter", "TrtSegmenter", "load_segmenter", "export_onnx", "OnnxExport", "convert_to_fp16",
           "build_engine", "EngineError"]

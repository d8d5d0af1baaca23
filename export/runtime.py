"""One ``Segmenter`` protocol over every backend that runs the exported graph.

    seg = load_segmenter("out/model.onnx")            # .onnx → ONNX Runtime, .engine → TensorRT,
    labels = seg.predict(images)                       # .safetensors / .json → the PyTorch wrapper
    logits = seg.logits(images)

``images`` are float RGB values in [0, 255], (B, 3, H, W), as a torch tensor or a numpy array (any float or
integer dtype). Results are torch tensors: ``logits`` (B, 19, H/4, W/4) float32 and ``predict`` (B, H, W) int32
label maps, on the CPU for ONNX Runtime, on the engine's GPU for TensorRT, and on the model's device for PyTorch.
``input_size`` is the (H, W) the backend accepts, or None when any multiple of 32 works.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from export.wrapper import INPUT_NAME, ExportWrapper

ImageBatch = Tensor | np.ndarray
CHECKPOINT_SUFFIXES = (".safetensors", ".json")


@runtime_checkable
class Segmenter(Protocol):
    """What bench, the infer CLI and the parity report need from a backend."""

    name: str
    input_size: tuple[int, int] | None

    def run(self, images: ImageBatch) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) RGB in [0, 255] → (logits (B, 19, H/4, W/4), labels (B, H, W)) in one pass."""
        ...

    def logits(self, images: ImageBatch) -> Tensor:
        """images (B, 3, H, W) RGB in [0, 255] → semantic logits (B, 19, H/4, W/4) float32."""
        ...

    def predict(self, images: ImageBatch) -> Tensor:
        """images (B, 3, H, W) RGB in [0, 255] → label map (B, H, W) int32."""
        ...


def as_image_tensor(images: ImageBatch) -> Tensor:
    """A float32 (B, 3, H, W) tensor from a tensor or numpy array; ValueError for anything else."""
    if isinstance(images, np.ndarray):
        if images.dtype == np.bool_ or np.iscomplexobj(images):
            raise ValueError(f"images: expected RGB values in [0, 255], got dtype {images.dtype}")
        images = torch.from_numpy(np.array(images, dtype=np.float32))  # a writable float32 copy
    if not isinstance(images, Tensor):
        raise ValueError(f"images: expected a torch tensor or numpy array (B, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (B, 3, H, W) with RGB channels, got {tuple(images.shape)}")
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"images: expected RGB values in [0, 255], got dtype {images.dtype}")
    return images.float()


def _check_size(images: Tensor, size: tuple[int, int] | None, multiple: int, name: str) -> None:
    h, w = images.shape[-2:]
    if size is not None and (h, w) != tuple(size):
        raise ValueError(f"images: {name} was exported for {size[0]}x{size[1]} inputs, got {h}x{w} "
                         f"(resize the images, or export again with --height {h} --width {w})")
    if size is None and (h == 0 or w == 0 or h % multiple or w % multiple):
        raise ValueError(f"images: height and width must be positive multiples of {multiple}, got {h}x{w}")


class TorchSegmenter:
    """The export wrapper run eagerly in PyTorch (the fp32 reference every artifact is compared with)."""

    def __init__(self, model: torch.nn.Module, *, device: str | torch.device | None = None,
                 name: str = "torch") -> None:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        self.wrapper = ExportWrapper(model.to(device).eval()).eval()
        self.device = device
        self.name = name
        self.input_size: tuple[int, int] | None = None

    @torch.no_grad()
    def run(self, images: ImageBatch) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) → (logits (B, K, H/4, W/4), labels (B, H, W) int32)."""
        x = as_image_tensor(images).to(self.device)
        _check_size(x, None, self.wrapper.size_multiple, self.name)
        return self.wrapper(x)

    def logits(self, images: ImageBatch) -> Tensor:
        return self.run(images)[0]

    def predict(self, images: ImageBatch) -> Tensor:
        return self.run(images)[1]


def ort_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers for ``device``: "cpu", "cuda" or "auto" (CUDA when this onnxruntime has it)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise ValueError(f"device='cuda': this onnxruntime has no CUDAExecutionProvider (available: "
                         f"{', '.join(available)}); install onnxruntime-gpu")
    if device != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtSegmenter:
    """An exported ``.onnx`` file in an ONNX Runtime InferenceSession (CPU or CUDA execution provider)."""

    def __init__(self, path: str | os.PathLike[str], *, device: str = "auto", threads: int = 0,
                 spinning: bool = True, name: str | None = None) -> None:
        """threads: intra-op threads (0 = ONNX Runtime's default, one per core); spinning: let idle worker
        threads busy-wait for the next run (lower latency for back-to-back runs, but they steal the CPU from
        anything interleaved with them, such as a PyTorch reference)."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"model '{path}' does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=ort_providers(device))
        except Exception as e:  # onnxruntime raises its own exception classes for unloadable graphs
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = (" (graphs exported with --msda plugin run only in TensorRT)"
                    if "MultiscaleDeformableAttnPlugin_TRT" in str(e) else "")
            raise ValueError(f"model '{path}' could not be loaded by ONNX Runtime: {first}{hint}") from None
        self.path = path
        self.name = name or path.stem
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        dims = inp.shape
        self.input_size = (int(dims[2]), int(dims[3])) if all(isinstance(d, int) for d in dims[2:]) else None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _outputs(self, images: ImageBatch, names: list[str] | None) -> dict[str, np.ndarray]:
        x = as_image_tensor(images).cpu()
        _check_size(x, self.input_size, 32, self.name)
        outputs = self.session.run(names, {self.input_name: x.numpy()})
        return dict(zip(names or self.output_names, outputs))

    def run(self, images: ImageBatch) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) → (logits (B, K, H/4, W/4) float32, labels (B, H, W) int32), CPU tensors."""
        named = self._outputs(images, None)
        return torch.from_numpy(named["logits"]).float(), torch.from_numpy(named["labels"])

    def logits(self, images: ImageBatch) -> Tensor:
        return self.run(images)[0]

    def predict(self, images: ImageBatch) -> Tensor:
        # The labels alone: no fp16 → fp32 conversion of logits nobody reads inside a timed call.
        return torch.from_numpy(self._outputs(images, ["labels"])["labels"])


def profile_calls(n: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """n ≥ 1 images as engine calls of lo..hi images each (a TensorRT optimisation profile's batch range):
    (start, stop, padding) per call, where ``padding`` copies of the call's last image bring a short call up to lo
    (their outputs are dropped)."""
    return [(start, min(start + hi, n), max(0, lo - (min(start + hi, n) - start))) for start in range(0, n, hi)]


class TrtSegmenter:
    """A serialized TensorRT engine run on torch CUDA buffers (see ``export.tensorrt.EngineRunner``)."""

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device = "cuda",
                 name: str | None = None) -> None:
        from export.tensorrt import EngineRunner

        self.runner = EngineRunner(path, device=device)
        self.name = name or Path(path).stem
        self.input_size = self.runner.input_size

    def run(self, images: ImageBatch) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) → (logits, labels) as CUDA tensors on the engine's device. Any B ≥ 1: a batch outside
        the engine's optimisation profile runs as calls inside it (see ``profile_calls``)."""
        x = as_image_tensor(images)
        if len(x) == 0:
            raise ValueError(f"images: an empty batch {tuple(x.shape)}; expected at least one image")
        spec = self.runner.meta["inputs"][INPUT_NAME]
        lo, hi = int(spec["min"][0]), int(spec["max"][0])
        if lo <= len(x) <= hi:
            outputs = self.runner.run(x)
            return outputs["logits"].float(), outputs["labels"]
        logits, labels = [], []
        for start, stop, pad in profile_calls(len(x), lo, hi):
            chunk = x[start:stop]
            if pad:
                chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            outputs = self.runner.run(chunk)
            logits.append(outputs["logits"][:stop - start])
            labels.append(outputs["labels"][:stop - start])
        return torch.cat(logits).float(), torch.cat(labels)

    def logits(self, images: ImageBatch) -> Tensor:
        return self.run(images)[0]

    def predict(self, images: ImageBatch) -> Tensor:
        return self.run(images)[1]


def load_segmenter(path: str | os.PathLike[str], *, device: str | None = None,
                   overrides: Sequence[str] = (), **kwargs: Any) -> Segmenter:
    """The backend for ``path``, chosen by its suffix.

    ``.onnx`` → ``OrtSegmenter`` (device "auto"/"cpu"/"cuda"); ``.engine`` → ``TrtSegmenter`` (a CUDA device);
    ``.pt2`` → ``export.aoti.AotiSegmenter`` (the package's device by default); ``.safetensors`` or ``.json``
    (a student checkpoint) → ``TorchSegmenter`` (device default "cpu"), with dotted config ``overrides``.
    Anything else raises ValueError naming the suffixes it accepts.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OrtSegmenter(path, device=device or "auto", **kwargs)
    if suffix == ".engine":
        return TrtSegmenter(path, device=device or "cuda", **kwargs)
    if suffix == ".pt2":
        from export.aoti import AotiSegmenter

        return AotiSegmenter(path, device=device, **kwargs)
    if suffix in CHECKPOINT_SUFFIXES:
        from qd_core.checkpoint import load_student

        model, _ = load_student(path, overrides, device=device or "cpu")
        return TorchSegmenter(model, name=path.stem, **kwargs)
    raise ValueError(f"model '{path}': expected a .onnx file, a TensorRT .engine, an AOTInductor .pt2 or a student "
                     f"checkpoint (.safetensors / .json), got suffix {path.suffix or '(none)'!r}")


__all__ = ["Segmenter", "TorchSegmenter", "OrtSegmenter", "TrtSegmenter", "load_segmenter", "as_image_tensor",
           "ort_providers", "INPUT_NAME"]

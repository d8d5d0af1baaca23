"""AOTInductor export of the export wrapper, and the runtime for the resulting ``.pt2`` package.

    wrapper = ExportWrapper(student).eval()
    export_aoti(wrapper, Path("out/student.pt2"), height=512, width=512, batch=(1, 1, 8))
    seg = AotiSegmenter("out/student.pt2")
    labels = seg.predict(images)        # images (B, 3, 512, 512) float RGB in [0, 255] → (B, 512, 512)

``torch.export`` captures the wrapper with a dynamic batch axis, AOTInductor compiles it to a shared library
(C++ kernels on CPU, Triton on CUDA) and packages library and weights into one zip. The package also carries
the input geometry as metadata ("qd.height", "qd.width", "qd.batch_min", "qd.batch_opt", "qd.batch_max",
"qd.num_classes"), which ``AotiSegmenter`` and the C++ runner ``qd_infer`` read to size and check their inputs:
the compiled code checks no shapes (unless AOTI_RUNTIME_CHECK_INPUTS=1 is set), so a batch outside the exported
range would run out of bounds instead of failing.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

# Keys export_aoti adds to the package metadata; AOTI_* keys are torch's own.
METADATA_PREFIX = "qd."
_DEVICE_KEY = "AOTI_DEVICE_KEY"


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def _check_batch(batch: Sequence[int]) -> tuple[int, int, int]:
    if len(batch) != 3 or not all(isinstance(b, int) and not isinstance(b, bool) for b in batch):
        raise ValueError(f"batch: expected three integers (min, opt, max), got {batch!r}")
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch: expected 1 <= min <= opt <= max, got {tuple(batch)}")
    return lo, opt, hi


def _check_size(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _output_shapes(program: torch.export.ExportedProgram) -> list[tuple[Any, ...]]:
    out = next(n for n in program.graph.nodes if n.op == "output")
    return [tuple(node.meta["val"].shape) for node in out.args[0]]


def export_aoti(wrapper: nn.Module, out_path: str | Path, *, height: int, width: int,
                batch: Sequence[int] = (1, 1, 8), device: str = "cpu", overwrite: bool = False,
                inductor_configs: dict[str, Any] | None = None) -> Path:
    """Export ``wrapper`` with ``torch.export`` and compile it into an AOTInductor package at ``out_path``.

    Args:
        wrapper: module taking images (B, 3, H, W) float RGB in [0, 255] and returning (logits (B, K, H/4, W/4),
            labels (B, H, W)), e.g. ``export.wrapper.ExportWrapper``. It is moved to ``device`` and set to eval.
        out_path: the package file; must end in ``.pt2``. Written through a temporary file in the same folder.
        height, width: the fixed input size.
        batch: (min, opt, max) batch sizes. The batch axis is dynamic over [min, max]; ``opt`` is the traced
            example (at least 2 when max allows it, since tracing with batch 1 would specialise the axis to 1).
        device: "cpu" or "cuda[:i]"; the package runs only on that kind of device.
        overwrite: replace an existing ``out_path``.
        inductor_configs: extra ``torch._inductor`` options (e.g. {"max_autotune": True} on GPU).

    Returns ``out_path``. Compilation takes minutes for the full model (one to two for the tiny one on 2 cores).
    """
    out_path = Path(out_path)
    if out_path.suffix != ".pt2":
        raise ValueError(f"out_path: an AOTInductor package must end in .pt2, got '{out_path}'")
    if out_path.exists() and not overwrite:
        raise ValueError(f"out_path: '{out_path}' exists; pass overwrite=True (--overwrite) to replace it")
    height, width = _check_size("height", height), _check_size("width", width)
    lo, opt, hi = _check_batch(batch)
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available")

    wrapper = wrapper.to(dev).eval()
    example_batch = min(max(opt, 2), hi)
    example = torch.rand(example_batch, 3, height, width, generator=torch.Generator().manual_seed(0)) * 255
    dynamic = None if lo == hi else ({0: torch.export.Dim("batch", min=lo, max=hi)},)
    with torch.no_grad():
        program = torch.export.export(wrapper, (example.to(dev),), dynamic_shapes=dynamic, strict=False)
    shapes = _output_shapes(program)
    if len(shapes) != 2 or len(shapes[0]) != 4 or len(shapes[1]) != 3:
        raise ValueError(f"wrapper: expected outputs (logits (B, K, h, w), labels (B, H, W)), got shapes {shapes}")

    metadata = {"height": height, "width": width, "batch_min": lo, "batch_opt": opt, "batch_max": hi,
                "num_classes": int(shapes[0][1])}
    configs = dict(inductor_configs or {})
    configs["aot_inductor.metadata"] = {
        **configs.get("aot_inductor.metadata", {}),
        **{METADATA_PREFIX + k: str(v) for k, v in metadata.items()},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.partial{os.getpid()}.pt2")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


# --------------------------------------------------------------------------------------------------------------
# Package metadata
# --------------------------------------------------------------------------------------------------------------


def read_package_metadata(path: str | Path, model_name: str = "model") -> dict[str, str]:
    """The metadata of an AOTInductor package, read from the zip without loading the compiled library.

    Holds torch's keys (AOTI_DEVICE_KEY: "cpu" or "cuda", AOTI_CPU_ISA, AOTI_PLATFORM, ...) and the "qd.*" keys
    written by ``export_aoti``. Raises ValueError for a missing file or one that is not a package.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: '{path}' {'is not a file' if path.exists() else 'does not exist'}")
    metadata: dict[str, str] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            # <archive root>/data/aotinductor/<model>/<hash>.<wrapper|kernel>_metadata.json
            names = [n for n in archive.namelist()
                     if f"/data/aotinductor/{model_name}/" in f"/{n}" and n.endswith("_metadata.json")]
            for name in sorted(names):
                metadata.update(json.loads(archive.read(name)))
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as err:
        raise ValueError(f"path: '{path}' is not a readable AOTInductor package ({err})") from None
    if not names:
        raise ValueError(f"path: '{path}' holds no AOTInductor model named '{model_name}'")
    return metadata


def _cpu_isa_missing(isa_list: str) -> str | None:
    """The vector ISA a CPU package was compiled for when this CPU lacks it, else None."""
    wanted = isa_list.split()[0] if isa_list.split() else ""
    have = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    order = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}
    if wanted in order and have in order and order[have] < order[wanted]:
        return wanted
    return None


def _package_device(path: Path, metadata: dict[str, str], requested: str | torch.device | None) -> torch.device:
    """The device to run the package on: its compiled device kind, checked against this machine and the request."""
    kind = metadata.get(_DEVICE_KEY, "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"path: '{path}' was compiled for device '{kind}'; expected cpu or cuda")
    wanted = torch.device(requested) if requested is not None else torch.device(kind)
    if wanted.type != kind:
        raise ValueError(f"device: '{path}' was compiled for {kind} and runs only there, got device={str(wanted)!r}"
                         f" (export it again with device={wanted.type!r})")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"path: '{path}' was compiled for CUDA, but CUDA is not available here; export it with "
                         f"device='cpu' to run it on this machine")
    if kind == "cpu":
        missing = _cpu_isa_missing(metadata.get("AOTI_CPU_ISA", ""))
        if missing:
            raise ValueError(f"path: '{path}' was compiled for CPUs with {missing}, which this CPU lacks; export "
                             f"it again on a machine like this one")
    if kind == "cuda" and wanted.index is None:
        wanted = torch.device("cuda", torch.cuda.current_device())
    return wanted


# --------------------------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------------------------


class AotiSegmenter:
    """Runs an AOTInductor package written by ``export_aoti`` (the ``export.runtime.Segmenter`` protocol).

    Args:
        path: the ``.pt2`` package.
        device: where to run: None (the package's device), "cpu" or "cuda[:i]"; must match the kind of device
            the package was compiled for.
        name: a label for reports (default: the file name without suffix).

    Results are on the package's device: ``logits`` (B, K, H/4, W/4) float32 and ``predict`` (B, H, W) int32.
    Batches larger than the package's maximum are split, and smaller than its minimum padded, so any batch works.
    Raises ValueError when the package is missing, lacks the "qd.*" metadata, or was compiled for a device
    (CUDA) or CPU vector ISA this machine does not have.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device | None = None,
                 name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.metadata = read_package_metadata(self.path)
        self.device = _package_device(self.path, self.metadata, device)
        self.input_size: tuple[int, int] = (self._meta_int("height"), self._meta_int("width"))
        self.batch_range = (self._meta_int("batch_min"), self._meta_int("batch_max"))
        self.num_classes = self._meta_int("num_classes")
        index = self.device.index if self.device.type == "cuda" and self.device.index is not None else -1
        self._model = torch._inductor.aoti_load_package(str(self.path), device_index=index)

    def _meta_int(self, key: str) -> int:
        value = self.metadata.get(METADATA_PREFIX + key)
        if value is None:
            raise ValueError(f"path: '{self.path}' has no '{METADATA_PREFIX}{key}' metadata; export it with "
                             f"export.aoti.export_aoti")
        if not value.isdigit() or int(value) <= 0:
            raise ValueError(f"path: '{self.path}' metadata '{METADATA_PREFIX}{key}' should be a positive integer, "
                             f"got {value!r}")
        return int(value)

    def as_input(self, images: Tensor | np.ndarray) -> Tensor:
        """images (B, 3, H, W) RGB in [0, 255], any real dtype, tensor or numpy → float32 on the package's device;
        ValueError naming the expected shape otherwise."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, Tensor):
            raise ValueError(f"images: expected a torch tensor or numpy array (B, 3, H, W), got "
                             f"{type(images).__name__}")
        if images.dtype == torch.bool or images.is_complex():
            raise ValueError(f"images: expected RGB values in [0, 255], got dtype {images.dtype}")
        h, w = self.input_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, h, w) or images.shape[0] == 0:
            raise ValueError(f"images: {self.name} was exported for (B, 3, {h}, {w}) inputs with B >= 1, got "
                             f"{tuple(images.shape)} (resize the images, or export again with --height and --width)")
        return images.to(self.device, torch.float32).contiguous()

    @torch.no_grad()
    def run(self, images: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W) RGB in [0, 255] → (logits (B, K, H/4, W/4) float32, labels (B, H, W) int32)."""
        x = self.as_input(images)
        lo, hi = self.batch_range
        logits, labels = [], []
        for chunk in x.split(hi):
            n = chunk.shape[0]
            if n < lo:  # repeat the last image; its extra results are dropped
                chunk = torch.cat([chunk, chunk[-1:].expand(lo - n, -1, -1, -1)])
            out = self._model(chunk)
            logits.append(out[0][:n])
            labels.append(out[1][:n])
        return torch.cat(logits).float(), torch.cat(labels)

    def logits(self, images: Tensor | np.ndarray) -> Tensor:
        """images (B, 3, H, W) RGB in [0, 255] → semantic logits (B, K, H/4, W/4) float32."""
        return self.run(images)[0]

    def predict(self, images: Tensor | np.ndarray) -> Tensor:
        """images (B, 3, H, W) RGB in [0, 255] → label map (B, H, W) int32."""
        return self.run(images)[1]


# --------------------------------------------------------------------------------------------------------------
# Parity with the PyTorch wrapper
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AotiParity:
    """How far an AOTInductor package is from the eager wrapper on the same images."""

    max_abs_logit_error: float
    argmax_agreement: float  # fraction of pixels with the same label, in [0, 1]
    num_images: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def aoti_parity(wrapper: nn.Module, segmenter: AotiSegmenter, images: Tensor | np.ndarray) -> AotiParity:
    """Run ``wrapper`` (eager, moved to the package's device) and ``segmenter`` on images (B, 3, H, W) float RGB in
    [0, 255] and compare the logits (max abs difference) and label maps (fraction of equal pixels)."""
    x = segmenter.as_input(images)
    hi = segmenter.batch_range[1]
    wrapper = wrapper.to(segmenter.device).eval()
    error, agree, total = 0.0, 0, 0
    for chunk in x.split(hi):
        ref_logits, ref_labels = wrapper(chunk)
        logits, labels = segmenter.run(chunk)
        # NaN-aware (Python's max drops a NaN): a broken package's NaN logits are an infinite error, not 0.
        error = max(error, (logits - ref_logits.float()).abs().nan_to_num(nan=math.inf).max().item())
        agree += (labels.long() == ref_labels.long()).sum().item()
        total += labels.numel()
    return AotiParity(max_abs_logit_error=error, argmax_agreement=agree / total, num_images=int(x.shape[0]))


__all__ = ["export_aoti", "read_package_metadata", "AotiSegmenter", "AotiParity", "aoti_parity"]

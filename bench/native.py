"""qd_infer, the C++ runner, as a benchmark backend: built with CMake, fed PNG files, timed by its own clock.

    exe = build_qd_infer(REPO_ROOT / "build" / "bench-native")
    seg = NativeSegmenter(exe, Path("model.pt2"), threads=2)
    labels = seg.predict(images)                        # (B, H, W) from the label PNGs qd_infer writes
    seconds = seg.timed_passes(images, warmup=3, iters=20)  # one entry per timed forward pass

A process per call cannot be timed from Python (start-up and model loading would dominate), so latency comes from
``qd_infer --timings``: the steady clock around each ``run`` of the loaded package inside the C++ process, batch
preparation and PNG decoding excluded, as ``predict`` is timed for the Python backends (their images are already
tensors). Accuracy uses ``predict``, one qd_infer process per batch.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


class NativeError(RuntimeError):
    """qd_infer could not be built or run; the message holds the tail of its output."""


def tail(text: str, lines: int = 30) -> str:
    """The last ``lines`` lines of a tool's output, for error messages."""
    return "\n".join(text.strip().splitlines()[-lines:])


def build_qd_infer(build_dir: Path, jobs: int = 2) -> tuple[Path, str]:
    """Configure and build qd_infer into ``build_dir`` (incrementally); returns (executable, configure output).

    Needs cmake, a C++20 compiler and libpng / libjpeg development files (scripts/system_deps.sh installs them).
    """
    if shutil.which("cmake") is None:
        raise NativeError("cmake is not installed; qd_infer needs cmake, g++, libpng-dev and libjpeg-dev "
                          "(bash scripts/system_deps.sh)")
    root = Path(__file__).resolve().parent.parent
    configure = subprocess.run(["cmake", "-S", str(root), "-B", str(build_dir),
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], capture_output=True, text=True)
    if configure.returncode:
        raise NativeError(f"configuring qd_infer failed:\n{tail(configure.stdout + configure.stderr)}")
    build = subprocess.run(["cmake", "--build", str(build_dir), f"-j{jobs}"], capture_output=True, text=True)
    if build.returncode:
        raise NativeError(f"building qd_infer failed:\n{tail(build.stdout + build.stderr)}")
    return build_dir / "native" / "qd_infer", configure.stdout


def write_pngs(images: Tensor, folder: Path) -> list[str]:
    """images (B, 3, H, W) float RGB holding whole numbers in [0, 255] → folder/000.png … (lossless); file names."""
    if not torch.equal(images, images.round()) or images.min() < 0 or images.max() > 255:
        raise ValueError("images: qd_infer reads 8-bit PNGs; expected whole numbers in [0, 255]")
    arrays = images.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
    names = [f"{i:03d}.png" for i in range(len(arrays))]
    for name, array in zip(names, arrays):
        Image.fromarray(np.ascontiguousarray(array)).save(folder / name)
    return names


class NativeSegmenter:
    """``export.runtime.Segmenter``'s ``predict`` through the qd_infer executable on an AOTInductor package."""

    name = "qd-infer"

    def __init__(self, exe: Path, package: Path, *, threads: int = 0, timeout_s: float = 600.0) -> None:
        self.exe, self.package, self.threads, self.timeout_s = Path(exe), Path(package), threads, timeout_s

    def _run(self, images: Tensor, *, warmup: int, iters: int) -> tuple[Tensor, dict]:
        """One qd_infer process over ``images`` as one batch → (labels (B, H, W) int64, its timings JSON)."""
        with tempfile.TemporaryDirectory(prefix="qd-native-") as tmp:
            folder, out, timings = Path(tmp) / "in", Path(tmp) / "out", Path(tmp) / "timings.json"
            folder.mkdir()
            names = write_pngs(images, folder)
            cmd = [str(self.exe), "--model", str(self.package), "--images", str(folder), "--out", str(out),
                   "--batch", str(len(names)), "--warmup", str(warmup), "--iters", str(iters),
                   "--threads", str(self.threads), "--timings", str(timings)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
            if proc.returncode:
                raise NativeError(f"qd_infer exited with {proc.returncode}:\n{tail(proc.stdout + proc.stderr)}")
            labels = []
            for name in names:
                with Image.open(out / name) as im:
                    labels.append(np.asarray(im, dtype=np.int64))
            return torch.from_numpy(np.stack(labels)), json.loads(timings.read_text())

    def predict(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) RGB in [0, 255] at the package's size → labels (B, H, W) int64 (CPU)."""
        return self._run(images, warmup=0, iters=1)[0]

    def timed_passes(self, images: Tensor, *, warmup: int, iters: int) -> list[float]:
        """Seconds of each of ``iters`` timed forward passes over ``images`` as one batch, after ``warmup``."""
        timings = self._run(images, warmup=warmup, iters=iters)[1]
        return [float(ms) / 1e3 for ms, _ in timings["runs"]]

"""qd_infer, the C++ runner, as a benchmark backend: built with CMake, fed PNG files, timed by its own clock.

    exe, _ = build_qd_infer(REPO_ROOT / "build" / "bench-native")
    seg = NativeSegmenter(exe, Path("model.pt2"), threads=2)
    labels = seg.predict(images)                        # (B, H, W) from the label PNGs qd_infer writes
    seconds = seg.timed_passes(images, warmup=3, iters=20)  # one entry per timed forward pass

A process per call cannot be timed from Python (start-up and model loading would dominate), so latency comes from
``qd_infer --timings``: the steady clock around each ``run`` of the loaded package inside the C++ process, batch
preparation and PNG decoding excluded, as ``predict`` is timed for the Python backends (their images are already
tensors). On a GPU that clock also covers copying the batch to the device and the outputs back (qd_infer builds
its batches on the host), which the Python backends' device-resident images skip; the report marks such rows.
Accuracy uses ``predict``, one qd_infer process per batch.
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


def headline(output: str) -> str:
    """The line of a build tool's output that says what went wrong: its first error line, else its last line."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[0 if errors else -1]


def native_sources() -> Path | None:
    """The checkout holding qd_infer's sources (CMakeLists.txt, native/), or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "CMakeLists.txt").is_file() and (root / "native").is_dir() else None


def build_qd_infer(build_dir: Path, jobs: int = 2) -> tuple[Path, str]:
    """Configure and build qd_infer into ``build_dir`` (incrementally); returns (executable, configure output).

    Needs the source checkout (CMakeLists.txt and native/), cmake, a C++20 compiler and libpng / libjpeg development
    files (scripts/system_deps.sh installs them).
    """
    root = native_sources()
    if root is None:
        raise NativeError("qd_infer is built from the source checkout (CMakeLists.txt, native/); this is an "
                          "installed copy of the package")
    if shutil.which("cmake") is None:
        exe = build_dir / "native" / "qd_infer"
        sources = [p for p in (root / "native").rglob("*") if p.is_file()] + [root / "CMakeLists.txt"]
        if exe.is_file() and exe.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
            # Built before and no source changed since: usable without the build tools.
            return exe, "cmake not installed: the existing build, newer than every source file, is used\n"
        raise NativeError("cmake is not installed; qd_infer needs cmake, g++, libpng-dev and libjpeg-dev "
                          "(bash scripts/system_deps.sh)")
    configure = subprocess.run(["cmake", "-S", str(root), "-B", str(build_dir),
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"], capture_output=True, text=True)
    if configure.returncode:
        output = configure.stdout + configure.stderr
        raise NativeError(f"configuring qd_infer failed: {headline(output)}\n{tail(output)}")
    build = subprocess.run(["cmake", "--build", str(build_dir), f"-j{jobs}"], capture_output=True, text=True)
    if build.returncode:
        output = build.stdout + build.stderr
        raise NativeError(f"building qd_infer failed: {headline(output)}\n{tail(output)}")
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

    def _run(self, images: Tensor, *, warmup: int, iters: int) -> tuple[Tensor, list[float]]:
        """One qd_infer process over ``images`` as one batch → (labels (B, H, W) int64, ms of each timed pass)."""
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
            labels = [self._read_labels(out / name, tuple(images.shape[-2:])) for name in names]
            return torch.from_numpy(np.stack(labels)), self._read_timings(timings, iters, len(names))

    def _read_labels(self, path: Path, size: tuple[int, ...]) -> np.ndarray:
        """One label PNG qd_infer wrote → (H, W) int64; a missing, unreadable or wrongly sized one is an error."""
        try:
            with Image.open(path) as im:
                labels = np.asarray(im, dtype=np.int64)
        except OSError as e:
            raise NativeError(f"qd_infer exited 0 but its label map {path.name} cannot be read: {e}") from e
        if labels.shape != size:
            raise NativeError(f"qd_infer wrote a label map of shape {labels.shape} for {path.name}; expected {size}")
        return labels

    @staticmethod
    def _read_timings(path: Path, iters: int, images: int) -> list[float]:
        """``--timings`` JSON → milliseconds of each timed pass; exactly ``iters`` passes of ``images`` images, else
        an error (a short or malformed file must not become a latency)."""
        try:
            runs = json.loads(path.read_text())["runs"]
            ms = [float(t) for t, n in runs if int(n) == images]
            complete = isinstance(runs, list) and len(ms) == len(runs)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NativeError(f"qd_infer exited 0 but its timings file is missing or malformed "
                              f"(expected {{\"runs\": [[ms, images], ...]}}): {type(e).__name__}: {e}") from e
        if not complete or len(ms) != iters or not all(t >= 0 for t in ms):
            raise NativeError(f"qd_infer's timings file lists {len(runs)} passes ({runs[:3]}...); expected {iters} "
                              f"passes of {images} images, each a non-negative time")
        return ms

    def predict(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) RGB in [0, 255] at the package's size → labels (B, H, W) int64 (CPU)."""
        return self._run(images, warmup=0, iters=1)[0]

    def timed_passes(self, images: Tensor, *, warmup: int, iters: int) -> list[float]:
        """Seconds of each of ``iters`` timed forward passes over ``images`` as one batch, after ``warmup``."""
        return [ms / 1e3 for ms in self._run(images, warmup=warmup, iters=iters)[1]]

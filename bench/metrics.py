"""The numbers of a benchmark report: latency percentiles, throughput, MFU, and the accuracy parity rule.

Parity: a backend is scored on the same images as the PyTorch fp32 reference; its mIoU may differ from the
reference's by at most ``TOLERANCE_POINTS[precision]`` mIoU points. fp32 backends only reorder fp32 sums (a handful
of pixels on a decision boundary may flip), so 0.1 points; fp16/bf16 round every activation to 8–11 mantissa bits
and flip more boundary pixels, so 0.5 points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

TOLERANCE_POINTS = {"fp32": 0.1, "bf16": 0.5, "fp16": 0.5}

# Dense peak FLOP/s per GPU and precision. H200 has the H100 SXM's compute (only its memory differs). fp32 is the
# plain fp32 rate: the suites keep TF32 off, as torch does by default for matrix products.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 ≤ q ≤ 100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("values: expected at least one measurement")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q: expected a percentile in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def peak_flops(device_name: str, precision: str, override: float | None = None) -> float | None:
    """Peak FLOP/s of ``device_name`` at ``precision``; ``override`` (FLOP/s) wins; None when unknown (CPUs)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"override: expected a positive peak FLOP/s, got {override}")
        return override
    for gpu, table in PEAK_FLOPS.items():
        if gpu in device_name.upper():
            return table.get(precision)
    return None


def mfu(flops_per_image: float, batch: int, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s (``batch`` images in ``seconds``) over ``peak``; None without one."""
    if peak is None or seconds <= 0:
        return None
    return flops_per_image * batch / seconds / peak


@dataclass(frozen=True)
class Parity:
    """mIoU of a backend against the PyTorch fp32 reference on the same images; mIoUs are fractions in [0, 1]."""

    backend: str
    precision: str
    miou: float
    reference_miou: float
    agreement: float  # fraction of pixels whose predicted class equals the reference's

    @property
    def delta_points(self) -> float:
        """Backend minus reference mIoU, in percentage points."""
        return 100.0 * (self.miou - self.reference_miou)

    @property
    def tolerance_points(self) -> float:
        if self.precision not in TOLERANCE_POINTS:
            raise ValueError(f"precision: expected one of {', '.join(TOLERANCE_POINTS)}, got {self.precision!r}")
        return TOLERANCE_POINTS[self.precision]

    @property
    def passed(self) -> bool:
        # NaN (nothing scored) never passes.
        return abs(self.delta_points) <= self.tolerance_points

    def message(self) -> str:
        verdict = "within" if self.passed else "exceeds"
        return (f"{self.backend}: mIoU {100 * self.miou:.2f} vs reference {100 * self.reference_miou:.2f} "
                f"(delta {self.delta_points:+.3f} points {verdict} the {self.precision} tolerance of "
                f"{self.tolerance_points} points; argmax agreement {100 * self.agreement:.3f}%)")


def check_parity(parity: Parity) -> None:
    """Raise AssertionError naming the backend when its mIoU delta exceeds its precision's tolerance."""
    if not parity.passed:
        raise AssertionError(parity.message())

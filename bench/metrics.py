"""The numbers of a benchmark report: latency percentiles, throughput, MFU, and the accuracy parity rule.

Parity: a backend is scored on the same images as the PyTorch fp32 reference and held to the tolerances of
``export.parity`` (one rule for the exporter's checks and the benchmark's): its mIoU within
``TOLERANCE_POINTS[precision]`` points of the reference's, and, where it returns logits, their relative error
within ``LOGIT_TOLERANCE[precision]``; that module says why these numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from export.parity import LOGIT_TOLERANCE, TOLERANCE_POINTS, check_precision, logits_within, miou_within

__all__ = ["LOGIT_TOLERANCE", "TOLERANCE_POINTS", "GpuSpec", "GPUS", "Parity", "check_parity", "gpu_spec_for", "mfu",
           "peak_flops", "percentile"]


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet peaks (dense, no sparsity) of one GPU. fp32 is the plain fp32 rate: the suites keep TF32 off, as
    torch does by default for matrix products."""

    name: str
    tensor_tflops: float  # bf16 / fp16 tensor cores
    fp32_tflops: float  # fp32 without tensor cores
    bandwidth_tbs: float  # HBM, TB/s (10^12 bytes)

    def peak(self, precision: str) -> float:
        """FLOP/s at ``precision`` (fp32, bf16 or fp16)."""
        return 1e12 * (self.fp32_tflops if precision == "fp32" else self.tensor_tflops)


# The H200 has the H100 SXM's compute; only its memory differs. The NVL cards (PCIe, 400 W) run slower clocks.
GPUS = {
    "h100-sxm": GpuSpec("NVIDIA H100 SXM (80GB HBM3)", 989.4, 66.9, 3.35),
    "h100-pcie": GpuSpec("NVIDIA H100 PCIe", 756.5, 51.2, 2.0),
    "h100-nvl": GpuSpec("NVIDIA H100 NVL", 835.5, 60.0, 3.9),
    "h200": GpuSpec("NVIDIA H200", 989.4, 66.9, 4.8),
    "h200-nvl": GpuSpec("NVIDIA H200 NVL", 835.5, 60.0, 4.8),
    "a100-sxm": GpuSpec("NVIDIA A100 SXM (80GB)", 312.0, 19.5, 2.039),
    "a100-sxm-40gb": GpuSpec("NVIDIA A100 SXM (40GB)", 312.0, 19.5, 1.555),
}


def gpu_spec_for(device_name: str) -> GpuSpec | None:
    """The datasheet entry for a ``torch.cuda.get_device_name()`` string, or None when it is not one of GPUS
    (then MFU and ideal times are n/a rather than computed against another card's peaks)."""
    name = device_name.upper()
    if " MIG " in f" {name} " or "MIG " in name:
        return None  # a MIG slice has a fraction of the card's SMs and bandwidth: the datasheet peaks do not apply
    if "GH200" in name:
        return None  # its HBM (96 GB at 4.0 TB/s or 144 GB at 4.9) is not told by the name
    if "H200" in name:
        return GPUS["h200-nvl" if "NVL" in name else "h200"]
    if "H100" in name:
        return GPUS["h100-nvl" if "NVL" in name else "h100-pcie" if "PCIE" in name else "h100-sxm"]
    if "A100" in name and "PCIE" not in name:
        return GPUS["a100-sxm-40gb" if "40GB" in name else "a100-sxm"]
    return None


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
    spec = gpu_spec_for(device_name)
    return spec.peak(precision) if spec is not None else None


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
    logit_rel_error: float | None = None  # ‖L − L_ref‖ / ‖L_ref‖; None for a backend that returns labels only

    @property
    def delta_points(self) -> float:
        """Backend minus reference mIoU, in percentage points."""
        return 100.0 * (self.miou - self.reference_miou)

    @property
    def tolerance_points(self) -> float:
        check_precision(self.precision)
        return TOLERANCE_POINTS[self.precision]

    @property
    def logit_tolerance(self) -> float:
        check_precision(self.precision)
        return LOGIT_TOLERANCE[self.precision]

    @property
    def miou_passed(self) -> bool:
        return miou_within(self.precision, self.delta_points)

    @property
    def logits_passed(self) -> bool:
        return logits_within(self.precision, self.logit_rel_error)

    @property
    def passed(self) -> bool:
        return self.miou_passed and self.logits_passed

    def message(self) -> str:
        verdict = "within" if self.miou_passed else "exceeds"
        text = (f"{self.backend}: mIoU {100 * self.miou:.2f} vs reference {100 * self.reference_miou:.2f} "
                f"(delta {self.delta_points:+.3f} points {verdict} the {self.precision} tolerance of "
                f"{self.tolerance_points} points; argmax agreement {100 * self.agreement:.3f}%)")
        if self.logit_rel_error is not None:
            verdict = "within" if self.logits_passed else "exceeds"
            text += (f"; logit relative error {self.logit_rel_error:.2e} {verdict} the {self.precision} tolerance "
                     f"of {self.logit_tolerance:.0e}")
        return text


def check_parity(parity: Parity) -> None:
    """Raise AssertionError naming the backend when its mIoU delta or its logit error exceeds its precision's
    tolerance."""
    if not parity.passed:
        raise AssertionError(parity.message())

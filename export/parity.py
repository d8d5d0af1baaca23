"""The tolerances a fast path (ONNX Runtime, FP16, TensorRT, torch.compile, bf16, the Triton kernels) is held to
against the PyTorch fp32 reference on the same images; the exporter's parity check and the benchmark's accuracy
suite both apply them.

mIoU: within ``TOLERANCE_POINTS[precision]`` points of the reference's. fp32 paths only reorder fp32 sums (a
handful of pixels on a decision boundary may flip), so 0.1 points; fp16/bf16 round every activation to 8–11
mantissa bits and flip more boundary pixels, so 0.5 points.

Logits: the relative error ‖L − L_ref‖ / ‖L_ref‖ over all images within ``LOGIT_TOLERANCE[precision]``. Labels
cannot show a wrong fast path of a randomly initialised student, whose logits hardly vary over the image (it
predicts one class everywhere), while its logits still can. fp32: the unit roundoff is 6e-8 and reordered sums
measured ≤ 1.2e-7 (ONNX Runtime, AOTInductor, torch.compile against eager, tiny student on CPU); 1e-4 leaves a
thousandfold margin and still fails a prediction shifted by 4 pixels (5.7e-4 on the random-weight tiny student) or
taken from another image (3.4e-3). fp16 / bf16: unit roundoff 4.9e-4 / 3.9e-3 per rounding, measured 2.9e-4–1.3e-3
(fp16) and 4.1e-3–2.0e-2 (bf16) on the tiny student, random and trained; 0.05 / 0.1 leave room for a 24-block
ViT-L and catch a broken path (zeros, NaN, another model's numbers), not a subtle one: that is the mIoU rule's job
on trained weights.
"""
from __future__ import annotations

import math

TOLERANCE_POINTS = {"fp32": 0.1, "bf16": 0.5, "fp16": 0.5}
LOGIT_TOLERANCE = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}


def check_precision(precision: str) -> None:
    """ValueError naming ``precision`` unless it is one the rule knows."""
    if precision not in TOLERANCE_POINTS:
        raise ValueError(f"precision: expected one of {', '.join(TOLERANCE_POINTS)}, got {precision!r}")


def miou_within(precision: str, miou_delta_points: float) -> bool:
    """Whether an mIoU delta (points) holds ``precision``'s tolerance; NaN (nothing scored) never does."""
    check_precision(precision)
    return abs(miou_delta_points) <= TOLERANCE_POINTS[precision]


def logits_within(precision: str, logit_rel_error: float | None) -> bool:
    """Whether a logit relative error holds ``precision``'s tolerance; NaN never does, and a path that returns
    labels only (None) has nothing to fail."""
    check_precision(precision)
    return logit_rel_error is None or logit_rel_error <= LOGIT_TOLERANCE[precision]


def parity_problems(precision: str, logit_rel_error: float | None, miou_delta_points: float) -> list[str]:
    """What breaks the rule for a path of ``precision`` ("fp32", "fp16" or "bf16"): an empty list when it holds.
    NaN never holds."""
    problems = []
    if not logits_within(precision, logit_rel_error):
        problems.append(f"logit relative error {logit_rel_error:.2e} exceeds the {precision} tolerance "
                        f"{LOGIT_TOLERANCE[precision]:.0e}")
    if not miou_within(precision, miou_delta_points):
        delta = "NaN" if math.isnan(miou_delta_points) else f"{miou_delta_points:+.3f}"
        problems.append(f"mIoU delta {delta} points exceeds the {precision} tolerance of "
                        f"{TOLERANCE_POINTS[precision]} points")
    return problems

"""The accuracy parity rule of the benchmark: a backend fails when its mIoU strays from the reference's by more than
its precision's tolerance (fp32 0.1 points, fp16/bf16 0.5 points)."""
from __future__ import annotations

import math

import pytest
import torch

from bench.metrics import TOLERANCE_POINTS, Parity, check_parity
from qd_core.metrics import ConfusionMatrix


def parity(precision: str, delta_points: float, reference: float = 0.6) -> Parity:
    return Parity("backend-x", precision, reference + delta_points / 100, reference, agreement=0.99)


def test_tolerances_are_the_documented_ones():
    assert TOLERANCE_POINTS == {"fp32": 0.1, "bf16": 0.5, "fp16": 0.5}


@pytest.mark.parametrize("precision, delta", [("fp32", 0.09), ("fp32", -0.09), ("bf16", 0.49), ("fp16", -0.49)])
def test_backend_within_tolerance_passes(precision: str, delta: float):
    p = parity(precision, delta)
    assert p.passed
    check_parity(p)


@pytest.mark.parametrize("precision, delta", [("fp32", 0.11), ("fp32", -0.2), ("bf16", 0.51), ("fp16", -0.6)])
def test_backend_over_tolerance_fails_naming_it(precision: str, delta: float):
    p = parity(precision, delta)
    assert not p.passed
    with pytest.raises(AssertionError, match=r"backend-x: .*exceeds the " + precision):
        check_parity(p)


def test_delta_is_in_percentage_points():
    assert parity("fp32", 0.25).delta_points == pytest.approx(0.25)


def test_nan_miou_fails():
    p = Parity("backend-x", "fp32", math.nan, 0.5, agreement=0.0)
    with pytest.raises(AssertionError, match="backend-x"):
        check_parity(p)


def test_unknown_precision_is_a_value_error():
    with pytest.raises(ValueError, match="precision"):
        parity("int8", 0.0).tolerance_points


def test_fp32_backend_flipping_one_percent_of_pixels_fails():
    # Two classes of 1000 pixels each; the backend turns 1 % of class-0 pixels into class 1. The reference is
    # perfect (mIoU 1); the backend's IoUs are 990/1000 and 1000/1010, a drop of ~1 point, far over 0.1.
    label = torch.zeros(1, 10, 200, dtype=torch.int64)
    label[..., 100:] = 1
    backend = label.clone()
    backend[0, 0, :10] = 1  # 10 of the 1000 class-0 pixels
    ref_cm, cm = ConfusionMatrix(2), ConfusionMatrix(2)
    ref_cm.update(label, label)
    cm.update(backend, label)
    expected = (990 / 1000 + 1000 / 1010) / 2
    assert cm.miou() == pytest.approx(expected)
    p = Parity("ort-fp32", "fp32", cm.miou(), ref_cm.miou(), agreement=float((backend == label).double().mean()))
    assert p.delta_points == pytest.approx(100 * (expected - 1))
    with pytest.raises(AssertionError, match="ort-fp32"):
        check_parity(p)

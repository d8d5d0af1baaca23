"""The accuracy parity rule of the benchmark: a backend fails when its mIoU strays from the reference's by more than
its precision's tolerance (fp32 0.1 points, fp16/bf16 0.5 points), or its logits by more than their relative
tolerance (fp32 1e-4, fp16 0.05, bf16 0.1)."""
from __future__ import annotations

import math

import pytest
import torch

from bench.metrics import LOGIT_TOLERANCE, TOLERANCE_POINTS, Parity, check_parity
from qd_core.metrics import ConfusionMatrix


def parity(precision: str, delta_points: float, reference: float = 0.6) -> Parity:
    return Parity("backend-x", precision, reference + delta_points / 100, reference, agreement=0.99)


def test_tolerances_are_the_documented_ones():
    assert TOLERANCE_POINTS == {"fp32": 0.1, "bf16": 0.5, "fp16": 0.5}
    assert LOGIT_TOLERANCE == {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}


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


def random_weight_logits(seed: int = 0) -> torch.Tensor:
    """(4, 19, 32, 32) logits like a randomly initialised student's: a per-class level, and a spatial variation
    thousands of times smaller (measured on the tiny student: mean |L| 0.52, spatial std 2e-4)."""
    g = torch.Generator().manual_seed(seed)
    level = torch.randn(1, 19, 1, 1, generator=g) * 0.6
    return level + 2e-4 * torch.randn(4, 19, 32, 32, generator=g)


def rel_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).norm() / reference.norm())


@pytest.mark.parametrize("wrong", ["shifted", "other image", "zeros", "nan"])
def test_a_wrong_fp32_path_fails_on_its_logits_where_its_labels_cannot_tell(wrong: str):
    """A random-weight student predicts one class everywhere: shifting or swapping its output leaves mIoU and the
    labels unchanged, and only the logits show it."""
    ref = random_weight_logits()
    logits = {"shifted": ref.roll(4, dims=-1), "other image": ref.roll(1, dims=0), "zeros": torch.zeros_like(ref),
              "nan": torch.full_like(ref, math.nan)}[wrong]
    assert bool((ref.argmax(1) == ref.argmax(1)[0, 0, 0]).all())  # one class everywhere: labels cannot tell
    p = Parity("ort-fp32", "fp32", 0.05, 0.05, agreement=1.0, logit_rel_error=rel_error(logits, ref))
    assert p.miou_passed and not p.passed
    with pytest.raises(AssertionError, match="ort-fp32: .*logit relative error .* exceeds the fp32 tolerance"):
        check_parity(p)


@pytest.mark.parametrize("precision, bits", [("fp32", 24), ("fp16", 11), ("bf16", 8)])
def test_rounding_to_the_backends_precision_passes(precision: str, bits: int):
    """Rounding every logit to the precision's mantissa (a lower bound of what its path does) stays far inside."""
    ref = random_weight_logits().double()
    mantissa, exponent = torch.frexp(ref)
    scale = 2.0 ** bits
    rounded = torch.ldexp(torch.round(mantissa * scale) / scale, exponent)
    p = Parity("x", precision, 0.05, 0.05, agreement=1.0, logit_rel_error=rel_error(rounded, ref))
    assert p.passed and p.logit_rel_error < LOGIT_TOLERANCE[precision] / 10


def test_a_labels_only_backend_is_judged_on_its_miou():
    assert Parity("qd-infer", "fp32", 0.5, 0.5, agreement=1.0).passed
    assert not Parity("qd-infer", "fp32", 0.49, 0.5, agreement=1.0).passed

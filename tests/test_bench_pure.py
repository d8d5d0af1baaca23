"""bench.backends.in_dtype: the whole student in bf16 (the torch-bf16-pure, -graphs and compile-bf16 backends)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.backends import BACKENDS, TorchBackend, in_dtype, torch_recipe
from qd_core import build_student, load_config


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_student(load_config("tiny")).eval().requires_grad_(False)


def test_in_dtype_converts_every_floating_tensor_of_a_copy():
    model = _tiny()
    pure = in_dtype(model, torch.bfloat16)
    for (name, t), (_, original) in zip(pure.state_dict(keep_vars=True).items(),
                                        model.state_dict(keep_vars=True).items()):
        expected = torch.bfloat16 if original.is_floating_point() else original.dtype
        assert t.dtype == expected, f"{name}: {t.dtype}"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the shared model is left alone
    assert pure.pixel_mean.dtype == torch.bfloat16  # non-persistent buffers too


def test_the_bf16_student_takes_fp32_images_and_stays_close_to_fp32():
    """Relative L2 error of the semantic logits within 8 bf16 unit roundoffs (2^-8 each): what a few dozen
    roundings of activations and weights, each of relative size ≤ 2^-8, add up to."""
    model = _tiny()
    images = torch.rand(2, 3, 128, 128) * 255
    ref_logits, ref_labels = TorchBackend(model, name="fp32").run(images)
    logits, labels = TorchBackend(model, name="pure", dtype=torch.bfloat16).run(images)
    assert logits.dtype == torch.float32 and labels.shape == ref_labels.shape
    rel = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert rel <= 8 * 2.0 ** -8, f"relative error {rel:.3e}"
    assert (labels == ref_labels).float().mean() >= 0.95


def test_the_backends_that_convert_the_model_do_not_also_autocast():
    converted = {b.name for b in BACKENDS if (torch_recipe(b) or {}).get("dtype") is not None}
    assert converted == {"torch-bf16-pure", "torch-triton-bf16-graphs", "torch-compile-bf16",
                         "torch-compile-triton-bf16"}
    for b in BACKENDS:
        recipe = torch_recipe(b)
        assert recipe is None or recipe.get("autocast") is None or recipe.get("dtype") is None, b.name
    with pytest.raises(ValueError, match="pick one"):
        TorchBackend(_tiny(), name="both", autocast=torch.bfloat16, dtype=torch.bfloat16)


def test_onnx_runtime_backends_skip_with_a_reason_where_it_is_not_installed(monkeypatch):
    import importlib.util

    from bench.backends import BACKENDS, unavailable_reason
    from bench.settings import BenchSettings

    settings = BenchSettings(device="cpu", config="tiny", checkpoint=None, data=None, images=2, batch=2, backends=None,
                             cpu_compile=False, work=None)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    reasons = {b.name: unavailable_reason(b, settings) for b in BACKENDS if b.name.startswith("ort-")}
    assert reasons == {"ort-fp32": "ONNX Runtime is not installed (the onnxruntime package)",
                       "ort-fp16": "ONNX Runtime is not installed (the onnxruntime package)"}

"""bench.backends.with_lowp_weights: low-precision linear/conv weights give autocast's outputs without its casts."""
from __future__ import annotations

import torch
from torch import nn

from bench.backends import TorchBackend, with_lowp_weights
from qd_core import build_student, load_config


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_student(load_config("tiny")).eval().requires_grad_(False)


def test_lowp_weights_change_only_linear_and_conv_parameters_of_a_copy():
    model = _tiny()
    lowp = with_lowp_weights(model, torch.bfloat16)
    matmul = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)
    cast = kept = 0
    for (name, module), original in zip(lowp.named_modules(), model.modules()):
        for pname, param in module.named_parameters(recurse=False):
            expected = torch.bfloat16 if isinstance(module, matmul) else torch.float32
            assert param.dtype == expected, f"{name}.{pname}: {param.dtype}"
            assert getattr(original, pname).dtype == torch.float32  # the shared model is left alone
            cast, kept = cast + (expected == torch.bfloat16), kept + (expected == torch.float32)
    assert cast > 20 and kept > 5  # the tiny student has both kinds


def test_autocast_with_lowp_weights_gives_the_same_labels_and_logits():
    """Autocast casts these weights to the same bf16 values on every call, so the outputs are identical."""
    model = _tiny()
    images = torch.rand(2, 3, 128, 128) * 255
    plain = TorchBackend(model, name="plain", autocast=torch.bfloat16)
    lowp = TorchBackend(model, name="lowp", autocast=torch.bfloat16, lowp_weights=True)
    (logits, labels), (logits_lowp, labels_lowp) = plain.run(images), lowp.run(images)
    torch.testing.assert_close(logits_lowp, logits, atol=0, rtol=0)
    assert torch.equal(labels_lowp, labels)

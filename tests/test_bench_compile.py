"""bench.backends.compile_options: how the torch.compile backends are compiled (here with Inductor on the CPU)."""
from __future__ import annotations

import torch
from torch import nn

from bench.backends import TorchBackend, compile_options
from qd_core import build_student, load_config


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_student(load_config("tiny")).eval().requires_grad_(False)


def test_options_drop_module_guards_and_ask_for_cuda_graphs_only_when_wanted():
    plain, graphed = compile_options(False), compile_options(True)
    assert plain == {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    assert graphed == {**plain, "triton.cudagraphs": True}
    assert compile_options(False) is not plain  # torch.compile pops from the dict it gets: a fresh one per call


def test_compiled_backend_equals_eager_and_compiles_once():
    """Without module guards the compiled forward must still be the eager one, and a third call at a seen shape
    must reuse the graph (a guard that fails on every call would recompile until the recompile limit)."""
    model = _tiny()
    eager = TorchBackend(model, name="eager")
    compiled = TorchBackend(model, name="compiled", compile=True)
    images = torch.rand(2, 3, 128, 128) * 255
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        logits, labels = compiled.run(images)
    expected_logits, expected_labels = eager.run(images)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert (labels == expected_labels).float().mean() >= 0.999
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

"""What torch.compile costs the host on every call of the compiled ViT-L student before its graph runs: Dynamo's
guard checks and the bytecode that hands the parameters to the graph, with all guards against without the guards
on nn.Module attributes (``bench.backends.compile_options``).

The graph itself is replaced by a function returning its outputs (computed once on fake tensors), so only
Dynamo's share is timed, on any machine. At batch 1 on a GPU that share is time the GPU waits before each replay.

    pytest bench/test_compile_overhead.py --benchmark-columns=median,rounds
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.backends import attention_backend, compile_options
from export.wrapper import ExportWrapper
from qd_core import build_student, load_config


def _outputs_once(gm: torch.fx.GraphModule, example_inputs: list[Any]):
    """A compiler backend that runs the graph once on fake tensors and then returns those outputs: no kernel runs."""
    cache: dict[str, Any] = {}

    def run(*args: Any) -> Any:
        if "out" not in cache:
            with FakeTensorMode(allow_non_fake_inputs=True):
                cache["out"] = gm(*args)
        return cache["out"]
    return run


@pytest.fixture(scope="module")
def student() -> ExportWrapper:
    cfg = copy.deepcopy(load_config("vitl16_512"))
    cfg.model.backbone.checkpoint = ""  # random weights: only the module structure matters here
    torch.manual_seed(0)
    return ExportWrapper(build_student(cfg).eval().requires_grad_(False).to(torch.bfloat16)).eval()


@pytest.mark.parametrize("guards", ["all", "no-module-guards"])
def test_dynamo_overhead_per_call(benchmark, student: ExportWrapper, guards: str):
    # The benchmarked backends' guard filter, or none. (Inductor's own options mean nothing to this backend.)
    filter_fn = compile_options(cuda_graphs=False).get("guard_filter_fn")
    assert filter_fn is not None, f"torch {torch.__version__}: no torch.compiler.skip_guard_on_all_nn_modules_unsafe"
    options = {"guard_filter_fn": filter_fn} if guards != "all" else None
    images = torch.zeros(1, 3, 512, 512)
    torch._dynamo.reset()
    with torch.inference_mode(), attention_backend("triton"):
        compiled = torch.compile(student, backend=_outputs_once, dynamic=False, options=options)
        logits, labels = compiled(images)  # traces and compiles
        benchmark.group = "dynamo overhead per call, vitl16_512 bf16, batch 1"
        benchmark.extra_info.update(kind="dynamo_overhead", guards=guards)
        benchmark(compiled, images)
    assert tuple(labels.shape) == (1, 512, 512)

"""kernels.ops: the Triton kernels as ``torch.ops.qd`` custom operators, the way torch.compile runs them.

Under Triton's interpreter on CPU (as tests/test_kernels.py). What must hold: each operator's fake implementation
gives the real output's shape, dtype and strides (Inductor plans the code around the call from it), the compiled
student calls every operator in one graph and gives the eager kernels' result, and the model takes the operators
only where it should (torch.compile, QD_ATTENTION=triton, no gradient; never in an export).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import kernels  # noqa: E402
from qd_core.attention import backend_for  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPERATORS = ("agent_attention", "masked_attention", "ms_deform_attn", "semantic_labels", "depthwise_conv3x3")


def _msda_inputs() -> tuple:
    shapes = torch.tensor([[4, 6], [2, 3]], device=DEVICE)
    starts = torch.tensor([0, 24], device=DEVICE)
    value = torch.randn(2, 30, 2, 8, device=DEVICE)
    locations = torch.rand(2, 5, 2, 2, 3, 2, device=DEVICE)
    weights = torch.rand(2, 5, 2, 2, 3, device=DEVICE)
    return value, shapes, starts, locations, weights


def _op_samples() -> dict[str, tuple]:
    """Small inputs for each operator, including a q that is a transposed (B, N, H, d) view, as the model's."""
    torch.manual_seed(50)
    q = torch.randn(2, 19, 3, 16, device=DEVICE).transpose(1, 2)  # (B, H, N, d), not contiguous
    k, v = torch.randn(1, 3, 7, 16, device=DEVICE), torch.randn(1, 3, 7, 16, device=DEVICE)
    mq = torch.randn(2, 3, 5, 16, device=DEVICE)
    mk, mv = torch.randn(2, 3, 40, 16, device=DEVICE), torch.randn(2, 3, 40, 16, device=DEVICE)
    x = torch.randn(2, 8, 6, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    return {
        "agent_attention": (q, k, v, None),
        "masked_attention": (mq, mk, mv, torch.randn(2, 5, 12, device=DEVICE), torch.randn(2, 12, 40, device=DEVICE),
                             0.3),
        "ms_deform_attn": _msda_inputs(),
        "semantic_labels": (torch.rand(2, 4, 6, device=DEVICE), torch.randn(2, 4, 5, 7, device=DEVICE), [11, 9]),
        "depthwise_conv3x3": (x, [torch.randn(8, 1, 3, 3, device=DEVICE) for _ in range(2)], [1, 3]),
    }


@pytest.mark.parametrize("name", OPERATORS)
def test_fake_implementation_gives_the_real_shape_dtype_and_strides(name):
    """torch.library.opcheck: the schema, the fake implementation against the real output (shape, dtype and
    strides) and the operator's behaviour under AOT dispatch, which is how Inductor sees it."""
    op = getattr(torch.ops.qd, name).default
    args = _op_samples()[name]
    with torch.no_grad():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_operators_return_the_eager_kernels_results():
    samples = _op_samples()
    q, k, v, _ = samples["agent_attention"]
    torch.testing.assert_close(torch.ops.qd.agent_attention(q, k, v, None), kernels.agent_attention(q, k, v),
                               rtol=0, atol=0)
    x, weights, dilations = samples["depthwise_conv3x3"]
    stacked = torch.ops.qd.depthwise_conv3x3(x, weights, dilations)
    assert stacked.shape == (2, 2, 6, 5, 8)
    for got, expected in zip(kernels.ops.unstack(stacked), kernels.depthwise_conv3x3(x, weights, dilations)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert got.is_contiguous(memory_format=torch.channels_last)


def _graph_operators(fn, *args) -> tuple[object, list[str]]:
    """Compile ``fn`` with Inductor in one graph (fullgraph: a graph break fails), run it on ``args``, and return its
    result and the ``qd`` operators in the graph Dynamo captured."""
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "qd." in str(n.target))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args), seen


def test_compiled_student_calls_every_kernel_operator_and_equals_the_eager_kernels(monkeypatch):
    """The torch-compile-triton-bf16 benchmark backend's graph (here fp32, Inductor on CPU): the deployed wrapper
    (normalisation, student, logits, full-size labels) with all five kernels in one compiled graph, equal to the
    same kernels run eagerly (same kernels on the same inputs; Inductor only re-associates the fused ops around
    them: fp32 rounding) and to the PyTorch path."""
    from export.wrapper import ExportWrapper
    from qd_core import build_student, load_config

    torch.manual_seed(51)
    wrapper = ExportWrapper(build_student(load_config("tiny")).eval().to(DEVICE).requires_grad_(False)).eval()
    images = torch.rand(1, 3, 128, 128, device=DEVICE) * 255
    with torch.inference_mode():
        monkeypatch.setenv("QD_ATTENTION", "torch")
        torch_logits, torch_labels = wrapper(images)
        monkeypatch.setenv("QD_ATTENTION", "triton")
        eager_logits, eager_labels = wrapper(images)
        (logits, labels), seen = _graph_operators(wrapper, images)
    assert sorted({s.removeprefix("qd.").split(".")[0] for s in seen}) == sorted(OPERATORS), seen
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(labels, eager_labels)
    torch.testing.assert_close(logits, torch_logits, atol=1e-4, rtol=1e-4)
    assert (labels == torch_labels).float().mean() >= 0.999


SEEN: list[str] = []  # module-level: torch.export works on a copy of the module, attributes included


class _Probe(nn.Module):
    """Records in SEEN what ``backend_for`` says inside a traced or compiled forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        SEEN.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(backend_for(x))
        return x * self.weight


@pytest.mark.parametrize("forced, grad, expected", [("triton", False, "triton"), ("triton", True, "torch"),
                                                    ("", False, "torch"), ("sdpa", False, "torch")])
def test_compiled_graphs_take_the_kernels_only_when_named_and_without_gradients(monkeypatch, forced, grad, expected):
    monkeypatch.setenv("QD_ATTENTION", forced)
    probe = _Probe()
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(probe, backend="eager", fullgraph=True)(torch.ones(2, 3))
    assert SEEN == [expected]


def test_exports_never_take_the_kernels(monkeypatch):
    """torch.export (AOTInductor) runs under is_compiling() too, but an exported program must be plain PyTorch."""
    monkeypatch.setenv("QD_ATTENTION", "triton")
    probe = _Probe().requires_grad_(False)
    with torch.no_grad():
        torch.export.export(probe, (torch.ones(2, 3),))
    assert SEEN == ["torch"]


def test_a_compiled_kernel_call_that_needs_gradients_runs_eagerly_with_its_backward():
    """No autograd formula on the operators: with gradients wanted the kernel runs between two compiled graphs,
    through its autograd Function, and gives the eager call's output and gradients."""
    torch.manual_seed(52)
    q = torch.randn(1, 2, 9, 16, device=DEVICE, requires_grad=True)
    k, v = torch.randn(1, 2, 4, 16, device=DEVICE), torch.randn(1, 2, 4, 16, device=DEVICE)

    def fn(q, k, v):
        return (kernels.agent_attention(q * 2, k, v) ** 2).sum()

    torch._dynamo.reset()
    got = torch.compile(fn, backend="eager")(q, k, v)
    (dq,) = torch.autograd.grad(got, q)
    expected = fn(q, k, v)
    (expected_dq,) = torch.autograd.grad(expected, q)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dq, expected_dq, rtol=1e-6, atol=1e-6)


def test_a_compiled_depthwise_call_that_needs_gradients_gets_the_kernels_one_line_refusal():
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    weights = [torch.randn(8, 1, 3, 3, device=DEVICE, requires_grad=True)]
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="inference only"):
        torch.compile(lambda x, w: kernels.depthwise_conv3x3(x, w, [1]), backend="eager")(x, weights)


def test_the_paper_student_compiles_to_one_graph_with_every_kernel_operator(monkeypatch):
    """vitl16_512 in bf16 as torch-compile-triton-bf16 runs it, traced by Dynamo in one graph (fullgraph: a graph
    break fails) and run on fake tensors (each operator's fake implementation; no kernel runs): one agent attention
    per Rein layer and one for the refinement, one masked attention per decoder layer, one deformable sampling per
    pixel-decoder layer, one depthwise call and one labels call."""
    import copy
    from collections import Counter

    from torch._subclasses.fake_tensor import FakeTensorMode

    from export.wrapper import ExportWrapper
    from qd_core import build_student, load_config

    cfg = copy.deepcopy(load_config("vitl16_512"))
    cfg.model.backbone.checkpoint = ""  # random weights: no DINOv2 file needed
    torch.manual_seed(53)
    wrapper = ExportWrapper(build_student(cfg).eval().requires_grad_(False).to(torch.bfloat16)).eval()
    seen: list[str] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "qd." in str(n.target))

        def run(*args):
            with FakeTensorMode(allow_non_fake_inputs=True):
                return gm(*args)
        return run

    monkeypatch.setenv("QD_ATTENTION", "triton")
    torch._dynamo.reset()
    with torch.inference_mode():
        logits, labels = torch.compile(wrapper, backend=backend, fullgraph=True, dynamic=False)(
            torch.zeros(1, 3, 512, 512))
    assert tuple(logits.shape) == (1, 19, 128, 128) and tuple(labels.shape) == (1, 512, 512)
    assert labels.dtype == torch.int32
    head = cfg.model.head
    assert Counter(s.removeprefix("qd.").split(".")[0] for s in seen) == {
        "agent_attention": cfg.model.backbone.depth + 1, "masked_attention": head.decoder_layers,
        "ms_deform_attn": head.pixel_decoder_layers, "depthwise_conv3x3": 1, "semantic_labels": 1}

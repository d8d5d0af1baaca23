"""Kernel microbenchmarks: the Triton agent and masked attention against their PyTorch references,
``F.scaled_dot_product_attention``, FlexAttention and xformers (the last two on CUDA, where installed); the
deformable attention's sampling core and predict's full-size labels against the model's PyTorch paths; the
student's bilinear resizes in PyTorch's own layout choice against channels-last (``qd_core.layers.resize``).

On CUDA every case runs at the paper's shapes in bf16, forward (inference, no graph) and forward+backward; each
timed call ends in ``torch.cuda.synchronize()`` and ``extra_info`` records the peak memory of one call
(``torch.cuda.max_memory_allocated``, and the part of it above the inputs), the GPU-only time of one call (CUDA
graph replay), the shapes and the forward FLOP count. Without CUDA the same code runs at tiny shapes under Triton's
interpreter; run it with ``--benchmark-disable`` (one call each) as a check that every benchmark runs and agrees
with the reference.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import kernels  # noqa: E402
from kernels import masked_triton  # noqa: E402
from kernels._triton_utils import autotuned_configs  # noqa: E402
from kernels.masked_triton import BITS_MIN_KEYS  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
HAS_FLEX = CUDA and importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
HAS_XFORMERS = CUDA and importlib.util.find_spec("xformers") is not None
MODES = ("fwd", "fwd+bwd")


@pytest.fixture(autouse=True, scope="module")
def cudnn_autotuning():
    """The PyTorch convolutions timed here get cuDNN's autotuning (per shape, in the warm-up calls) as the Triton
    kernels get theirs, and as ``python -m bench`` runs the model (bench.backends.BenchSession)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = CUDA
    yield
    torch.backends.cudnn.benchmark = previous


@dataclass(frozen=True)
class AgentCase:
    """q (b, h, n, d) over keys (b or 1, h, m, d)."""

    name: str
    b: int
    h: int
    n: int
    m: int
    d: int
    shared: bool


@dataclass(frozen=True)
class MaskedCase:
    """q (b, h, nq, d) over keys (b, h, seq, d), mask factors (b, nq, c) and (b, c, seq)."""

    name: str
    b: int
    h: int
    nq: int
    seq: int
    d: int
    c: int


@dataclass(frozen=True)
class LabelsCase:
    """predict's full-size labels: q queries' mask logits at ``low`` resized to ``size``, k classes."""

    name: str
    b: int
    q: int
    k: int
    low: tuple[int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class ResizeCase:
    """One of the student's bilinear resizes: (b, c, h, w) in → ``size``; ``tokens``: the input is a map view of
    (b, 1 + h·w, c) tokens (pyramid, refinement responses), else an NCHW-contiguous tensor (convolution output)."""

    name: str
    b: int
    c: int
    hw: tuple[int, int]
    size: tuple[int, int]
    tokens: bool


@dataclass(frozen=True)
class DepthwiseCase:
    """The refinement's dilated depthwise 3×3 convolution on its (b, c, h, w) concatenated maps."""

    name: str
    b: int
    c: int
    hw: tuple[int, int]
    dilation: int


@dataclass(frozen=True)
class MsdaCase:
    """Deformable attention: every pixel of the levels queries P points per head and level."""

    name: str
    b: int
    levels: tuple[tuple[int, int], ...]
    h: int
    d: int
    points: int


if CUDA:
    # Refinement: pixel tokens of the four pyramid levels of a 512² crop (128² + 64² + 32² + 16²) over 100 agent
    # queries, 8 heads × 32. Rein: 32² patch tokens over the 100 layer tokens shared by the batch, one 1024 head.
    AGENT_CASES = [AgentCase(f"refine-b{b}", b, 8, 21760, 100, 32, False) for b in (1, 8)] + \
                  [AgentCase(f"rein-b{b}", b, 1, 1024, 100, 1024, True) for b in (1, 8)]
    # Decoder: 100 queries over the 16², 32², 64² memories of a 512² crop, 8 heads × 32, 256 mask channels.
    MASKED_CASES = [MaskedCase(f"decoder-b{b}-L{seq}", b, 8, 100, seq, 32, 256) for b in (1, 8)
                    for seq in (256, 1024, 4096)]
    # torch.compile builds FlexAttention for each shape (tens of seconds each): batch 1 only.
    FLEX_CASES = {"refine-b1", "decoder-b1-L256", "decoder-b1-L1024", "decoder-b1-L4096"}
    # The pixel decoder's encoder layers at 512²: levels of stride 8, 16, 32, 8 heads × 32, 4 points.
    MSDA_CASES = [MsdaCase(f"pixel-decoder-b{b}", b, ((64, 64), (32, 32), (16, 16)), 8, 32, 4) for b in (1, 8)]
    LABELS_CASES = [LabelsCase(f"predict-b{b}", b, 100, 19, (128, 128), (512, 512)) for b in (1, 8)]
    # ViT-L at 512²: the pyramid's stride-32 map from 1024-channel tokens, the refinement's stride-32 response up
    # to stride 4, and its stride-4 maps down to the stride-32 memory (the decoder's mask factors likewise).
    RESIZE_CASES = [case for b in (1, 8) for case in (
        ResizeCase(f"pyramid-to-16-b{b}", b, 1024, (32, 32), (16, 16), True),
        ResizeCase(f"refine-16-to-128-b{b}", b, 256, (16, 16), (128, 128), True),
        ResizeCase(f"refine-128-to-16-b{b}", b, 256, (128, 128), (16, 16), False))]
    # ViT-L at 512²: 4 × 256 channels at stride 4, the widest of the four dilations.
    DEPTHWISE_CASES = [DepthwiseCase(f"refine-d4-b{b}", b, 1024, (128, 128), 4) for b in (1, 8)]
    # The same maps through all four fusions' depthwise convolutions (dilations 1-4).
    REFINE_DW_CASES = [DepthwiseCase(f"refine-b{b}", b, 1024, (128, 128), 4) for b in (1, 8)]
else:
    AGENT_CASES = [AgentCase("refine-tiny", 2, 2, 150, 20, 32, False), AgentCase("rein-tiny", 2, 1, 40, 20, 256, True)]
    MASKED_CASES = [MaskedCase("decoder-tiny", 1, 2, 20, 100, 32, 16)]
    FLEX_CASES = set()
    MSDA_CASES = [MsdaCase("msda-tiny", 1, ((6, 6), (3, 3)), 2, 8, 2)]
    LABELS_CASES = [LabelsCase("labels-tiny", 2, 20, 5, (6, 5), (23, 20))]
    RESIZE_CASES = [ResizeCase("tokens-tiny-b1", 1, 32, (8, 8), (4, 4), True),
                    ResizeCase("nchw-tiny-b2", 2, 16, (12, 12), (5, 7), False)]
    # The tiny config's refinement at 128² (4 × 64 channels at 32×32), batch 8 as in its training.
    DEPTHWISE_CASES = [DepthwiseCase(f"tiny-d{d}-b8", 8, 256, (32, 32), d) for d in (1, 4)]
    REFINE_DW_CASES = [DepthwiseCase("tiny-b2", 2, 256, (32, 32), 4)]  # (the interpreter: correctness only)


def _impls(case_name: str, wide_head: bool, masked_seq: int | None = None) -> list[str]:
    impls = ["triton", "reference", "sdpa"]
    if masked_seq is not None:
        # The masked kernel's other way of deciding the mask at this L (bench.kernel_summary compares the two).
        impls.insert(1, "triton-factors" if masked_seq >= BITS_MIN_KEYS else "triton-bits")
    if HAS_FLEX and case_name in FLEX_CASES:
        impls.append("flex")
    if HAS_XFORMERS and not wide_head:  # xformers' kernels stop short of a 1024-wide head
        impls.append("xformers")
    return impls


AGENT_PARAMS = [pytest.param(case, impl, mode, id=f"{case.name}-{impl}-{mode}")
                for case in AGENT_CASES for impl in _impls(case.name, case.d > 256) for mode in MODES]
MASKED_PARAMS = [pytest.param(case, impl, mode, id=f"{case.name}-{impl}-{mode}")
                 for case in MASKED_CASES for impl in _impls(case.name, False, case.seq) for mode in MODES]


# ------------------------------------------------------------------------------------------ implementations

_compiled: dict[str, Callable] = {}


def _flex(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor | None) -> Tensor:
    if "flex" not in _compiled:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        def run(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor | None) -> Tensor:
            if allowed is None:
                return flex_attention(q, k, v, scale=scale)

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(allowed[b, q_idx, kv_idx], score, -float("inf"))

            return flex_attention(q, k, v, score_mod=score_mod, scale=scale)

        # One build per shape, grad mode and masking: lift dynamo's per-function recompile cap above that count.
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
        _compiled["flex"] = torch.compile(run, dynamic=False)
    return _compiled["flex"](q, k, v, scale, allowed)


def _xformers(q: Tensor, k: Tensor, v: Tensor, scale: float, allowed: Tensor | None) -> Tensor:
    import xformers.ops as xops

    bias = None
    if allowed is not None:  # additive bias, (B, H, Q, L), 0 where allowed and -inf where blocked
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
        bias = bias[:, None].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
                                          scale=scale)
    return out.transpose(1, 2)


def agent_fn(impl: str, scale: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """q (B, H, N, d), k/v (B or 1, H, M, d) → (B, H, N, d) for one implementation."""
    if impl == "triton":
        return lambda q, k, v: kernels.agent_attention(q, k, v, scale=scale)
    if impl == "reference":
        return lambda q, k, v: kernels.agent_attention_reference(q, k, v, scale=scale)

    def expanded(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)

    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, *expanded(q, k, v), scale=scale)
    if impl == "flex":
        return lambda q, k, v: _flex(q, *expanded(q, k, v), scale, None)
    return lambda q, k, v: _xformers(q, *expanded(q, k, v), scale, None)


Attention = Callable[[Tensor, Tensor, Tensor], Tensor]  # (q, k, v) → output


def _with_mask_path(bits: bool, fn: Attention) -> Attention:
    """``fn`` with the masked kernel deciding its mask from the bit mask (``bits``) or from the factors at any L;
    the backward follows the forward's choice."""
    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        saved = masked_triton.BITS_MIN_KEYS
        masked_triton.BITS_MIN_KEYS = 0 if bits else 1 << 62
        try:
            return fn(q, k, v)
        finally:
            masked_triton.BITS_MIN_KEYS = saved
    return call


def masked_fn(impl: str, scale: float, me: Tensor, mf: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """q (B, H, Q, d), k/v (B, H, L, d) → (B, H, Q, d); the other implementations build the (B, Q, L) mask in the
    timed call, as the model would, since the Triton kernel builds it in-kernel from the same factors."""
    if impl == "triton":
        return lambda q, k, v: kernels.masked_attention(q, k, v, me, mf, scale=scale)
    if impl in ("triton-bits", "triton-factors"):
        return _with_mask_path(impl == "triton-bits", lambda q, k, v: kernels.masked_attention(q, k, v, me, mf,
                                                                                              scale=scale))
    if impl == "reference":
        return lambda q, k, v: kernels.masked_attention_reference(q, k, v, me, mf, scale=scale)

    def allowed() -> Tensor:
        return ~kernels.blocked_keys(me, mf)  # (B, Q, L), True = may attend

    if impl == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed()[:, None], scale=scale)
    if impl == "flex":
        return lambda q, k, v: _flex(q, k, v, scale, allowed())
    return lambda q, k, v: _xformers(q, k, v, scale, allowed())


# ------------------------------------------------------------------------------------------------- harness


def _run(benchmark, fn: Callable[[Tensor, Tensor, Tensor], Tensor], inputs: list[Tensor], mode: str,
         group: str, flops: int, out_like: Tensor | None = None) -> Tensor:
    """Benchmark ``fn`` on ``inputs`` in ``mode`` and return its output (detached). The output gradient takes the
    shape and dtype of ``out_like``, by default of the first input (the attention kernels' q)."""
    like = out_like if out_like is not None else inputs[0]
    grad_out = torch.randn(like.shape, dtype=like.dtype, device=like.device)

    def launch() -> Tensor:
        if mode == "fwd":
            with torch.no_grad():
                out = fn(*inputs)
        else:
            out = fn(*inputs)
            torch.autograd.grad(out, inputs, grad_out)
        return out

    def step() -> Tensor:
        out = launch()
        if CUDA:
            torch.cuda.synchronize()
        return out.detach()

    benchmark.group = group
    benchmark.extra_info.update(mode=mode, dtype=str(inputs[0].dtype).removeprefix("torch."),
                                device=torch.cuda.get_device_name() if CUDA else "cpu",
                                shapes=[list(t.shape) for t in inputs], fwd_flops=flops)
    if CUDA:
        tuned_before = autotuned_configs()
        step()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        # What the autotuners chose for the shapes this call tuned (bench.kernel_summary tables them).
        benchmark.extra_info.update(autotuned={name: {key: cfg for key, cfg in chosen.items()
                                                      if key not in tuned_before.get(name, {})}
                                               for name, chosen in autotuned_configs().items()
                                               if set(chosen) - set(tuned_before.get(name, {}))})
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated()
        benchmark.extra_info.update(peak_mem_mib=peak / 2 ** 20, added_mem_mib=(peak - base) / 2 ** 20)
        device_ms, why = graph_replay_ms(launch)
        benchmark.extra_info.update(device_ms=device_ms, device_ms_note=why)
    return benchmark(step)


def graph_replay_ms(launch: Callable[[], Tensor], replays: int = 20) -> tuple[float | None, str]:
    """GPU time of one ``launch()`` without the host: captured once in a CUDA graph, replayed ``replays`` times
    between two CUDA events. The wall-clock benchmark includes the Python and launch cost of every call, which
    at these sizes can exceed the GPU work; this separates the two. Returns (ms or None, how it was measured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
            for _ in range(2):
                launch()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays, f"CUDA graph replay, mean of {replays}"
    except Exception as e:  # noqa: BLE001 - a path that cannot be captured still gets its wall-clock timing
        torch.cuda.synchronize()
        return None, f"not capturable in a CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _assert_grads_agree(fn: Callable[[Tensor, Tensor, Tensor], Tensor],
                        ref: Callable[[Tensor, Tensor, Tensor], Tensor], inputs: list[Tensor]) -> None:
    """dq, dk, dv of ``fn`` against the fp32 ``ref`` on the same (rounded) inputs: the autotuned configs' backward
    at the paper's shapes, with the bounds of tests/test_kernels.py (norm 2 eps, max 4 eps of the reference's)."""
    grad_out = torch.randn(inputs[0].shape, device=inputs[0].device, dtype=inputs[0].dtype)
    actual = torch.autograd.grad(fn(*inputs), inputs, grad_out)
    leaves = [t.detach().float().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(ref(*leaves), leaves, grad_out.float())
    eps = torch.finfo(inputs[0].dtype).eps if inputs[0].dtype != torch.float32 else 1e-5
    for name, a, e in zip(("dq", "dk", "dv"), actual, expected):
        err = a.float() - e
        assert float(err.norm()) <= 2 * eps * float(e.norm()), f"{name}: norm error {float(err.norm()):.3e}"
        worst = float(err.abs().max())
        assert worst <= 4 * eps * float(e.abs().max()), f"{name}: max error {worst:.3e}"


def _assert_agrees(out: Tensor, expected: Tensor) -> None:
    # The benchmark dtype's rounding of P and of the output: a few eps of the output's scale (see tests/).
    eps = torch.finfo(out.dtype).eps if out.dtype != torch.float32 else 1e-6
    err = float((out.float() - expected).abs().max())
    assert err <= 8 * eps * max(1.0, float(expected.abs().max())), f"max error {err:.3e} against the reference"


@pytest.mark.parametrize("case, impl, mode", AGENT_PARAMS)
def test_agent_attention(benchmark, case: AgentCase, impl: str, mode: str):
    torch.manual_seed(0)
    kb = 1 if case.shared else case.b
    q = torch.randn(case.b, case.h, case.n, case.d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(kb, case.h, case.m, case.d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(kb, case.h, case.m, case.d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    scale = case.d ** -0.5
    flops = 4 * case.b * case.h * case.n * case.m * case.d
    out = _run(benchmark, agent_fn(impl, scale), [q, k, v], mode, f"agent {case.name} {mode}", flops)
    with torch.no_grad():
        _assert_agrees(out, kernels.agent_attention_reference(q.float(), k.float(), v.float(), scale=scale))
    if impl == "triton" and mode == "fwd+bwd":
        _assert_grads_agree(agent_fn(impl, scale), agent_fn("reference", scale), [q, k, v])


@pytest.mark.parametrize("case, impl, mode", MASKED_PARAMS)
def test_masked_attention(benchmark, case: MaskedCase, impl: str, mode: str):
    torch.manual_seed(0)
    shape_q, shape_k = (case.b, case.h, case.nq, case.d), (case.b, case.h, case.seq, case.d)
    q = torch.randn(shape_q, device=DEVICE, dtype=DTYPE, requires_grad=True)
    k = torch.randn(shape_k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    v = torch.randn(shape_k, device=DEVICE, dtype=DTYPE, requires_grad=True)
    # Integer factors: every mask logit is exact, so all implementations block the same keys.
    me = torch.randint(-2, 3, (case.b, case.nq, case.c), device=DEVICE).to(DTYPE)
    mf = torch.randint(-2, 3, (case.b, case.c, case.seq), device=DEVICE).to(DTYPE)
    scale = case.d ** -0.5
    flops = 4 * case.b * case.h * case.nq * case.seq * case.d
    out = _run(benchmark, masked_fn(impl, scale, me, mf), [q, k, v], mode, f"masked {case.name} {mode}", flops)
    with torch.no_grad():
        _assert_agrees(out, kernels.masked_attention_reference(q.float(), k.float(), v.float(), me, mf, scale=scale))
    if impl.startswith("triton") and mode == "fwd+bwd":
        _assert_grads_agree(masked_fn(impl, scale, me, mf), masked_fn("reference", scale, me, mf), [q, k, v])


# ------------------------------------------------------------------------------------------ deformable attention

MSDA_PARAMS = [pytest.param(case, impl, mode, id=f"{case.name}-{impl}-{mode}")
               for case in MSDA_CASES for impl in ("triton", "grid_sample", "gather") for mode in MODES]


@pytest.mark.parametrize("case, impl, mode", MSDA_PARAMS)
def test_msda(benchmark, case: MsdaCase, impl: str, mode: str):
    """The sampling core of one deformable-attention layer: the Triton kernel (value read in its own dtype) against
    the model's two PyTorch paths (value cast to fp32 first, as ``MSDeformAttn`` does for them)."""
    from qd_core.head.msda import ms_deform_attn_core

    torch.manual_seed(0)
    seq = sum(h * w for h, w in case.levels)
    starts = [sum(h * w for h, w in case.levels[:i]) for i in range(len(case.levels))]
    value = torch.randn(case.b, seq, case.h, case.d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    # Points around every query's own pixel, some off the map: what trained offsets look like.
    locations = (torch.rand(case.b, seq, case.h, len(case.levels), case.points, 2, device=DEVICE) * 1.2 - 0.1)
    weights = torch.rand(case.b, seq, case.h, len(case.levels), case.points, device=DEVICE).softmax(-1)
    locations.requires_grad_()
    weights.requires_grad_()

    def fn(v: Tensor, loc: Tensor, w: Tensor) -> Tensor:
        return ms_deform_attn_core(v if impl == "triton" else v.float(), case.levels, starts, loc, w,
                                   sampling=impl)

    inputs = [value, locations, weights]
    flops = 2 * case.b * seq * case.h * len(case.levels) * case.points * 4 * case.d
    out = _run(benchmark, fn, inputs, mode, f"msda {case.name} {mode}", flops,
               out_like=torch.empty(case.b, seq, case.h * case.d, device=DEVICE))
    expected = ms_deform_attn_core(value.detach().float(), case.levels, starts, locations.detach(),
                                   weights.detach(), sampling="gather")
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    if impl == "triton" and mode == "fwd+bwd":
        ref_in = [value.detach().float().requires_grad_(), locations.detach().requires_grad_(),
                  weights.detach().requires_grad_()]
        ref = ms_deform_attn_core(ref_in[0], case.levels, starts, ref_in[1], ref_in[2], sampling="gather")
        upstream = torch.randn(ref.shape, device=DEVICE)
        ours = torch.autograd.grad(fn(*inputs), inputs, upstream)
        theirs = torch.autograd.grad(ref, ref_in, upstream)
        for name, a, e in zip(("value", "locations", "weights"), ours, theirs):
            # dValue is rounded to the value's dtype once; the rest are fp32 sums in another order.
            eps = torch.finfo(a.dtype).eps if a.dtype != torch.float32 else 1e-5
            err = float((a.float() - e).abs().max())
            assert err <= 4 * eps * float(e.abs().max()) + 1e-6, f"{name}: max error {err:.3e}"


# ------------------------------------------------------------------------------------------------ full-size labels

LABELS_PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in LABELS_CASES
                 for impl in ("triton", "torch")]


@pytest.mark.parametrize("case, impl", LABELS_PARAMS)
def test_labels(benchmark, case: LabelsCase, impl: str):
    """predict's last step, inference only: the Triton kernel (only the labels written) against the PyTorch
    composition (full-size resize, sigmoid, class product, argmax). Labels agree wherever the fp32 sums of the best
    two classes are further apart than the inputs' rounding can move them (see tests/test_kernels.py)."""
    torch.manual_seed(0)
    probs = (torch.randn(case.b, case.q, case.k + 1, device=DEVICE) * 2).softmax(-1)[..., :case.k].to(DTYPE)
    masks = (torch.randn(case.b, case.q, *case.low, device=DEVICE) * 3).to(DTYPE)
    fn = kernels.semantic_labels if impl == "triton" else kernels.semantic_labels_reference
    flops = 2 * case.b * case.q * case.k * case.size[0] * case.size[1]
    labels = _run(benchmark, lambda p, m: fn(p, m, case.size), [probs, masks], "fwd", f"labels {case.name}", flops)
    full = F.interpolate(masks.float(), size=case.size, mode="bilinear", align_corners=False)
    sums = torch.einsum("bqk,bqhw->bkhw", probs.float(), full.sigmoid())
    top2 = sums.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * torch.finfo(DTYPE).eps * top2[:, 0] + 1e-5 * top2[:, 0]
    if impl == "triton":  # the PyTorch composition rounds every full-size intermediate to DTYPE: no such bound
        assert torch.equal(labels[clear], sums.argmax(dim=1).to(torch.int32)[clear])


# ------------------------------------------------------------------------------------------------------ resize

RESIZE_PARAMS = [pytest.param(case, impl, mode, id=f"{case.name}-{impl}-{mode}") for case in RESIZE_CASES
                 for impl in ("nchw", "channels-last") for mode in MODES]


@pytest.mark.parametrize("case, impl, mode", RESIZE_PARAMS)
def test_resize(benchmark, case: ResizeCase, impl: str, mode: str):
    """The student's bilinear resizes as PyTorch lays them out by itself (``nchw``: at batch 1 a token-map view is
    guessed NCHW, and CUDA's NCHW kernel loops over every (image, channel) plane in each output-pixel thread)
    against ``qd_core.layers.channels_last`` first (a view or one copy, then a thread per output element), which is
    what ``qd_core.layers.resize`` does. Both round the same fp32 value: each is checked against fp32."""
    from qd_core.layers import channels_last

    torch.manual_seed(0)
    h, w = case.hw
    if case.tokens:
        x = torch.randn(case.b, 1 + h * w, case.c, device=DEVICE, dtype=DTYPE)[:, 1:].transpose(1, 2)
        x = x.reshape(case.b, case.c, h, w)
    else:
        x = torch.randn(case.b, case.c, h, w, device=DEVICE, dtype=DTYPE)
    x.requires_grad_()

    def fn(t: Tensor) -> Tensor:
        t = channels_last(t) if impl == "channels-last" else t
        return F.interpolate(t, size=case.size, mode="bilinear", align_corners=False)

    out = _run(benchmark, fn, [x], mode, f"resize {case.name} {mode}", 8 * case.b * case.c * case.size[0] *
               case.size[1], out_like=torch.empty(case.b, case.c, *case.size, device=DEVICE, dtype=DTYPE))
    expected = F.interpolate(x.detach().float(), size=case.size, mode="bilinear", align_corners=False)
    # One rounding of the fp32 value to DTYPE (≤ half an ulp, ≤ eps·|value|), plus fp32 summation order.
    err = (out.float() - expected).abs()
    assert bool((err <= torch.finfo(DTYPE).eps * expected.abs() + 1e-6).all()), f"max error {float(err.max()):.3e}"


# -------------------------------------------------------------------------------------------- depthwise conv

DEPTHWISE_PARAMS = [pytest.param(case, impl, mode, id=f"{case.name}-{impl}-{mode}") for case in DEPTHWISE_CASES
                    for impl in ("nchw", "channels-last") for mode in MODES]


@pytest.mark.parametrize("case, impl, mode", DEPTHWISE_PARAMS)
def test_depthwise(benchmark, case: DepthwiseCase, impl: str, mode: str):
    """The refinement's dilated depthwise 3×3 convolution on NCHW maps against the same maps channels-last (what
    ``qd_core.head.refine`` hands it): cuDNN / oneDNN pick other algorithms per layout. Checked against fp32 NCHW."""
    from qd_core.layers import channels_last

    torch.manual_seed(0)
    x = torch.randn(case.b, case.c, *case.hw, device=DEVICE, dtype=DTYPE)
    if impl == "channels-last":
        x = channels_last(x)
    x.requires_grad_()
    weight = (torch.randn(case.c, 1, 3, 3, device=DEVICE, dtype=DTYPE) / 3).requires_grad_()
    d = case.dilation

    def fn(t: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(t, w, padding=d, dilation=d, groups=case.c)

    flops = 2 * 9 * case.b * case.c * case.hw[0] * case.hw[1]
    out = _run(benchmark, fn, [x, weight], mode, f"depthwise {case.name} {mode}", flops)
    expected = F.conv2d(x.detach().float().contiguous(), weight.detach().float(), padding=d, dilation=d,
                        groups=case.c)
    # Nine products summed in fp32 and rounded once to DTYPE: ≤ eps of the largest output, plus fp32 order.
    err = float((out.float() - expected).abs().max())
    assert err <= torch.finfo(DTYPE).eps * float(expected.abs().max()) + 1e-5, f"max error {err:.3e}"


REFINE_DW_PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in REFINE_DW_CASES
                    for impl in ("nchw", "channels-last", "triton")]


@pytest.mark.parametrize("case, impl", REFINE_DW_PARAMS)
def test_refine_depthwise(benchmark, case: DepthwiseCase, impl: str):
    """The refinement's four depthwise convolutions of one map (dilations 1 to ``case.dilation``), inference: four
    PyTorch convolutions in PyTorch's own layout (``nchw``) and channels-last, against one Triton kernel that
    writes all four from one pass over the map (``kernels.depthwise_conv3x3``). Checked against fp32 NCHW."""
    from qd_core.layers import channels_last

    torch.manual_seed(0)
    x = torch.randn(case.b, case.c, *case.hw, device=DEVICE, dtype=DTYPE)
    if impl != "nchw":
        x = channels_last(x)
    dilations = list(range(1, case.dilation + 1))
    weights = [torch.randn(case.c, 1, 3, 3, device=DEVICE, dtype=DTYPE) / 3 for _ in dilations]

    def outputs(t: Tensor, *ws: Tensor) -> list[Tensor]:
        if impl == "triton":
            return kernels.depthwise_conv3x3(t, list(ws), dilations)
        return [F.conv2d(t, w, padding=d, dilation=d, groups=case.c) for w, d in zip(ws, dilations)]

    flops = 2 * 9 * case.b * case.c * case.hw[0] * case.hw[1] * len(dilations)
    # Timed: all of them (the last is returned, the others are computed all the same).
    _run(benchmark, lambda t, *ws: outputs(t, *ws)[-1], [x, *weights], "fwd", f"refine depthwise {case.name}",
         flops)
    with torch.no_grad():
        got = outputs(x, *weights)
    expected = kernels.depthwise_conv3x3_reference(x.float().contiguous(), [w.float() for w in weights], dilations)
    for out, ref in zip(got, expected):
        # As test_depthwise: one rounding of an fp32 sum of nine products.
        err = float((out.float() - ref).abs().max())
        assert err <= torch.finfo(DTYPE).eps * float(ref.abs().max()) + 1e-5, f"max error {err:.3e}"


# ----------------------------------------------------------------------------------------------------- labels

# predict's class scores at the crop size: 19 classes, the tiny config's 128² on CPU, ViT-L's 512² on CUDA.
ARGMAX_SHAPES = [(b, 19, 512, 512) for b in (1, 8)] if CUDA else [(1, 19, 128, 128), (4, 19, 128, 128)]
ARGMAX_PARAMS = [pytest.param(shape, impl, id=f"b{shape[0]}-{shape[2]}-{impl}") for shape in ARGMAX_SHAPES
                 for impl in ("argmax", "max-indices")]


@pytest.mark.parametrize("shape, impl", ARGMAX_PARAMS)
def test_class_argmax(benchmark, shape: tuple[int, ...], impl: str):
    """The label step: ``argmax(dim=1)`` against ``max(dim=1).indices`` (``qd_core.layers.class_argmax`` takes the
    latter on CPU). Both must give the same labels."""
    torch.manual_seed(0)
    scores = torch.randn(shape, device=DEVICE)

    def fn(s: Tensor) -> Tensor:
        return s.argmax(dim=1) if impl == "argmax" else s.max(dim=1).indices

    labels = _run(benchmark, fn, [scores], "fwd", f"class argmax b{shape[0]} {shape[2]}", 0)
    assert torch.equal(labels, scores.argmax(dim=1))

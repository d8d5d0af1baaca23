"""The Triton attention kernels equal their PyTorch references, forward and backward, in every dtype and edge shape.

Without CUDA the kernels run under Triton's interpreter, which must be switched on before any kernel module is
imported (Triton decides at decoration time); the shapes here are therefore small and chosen to reach every code
path: ragged tails, several splits, shared keys, M = 1, the chunked d = 1024 head, fully blocked and single-key
rows. The ``gpu`` tests repeat the comparison at the paper's shapes.

Tolerances. fp32: both sides accumulate in fp32 in a different order over at most a few hundred terms of O(1)
values, so ~1e-5 on outputs and ~1e-4 on gradients (which sum over all rows). fp16/bf16: the kernel is compared
with the fp32 reference run on the same rounded inputs; it rounds P and dS to the input dtype before the tensor-core
products (relative error eps/2 per term) and rounds its result (eps/2), so the error is about one eps of the
result's scale: we allow 2·eps in norm (‖err‖ ≤ 2·eps·‖ref‖) and 4·eps of the largest magnitude per
element. Gradients flowing in are rounded to the input dtype first, for both sides.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402

import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    """The fp32 references must not run as TF32, whatever another test left set."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


def leaf(*shape: int, dtype: torch.dtype = torch.float32, device: str = DEVICE) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype).requires_grad_()


def fp32_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Independent fp32 leaves holding the same (already rounded) values, for the reference's own autograd."""
    return [t.detach().float().requires_grad_() for t in tensors]


def outputs_and_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor, *extra) -> list[torch.Tensor]:
    out = fn(*inputs, *extra)
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def assert_fp32_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    for name, a, e in zip(("dq", "dk", "dv"), actual[1:], expected[1:]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def assert_low_precision_close(actual: list[torch.Tensor], expected: list[torch.Tensor], eps: float) -> None:
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        err = a.float() - e
        norm_err, max_err = float(err.norm()), float(err.abs().max())
        assert norm_err <= 2 * eps * float(e.norm()), f"{name}: norm error {norm_err:.3e}"
        assert max_err <= 4 * eps * float(e.abs().max()), f"{name}: max error {max_err:.3e}"


def check_agent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> None:
    grad_out = torch.randn(q.shape, device=q.device).to(q.dtype)
    actual = outputs_and_grads(lambda *t: kernels.agent_attention(*t, **kw), [q, k, v], grad_out)
    expected = outputs_and_grads(lambda *t: kernels.agent_attention_reference(*t, **kw), fp32_copies(q, k, v),
                                 grad_out)
    for a, t in zip(actual, (q, q, k, v)):
        assert a.dtype == t.dtype and a.shape == t.shape
    if q.dtype == torch.float32:
        assert_fp32_close(actual, expected)
    else:
        assert_low_precision_close(actual, expected, torch.finfo(q.dtype).eps)


# ---------------------------------------------------------------------------------------------- agent attention


def test_agent_matches_reference_with_ragged_rows_over_several_splits():
    torch.manual_seed(0)
    # 300 rows = 4 blocks of 64 + 44; under the interpreter's 4-program target, 2 (batch, head)s get 2 splits each.
    check_agent(leaf(1, 2, 300, 32), leaf(1, 2, 100, 32), leaf(1, 2, 100, 32))


def test_agent_programs_that_stride_over_several_query_blocks_cover_every_row():
    torch.manual_seed(9)
    # One (batch, head): the interpreter's grid has 3 programs for 5 blocks of 64 rows (the last one ragged), so
    # programs 0 and 1 take two blocks each.
    check_agent(leaf(1, 1, 300, 32), leaf(1, 1, 100, 32), leaf(1, 1, 100, 32))


def test_agent_forward_without_grad_equals_the_differentiable_forward():
    """Without grad the kernel skips the log-sum-exp store; the output must not change."""
    torch.manual_seed(10)
    q, k, v = leaf(2, 2, 150, 32), leaf(2, 2, 20, 32), leaf(2, 2, 20, 32)
    with torch.no_grad():
        out = kernels.agent_attention(q, k, v)
    assert not out.requires_grad
    torch.testing.assert_close(out, kernels.agent_attention(q, k, v).detach(), atol=0, rtol=0)


def test_agent_keys_shared_over_the_batch_get_the_gradient_of_every_image():
    torch.manual_seed(1)
    check_agent(leaf(3, 2, 150, 32), leaf(1, 2, 100, 32), leaf(1, 2, 100, 32))
    # and over the splits of each image too: 3 images × 1 head get 2 splits of 192 rows
    check_agent(leaf(3, 1, 300, 32), leaf(1, 1, 100, 32), leaf(1, 1, 100, 32))


def test_agent_single_key_returns_its_value_and_gets_all_the_gradient():
    torch.manual_seed(2)
    q, k, v = leaf(2, 2, 70, 32), leaf(2, 2, 1, 32), leaf(2, 2, 1, 32)
    out = kernels.agent_attention(q, k, v)
    torch.testing.assert_close(out, v.detach().expand_as(out))
    check_agent(q, k, v)


def test_agent_wide_rein_head_is_chunked_over_d():
    torch.manual_seed(3)
    # d = 1024 is 32-wide chunks in fp32 forward, 16-wide backward; keys shared as the Rein tokens are; 150 rows
    # make two splits.
    check_agent(leaf(2, 1, 150, 1024), leaf(1, 1, 20, 1024), leaf(1, 1, 20, 1024))


def test_agent_handles_widths_and_key_counts_that_are_not_powers_of_two():
    torch.manual_seed(4)
    check_agent(leaf(1, 3, 45, 48), leaf(1, 3, 37, 48), leaf(1, 3, 37, 48))


def test_agent_applies_an_explicit_scale():
    torch.manual_seed(5)
    check_agent(leaf(1, 2, 64, 32), leaf(1, 2, 16, 32), leaf(1, 2, 16, 32), scale=0.05)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.parametrize("d", [32, 1024])
def test_agent_rows_whose_logits_all_lie_far_below_zero(d):
    """Every real logit near -120 (the constant first column of q and k) with an O(1) spread: a row maximum
    taken over padded keys of logit 0 would underflow every real probability (2^-173) to 0, a 0/0 output, so padded
    keys (12 of the 32-key tile here) must not take part in it. The logits are only known to fp32 rounding of their
    magnitude (|s|·eps), which bounds the probabilities' relative error, hence the tolerance; output and dV are
    compared (in dQ and dK the -120 cancels, leaving that rounding, whatever the implementation). The backward's
    exp2 overflows on the padded keys (0 - lse) before they are selected away: numpy warns, the result is right."""
    torch.manual_seed(15)
    q, k, v = torch.randn(1, 2, 70, d), torch.randn(1, 2, 20, d) / d ** 0.5, leaf(1, 2, 20, d)
    q[..., 0], k[..., 0] = 12.0, -10.0
    tol = 16 * 120 * torch.finfo(torch.float32).eps  # a few rounding steps of 120 over sums of up to 1024 terms
    grad_out = torch.randn(q.shape)
    for store_lse in (False, True):
        q_in = q.clone().requires_grad_(store_lse)
        out = kernels.agent_attention(q_in, k, v, scale=1.0)
        expected = kernels.agent_attention_reference(q, k, v, scale=1.0)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    dv, = torch.autograd.grad(out, [v], grad_out)
    expected_dv, = torch.autograd.grad(expected, [v], grad_out)
    torch.testing.assert_close(dv, expected_dv, atol=tol, rtol=tol)


def test_agent_accepts_strided_heads_views():
    torch.manual_seed(6)
    # (B, N, H·d) projections viewed as heads, as nn attention layers produce them: d contiguous, N strided.
    q = torch.randn(2, 90, 2 * 32, device=DEVICE).view(2, 90, 2, 32).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 20, 2 * 32, device=DEVICE).view(2, 20, 2, 32).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 20, 2 * 32, device=DEVICE).view(2, 20, 2, 32).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    check_agent(q, k, v)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_agent_low_precision_matches_fp32_reference_on_rounded_inputs(dtype):
    torch.manual_seed(7)
    check_agent(leaf(2, 2, 150, 32, dtype=dtype), leaf(2, 2, 100, 32, dtype=dtype), leaf(2, 2, 100, 32, dtype=dtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_agent_low_precision_wide_shared_head(dtype):
    torch.manual_seed(8)
    check_agent(leaf(2, 1, 40, 1024, dtype=dtype), leaf(1, 1, 20, 1024, dtype=dtype), leaf(1, 1, 20, 1024, dtype=dtype))


def test_agent_wide_head_output_columns_split_across_programs():
    """One query block of one head: the forward splits O's d-chunks over several programs (each recomputing the
    softmax). Output, log-sum-exp (through the gradients) and gradients must equal the reference's (a ragged last
    chunk: test_agent_wide_head_whose_last_column_split_gets_the_ragged_chunk)."""
    from kernels import agent_triton

    torch.manual_seed(9)
    q, k, v = leaf(1, 1, 20, 1000), leaf(1, 1, 7, 1000), leaf(1, 1, 7, 1000)
    chunk = agent_triton.block_d(1000, 7, q.element_size(), "fwd")
    assert agent_triton.d_splits(1, -(-1000 // chunk), q.device) > 2
    check_agent(q, k, v)


@pytest.mark.parametrize("k_shape, match", [((2, 3, 10, 32), "k: expected shape"),
                                            ((2, 2, 300, 32), "1 to 256 keys"),
                                            ((2, 2, 10, 16), "k: expected shape")])
def test_agent_rejects_keys_that_do_not_fit_the_queries(k_shape, match):
    q, k = torch.randn(2, 2, 8, 32, device=DEVICE), torch.randn(*k_shape, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        kernels.agent_attention(q, k, k)


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
def test_kernels_reject_a_scale_that_is_not_positive_and_finite(scale):
    q, k = torch.randn(1, 1, 8, 32, device=DEVICE), torch.randn(1, 1, 4, 32, device=DEVICE)
    me, mf = torch.randn(1, 8, 4, device=DEVICE), torch.randn(1, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="scale: expected a finite, positive float"):
        kernels.agent_attention(q, k, k, scale=scale)
    with pytest.raises(ValueError, match="scale: expected a finite, positive float"):
        kernels.masked_attention(q, k, k, me, mf, scale=scale)


def test_outputs_and_gradients_keep_the_models_head_layout(mask_path):
    """The model's q, k, v are (B, N, H, d) tensors seen as (B, H, N, d); outputs (and the agent kernel's dQ) come
    back in that layout, so that their transpose back to (B, N, H·d) is a view, as after SDPA. (dK and dV, summed
    from per-split partials, come back contiguous: same values, another layout.)"""
    torch.manual_seed(10)

    def heads(b: int, n: int, h: int, d: int) -> torch.Tensor:
        return torch.randn(b, n, h, d, device=DEVICE).transpose(1, 2).requires_grad_()
    q, k, v = heads(2, 40, 2, 32), heads(2, 9, 2, 32), heads(2, 9, 2, 32)
    out = kernels.agent_attention(q, k, v)
    assert out.stride() == q.stride()
    grads = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    assert [g.stride() for g in grads[:1]] == [q.stride()]
    check_agent(q, k, v)
    me, mf = integer_factors(2, 40, 4, 9)
    out = kernels.masked_attention(q, k, v, me, mf)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, kernels.masked_attention_reference(q, k, v, me, mf), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [40, 1030])  # the per-tile mask and, from 1024 keys, the bit mask
def test_a_nan_mask_logit_leaves_its_key_open_as_the_reference_does(keys):
    # blocked_keys blocks where the logit is < 0, so NaN is open; the kernels' ">= 0" closed it.
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, 1, n, 16, device=DEVICE) for n in (4, keys, keys))
    mask_embed = torch.ones(1, 4, 1, device=DEVICE)
    mask_feats = torch.full((1, 1, keys), 2.0, device=DEVICE)
    mask_feats[0, 0, 5] = float("nan")
    out = kernels.masked_attention(q, k, v, mask_embed, mask_feats)
    torch.testing.assert_close(out, kernels.masked_attention_reference(q, k, v, mask_embed, mask_feats),
                               atol=1e-5, rtol=1e-5)


def test_arguments_that_are_not_tensors_or_empty_are_named():
    q = torch.randn(1, 1, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"^v: expected a torch.Tensor .*got list"):
        kernels.agent_attention(q, q, [[1.0]])
    with pytest.raises(ValueError, match=r"^k: expected a torch.Tensor .*got ndarray"):
        kernels.agent_attention(q, q.cpu().numpy(), q)
    # An empty mask grid: the labels kernel read its bilinear taps out of bounds (a crash on CPU and GPU alike).
    with pytest.raises(ValueError, match=r"mask_logits: expected a non-empty \(h, w\)"):
        kernels.semantic_labels(torch.rand(2, 5, 7, device=DEVICE), torch.randn(2, 5, 0, 6, device=DEVICE), (9, 13))


def test_input_checks_remember_accepted_signatures_only():
    """The checks are skipped for shapes/dtypes/devices accepted before, never for ones rejected before, and a
    signature differing only in a rejected detail (here the key count, the dtype) is still checked."""
    q, k = torch.randn(1, 1, 8, 32, device=DEVICE), torch.randn(1, 1, 4, 32, device=DEVICE)
    kernels.agent_attention(q, k, k)
    for _ in range(2):
        with pytest.raises(ValueError, match="1 to 256 keys"):
            kernels.agent_attention(q, torch.randn(1, 1, 300, 32, device=DEVICE), torch.randn(1, 1, 300, 32,
                                                                                              device=DEVICE))
        with pytest.raises(ValueError, match="one dtype"):
            kernels.agent_attention(q, k.half(), k.half())
    me, mf = torch.randn(1, 8, 4, device=DEVICE), torch.randn(1, 4, 4, device=DEVICE)
    kernels.masked_attention(q, k, k, me, mf)
    for _ in range(2):
        with pytest.raises(ValueError, match="mask_feats: expected shape"):
            kernels.masked_attention(q, k, k, me, torch.randn(1, 4, 5, device=DEVICE))
    kernels.agent_attention(q, k, k)


def test_agent_rejects_mixed_dtypes():
    q, k = torch.randn(1, 1, 8, 32, device=DEVICE), torch.randn(1, 1, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        kernels.agent_attention(q, k.half(), k.half())


# --------------------------------------------------------------------------------------------- masked attention


@pytest.fixture
def tuned_twice(monkeypatch):
    """Every autotuned kernel tries two configs, each timed by three calls, as the GPU's autotuner times several
    configs by hundreds of calls on the first call of a shape (under the interpreter there is one config and
    nothing is timed). A kernel that accumulates into a buffer with atomic adds must have it re-zeroed between
    those calls (``reset_to_zero``), or the first result of each shape is the sum of every timing run."""
    from triton.runtime.autotuner import Autotuner

    from kernels import _triton_utils, agent_triton, masked_triton

    monkeypatch.setattr(_triton_utils, "FAST_LAUNCH", False)  # every call through Triton's autotuner
    timed = []

    def three_calls(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        timed.append(1)
        return [float(len(timed))] * len(quantiles or [0])

    for module in (agent_triton, masked_triton):
        for tuner in vars(module).values():
            if isinstance(tuner, Autotuner):
                config = tuner.configs[0]
                monkeypatch.setattr(tuner, "configs", [config, triton.Config(dict(config.kwargs), num_warps=4,
                                                                             num_stages=1)])
                monkeypatch.setattr(tuner, "cache", {})
                monkeypatch.setattr(tuner, "early_config_prune", None)  # both configs are the one that runs here
                monkeypatch.setattr(tuner, "do_bench", three_calls)
    return timed


def test_autotuning_runs_do_not_add_into_the_gradients(tuned_twice):
    """Masked backward over several key splits (dQ summed with atomic adds) and the wide agent backward (dK/dV
    partials accumulated in place): the first call of a shape, which autotunes, must give the reference's
    gradients."""
    torch.manual_seed(12)
    me, mf = integer_factors(1, 100, 24, 200)
    check_masked(leaf(1, 2, 100, 32), leaf(1, 2, 200, 32), leaf(1, 2, 200, 32), me, mf)
    check_agent(leaf(2, 1, 150, 160), leaf(1, 1, 20, 160), leaf(1, 1, 20, 160))  # fp32 d = 160: 10 chunks
    assert len(tuned_twice) >= 8  # forward and backward of both kernels timed both configs
    # and what they chose is there for the benchmarks to record (bench/test_kernels.py)
    from kernels._triton_utils import autotuned_configs

    chosen = autotuned_configs()
    assert {"agent_fwd_kernel", "agent_bwd_kernel", "masked_fwd_kernel", "masked_bwd_kernel"} <= set(chosen)
    assert all("num_warps: 4" in config for configs in chosen.values() for config in configs.values())


def integer_factors(b: int, nq: int, c: int, seq: int, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask factors with small integer entries: every dot product is exact in any dtype and summation order, so
    the kernel and the reference take identical mask decisions (zeros included, which count as open).

    Channel 0 of the features is all ones and channel 1 is one-hot at key ``seq // 2``, so a query's embedding can
    block every key (-5 on channel 0) or open exactly one key ((-1, 1) on channels 0, 1: logit 0 there, -1 elsewhere).
    """
    me = torch.randint(-2, 3, (b, nq, c), device=device).float()
    mf = torch.randint(-2, 3, (b, c, seq), device=device).float()
    mf[:, 0] = 1.0
    mf[:, 1] = 0.0
    mf[:, 1, seq // 2] = 1.0
    return me, mf


def block_all_keys(me: torch.Tensor, row: int) -> None:
    me[:, row] = 0.0
    me[:, row, 0] = -5.0


def open_one_key(me: torch.Tensor, row: int) -> None:
    me[:, row] = 0.0
    me[:, row, 0] = -1.0
    me[:, row, 1] = 1.0


@pytest.fixture(params=["factors", "bits"])
def mask_path(request, monkeypatch) -> str:
    """Both ways the kernels decide the mask: per key tile from its factors (short memories), and from the
    per-image bit mask (L ≥ BITS_MIN_KEYS; the threshold is lowered here so that the small shapes take it too)."""
    from kernels import masked_triton

    monkeypatch.setattr(masked_triton, "BITS_MIN_KEYS", 0 if request.param == "bits" else 10**9)
    return request.param


def check_masked(q, k, v, me, mf, **kw) -> list[torch.Tensor]:
    grad_out = torch.randn(q.shape, device=q.device).to(q.dtype)
    actual = outputs_and_grads(lambda *t: kernels.masked_attention(*t, me, mf, **kw), [q, k, v], grad_out)
    expected = outputs_and_grads(lambda *t: kernels.masked_attention_reference(*t, me, mf, **kw),
                                 fp32_copies(q, k, v), grad_out)
    for a, t in zip(actual, (q, q, k, v)):
        assert a.dtype == t.dtype and a.shape == t.shape
    if q.dtype == torch.float32:
        assert_fp32_close(actual, expected)
    else:
        assert_low_precision_close(actual, expected, torch.finfo(q.dtype).eps)
    return actual


def test_masked_matches_reference_with_ragged_keys_over_several_splits(mask_path):
    torch.manual_seed(10)
    me, mf = integer_factors(1, 100, 24, 200)
    check_masked(leaf(1, 2, 100, 32), leaf(1, 2, 200, 32), leaf(1, 2, 200, 32), me, mf)


def test_masked_sums_mask_channels_in_chunks_for_every_image(mask_path):
    torch.manual_seed(11)
    me, mf = integer_factors(2, 20, 80, 300)  # 80 channels: two chunks of 64; 300 keys: ragged last tile
    check_masked(leaf(2, 2, 20, 32), leaf(2, 2, 300, 32), leaf(2, 2, 300, 32), me, mf)


def test_masked_mask_changes_the_result(mask_path):
    torch.manual_seed(12)
    me, mf = integer_factors(1, 30, 16, 100)
    q, k, v = leaf(1, 2, 30, 32), leaf(1, 2, 100, 32), leaf(1, 2, 100, 32)
    with torch.no_grad():
        masked = kernels.masked_attention(q, k, v, me, mf)
        unmasked = kernels.agent_attention_reference(q, k, v)
    assert float((masked - unmasked).abs().max()) > 0.1


def test_masked_fully_blocked_row_attends_to_every_key(mask_path):
    torch.manual_seed(13)
    me, mf = integer_factors(1, 20, 16, 150)
    block_all_keys(me, 3)
    q, k, v = leaf(1, 2, 20, 32), leaf(1, 2, 150, 32), leaf(1, 2, 150, 32)
    out = check_masked(q, k, v, me, mf)[0]
    plain = kernels.agent_attention_reference(q[:, :, 3:4], k, v)
    torch.testing.assert_close(out[:, :, 3:4], plain, atol=1e-5, rtol=1e-5)


def test_masked_row_with_a_single_open_key_returns_that_value(mask_path):
    torch.manual_seed(14)
    me, mf = integer_factors(1, 20, 16, 150)
    open_one_key(me, 5)  # its only non-negative logit is exactly 0: zero counts as open
    q, k, v = leaf(1, 2, 20, 32), leaf(1, 2, 150, 32), leaf(1, 2, 150, 32)
    out = check_masked(q, k, v, me, mf)[0]
    torch.testing.assert_close(out[:, :, 5], v.detach()[:, :, 75])


def test_masked_does_not_differentiate_the_mask_factors(mask_path):
    torch.manual_seed(15)
    me, mf = integer_factors(1, 10, 8, 40)
    me.requires_grad_()
    q, k, v = leaf(1, 1, 10, 32), leaf(1, 1, 40, 32), leaf(1, 1, 40, 32)
    out = kernels.masked_attention(q, k, v, me, mf)
    assert torch.autograd.grad(out.sum(), [q, me], allow_unused=True)[1] is None


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_masked_low_precision_matches_fp32_reference_on_rounded_inputs(dtype, mask_path):
    torch.manual_seed(16)
    me, mf = integer_factors(1, 100, 24, 200)
    block_all_keys(me, 7)
    open_one_key(me, 8)
    check_masked(leaf(1, 2, 100, 32, dtype=dtype), leaf(1, 2, 200, 32, dtype=dtype), leaf(1, 2, 200, 32, dtype=dtype),
                 me.to(dtype), mf.to(dtype))


def test_masked_forward_without_grad_equals_the_differentiable_forward(mask_path):
    torch.manual_seed(14)
    me, mf = integer_factors(1, 20, 16, 150)
    q, k, v = leaf(1, 2, 20, 32), leaf(1, 2, 150, 32), leaf(1, 2, 150, 32)
    with torch.no_grad():
        out = kernels.masked_attention(q, k, v, me, mf)
    assert not out.requires_grad
    torch.testing.assert_close(out, kernels.masked_attention(q, k, v, me, mf).detach(), atol=0, rtol=0)


def test_masked_applies_an_explicit_scale(mask_path):
    torch.manual_seed(17)
    me, mf = integer_factors(1, 12, 8, 64)
    check_masked(leaf(1, 2, 12, 32), leaf(1, 2, 64, 32), leaf(1, 2, 64, 32), me, mf, scale=0.3)


def test_mask_bits_hold_every_keys_decision():
    """Bit j of word w is key 32·w + j's decision (bit 31 included); the bits past L are 0."""
    from kernels.masked_triton import mask_bits

    torch.manual_seed(18)
    me, mf = integer_factors(2, 20, 80, 300)  # 300 keys: a ragged last word and a ragged last program
    block_all_keys(me, 3)
    open_one_key(me, 5)
    bits = mask_bits(me, mf)
    assert bits.shape == (2, 20, 10) and bits.dtype == torch.int32
    keys = torch.arange(320, device=me.device)
    decided = ((bits[:, :, keys // 32] >> (keys % 32)) & 1).bool()
    expected = torch.zeros(2, 20, 320, dtype=torch.bool, device=me.device)
    expected[:, :, :300] = (me @ mf) >= 0
    assert torch.equal(decided, expected)
    assert (bits[:, :, :9] < 0).any(), "no word with bit 31 set: the test misses the sign bit"
    assert not decided[:, 3].any() and decided[:, 5].sum() == 2


def test_long_memories_decide_the_mask_once_per_image_for_forward_and_backward(monkeypatch):
    """From BITS_MIN_KEYS keys on the forward makes one bit mask, and the backward reuses it (the same decisions);
    below it neither makes one."""
    from kernels import masked_triton

    made = []
    real = masked_triton.mask_bits
    monkeypatch.setattr(masked_triton, "mask_bits", lambda me, mf: made.append(mf.shape[2]) or real(me, mf))
    torch.manual_seed(19)
    for seq in (masked_triton.BITS_MIN_KEYS - 1, masked_triton.BITS_MIN_KEYS):
        me, mf = integer_factors(1, 6, 8, seq)
        check_masked(leaf(1, 2, 6, 32), leaf(1, 2, seq, 32), leaf(1, 2, seq, 32), me, mf)
    assert made == [masked_triton.BITS_MIN_KEYS]


def test_masked_heads_wider_than_the_backward_fits_run_forward_only_and_the_model_falls_back(monkeypatch):
    """fp32, 100 queries of width 64: the forward's tiles fit an sm_90 program, the backward's do not
    (kernels.fit). The kernel then runs without grad, refuses with grad in one line, and the model's dispatch takes
    the PyTorch path for it (same values, gradients flow)."""
    from qd_core import attention as dispatch

    torch.manual_seed(13)
    me, mf = integer_factors(1, 100, 16, 70)
    q, k, v = leaf(1, 2, 100, 64), leaf(1, 2, 70, 64), leaf(1, 2, 70, 64)
    expected = kernels.masked_attention_reference(q, k, v, me, mf)
    with torch.no_grad():
        torch.testing.assert_close(kernels.masked_attention(q, k, v, me, mf), expected.detach(), atol=1e-5,
                                   rtol=1e-5)
    with pytest.raises(ValueError, match=r"^q: 100 queries of head width 64 in float32 are more than the kernel's "
                                         r"backward fits[^\n]*$"):
        kernels.masked_attention(q, k, v, me, mf)
    monkeypatch.setenv("QD_ATTENTION", "triton")
    monkeypatch.setattr(kernels, "masked_attention", lambda *a, **kw: pytest.fail("the kernel was called"))
    out = dispatch.masked_attention(q, k, v, me, mf)
    torch.testing.assert_close(out, expected)
    assert all(g is not None for g in torch.autograd.grad(out.sum(), (q, k, v)))


@pytest.mark.parametrize("bad, match", [("mask_feats", "mask_feats: expected shape"),
                                        ("mask_embed", "mask_embed: expected shape"),
                                        ("queries", "1 to 256 queries")])
def test_masked_rejects_factors_that_do_not_fit(bad, match):
    nq = 300 if bad == "queries" else 10
    q, k = torch.randn(1, 2, nq, 32, device=DEVICE), torch.randn(1, 2, 40, 32, device=DEVICE)
    me = torch.randn(1, nq + (bad == "mask_embed"), 8, device=DEVICE)
    mf = torch.randn(1, 8, 40 + (bad == "mask_feats"), device=DEVICE)
    with pytest.raises(ValueError, match=match):
        kernels.masked_attention(q, k, k, me, mf)


# ------------------------------------------------------------------------------------- deformable attention


def msda_inputs(b: int, nq: int, h: int, d: int, shapes: list[tuple[int, int]], points: int, *, seed: int,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """value (B, S, H, d), level shapes and starts, locations (20 % of the points outside [0, 1]), weights."""
    g = torch.Generator().manual_seed(seed)
    s = sum(hh * ww for hh, ww in shapes)
    starts = [sum(hh * ww for hh, ww in shapes[:i]) for i in range(len(shapes))]
    value = torch.randn(b, s, h, d, generator=g).to(dtype).to(DEVICE)
    locations = (torch.rand(b, nq, h, len(shapes), points, 2, generator=g) * 1.4 - 0.2).to(DEVICE)
    weights = torch.rand(b, nq, h, len(shapes), points, generator=g).to(DEVICE)
    return (value, torch.tensor(shapes, device=DEVICE), torch.tensor(starts, device=DEVICE), locations, weights)


def test_msda_kernel_matches_the_gather_reference_over_several_query_blocks():
    """150 queries: three blocks, the last ragged; 32-wide heads over three levels as in the pixel decoder."""
    from qd_core.head.msda import ms_deform_attn_core

    value, shapes, starts, locations, weights = msda_inputs(2, 150, 2, 32, [(8, 8), (4, 4), (2, 2)], 4, seed=30)
    leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    out = kernels.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
    ref_leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
    ref = ms_deform_attn_core(ref_leaves[0], shapes, starts, ref_leaves[1], ref_leaves[2], sampling="gather")
    assert out.shape == (2, 150, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(out.shape, device=DEVICE)
    for name, a, e in zip(("value", "locations", "weights"), torch.autograd.grad(out, leaves, upstream),
                          torch.autograd.grad(ref, ref_leaves, upstream)):
        assert e.abs().sum() > 0, name
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():  # no autograd Function without a backward to follow: the same numbers
        torch.testing.assert_close(kernels.ms_deform_attn(value, shapes, starts, locations, weights), out.detach(),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_msda_kernel_reads_low_precision_values_as_fp32(dtype):
    """A bf16/fp16 value map is read exactly (converted to fp32), so the output equals the fp32 reference on the
    same rounded values, and dValue comes back in the value's dtype."""
    from qd_core.head.msda import ms_deform_attn_core

    value, shapes, starts, locations, weights = msda_inputs(1, 40, 2, 32, [(6, 5), (3, 3)], 2, seed=31, dtype=dtype)
    leaf_value = value.clone().requires_grad_()
    out = kernels.ms_deform_attn(leaf_value, shapes, starts, locations, weights)
    ref = ms_deform_attn_core(value.float(), shapes, starts, locations, weights, sampling="gather")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), [leaf_value])
    assert grad.dtype == dtype


@pytest.mark.parametrize("bad, match", [("shapes", "spatial_shapes / level_start_index: expected"),
                                        ("weights", "attention_weights: expected shape"),
                                        ("float_shapes", "spatial_shapes: expected an integer tensor"),
                                        ("fp16_locations", "sampling_locations: expected float32")])
def test_msda_kernel_rejects_inputs_that_do_not_fit(bad, match):
    value, shapes, starts, locations, weights = msda_inputs(1, 5, 2, 8, [(3, 3), (2, 2)], 2, seed=32)
    if bad == "shapes":
        shapes = shapes[:1]
    elif bad == "weights":
        weights = weights[..., :1]
    elif bad == "float_shapes":
        shapes = shapes.float()
    else:
        locations = locations.half()
    with pytest.raises(ValueError, match=match):
        kernels.ms_deform_attn(value, shapes, starts, locations, weights)


# ------------------------------------------------------------------------------------------- full-size labels


def labels_inputs(b: int, q: int, k: int, h: int, w: int, dtype: torch.dtype, seed: int):
    """Class probabilities sliced off a (B, Q, K+1) softmax, as the model makes them (non-contiguous), and mask
    logits of O(3)."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(b, q, k + 1, generator=g) * 2).softmax(-1)[..., :k]
    masks = torch.randn(b, q, h, w, generator=g) * 3
    return probs.to(DEVICE, dtype), masks.to(DEVICE, dtype)


def fp32_labels_and_margin(probs, masks, size):
    """The fp32 composition's labels on the same (rounded) inputs, and the relative gap between its two best
    classes at every pixel."""
    full = torch.nn.functional.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
    sums = torch.einsum("bqk,bqhw->bkhw", probs.float(), full.sigmoid())
    top2 = sums.topk(2, dim=1).values
    return sums.argmax(dim=1).to(torch.int32), (top2[:, 0] - top2[:, 1]) / top2[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("h, w, size", [(24, 20, (96, 80)), (24, 20, (100, 70)), (7, 5, (13, 11))],
                         ids=["x4", "ragged-scale", "tiny"])
def test_labels_equal_the_fp32_composition_wherever_two_classes_do_not_tie(dtype, h, w, size):
    """Every class sum is Σ_q p·s over positive terms; the kernel rounds s and p to ``dtype`` (relative error u
    each) and multiplies exactly into fp32, so each sum is off by at most 2u of itself and the best two by at most
    4u of the larger: wherever they are further apart than that (plus fp32 rounding of the resize), the label must
    be the fp32 one. 100 queries (not a multiple of the 16-query chunk), 19 classes in a 32-wide tile, output
    pixels not a multiple of the pixel block, exact ×4 and non-integer resize scales."""
    probs, masks = labels_inputs(2, 100, 19, h, w, dtype, seed=40)
    labels = kernels.semantic_labels(probs, masks, size)
    assert labels.dtype == torch.int32 and labels.shape == (2, *size)
    expected, margin = fp32_labels_and_margin(probs, masks, size)
    u = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    clear = margin > 4 * u + 1e-5
    assert clear.float().mean() > 0.8  # the test bites on most pixels
    assert torch.equal(labels[clear], expected[clear])
    if dtype == torch.float32:
        assert (labels == expected).float().mean() >= 0.999


def test_labels_of_single_query_and_single_class_inputs():
    probs, masks = labels_inputs(1, 1, 1, 3, 4, torch.float32, seed=41)
    assert torch.equal(kernels.semantic_labels(probs, masks, (6, 8)), torch.zeros(1, 6, 8, dtype=torch.int32,
                                                                                  device=DEVICE))
    probs, masks = labels_inputs(1, 3, 2, 3, 4, torch.float32, seed=42)
    expected, _ = fp32_labels_and_margin(probs, masks, (6, 8))
    assert torch.equal(kernels.semantic_labels(probs, masks, (6, 8)), expected)


def check_labels_with_nan(b: int, h: int, w: int, size: tuple[int, int], seed: int) -> None:
    """NaN counts as the maximum and the first one wins, as in torch.argmax: a NaN mask logit makes every class
    sum of the pixels it reaches NaN (label 0), a NaN probability of class 3 makes that class's sum NaN everywhere
    (label 3 where no earlier class is NaN). The interpreter's argmax is numpy's, which already does this; the GPU's
    is a ">" reduction over a tile padded with -inf classes, where a NaN would lose."""
    probs, masks = labels_inputs(b, 100, 19, h, w, torch.float32, seed=seed)
    masks[0, 7, h // 2, w // 3] = float("nan")
    expected, _ = fp32_labels_and_margin(probs, masks, size)
    labels = kernels.semantic_labels(probs, masks, size)
    reached = torch.nn.functional.interpolate(masks.float(), size=size, mode="bilinear").isnan().any(1)
    assert reached.any() and (expected[reached] == 0).all()
    assert torch.equal(labels, expected)
    probs[-1, 11, 3] = float("nan")
    expected, _ = fp32_labels_and_margin(probs, masks, size)
    assert (expected[-1] == 3).all()
    assert torch.equal(kernels.semantic_labels(probs, masks, size), expected)


def test_labels_put_the_first_nan_class_first_as_argmax_does():
    check_labels_with_nan(2, 6, 5, (24, 20), seed=44)


@pytest.mark.parametrize("bad, match", [("probs_batch", r"class_probs: expected \(2, 5, K\)"),
                                        ("classes", "classes"), ("mask_dims", r"mask_logits: expected \(B, Q, h, w\)"),
                                        ("int", "mask_logits: expected a float32"), ("size", "size: expected")])
def test_labels_reject_bad_input_in_one_line(bad, match):
    probs, masks = labels_inputs(2, 5, 3, 4, 4, torch.float32, seed=43)
    size = (8, 8)
    if bad == "probs_batch":
        probs = probs[:1]
    elif bad == "classes":
        probs = torch.rand(2, 5, 300, device=DEVICE)
    elif bad == "mask_dims":
        masks = masks[0]
    elif bad == "int":
        masks = masks.to(torch.int32)
    else:
        size = (0, 8)
    with pytest.raises(ValueError, match=match):
        kernels.semantic_labels(probs, masks, size)


# ---------------------------------------------------------------------------------- refinement depthwise conv


def check_depthwise(x: torch.Tensor, weights: list[torch.Tensor], dilations: list[int]) -> None:
    """Every output against fp32 F.conv2d of the same (rounded) inputs. fp32: nine products summed in another
    order, ~1e-6. fp16/bf16: the kernel sums in fp32 and rounds once, ≤ eps/2 of each value, plus fp32 order."""
    with torch.no_grad():
        got = kernels.depthwise_conv3x3(x, weights, dilations)
    expected = kernels.depthwise_conv3x3_reference(x.float(), [w.float() for w in weights], dilations)
    assert len(got) == len(dilations)
    for d, g, e in zip(dilations, got, expected):
        assert g.dtype == x.dtype and g.shape == x.shape and g.is_contiguous(memory_format=torch.channels_last)
        err = (g.float() - e).abs()
        bound = 1e-5 if x.dtype == torch.float32 else torch.finfo(x.dtype).eps * e.abs() + 1e-5
        assert bool((err <= bound).all()), f"dilation {d}: max error {float(err.max()):.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
def test_depthwise_matches_conv2d_at_every_dilation(dtype):
    """The refinement's four dilations plus a fifth (a second launch), on a ragged map (pixels and channels not
    multiples of the tile) smaller than the widest dilation, so that whole taps fall outside the zero padding."""
    torch.manual_seed(30)
    x = torch.randn(2, 40, 5, 7, device=DEVICE).to(dtype)
    weights = [(torch.randn(40, 1, 3, 3, device=DEVICE) / 3).to(dtype) for _ in range(5)]
    check_depthwise(x, weights, [1, 2, 3, 4, 6])


def test_depthwise_takes_nchw_and_channels_last_maps_one_dilation_and_fp32_weights():
    torch.manual_seed(31)
    x = torch.randn(1, 24, 9, 4, device=DEVICE)
    weights = [torch.randn(24, 1, 3, 3, device=DEVICE)]
    check_depthwise(x, weights, [2])
    check_depthwise(x.contiguous(memory_format=torch.channels_last), weights, [2])
    check_depthwise(x.to(torch.bfloat16), weights, [1])  # bf16 map, fp32 weights (read as fp32)


@pytest.mark.parametrize("bad, match", [
    ("weight_shape", r"weights: expected \(8, 1, 3, 3\)"), ("dilation", "dilations: expected positive ints"),
    ("counts", "as many of each"), ("dims", r"x: expected \(B, C, H, W\)"), ("int", "x: expected a float32"),
    ("grad", "inference only")])
def test_depthwise_rejects_bad_input_in_one_line(bad, match):
    x = torch.randn(2, 8, 5, 5, device=DEVICE)
    weights, dilations = [torch.randn(8, 1, 3, 3, device=DEVICE)], [1]
    if bad == "weight_shape":
        weights = [torch.randn(8, 1, 5, 5, device=DEVICE)]
    elif bad == "dilation":
        dilations = [0]
    elif bad == "counts":
        dilations = [1, 2]
    elif bad == "dims":
        x = x[0]
    elif bad == "int":
        x = x.to(torch.int32)
    else:
        weights = [weights[0].requires_grad_()]
    with pytest.raises(ValueError, match=match):
        kernels.depthwise_conv3x3(x, weights, dilations)


# ---------------------------------------------------------------------------------------------- the model path


def test_tiny_student_semantic_logits_equal_with_triton_and_torch_attention(monkeypatch):
    from qd_core import build_student, load_config

    torch.manual_seed(20)
    student = build_student(load_config("tiny")).eval().to(DEVICE)
    images = torch.randn(1, 3, 128, 128, device=DEVICE)
    calls = {"agent_attention": 0, "masked_attention": 0, "ms_deform_attn": 0, "depthwise_conv3x3": 0}
    for name in calls:
        def counting(*args, name=name, real=getattr(kernels, name), **kw):
            calls[name] += 1
            return real(*args, **kw)
        monkeypatch.setattr(kernels, name, counting)
    with torch.no_grad():
        monkeypatch.setenv("QD_ATTENTION", "torch")
        reference = student.semantic_logits(images)
        assert sum(calls.values()) == 0
        monkeypatch.setenv("QD_ATTENTION", "triton")
        triton_logits = student.semantic_logits(images)
    assert all(n > 0 for n in calls.values()), calls
    torch.testing.assert_close(triton_logits, reference, atol=1e-4, rtol=1e-4)


def test_refinement_takes_the_depthwise_kernel_only_where_no_gradient_is_wanted(monkeypatch):
    """Inference: one kernel call for the four fusions' depthwise convolutions, the torch path's result. Training
    (gradients on): the four PyTorch convolutions, whose gradients reach every fusion's depthwise weights."""
    from qd_core.config import load_config
    from qd_core.head.refine import Refinement

    torch.manual_seed(32)
    cfg = load_config("tiny").model.head
    refine = Refinement(cfg).to(DEVICE).eval()
    d = cfg.dim
    maps = [torch.randn(2, d, *hw, device=DEVICE) for hw in ((16, 16), (2, 2), (4, 4), (8, 8))]
    queries = torch.randn(2, cfg.num_queries, d, device=DEVICE)
    calls = []
    real = kernels.depthwise_conv3x3
    monkeypatch.setattr(kernels, "depthwise_conv3x3", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        monkeypatch.setenv("QD_ATTENTION", "torch")
        expected = refine(maps[0], maps[1:], queries)
        monkeypatch.setenv("QD_ATTENTION", "triton")
        got = refine(maps[0], maps[1:], queries)
    assert calls == [1]
    for g, e in zip([got[0], *got[1]], [expected[0], *expected[1]]):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    refine.train()
    fused, memories = refine(maps[0], maps[1:], queries)
    assert calls == [1]
    (fused.sum() + sum(m.sum() for m in memories)).backward()
    assert all(f.depthwise.weight.grad is not None and f.depthwise.weight.grad.abs().sum() > 0
               for f in refine.fusions)


def test_tiny_student_under_bf16_autocast_gives_the_kernels_one_dtype(monkeypatch):
    """Under autocast the model hands mixed fp32/bf16 q, k, v to the attention; the dispatch must cast them to the
    autocast dtype (as SDPA does) rather than let the kernels reject them. bf16 tolerance: logits are O(1-10), and
    both paths round every matmul input to bf16 (eps 2^-7), in a different order."""
    from qd_core import build_student, load_config

    torch.manual_seed(21)
    student = build_student(load_config("tiny")).eval().to(DEVICE)
    images = torch.randn(1, 3, 128, 128, device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        monkeypatch.setenv("QD_ATTENTION", "torch")
        reference = student.semantic_logits(images).float()
        monkeypatch.setenv("QD_ATTENTION", "triton")
        triton_logits = student.semantic_logits(images).float()
    err = (triton_logits - reference).abs().max()
    assert err <= 8 * torch.finfo(torch.bfloat16).eps * reference.abs().max(), f"max error {err:.3e}"


def test_tiny_student_labels_come_from_the_kernel_with_the_triton_backend(monkeypatch):
    """predict's full-size labels: one kernel with the Triton backend, the PyTorch composition otherwise; the same
    labels (fp32: they differ only where two classes tie to within rounding)."""
    from export.wrapper import ExportWrapper
    from qd_core import build_student, load_config

    torch.manual_seed(24)
    wrapper = ExportWrapper(build_student(load_config("tiny")).eval().to(DEVICE))
    images = torch.rand(2, 3, 128, 128, device=DEVICE) * 255
    calls = []
    real = kernels.semantic_labels
    monkeypatch.setattr(kernels, "semantic_labels", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        monkeypatch.setenv("QD_ATTENTION", "torch")
        logits, labels = wrapper(images)
        assert not calls
        monkeypatch.setenv("QD_ATTENTION", "triton")
        triton_logits, triton_labels = wrapper(images)
    assert calls == [1] and triton_labels.dtype == labels.dtype == torch.int32
    assert (triton_labels == labels).float().mean() >= 0.999
    torch.testing.assert_close(triton_logits, logits, atol=1e-4, rtol=1e-4)


def test_tiny_student_in_bf16_runs_every_kernel_in_bf16(monkeypatch):
    """The CUDA-graph backend's model: the whole student converted to bf16 (no autocast), so every kernel gets bf16
    q, k, v, mask factors and value maps (and fp32 sampling locations). Same tolerance as under autocast."""
    from bench.backends import in_dtype
    from qd_core import build_student, load_config

    torch.manual_seed(23)
    student = in_dtype(build_student(load_config("tiny")).eval().to(DEVICE), torch.bfloat16)
    images = torch.randn(1, 3, 128, 128, device=DEVICE)
    dtypes = set()
    for name in ("agent_attention", "masked_attention", "ms_deform_attn", "depthwise_conv3x3"):
        def recording(*args, real=getattr(kernels, name), **kw):
            dtypes.update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            return real(*args, **kw)
        monkeypatch.setattr(kernels, name, recording)
    with torch.no_grad():
        monkeypatch.setenv("QD_ATTENTION", "torch")
        reference = student.semantic_logits(images).float()
        monkeypatch.setenv("QD_ATTENTION", "triton")
        triton_logits = student.semantic_logits(images).float()
    assert dtypes == {torch.bfloat16, torch.float32}  # fp32: the deformable sampling's locations and weights
    err = (triton_logits - reference).abs().max()
    assert err <= 8 * torch.finfo(torch.bfloat16).eps * reference.abs().max(), f"max error {err:.3e}"


# ------------------------------------------------------------------------------------ paper shapes, GPU only


@pytest.mark.gpu
@needs_cuda
def test_tiny_student_with_the_kernels_replays_from_a_cuda_graph_as_it_runs_eagerly():
    """The torch-triton-bf16-graphs benchmark backend: the student with the Triton kernels must be capturable (no
    host reads, autotuning finished in the warm-up) and a replay on new images must give an eager call's result,
    not the captured images' (which differ everywhere)."""
    from bench.backends import TorchBackend
    from qd_core import build_student, load_config

    torch.manual_seed(22)
    student = build_student(load_config("tiny")).eval().to("cuda").requires_grad_(False)
    eager = TorchBackend(student, name="eager", dtype=torch.bfloat16, attention="triton")
    graphed = TorchBackend(student, name="graphs", dtype=torch.bfloat16, attention="triton", cuda_graphs=True)
    first, second = (torch.rand(2, 3, 128, 128, device="cuda") * 255 for _ in range(2))
    graphed.run(first)  # captures
    for images in (second, first):
        logits, labels = graphed.run(images)
        expected_logits, expected_labels = eager.run(images)
        # Same kernels on the same inputs; only library algorithm choices could differ under capture (bf16).
        err = (logits - expected_logits).abs().max()
        assert err <= 8 * torch.finfo(torch.bfloat16).eps * expected_logits.abs().max(), f"max error {err:.3e}"
        assert (labels == expected_labels).float().mean() >= 0.99


@pytest.mark.gpu
@needs_cuda
def test_tiny_student_compiled_with_the_kernel_operators_replays_as_the_eager_kernels_run():
    """The torch-compile-triton-bf16 benchmark backend: Inductor with the kernels as custom operators (kernels.ops)
    and its CUDA graphs; a replay on new images gives the eager kernels' result."""
    from bench.backends import TorchBackend
    from qd_core import build_student, load_config

    torch.manual_seed(23)
    student = build_student(load_config("tiny")).eval().to("cuda").requires_grad_(False)
    eager = TorchBackend(student, name="eager", dtype=torch.bfloat16, attention="triton")
    compiled = TorchBackend(student, name="compiled", dtype=torch.bfloat16, attention="triton", compile=True,
                            cuda_graphs=True)
    first, second = (torch.rand(2, 3, 128, 128, device="cuda") * 255 for _ in range(2))
    for _ in range(3):  # compilation, then Inductor's warm-up and recording
        compiled.run(first)
    for images in (second, first):
        logits, labels = compiled.run(images)
        expected_logits, expected_labels = eager.run(images)
        # Same kernels; Inductor's fused kernels round once where eager bf16 rounds after every operation, so the
        # two differ by the compounded bf16 roundings (tests/test_bench_pure.py's bound against fp32).
        rel = ((logits - expected_logits).norm() / expected_logits.norm()).item()
        assert rel <= 8 * 2.0 ** -8, f"relative error {rel:.3e}"
        assert (labels == expected_labels).float().mean() >= 0.95


@pytest.mark.gpu
@needs_cuda
def test_labels_with_nan_at_the_paper_shape_on_gpu():
    check_labels_with_nan(2, 128, 128, (512, 512), seed=45)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.gpu
@needs_cuda
def test_depthwise_at_the_paper_shape_on_gpu(dtype):
    """The refinement's four depthwise convolutions of the ViT-L student's stride-4 maps at 512², batch 2 (fp32
    through cuDNN without TF32, whatever the session's setting)."""
    torch.manual_seed(33)
    x = torch.randn(2, 1024, 128, 128, device=DEVICE).to(dtype).contiguous(memory_format=torch.channels_last)
    weights = [(torch.randn(1024, 1, 3, 3, device=DEVICE) / 3).to(dtype) for _ in range(4)]
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        check_depthwise(x, weights, [1, 2, 3, 4])
    finally:
        torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("b, h, n, m, d, shared", [(2, 8, 21760, 100, 32, False),  # refinement, 4 levels
                                                   (2, 1, 1024, 100, 1024, True)],  # Rein tokens, 512² crop
                         ids=["refinement", "rein"])
@pytest.mark.gpu
@needs_cuda
def test_agent_paper_shapes_on_gpu(b, h, n, m, d, shared, dtype):
    torch.manual_seed(30)
    kb = 1 if shared else b
    check_agent_gpu(leaf(b, h, n, d, dtype=dtype), leaf(kb, h, m, d, dtype=dtype), leaf(kb, h, m, d, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("b, seq", [(1, 256), (2, 1024), (2, 4096), (8, 4096)])
@pytest.mark.gpu
@needs_cuda
def test_masked_paper_shapes_on_gpu(b, seq, dtype):
    torch.manual_seed(31)
    me, mf = integer_factors(b, 100, 256, seq)
    block_all_keys(me, 0)
    open_one_key(me, 1)
    q, k, v = leaf(b, 8, 100, 32, dtype=dtype), leaf(b, 8, seq, 32, dtype=dtype), leaf(b, 8, seq, 32, dtype=dtype)
    grad_out = torch.randn(q.shape, device=q.device).to(q.dtype)
    actual = outputs_and_grads(lambda *t: kernels.masked_attention(*t, me.to(dtype), mf.to(dtype)), [q, k, v],
                               grad_out)
    expected = outputs_and_grads(lambda *t: kernels.masked_attention_reference(*t, me, mf), fp32_copies(q, k, v),
                                 grad_out)
    assert_gpu_close(actual, expected, dtype)


def check_agent_gpu(q, k, v) -> None:
    grad_out = torch.randn(q.shape, device=q.device).to(q.dtype)
    actual = outputs_and_grads(kernels.agent_attention, [q, k, v], grad_out)
    expected = outputs_and_grads(kernels.agent_attention_reference, fp32_copies(q, k, v), grad_out)
    assert_gpu_close(actual, expected, q.dtype)


def assert_gpu_close(actual: list[torch.Tensor], expected: list[torch.Tensor], dtype: torch.dtype) -> None:
    # fp32 runs its products as tf32x3 (~2^-21 relative per product) and sums up to 21760 terms in another
    # order than cuBLAS: 1e-5 relative stands in for "eps" there.
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_low_precision_close(actual, expected, eps)


# ------------------------------------------------------------------------------------------------ more cases

def test_agent_fp16_softmax_subtracts_the_row_maximum():
    """fp16 logits from about -50 to +30 (natural units): exp of the unshifted logits overflows fp16 (65504 ≈ e^11),
    so the 16-bit path must shift by the row maximum as the fp32 path does. Compared with the fp32 reference on the
    same rounded inputs with tests/test_kernels.py's low-precision bounds (2·eps in norm, 4·eps of the largest
    magnitude per element)."""
    torch.manual_seed(20)
    q = (torch.randn(1, 2, 70, 32, device=DEVICE) * 3).half()
    k = (torch.randn(1, 2, 20, 32, device=DEVICE) * 3).half()
    v = torch.randn(1, 2, 20, 32, device=DEVICE).half()
    ref = kernels.agent_attention_reference(q.float(), k.float(), v.float())
    logits = (q.float() @ k.float().transpose(-1, -2)) * 32 ** -0.5
    assert float(logits.amax()) > 20  # the case bites: e^20 is far past fp16's range
    out = kernels.agent_attention(q, k, v)
    assert torch.isfinite(out).all()
    eps = torch.finfo(torch.float16).eps
    err = out.float() - ref
    assert float(err.norm()) <= 2 * eps * float(ref.norm())
    assert float(err.abs().max()) <= 4 * eps * float(ref.abs().max())


def test_agent_values_with_other_strides_than_the_keys():
    """k contiguous, v a transposed (B, M, H, d) view: each operand must be read with its own strides."""
    torch.manual_seed(21)
    q = torch.randn(2, 2, 70, 32, device=DEVICE)
    k = torch.randn(2, 2, 20, 32, device=DEVICE)
    v = torch.randn(2, 20, 2, 32, device=DEVICE).transpose(1, 2)
    assert k.stride() != v.stride()
    check_agent(q.requires_grad_(), k.requires_grad_(), v.requires_grad_())


def test_agent_gradients_reach_keys_and_values_when_the_queries_need_none():
    """Rein's first block: frozen patch tokens (q, no grad) over trainable tokens (k, v). The kernel must still
    run its autograd Function and give the reference's dK and dV."""
    torch.manual_seed(22)
    q = torch.randn(2, 1, 70, 32, device=DEVICE)
    k = torch.randn(1, 1, 6, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 1, 6, 32, device=DEVICE, requires_grad=True)
    grad_out = torch.randn(q.shape, device=DEVICE)
    out = kernels.agent_attention(q, k, v)
    assert out.requires_grad
    dk, dv = torch.autograd.grad(out, [k, v], grad_out)
    kr, vr = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = kernels.agent_attention_reference(q, kr, vr)
    edk, edv = torch.autograd.grad(ref, [kr, vr], grad_out)
    torch.testing.assert_close(dk, edk, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv, edv, atol=1e-4, rtol=1e-4)


def test_agent_wide_head_whose_last_column_split_gets_the_ragged_chunk():
    """fp32 d = 264: nine 32-wide forward chunks (the ninth 8 wide) over four column splits of one query block.
    Every column of O, including the last chunk's, must be written."""
    from kernels import agent_triton

    torch.manual_seed(23)
    q, k, v = leaf(1, 1, 20, 264), leaf(1, 1, 7, 264), leaf(1, 1, 7, 264)
    chunk = agent_triton.block_d(264, 7, 4, "fwd")
    assert 264 % chunk and agent_triton.d_splits(1, -(-264 // chunk), q.device) > 1
    check_agent(q, k, v)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_agent_wide_head_dq_stays_finite_when_every_logit_is_far_below_zero():
    """d = 1024 (chunked backward), logits near -120: exp2(0 - lse) of the zero-padded keys overflows to inf, so
    the backward must drop padded keys before they reach dS, or dQ = dS·K is inf·0 = NaN. dQ is compared with the
    reference to the rounding of the -120 offset (see test_agent_rows_whose_logits_all_lie_far_below_zero), column 0
    (the constant one, where Σ dS = 0 cancels to that rounding alone) left out."""
    torch.manual_seed(24)
    d = 1024
    q = torch.randn(1, 1, 70, d, device=DEVICE)
    k = torch.randn(1, 1, 20, d, device=DEVICE) / d ** 0.5
    q[..., 0], k[..., 0] = 12.0, -10.0
    v = torch.randn(1, 1, 20, d, device=DEVICE)
    grad_out = torch.randn(q.shape, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dq, dk = torch.autograd.grad(kernels.agent_attention(*leaves, scale=1.0), leaves[:2], grad_out)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    edq, = torch.autograd.grad(kernels.agent_attention_reference(*ref_leaves, scale=1.0), ref_leaves[:1], grad_out)
    tol = 16 * 120 * torch.finfo(torch.float32).eps * float(edq.abs().max())
    torch.testing.assert_close(dq[..., 1:], edq[..., 1:], atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------ compiled-path operators

def test_agent_operator_applies_an_explicit_scale():
    """torch.ops.qd.agent_attention (what torch.compile calls) with a scale other than d ** -0.5."""
    torch.manual_seed(25)
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (9, 5, 5))
    with torch.no_grad():
        got = torch.ops.qd.agent_attention(q, k, v, 0.7)
    torch.testing.assert_close(got, kernels.agent_attention_reference(q, k, v, scale=0.7), atol=1e-5, rtol=1e-5)


def test_masked_operator_applies_an_explicit_scale():
    torch.manual_seed(26)
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (6, 40, 40))
    me = torch.randint(-2, 3, (1, 6, 4), device=DEVICE).float()
    mf = torch.randint(-2, 3, (1, 4, 40), device=DEVICE).float()
    with torch.no_grad():
        got = torch.ops.qd.masked_attention(q, k, v, me, mf, 0.7)
    torch.testing.assert_close(got, kernels.masked_attention_reference(q, k, v, me, mf, scale=0.7), atol=1e-5,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------------------- the references

def test_semantic_labels_reference_is_the_half_pixel_resize_sigmoid_class_product_argmax():
    """The labels reference against the composition written out here: a half-pixel (align_corners=False)
    bilinear resize computed by hand, the sigmoid, Σ_q p·s and the argmax (labels compared where the best two
    classes are clearly apart)."""
    g = torch.Generator().manual_seed(27)
    b, nq, ncls, h, w, size = 2, 7, 5, 4, 3, (10, 7)
    probs = torch.rand(b, nq, ncls, generator=g)
    masks = torch.randn(b, nq, h, w, generator=g) * 3

    def taps(n_out: int, n_in: int) -> torch.Tensor:
        """(n_out, n_in) interpolation matrix: source coordinate max((i + 0.5)·n_in/n_out − 0.5, 0)."""
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = src - lo
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), lo] += 1 - frac
        m[torch.arange(n_out), hi] += frac
        return m

    full = torch.einsum("yh,bqhw,xw->bqyx", taps(size[0], h), masks.double(), taps(size[1], w))
    sums = torch.einsum("bqk,bqyx->bkyx", probs.double(), full.sigmoid())
    top2 = sums.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.float().mean() > 0.9
    labels = kernels.semantic_labels_reference(probs, masks, size)
    assert labels.dtype == torch.int32 and labels.shape == (b, *size)
    assert torch.equal(labels[clear], sums.argmax(dim=1).to(torch.int32)[clear])
    # bf16 inputs are summed in fp32 (the module docstring), not in bf16: the labels of the inputs' fp32 values
    # (100 queries and 19 classes, where bf16 sums tie and swap the best two at a few per cent of the pixels).
    half_p = torch.rand(1, 100, 19, generator=g).softmax(-1).bfloat16()
    half_m = (torch.randn(1, 100, 12, 10, generator=g) * 3).bfloat16()
    size = (48, 40)
    assert torch.equal(kernels.semantic_labels_reference(half_p, half_m, size),
                       kernels.semantic_labels_reference(half_p.float(), half_m.float(), size))


def test_attention_references_return_the_query_dtype():
    torch.manual_seed(28)
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.bfloat16) for n in (6, 40, 40))
    me, mf = torch.randn(1, 6, 4), torch.randn(1, 4, 40)
    assert kernels.agent_attention_reference(q, k, v).dtype == torch.bfloat16
    assert kernels.masked_attention_reference(q, k, v, me, mf).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- the compiled path (kernels/__init__)

def test_compiled_agent_call_with_an_explicit_scale_and_no_gradients():
    torch.manual_seed(29)
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (9, 5, 5))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(lambda q, k, v: kernels.agent_attention(q, k, v, scale=0.7), backend="eager")(q, k, v)
    torch.testing.assert_close(got, kernels.agent_attention_reference(q, k, v, scale=0.7), atol=1e-5, rtol=1e-5)


def test_compiled_agent_call_whose_keys_and_values_need_gradients_gets_them():
    """A compiled call where only k and v require grad (frozen queries) must still run the autograd Function."""
    torch.manual_seed(30)
    q = torch.randn(1, 2, 9, 16, device=DEVICE)
    k = torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, v: kernels.agent_attention(q, k, v), backend="eager")(q, k, v)
    dk, dv = torch.autograd.grad(out.square().sum(), [k, v])
    kr, vr = k.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    edk, edv = torch.autograd.grad(kernels.agent_attention_reference(q, kr, vr).square().sum(), [kr, vr])
    torch.testing.assert_close(dk, edk, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dv, edv, atol=1e-4, rtol=1e-4)


def test_compiled_labels_at_a_size_that_is_not_square():
    """(H, W) must reach the operator in that order (a square size would not tell)."""
    g = torch.Generator().manual_seed(31)
    probs = torch.rand(1, 5, 4, generator=g).to(DEVICE)
    masks = (torch.randn(1, 5, 3, 4, generator=g) * 3).to(DEVICE)
    torch._dynamo.reset()
    got = torch.compile(lambda p, m: kernels.semantic_labels(p, m, (6, 10)), backend="eager")(probs, masks)
    assert got.shape == (1, 6, 10)
    assert torch.equal(got, kernels.semantic_labels(probs, masks, (6, 10)))


def test_compiled_deformable_call_whose_locations_and_weights_need_gradients_gets_them():
    """A compiled call with a frozen value map and trainable locations and weights must run the autograd Function;
    its gradients equal the gather reference's."""
    from qd_core.head.msda import ms_deform_attn_core

    g = torch.Generator().manual_seed(32)
    shapes_hw = [(4, 5), (2, 3)]
    value = torch.randn(1, 26, 2, 8, generator=g).to(DEVICE)
    shapes = torch.tensor(shapes_hw, device=DEVICE)
    starts = torch.tensor([0, 20], device=DEVICE)
    locations = (torch.rand(1, 7, 2, 2, 2, 2, generator=g) * 1.2 - 0.1).to(DEVICE).requires_grad_()
    weights = torch.rand(1, 7, 2, 2, 2, generator=g).to(DEVICE).requires_grad_()
    torch._dynamo.reset()
    out = torch.compile(kernels.ms_deform_attn, backend="eager")(value, shapes, starts, locations, weights)
    upstream = torch.randn(out.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad(out, [locations, weights], upstream)
    ref_in = [locations.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()]
    ref = ms_deform_attn_core(value, shapes, starts, ref_in[0], ref_in[1], sampling="gather")
    for a, e in zip(got, torch.autograd.grad(ref, ref_in, upstream)):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_deformable_operator_fake_gives_fp32_for_a_bf16_value_map():
    """The kernel returns fp32 whatever the value's dtype; the fake implementation Inductor plans with must too."""
    g = torch.Generator().manual_seed(33)
    value = torch.randn(1, 26, 2, 8, generator=g).to(DEVICE, torch.bfloat16)
    shapes = torch.tensor([(4, 5), (2, 3)], device=DEVICE)
    starts = torch.tensor([0, 20], device=DEVICE)
    locations = torch.rand(1, 7, 2, 2, 2, 2, generator=g).to(DEVICE)
    weights = torch.rand(1, 7, 2, 2, 2, generator=g).to(DEVICE)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.qd.ms_deform_attn.default, (value, shapes, starts, locations, weights),
                              test_utils=("test_faketensor",))

"""kernels._triton_utils.Launcher: its direct launches are the launches Triton's own dispatch makes.

The kernels compile for sm_90 with the offline driver (``kernels.offline_driver``: no GPU, launches recorded), in
a subprocess (this file run as a script) because the test session runs Triton's interpreter. Every scenario runs
three times: through Triton's dispatch, then through the launcher twice (its first call of a signature goes
through Triton, the second launches directly); the recorded launches must be equal: kernel, grid, stream and every
argument (tensors by dtype, shape, strides and alignment). It also checks that an installed launch hook makes the
launcher step aside. A second run trains one step of the tiny student under bf16 autocast with every attention on
the compiled kernels (outputs are not computed, so only the calls are checked: every kernel compiles for sm_90 at
the shapes, strides and dtypes the model hands it, and is launched), then runs one inference forward.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_script(*argv: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["QD_TRITON_AUTOTUNE"] = "0"
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_direct_launches_equal_tritons_dispatch_for_every_kernel():
    result = _run_script()
    assert result["compared"] == sorted(result["compared"]) and len(result["compared"]) == 12
    assert result["mismatches"] == [], result["mismatches"]
    # Each kernel launched directly at least once (a scenario that never hit the cache would prove nothing).
    assert set(result["direct"]) == {"_agent_fwd_kernel", "_agent_bwd_kernel", "_mask_bits_kernel",
                                     "_masked_fwd_kernel", "_masked_combine_kernel", "_masked_bwd_kernel",
                                     "_sum_partials_kernel", "_msda_fwd_kernel", "_msda_bwd_kernel",
                                     "_labels_kernel", "_depthwise_kernel"}
    assert result["hooked_launches"] == result["hook_calls"] > 0


def test_the_student_reaches_every_compiled_kernel_under_bf16_autocast():
    result = _run_script("student")
    # Per training step of the tiny config: the Rein token attention after each of its ViT blocks and the
    # refinement (agent), the masked attention of each decoder layer; each forward with its backward.
    launched = result["launched"]
    assert set(launched) == {"_agent_fwd_kernel", "_agent_bwd_kernel", "_masked_fwd_kernel",
                             "_masked_combine_kernel", "_masked_bwd_kernel", "_sum_partials_kernel",
                             "_msda_fwd_kernel", "_msda_bwd_kernel"}, launched
    assert launched["_agent_fwd_kernel"] == result["blocks"] + 1
    assert launched["_masked_fwd_kernel"] == launched["_masked_combine_kernel"] == result["decoder_layers"]
    assert launched["_msda_fwd_kernel"] == launched["_msda_bwd_kernel"] == result["msda_layers"] > 0
    assert launched["_agent_bwd_kernel"] == launched["_agent_fwd_kernel"]
    assert launched["_masked_bwd_kernel"] == launched["_masked_fwd_kernel"]
    assert result["dtypes"] == ["torch.bfloat16"]  # the first argument of every forward (the MSDA value map too)
    # An inference forward (eval, inference_mode): the same forward launches, no backward ones, no log-sum-exp,
    # and the refinement's depthwise convolutions in one kernel (training ran them in PyTorch, for their gradients).
    inference = result["inference"]
    assert inference == {**{name: launched[name] for name in ("_agent_fwd_kernel", "_masked_fwd_kernel",
                                                             "_masked_combine_kernel", "_msda_fwd_kernel")},
                         "_depthwise_kernel": 1}, inference


# --------------------------------------------------------------------------------------------------------------
# The subprocess side.

def _normalise(launches: list) -> list:
    """Launches as comparable data: tensors by (dtype, shape, strides, 16-byte alignment); no-op hooks as None."""
    def arg(a: object) -> object:
        import torch

        if isinstance(a, torch.Tensor):
            return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
        return a if isinstance(a, (int, float, str, bool)) or a is None else repr(a)

    def hook(h: object) -> object:
        return None if h is None or not getattr(h, "calls", True) else repr(h)

    return [[x.kernel, list(x.grid), x.stream, hook(x.hooks[1]), hook(x.hooks[2]), [arg(a) for a in x.args]]
            for x in launches]


def _main() -> None:
    from kernels.offline_driver import install

    launches = install(arch=90)
    import torch
    from triton import knobs
    from triton.runtime.jit import JITFunction

    dispatches = [0]  # calls of Triton's own dispatch, counted to show which runs launched directly
    triton_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        dispatches[0] += 1
        return triton_run(self, *args, **kwargs)
    JITFunction.run = counting_run

    import kernels
    from kernels import _triton_utils

    def tensors(*shapes: tuple, dtype: torch.dtype, grad: bool = False) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=dtype, requires_grad=grad) for s in shapes]

    def agent(b: int, h: int, n: int, m: int, d: int, dtype: torch.dtype, shared: bool, grad: bool,
              offset: int = 0):
        kb = 1 if shared else b
        q, k, v = tensors((b * h * n * d + offset,), (kb, h, m, d), (kb, h, m, d), dtype=dtype, grad=grad)
        qv = q[offset:].view(b, h, n, d)  # offset: a q that is not 16-byte aligned (another specialisation)

        def call() -> None:
            out = kernels.agent_attention(qv, k, v)
            if grad:
                out.backward(torch.zeros_like(out))
        return call

    def masked(b: int, h: int, nq: int, seq: int, d: int, c: int, dtype: torch.dtype, grad: bool):
        q, k, v = tensors((b, h, nq, d), (b, h, seq, d), (b, h, seq, d), dtype=dtype, grad=grad)
        me, mf = tensors((b, nq, c), (b, c, seq), dtype=dtype)

        def call() -> None:
            out = kernels.masked_attention(q, k, v, me, mf)
            if grad:
                out.backward(torch.zeros_like(out))
        return call

    def msda(b: int, nq: int, h: int, d: int, shapes: list, points: int, grad: bool):
        s = sum(hh * ww for hh, ww in shapes)
        value = torch.zeros((b, s, h, d), dtype=torch.bfloat16, requires_grad=grad)
        locations = torch.zeros((b, nq, h, len(shapes), points, 2), requires_grad=grad)
        weights = torch.zeros((b, nq, h, len(shapes), points), requires_grad=grad)
        level_shapes = torch.tensor(shapes)
        starts = torch.tensor([sum(hh * ww for hh, ww in shapes[:i]) for i in range(len(shapes))])

        def call() -> None:
            out = kernels.ms_deform_attn(value, level_shapes, starts, locations, weights)
            if grad:
                out.backward(torch.zeros_like(out))
        return call

    def labels(b: int, nq: int, k: int, h: int, w: int, size: tuple, dtype: torch.dtype):
        probs = torch.zeros((b, nq, k + 1), dtype=dtype)[..., :k]  # strided, as the model slices it
        masks = torch.zeros((b, nq, h, w), dtype=dtype)
        return lambda: kernels.semantic_labels(probs, masks, size)

    def depthwise(b: int, c: int, h: int, w: int, dilations: list, dtype: torch.dtype):
        x = torch.zeros((b, c, h, w), dtype=dtype).contiguous(memory_format=torch.channels_last)
        weights = [torch.zeros((c, 1, 3, 3)) for _ in dilations]  # fp32, as the model's under autocast
        return lambda: kernels.depthwise_conv3x3(x, weights, dilations)

    scenarios = {
        "agent-bf16-fwd": agent(2, 2, 150, 20, 32, torch.bfloat16, shared=False, grad=False),
        "agent-bf16-fwd-other-n": agent(2, 2, 333, 20, 32, torch.bfloat16, shared=False, grad=False),
        "agent-bf16-fwd-unaligned-q": agent(2, 2, 150, 20, 32, torch.bfloat16, shared=False, grad=False, offset=1),
        "agent-fp16-shared-fwd-bwd": agent(2, 1, 150, 20, 32, torch.float16, shared=True, grad=True),
        "agent-bf16-wide-fwd-bwd": agent(1, 1, 70, 20, 160, torch.bfloat16, shared=True, grad=True),
        "masked-bf16-fwd": masked(1, 2, 20, 300, 32, 16, torch.bfloat16, grad=False),
        "masked-bf16-fwd-bwd": masked(2, 2, 20, 300, 32, 16, torch.bfloat16, grad=True),
        # L = BITS_MIN_KEYS: the per-image bit mask, read by the forward and the backward
        "masked-bf16-bits-fwd-bwd": masked(2, 2, 20, 1024, 32, 16, torch.bfloat16, grad=True),
        "msda-bf16-fwd-bwd": msda(2, 100, 2, 32, [(8, 8), (4, 4), (2, 2)], 4, grad=True),
        "labels-bf16": labels(2, 100, 19, 16, 16, (64, 64), torch.bfloat16),
        "depthwise-bf16": depthwise(2, 48, 10, 12, [1, 2, 3, 4], torch.bfloat16),
        "depthwise-bf16-five": depthwise(1, 48, 10, 12, [1, 2, 3, 4, 6], torch.bfloat16),  # 4 + 1 outputs
    }
    mismatches, direct = [], set()
    for name, call in scenarios.items():
        runs, counts = [], []
        for fast in (False, True, True):
            _triton_utils.FAST_LAUNCH = fast
            start, before = len(launches), dispatches[0]
            call()
            runs.append(_normalise(launches[start:]))
            counts.append(dispatches[0] - before)
        if not (runs[0] == runs[1] == runs[2]) or not runs[0] or counts[0] != len(runs[0]):
            mismatches.append({"scenario": name, "triton": runs[0], "first": runs[1], "cached": runs[2]})
        if counts[2] == 0:  # the cached run launched everything directly
            direct.update(launch[0] for launch in runs[2])
        else:
            mismatches.append({"scenario": name, "dispatches of the cached run": counts[2]})

    # An installed launch hook (a profiler's) must see every launch: the launcher leaves those to Triton.
    _triton_utils.FAST_LAUNCH = True
    seen: list = []
    knobs.runtime.launch_enter_hook.add(seen.append)
    start = len(launches)
    scenarios["masked-bf16-fwd-bwd"]()
    hooked = len(launches) - start
    knobs.runtime.launch_enter_hook.remove(seen.append)
    print(json.dumps({"compared": sorted(scenarios), "mismatches": mismatches, "direct": sorted(direct),
                      "hooked_launches": hooked, "hook_calls": len(seen)}))


def _student() -> None:
    from kernels.offline_driver import install

    launches = install(arch=90)
    os.environ["QD_ATTENTION"] = "triton"
    import torch

    from qd_core import build_student, load_config

    torch.manual_seed(0)
    cfg = load_config("tiny")
    student = build_student(cfg).train()
    images = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = student(images)
        loss = sum(t.float().sum() for t in (*out.class_logits, *out.mask_logits))
    loss.backward()
    counts: dict[str, int] = {}
    dtypes = set()
    for launch in launches:
        counts[launch.kernel] = counts.get(launch.kernel, 0) + 1
        if launch.kernel.endswith("_fwd_kernel"):
            dtypes.add(str(launch.args[0].dtype))
    start = len(launches)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        student.eval()(images)
    inference: dict[str, int] = {}
    for launch in launches[start:]:
        inference[launch.kernel] = inference.get(launch.kernel, 0) + 1
    from qd_core.head.msda import MSDeformAttn

    msda_layers = sum(isinstance(m, MSDeformAttn) for m in student.modules())
    print(json.dumps({"launched": counts, "dtypes": sorted(dtypes), "blocks": cfg.model.backbone.depth,
                      "decoder_layers": cfg.model.head.decoder_layers, "msda_layers": msda_layers,
                      "inference": inference}))


if __name__ == "__main__":
    _student() if sys.argv[1:] == ["student"] else _main()

"""Where the host time of one kernel call goes: issue rate, synchronised rate and a Python profile.

    python -m bench.host_profile [--calls N] [--top K] [--out FILE]

At the paper's decoder and batch-1 refinement shapes the attention kernels finish in tens of microseconds, so a
wall-clock call is mostly host work: Python checks, allocations, Triton's launcher and autotuner lookup, the
autograd machinery. For the Triton kernels and SDPA (with a materialised mask for the masked kind) this prints, per
case and mode:

- issue µs: host time per call with no synchronisation (N calls back to back, one synchronise at the end, whose
  wait is excluded: the GPU finishes each small call before the host has issued the next);
- synced µs: per call ending in ``torch.cuda.synchronize()``, as the microbenchmarks time it;
- then, for the Triton calls, the functions with the largest own time in ``cProfile`` (per call).

On a machine without CUDA it runs tiny shapes under Triton's interpreter: the numbers then describe the interpreter,
and the run only checks that the tool works.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from qd_core.checkpoint import atomic_write  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cases() -> list[tuple[str, dict[str, Callable[[], object]], list[torch.Tensor]]]:
    """(name, {implementation: zero-argument call}, differentiable inputs) at the paper's shapes (tiny on CPU)."""
    torch.manual_seed(0)
    b, h, n, m, d = (1, 8, 21760, 100, 32) if CUDA else (1, 2, 150, 20, 32)
    q, k, v = (torch.randn(s, device=DEVICE, dtype=DTYPE, requires_grad=True)
               for s in ((b, h, n, d), (b, h, m, d), (b, h, m, d)))
    agent = {"triton": lambda: kernels.agent_attention(q, k, v),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    nq, seq, c = (100, 1024, 256) if CUDA else (20, 100, 16)
    mq, mk, mv = (torch.randn(s, device=DEVICE, dtype=DTYPE, requires_grad=True)
                  for s in ((1, 8, nq, d), (1, 8, seq, d), (1, 8, seq, d)))
    me = torch.randn(1, nq, c, device=DEVICE, dtype=DTYPE)
    mf = torch.randn(1, c, seq, device=DEVICE, dtype=DTYPE)
    masked = {"triton": lambda: kernels.masked_attention(mq, mk, mv, me, mf),
              "sdpa": lambda: F.scaled_dot_product_attention(
                  mq, mk, mv, attn_mask=~kernels.blocked_keys(me, mf)[:, None])}
    return [(f"agent refine-b{b}", agent, [q, k, v]), (f"masked decoder-b1-L{seq}", masked, [mq, mk, mv])]


def _step(fn: Callable[[], object], inputs: list[torch.Tensor], mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                fn()
    else:
        def run() -> None:
            out = fn()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def per_call_us(run: Callable[[], None], calls: int, synced: bool) -> float:
    """Host microseconds per call, with or without a synchronise after each (see the module docstring)."""
    run()
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        run()
        if synced:
            _sync()
    elapsed = time.perf_counter() - start
    _sync()
    return 1e6 * elapsed / calls


def profile_text(run: Callable[[], None], calls: int, top: int) -> str:
    """cProfile's top ``top`` functions by own time, as text, over ``calls`` calls."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        run()
    profiler.disable()
    _sync()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    # Keep the table (from its header), not pstats' preamble.
    return text[text.find("   ncalls"):].rstrip() if "   ncalls" in text else text.rstrip()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="timed calls per measurement (default 300)")
    ap.add_argument("--top", type=int, default=15, help="functions listed per profile (default 15)")
    ap.add_argument("--out", type=Path, default=None, help="also write the text here")
    args = ap.parse_args(argv)
    if args.calls < 1 or args.top < 1:
        ap.error(f"--calls {args.calls} / --top {args.top}: expected positive integers")
    device = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter: numbers describe the interpreter)"
    lines = [f"# Host time per kernel call, {device}", "",
             f"torch {torch.__version__}; {args.calls} calls per figure; {DTYPE}", "",
             "| case | mode | implementation | issue µs | synced µs |", "|---|---|---|---|---|"]
    profiles = []
    for name, impls, inputs in cases():
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in impls.items():
                run = _step(fn, inputs, mode)
                issue, synced = per_call_us(run, args.calls, False), per_call_us(run, args.calls, True)
                lines.append(f"| {name} | {mode} | {impl} | {issue:.1f} | {synced:.1f} |")
                if impl == "triton":
                    profiles.append(f"## {name} {mode}, Triton: cProfile over {args.calls} calls\n\n"
                                    + profile_text(run, args.calls, args.top))
    text = "\n".join(lines) + "\n\n" + "\n\n".join(profiles) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

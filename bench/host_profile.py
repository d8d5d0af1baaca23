"""Where the host time of one kernel call goes: issue rate, synchronised rate and a Python profile.

    python -m bench.host_profile [--calls N] [--top K] [--out FILE] [--offline]

At the paper's decoder and batch-1 refinement shapes the attention kernels finish in tens of microseconds, so a
wall-clock call is mostly host work: Python checks, allocations, Triton's launcher and autotuner lookup, the
autograd machinery. For the Triton kernels and SDPA (with a materialised mask for the masked kind) this prints, per
case and mode:

- issue µs: host time per call with no synchronisation (N calls back to back, one synchronise at the end, whose
  wait is excluded: the GPU finishes each small call before the host has issued the next);
- synced µs: per call ending in ``torch.cuda.synchronize()``, as the microbenchmarks time it;
- then, for the Triton calls, the functions with the largest own time in ``cProfile`` (per call).

The Triton kernels are timed twice: as they run (``triton``: ``kernels._triton_utils.Launcher`` launches a
signature it has seen directly) and with every launch through Triton's own dispatch (``triton-dispatch``,
what ``QD_TRITON_FAST_LAUNCH=0`` gives).

On a machine without CUDA it runs tiny shapes under Triton's interpreter: the numbers then describe the interpreter,
and the run only checks that the tool works. ``--offline`` instead compiles the kernels for sm_90 and replaces the
CUDA driver with ``kernels.offline_driver`` (launches recorded, not run; one fixed config per kernel): the issue
column is then the host cost of a call on this machine up to Triton's launcher (tiny shapes, bf16), for the
Triton paths only (``TRITON_INTERPRET`` must be unset).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import torch.nn.functional as F

import kernels
from qd_core.checkpoint import atomic_write

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _dispatched(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every kernel launch going through Triton's own dispatch (no direct launches)."""
    from kernels import _triton_utils

    def run() -> object:
        _triton_utils.FAST_LAUNCH = False
        try:
            return fn()
        finally:
            _triton_utils.FAST_LAUNCH = True
    return run


def cases(mode: str) -> list[tuple[str, dict[str, Callable[[], object]], list[torch.Tensor]]]:
    """(name, {implementation: zero-argument call}, differentiable inputs) at the paper's shapes on a GPU, tiny
    ones otherwise. ``mode``: "cuda", "interpreter" or "offline" (see the module docstring); offline, the shapes are
    tiny too so that this CPU's allocations (and the filled gradient seeds) stay cheap: on a GPU they come from the
    caching allocator at a cost that does not grow with the size, and the Python path is the same at any size."""
    torch.manual_seed(0)
    full = mode == "cuda"
    dtype = torch.float32 if mode == "interpreter" else torch.bfloat16
    b, h, n, m, d = (1, 8, 21760, 100, 32) if full else (1, 2, 150, 20, 32)
    q, k, v = (torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True)
               for s in ((b, h, n, d), (b, h, m, d), (b, h, m, d)))
    agent = {"triton": lambda: kernels.agent_attention(q, k, v),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    nq, seq, c = (100, 1024, 256) if full else (20, 100, 16)
    mq, mk, mv = (torch.randn(s, device=DEVICE, dtype=dtype, requires_grad=True)
                  for s in ((1, 8, nq, d), (1, 8, seq, d), (1, 8, seq, d)))
    me = torch.randn(1, nq, c, device=DEVICE, dtype=dtype)
    mf = torch.randn(1, c, seq, device=DEVICE, dtype=dtype)
    masked = {"triton": lambda: kernels.masked_attention(mq, mk, mv, me, mf),
              "sdpa": lambda: F.scaled_dot_product_attention(
                  mq, mk, mv, attn_mask=~kernels.blocked_keys(me, mf)[:, None])}
    out = [(f"agent refine-b{b}", agent, [q, k, v]), (f"masked decoder-b1-L{seq}", masked, [mq, mk, mv])]
    for _, impls, _ in out:
        if mode != "interpreter":  # the interpreter has no direct launches to compare with
            impls["triton-dispatch"] = _dispatched(impls["triton"])
        if mode == "offline":  # SDPA would run on this CPU: nothing to compare with
            del impls["sdpa"]
    return out


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


def per_call_us(run: Callable[[], None], calls: int, synced: bool, chunks: int = 5) -> float:
    """Host microseconds per call, with or without a synchronise after each (see the module docstring).

    The calls are timed in ``chunks`` runs of calls/chunks back to back (at least one call each), and the median
    chunk is kept: a page fault, a collection or another process on a small machine stalls a chunk, not the
    figure. Garbage collection is paused while timing.
    """
    run()
    _sync()
    per_chunk = max(1, calls // chunks)
    rates = []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(chunks):
            start = time.perf_counter()
            for _ in range(per_chunk):
                run()
                if synced:
                    _sync()
            elapsed = time.perf_counter() - start
            _sync()
            rates.append(1e6 * elapsed / per_chunk)
    finally:
        if enabled:
            gc.enable()
    return statistics.median(rates)


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


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, in one line naming the flag, or None."""
    if args.calls < 1 or args.top < 1:
        return f"--calls {args.calls} / --top {args.top}: expected positive integers"
    if args.out is not None and args.out.is_dir():
        return f"--out '{args.out}': is a folder; expected the path of the text file to write"
    if args.offline:
        if CUDA:
            return "--offline: this machine has CUDA; run without --offline to time the real launches"
        if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on"):
            return "--offline: unset TRITON_INTERPRET (the offline driver compiles the kernels)"
        if "kernels._triton_utils" in sys.modules:
            return "--offline: the Triton kernels were already imported in this process"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300, help="timed calls per measurement (default 300)")
    ap.add_argument("--top", type=int, default=15, help="functions listed per profile (default 15)")
    ap.add_argument("--out", type=Path, default=None, help="also write the text here")
    ap.add_argument("--offline", action="store_true",
                    help="no GPU: kernels compiled for sm_90, launches recorded instead of run (host cost only)")
    args = ap.parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.offline:
        os.environ["QD_TRITON_AUTOTUNE"] = "0"  # nothing to time configs with
        from kernels.offline_driver import install

        install(arch=90, record=False)
    mode = "cuda" if CUDA else "offline" if args.offline else "interpreter"
    device = {"cuda": torch.cuda.get_device_name() if CUDA else "",
              "interpreter": "cpu (Triton interpreter: numbers describe the interpreter)",
              "offline": "cpu, kernels compiled for sm_90, launches not run (kernels.offline_driver; the synced "
                         "column equals the issue one)"}[mode]
    lines = [f"# Host time per kernel call, {device}", "",
             f"torch {torch.__version__}; {args.calls} calls per figure", "",
             "| case | mode | implementation | issue µs | synced µs |", "|---|---|---|---|---|"]
    profiles = []
    for name, impls, inputs in cases(mode):
        for step in ("fwd", "fwd+bwd"):
            for impl, fn in impls.items():
                run = _step(fn, inputs, step)
                issue, synced = per_call_us(run, args.calls, False), per_call_us(run, args.calls, True)
                lines.append(f"| {name} | {step} | {impl} | {issue:.1f} | {synced:.1f} |")
                if impl.startswith("triton"):
                    profiles.append(f"## {name} {step}, {impl}: cProfile over {args.calls} calls\n\n"
                                    + profile_text(run, args.calls, args.top))
    text = "\n".join(lines) + "\n\n" + "\n\n".join(profiles) + "\n"
    sys.stdout.write(text)
    if args.out is not None:
        atomic_write(args.out, lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

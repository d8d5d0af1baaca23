"""Helpers shared by the Triton kernel modules.

Importing this module imports Triton, so it must happen after ``TRITON_INTERPRET`` is settled: Triton decides
at decoration time whether ``@triton.jit`` builds a compiled or an interpreted function. ``kernels/__init__.py``
takes care of that by importing the kernel modules only on first use.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner

# Read the same way Triton reads it when the decorators below run, so the launch-side choices (fixed configs,
# the bf16 workaround) always agree with the kind of function Triton built.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")

# QD_TRITON_AUTOTUNE=0: one fixed config per kernel instead of autotuning. Every autotune config is one more
# compilation per shape and dtype (about a second each); a correctness run at many shapes (the gpu tests) spends
# minutes on them, while the results do not depend on the config. Read once, at import, like the configs.
AUTOTUNE: bool = os.environ.get("QD_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off")

# QD_TRITON_FAST_LAUNCH=0: every launch goes through Triton's own dispatch (see ``Launcher``). Read once, at import.
FAST_LAUNCH: bool = os.environ.get("QD_TRITON_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "off")

LOG2E = 1.4426950408889634  # softmax runs in base 2 (exp2 is one instruction): exp(x) = exp2(x · log2 e)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on inputs of ``dtype``.

    fp32 inputs would default to TF32 (10-bit mantissa, ~1e-3 relative error), far outside the fp32 tolerances the
    references are held to; ``tf32x3`` splits each operand into a big and a small TF32 part and keeps fp32-level
    accuracy at three tensor-core products instead of one. Half-precision inputs ignore the setting.
    """
    if INTERPRET:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def needs_upcast(dtype: torch.dtype) -> bool:
    """Whether dot operands of ``dtype`` must be widened to fp32 before ``tl.dot``.

    The interpreter keeps bf16 tiles as raw uint16 words and multiplies those integers; widening first gives the
    product the GPU computes (bf16 × bf16 is exact in fp32, and the tensor core accumulates in fp32).
    """
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(P, R) @ (R, S) → (P, S) fp32 tile, see ``dot_precision`` and ``needs_upcast``."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


# Per-row log-sum-exps and reciprocals of row sums. On the GPU the approximate instructions (lg2.approx, a fast
# divide: errors of a few 1e-7 relative, far inside any tolerance here, on sums ≥ 1) instead of libdevice's exact
# log2 and IEEE division: in the agent forward those were ~20 % of the loop body at d = 32 (sm_90 SASS: 474 → 404
# instructions per 64 × 128 tile). The interpreter has no libdevice, hence the exact forms there.
if INTERPRET:
    @triton.jit
    def row_log2(x):
        """log2 of positive row sums."""
        return tl.log2(x)

    @triton.jit
    def row_reciprocal(x):
        """1 / x for positive row sums."""
        return 1.0 / x
else:
    from triton.language.extra import libdevice

    @triton.jit
    def row_log2(x):
        """log2 of positive row sums."""
        return libdevice.fast_log2f(x)

    @triton.jit
    def row_reciprocal(x):
        """1 / x for positive row sums."""
        return libdevice.fast_dividef(1.0, x)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints. Host-side helpers use these rather than ``triton.cdiv`` /
    ``triton.next_power_of_2``, which Triton wraps for use inside kernels at a few µs per host call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def autotune_bench(kernel_call, quantiles):
    """The autotuner's timing of one config: 5 ms of warm-up and 25 ms of repetitions instead of Triton's 25 + 100.

    The kernels take tens of microseconds, so 25 ms is hundreds of runs, enough to rank configs; with ~10 configs
    per kernel and a tuning per shape and dtype, the default would spend most of a GPU check benchmarking.
    """
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def tile(n: int, cap: int | None = None) -> int:
    """Smallest power of two ≥ n (and ≥ 16, the smallest ``tl.dot`` operand side), optionally capped."""
    size = max(16, next_power_of_2(n))
    return min(size, cap) if cap is not None else size


_SM_OVERRIDE: list[int] = []  # see use_multiprocessors


def use_multiprocessors(count: int) -> None:
    """Size launch grids for a GPU of ``count`` SMs whatever the tensors' device (``kernels.offline_driver``)."""
    _SM_OVERRIDE[:] = [count]


def target_programs(device: torch.device) -> int:
    """How many programs a split launch aims for: two waves of the GPU's SMs.

    Under the interpreter programs run one after another, so a small number still exercises the split paths.
    """
    if not _SM_OVERRIDE and (INTERPRET or device.type != "cuda"):
        return 4
    return 2 * multiprocessors(device)


def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count; 3 under the interpreter, so that a grid sized in waves of SMs still has programs that
    stride over several blocks (see ``persistent_programs``)."""
    if _SM_OVERRIDE:
        return _SM_OVERRIDE[0]
    if INTERPRET or device.type != "cuda":
        return 3
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(blocks: int, waves: int, other_axis: int, device: torch.device) -> int:
    """Programs along a grid axis of ``blocks`` blocks when each program strides over several of them.

    ``waves`` = 0 keeps one program per block. Otherwise the axis gets enough programs for ``waves`` programs per
    SM counting the ``other_axis`` programs beside it; each then loops over blocks pid, pid + programs, …, which lets
    Triton pipeline the next block's loads under the current block's math (a one-block program cannot overlap its
    own load latency, only other programs can).
    """
    if waves <= 0:
        return blocks
    return max(1, min(blocks, cdiv(waves * multiprocessors(device), other_axis)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    # Cached: the property query is a host round trip paid on every launch otherwise.
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_extent(extent: int, quantum: int, programs_per_split: int, device: torch.device,
                 max_splits: int | None = None) -> tuple[int, int]:
    """Cut ``extent`` rows/keys into splits of a whole number of ``quantum``-sized blocks.

    Returns (number of splits, length of each split). The split count is chosen so that splits × the other grid
    axis (``programs_per_split``) fills the GPU, without splitting finer than one quantum.
    """
    quanta = cdiv(extent, quantum)
    splits = min(quanta, max(1, cdiv(target_programs(device), programs_per_split)))
    if max_splits is not None:
        splits = max(1, min(splits, max_splits))
    length = cdiv(quanta, splits) * quantum
    return cdiv(extent, length), length


def checked_once(check: Callable[..., None]) -> Callable[..., None]:
    """``check(*tensors)``, skipped for tensors of shapes, dtypes and devices it has already accepted.

    The input checks of the kernels depend on nothing else, and they run on every call (a few µs of host time at
    sizes where a call's host time is comparable to its GPU time); a signature that fails is checked again.
    """
    accepted: set[tuple] = set()

    def run(*tensors: torch.Tensor) -> None:
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            check(*tensors)  # it names the argument that is not a tensor (check_float)
            return
        key = tuple([(t.shape, t.dtype, t.device) for t in tensors])
        if key not in accepted:
            check(*tensors)
            if len(accepted) >= 4096:
                accepted.clear()
            accepted.add(key)
    run.__doc__ = check.__doc__
    return run


def check_float(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless ``t`` is an fp32/fp16/bf16 tensor on a CUDA or CPU device."""
    if not isinstance(t, torch.Tensor):  # a list or a numpy array (whose dtype would print like a torch one)
        raise ValueError(f"{name}: expected a torch.Tensor (float32, float16 or bfloat16), got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a float32, float16 or bfloat16 tensor, got {t.dtype}")
    if t.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{name}: expected a CUDA tensor (or CPU under TRITON_INTERPRET=1), got {t.device}")


def check_scale(scale: float | None, head_dim: int) -> float:
    """The logit scale: ``scale`` or head_dim ** -0.5; a finite, positive float is expected.

    Positive because the kernels take each row's maximum on the unscaled logits and mask with -inf before scaling
    (so that scaling and shifting are one fused multiply-add per element): the maximum of the scaled logits only
    for a scale > 0, and -inf · 0 would be NaN.
    """
    if scale is None:
        return head_dim ** -0.5
    value = float(scale)
    if value != value or value in (float("inf"), float("-inf")) or value <= 0:
        raise ValueError(f"scale: expected a finite, positive float, got {scale}")
    return value


@triton.jit
def _sum_partials_kernel(PART, OUT, ROWS, COLS, BLOCK: tl.constexpr):
    """OUT[t, e] = Σ_r PART[t, r, e] in fp32, stored in OUT's dtype; grid (cdiv(COLS, BLOCK), T)."""
    pid = tl.program_id(0)
    t = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < COLS
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    base = PART + t.to(tl.int64) * ROWS * COLS
    for r in range(0, ROWS):
        acc += tl.load(base + r * COLS + offs, mask=ok, other=0.0)
    tl.store(OUT + t.to(tl.int64) * COLS + offs, acc.to(OUT.dtype.element_ty), mask=ok)


GridFn = Callable[[dict], tuple]


def _hooks_installed() -> bool:
    """Whether a launch hook is installed (a profiler's). Triton 3.6+ keeps them as hook chains, empty by
    default, and passes the chains to its launcher, which calls them; with no hook in them, passing None (the
    launcher then calls nothing) is the same launch without the per-call metadata they would receive."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def autotuned_configs() -> dict[str, dict[str, str]]:
    """{kernel: {tuning key: chosen config}} of every autotuned kernel of the ``kernels`` modules imported so far, as
    strings: what the autotuners picked in this process (a benchmark records it beside its timings). The key is
    Triton's: the values of the autotuner's key arguments, then the tensor arguments' dtypes. A kernel with a
    single config is never tuned and has no entries."""
    found: dict[str, dict[str, str]] = {}
    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("kernels.") and module is not None:
            for name, obj in vars(module).items():
                if isinstance(obj, Autotuner) and obj.cache:
                    found[name.strip("_")] = {", ".join(map(str, key)): str(cfg) for key, cfg in obj.cache.items()}
    return found


class Launcher:
    """Launches one ``@triton.jit`` kernel, autotuned or not, paying Triton's per-call dispatch once per signature.

    ``kernel[grid](*args)`` costs ~15 µs of host time per call on a 2-core CPU before the launch itself (the
    autotuner's key, the binder specialising every argument, the compiled-kernel key), several times the ~1 µs
    an argument key takes here. The kernels run at sizes where the host cost of a call is comparable to the GPU
    work, so the first call of each signature goes through Triton (autotuning, compiling) and the later ones
    launch the kernel it returned directly, with the config it chose and the exact argument list Triton passes
    (``JITFunction.run``: every parameter in order, constexprs included; Triton 3.6 and 3.7 alike).

    The signature is everything Triton specialises on and more: the current device, each tensor's dtype and
    16-byte alignment, the values of the scalar arguments (sizes, strides, scales) and of the constexprs; the
    autotuner's key is among them, so the cached config is the one it would pick. Call sites pass tensors first,
    then scalars, with one Python type per position. Triton's path is taken instead under the interpreter, with
    ``QD_TRITON_FAST_LAUNCH=0``, while a launch hook is installed (profilers; see ``_hooks_installed``), or for
    configs with a pre-hook.
    """

    _MAX_ENTRIES = 4096  # signatures kept per kernel; cleared beyond (each miss only costs one Triton dispatch)

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.tuned = isinstance(kernel, Autotuner)
        self.names: list[str] = list((kernel.fn if self.tuned else kernel).arg_names)
        self.entries: dict[tuple, tuple[Any, dict, tuple]] = {}

    def __call__(self, grid: tuple | GridFn, tensors: tuple, scalars: tuple, **constexprs: Any) -> None:
        """Launch on ``grid`` (a tuple, or a function of the meta-parameters) with ``(*tensors, *scalars)`` as the
        kernel's leading positional parameters and ``constexprs`` (and the autotuned config) as the rest."""
        if INTERPRET or not FAST_LAUNCH:
            self.kernel[grid](*tensors, *scalars, **constexprs)
            return
        device = driver.active.get_current_device()
        key = (device, tuple([(t.dtype, t.data_ptr() & 15) for t in tensors]), scalars, tuple(constexprs.items()))
        entry = self.entries.get(key)
        if entry is None or _hooks_installed():
            compiled = self.kernel[grid](*tensors, *scalars, **constexprs)
            self._remember(key, compiled, len(tensors) + len(scalars), constexprs)
            return
        compiled, meta, tail = entry
        g = grid(meta) if callable(grid) else grid
        compiled.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     None, None, *tensors, *scalars, *tail)

    def _remember(self, key: tuple, compiled: Any, positional: int, constexprs: dict) -> None:
        config = self.kernel.best_config if self.tuned else None
        if compiled is None or getattr(compiled, "function", None) is None or (config is not None and config.pre_hook):
            return
        meta = dict(constexprs, **(config.kwargs if config is not None else {}))
        missing = [name for name in self.names[positional:] if name not in meta]
        if missing:  # a parameter left to its default: its value is not known here, so keep Triton's path
            return
        if len(self.entries) >= self._MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (compiled, meta, tuple(meta[name] for name in self.names[positional:]))


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(T, R, E) contiguous fp32 partials → (T, E) sums over R in ``dtype``, in one launch.

    Replaces torch's sum then cast (two launches per tensor, four for a dK/dV pair): the backward passes run at
    sizes where each launch's host cost is comparable to the GPU work.
    """
    t, rows, cols = part.shape
    out = torch.empty((t, cols), dtype=dtype, device=part.device)
    block = 1024 if not INTERPRET else max(16, min(4096, next_power_of_2(cols)))
    _sum_partials_launch((cdiv(cols, block), t), (part, out), (rows, cols), BLOCK=block, num_warps=4)
    return out


_sum_partials_launch = Launcher(_sum_partials_kernel)

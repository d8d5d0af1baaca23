"""Peak memory one call adds on top of what was already held.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory allocated before the
call: the activations and workspace of that call, through torch's caching allocator. Engines that allocate outside
torch (ONNX Runtime's CUDA provider, TensorRT) are invisible to it, so their GPU figure is reported as n/a.

CPU: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``) during the call minus its resident
size before it. Linux lets a process reset that peak by writing "5" to ``/proc/self/clear_refs``; where that is not
allowed the peak since process start (``resource.getrusage().ru_maxrss``) is used instead, which only ever grows,
so the figure is then an upper bound that includes earlier work. Before the call glibc's ``malloc_trim(0)`` hands
the heap's free pages back to the kernel: otherwise the buffers an earlier call freed stay resident, the call
reuses them without growing the resident size, and its working set would read as nearly zero. tracemalloc is not
used: it sees Python's allocations but not torch's or ONNX Runtime's native buffers, which are nearly all of it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: the figure is then a lower bound
        pass


def measure_cpu_peak(fn: Callable[[], T]) -> tuple[T, float, str]:
    """Run ``fn`` once; return (its result, MiB of resident memory it added at its peak, method used)."""
    _malloc_trim()
    before = _status_kib("VmRSS")
    if before is not None and _reset_rss_peak():
        result = fn()
        peak = _status_kib("VmHWM")
        if peak is not None:
            return result, max(0, peak - before) / 1024.0, "CPU: VmHWM reset via clear_refs, after malloc_trim"
        return result, *_since_process_start(before)  # fn has run: never a second time, for a worse figure
    start = _status_kib("VmRSS") or 0
    return fn(), *_since_process_start(start)


def _since_process_start(start_kib: int) -> tuple[float, str]:
    """(MiB of the process's lifetime peak above ``start_kib``, method): an upper bound of what a call added."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, peak - start_kib) / 1024.0, "CPU: ru_maxrss since process start (upper bound)"


def measure_cuda_peak(fn: Callable[[], T]) -> tuple[T, float, str]:
    """Run ``fn`` once (it must synchronise); return (result, MiB of torch-allocated memory it added, method)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.max_memory_allocated() - base) / 2 ** 20, "CUDA: torch.cuda.max_memory_allocated"


def measure_peak(device: str, fn: Callable[[], T]) -> tuple[T, float, str]:
    """``measure_cuda_peak`` or ``measure_cpu_peak`` depending on ``device`` ('cuda' or 'cpu')."""
    if device == "cuda":
        return measure_cuda_peak(fn)
    if device == "cpu":
        return measure_cpu_peak(fn)
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")

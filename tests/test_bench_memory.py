"""CPU peak memory of one call: the resident memory the call adds at its peak, not what the process already held."""
from __future__ import annotations

import numpy as np
import pytest

from bench.memory import measure_cpu_peak, measure_peak

MIB = 2 ** 20


def touch(mib: int) -> int:
    buf = np.ones(mib * MIB, dtype=np.uint8)  # np.ones writes every page, so all of it becomes resident
    return int(buf[::4096].sum())


def test_a_call_that_touches_64_mib_reads_at_least_that():
    result, added, method = measure_cpu_peak(lambda: touch(64))
    assert result == 64 * MIB // 4096
    # Page-granular: up to a few MiB of the buffer may land on heap pages that were resident already, and the
    # interpreter adds a little on top.
    assert 60 <= added < 64 + 32, method


def test_memory_freed_by_an_earlier_call_does_not_hide_the_next_one():
    # 16 MiB is below glibc's largest dynamic mmap threshold (32 MiB): once one such buffer has been freed, the
    # next ones come from the heap, whose freed pages stay resident unless trimmed, and would be reused unseen.
    for _ in range(3):
        touch(16)
    _, added, _ = measure_cpu_peak(lambda: touch(16))
    assert added >= 14


def test_a_call_that_allocates_nothing_reads_near_zero():
    held = np.ones(64 * MIB, dtype=np.uint8)  # resident before the call: must not be counted
    _, added, _ = measure_cpu_peak(lambda: int(held[0]))
    assert added < 8


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="device"):
        measure_peak("tpu", lambda: None)

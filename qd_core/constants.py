"""Tensors that depend only on sizes, made once and reused: position encodings, reference points, level sizes.

Each is a handful of small operations (kernel launches on a GPU) or a host-to-device copy, which would otherwise
run in every forward and, for the copies, wait for the GPU stream to drain and break CUDA graph capture. While
tracing (export, torch.compile) they are made afresh, so the graph computes or folds them itself.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from qd_core.attention import is_tracing

_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()  # least recently used first
# Bytes kept at most. Whole-image inference over images of many sizes would otherwise keep encodings of every size
# (a 1024×2048 image's stride-8 encoding alone is 32 MiB); a forward at one size needs a few MiB of them.
_CACHE_BYTES = 256 * 2**20


def cached_constant(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, called once per ``key`` (which must hold everything the result depends on, device and dtype
    included) outside tracing. The result is shared: read it, do not write into it. It is made outside
    inference mode and autograd, so that training can use a constant first made by an inference call. The least
    recently used constants are dropped beyond _CACHE_BYTES."""
    if is_tracing():
        return make()
    out = _CACHE.get(key)
    if out is not None:
        _CACHE.move_to_end(key)
        return out
    with torch.inference_mode(False), torch.no_grad():
        out = make()
    _CACHE[key] = out
    total = sum(t.numel() * t.element_size() for t in _CACHE.values())
    while total > _CACHE_BYTES and len(_CACHE) > 1:
        _, dropped = _CACHE.popitem(last=False)
        total -= dropped.numel() * dropped.element_size()
    return out


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(values, dtype, device)``, made once (see ``cached_constant``): on a GPU each
    ``torch.tensor(..., device="cuda")`` is a host-to-device copy that drains the stream."""
    device = torch.device(device)
    return cached_constant(("tensor", values, dtype, device), lambda: torch.tensor(values, dtype=dtype, device=device))

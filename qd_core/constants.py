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

_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()
_CACHE_SIZE = 128  # least recently made first out


def cached_constant(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """``make()``, called once per ``key`` (which must hold everything the result depends on, device and dtype
    included) outside tracing. The result is shared: read it, do not write into it. It is made outside
    inference mode and autograd, so that training can use a constant first made by an inference call."""
    if is_tracing():
        return make()
    out = _CACHE.get(key)
    if out is None:
        with torch.inference_mode(False), torch.no_grad():
            out = make()
        _CACHE[key] = out
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return out


def device_constant(values: tuple, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.tensor(values, dtype, device)``, made once (see ``cached_constant``): on a GPU each
    ``torch.tensor(..., device="cuda")`` is a host-to-device copy that drains the stream."""
    device = torch.device(device)
    return cached_constant(("tensor", values, dtype, device), lambda: torch.tensor(values, dtype=dtype, device=device))

"""Whole-image and sliding-window inference (METHOD §6.4), independent of the model class.

``fn`` is any callable mapping normalised images (B, 3, h, w) to semantic logits (B, C, h, w) at input size
(see ``QueryDiffStudent.window_logits``); inputs it receives are always a multiple of ``multiple`` in size.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]


def window_grid(size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
                ) -> list[tuple[int, int, int, int]]:
    """Window boxes (y1, y2, x1, x2) of mmseg's slide inference.

    Per axis: count = max(S − win + stride − 1, 0) // stride + 1; window i starts at i·stride, ends at
    min(start + win, S), and is pushed back to start at max(end − win, 0) so the last one touches the border.
    An axis shorter than the window gets one box covering the whole axis.
    """
    (h, w), (wh, ww), (sh, sw) = size, window, stride
    rows = max(h - wh + sh - 1, 0) // sh + 1
    cols = max(w - ww + sw - 1, 0) // sw + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, h), min(c * sw + ww, w)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def pad_to(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad (B, 3, h, w) at the bottom/right to ``size`` (zeros = the mean colour after normalisation)."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, size[1] - w, 0, size[0] - h)) if (h, w) != tuple(size) else images


def padded_size(h: int, w: int, multiple: int, min_size: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """(h, w) raised to at least ``min_size``, then rounded up to a multiple of ``multiple`` (in that order: a window
    that is not itself a multiple must not be the padded size)."""
    return -(-max(h, min_size[0]) // multiple) * multiple, -(-max(w, min_size[1]) // multiple) * multiple


def run_padded(fn: LogitsFn, images: Tensor, multiple: int, min_size: tuple[int, int] = (0, 0)) -> Tensor:
    """Pad to a multiple of ``multiple`` (and at least ``min_size``), run ``fn``, crop the logits back."""
    h, w = images.shape[-2:]
    return fn(pad_to(images, padded_size(h, w, multiple, min_size)))[..., :h, :w]


def whole_inference(fn: LogitsFn, images: Tensor, multiple: int = 32) -> Tensor:
    """images: (B, 3, H, W) normalised → logits (B, C, H, W)."""
    return run_padded(fn, images, multiple)


def slide_inference(fn: LogitsFn, images: Tensor, window: tuple[int, int], stride: tuple[int, int],
                    num_classes: int, multiple: int = 32, window_batch: int = 8) -> Tensor:
    """images: (B, 3, H, W) normalised → logits (B, C, H, W), averaged over overlapping windows.

    A window cut at an image smaller than ``window`` is padded to the full window (the size the model was
    trained on) and its logits are cropped back. Up to ``window_batch`` windows of the B images go through ``fn``
    together (as one batch of ≤ window_batch·B crops, windows of equal padded size only): one call per window
    would run the model at batch B, where a GPU waits on the host and a CPU runs its small products slowly. The
    result is the same whatever ``window_batch`` (the model treats every image of a batch on its own).
    """
    if window_batch < 1:
        raise ValueError(f"window_batch {window_batch}: expected a positive integer")
    b, _, h, w = images.shape
    grid = window_grid((h, w), window, stride)
    # The grid is rows × columns, so it covers the image when each axis's spans do. Checked on the host before any
    # window runs (mmseg asserts the same after the fact): 0/0 would give NaN logits and a silent label 0.
    rows, cols = {(y1, y2) for y1, y2, _, _ in grid}, {(x1, x2) for _, _, x1, x2 in grid}
    if not (_spans_cover(rows, h) and _spans_cover(cols, w)):
        raise ValueError(f"inference.stride {list(stride)} leaves pixels no window {list(window)} covers: expected "
                         f"a stride no larger than the window")
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    # Windows grouped by the size run_padded would give them, in grid order within each size.
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for y1, y2, x1, x2 in grid:
        groups.setdefault(padded_size(y2 - y1, x2 - x1, multiple, window), []).append((y1, y2, x1, x2))
    for size, boxes in groups.items():
        for start in range(0, len(boxes), window_batch):
            chunk = boxes[start:start + window_batch]
            crops = torch.cat([pad_to(images[:, :, y1:y2, x1:x2], size) for y1, y2, x1, x2 in chunk])
            out = fn(crops).float()
            for i, (y1, y2, x1, x2) in enumerate(chunk):
                logits[:, :, y1:y2, x1:x2] += out[i * b:(i + 1) * b, :, :y2 - y1, :x2 - x1]
                count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def _spans_cover(spans: set[tuple[int, int]], size: int) -> bool:
    """Whether the half-open spans [a, b) together cover [0, size)."""
    reach = 0
    for start, end in sorted(spans):
        if start > reach:
            return False
        reach = max(reach, end)
    return reach >= size

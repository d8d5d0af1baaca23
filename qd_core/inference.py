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


def run_padded(fn: LogitsFn, images: Tensor, multiple: int, min_size: tuple[int, int] = (0, 0)) -> Tensor:
    """Pad to a multiple of ``multiple`` (and at least ``min_size``), run ``fn``, crop the logits back."""
    h, w = images.shape[-2:]
    ph = max(-(-h // multiple) * multiple, min_size[0])
    pw = max(-(-w // multiple) * multiple, min_size[1])
    return fn(pad_to(images, (ph, pw)))[..., :h, :w]


def whole_inference(fn: LogitsFn, images: Tensor, multiple: int = 32) -> Tensor:
    """images: (B, 3, H, W) normalised → logits (B, C, H, W)."""
    return run_padded(fn, images, multiple)


def slide_inference(fn: LogitsFn, images: Tensor, window: tuple[int, int], stride: tuple[int, int],
                    num_classes: int, multiple: int = 32) -> Tensor:
    """images: (B, 3, H, W) normalised → logits (B, C, H, W), averaged over overlapping windows.

    A window cut at an image smaller than ``window`` is padded to the full window (the size the model was
    trained on) and its logits are cropped back.
    """
    b, _, h, w = images.shape
    logits = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in window_grid((h, w), window, stride):
        crop = images[:, :, y1:y2, x1:x2]
        out = run_padded(fn, crop, multiple, min_size=tuple(window))
        logits[:, :, y1:y2, x1:x2] += out.float()
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count

"""Colour-coded label maps, overlays and side-by-side panels (numpy + Pillow)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from qd_core.classes import CITYSCAPES_PALETTE


def colorize(label: np.ndarray, palette: tuple[tuple[int, int, int], ...] = CITYSCAPES_PALETTE) -> np.ndarray:
    """Train-id label (H, W) → RGB uint8 (H, W, 3); ids without a colour (255 = ignore, negative ones) are black."""
    lut = np.zeros((len(palette) + 1, 3), dtype=np.uint8)  # the last row: black
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    ids = np.asarray(label).astype(np.intp)
    return lut[np.where((ids >= 0) & (ids < len(palette)), ids, len(palette))]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-coded ``label`` (H, W) over an RGB uint8 ``image`` (H, W, 3)."""
    if image.shape[:2] != label.shape:
        raise ValueError(f"overlay: image {image.shape[:2]} and label {label.shape} differ in size")
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colorize(label).astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


def panel(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Place RGB uint8 images of equal height side by side with a white gap."""
    h = images[0].shape[0]
    if any(im.shape[0] != h for im in images):
        raise ValueError("panel: images must share one height")
    sep = np.full((h, gap, 3), 255, dtype=np.uint8)
    parts = []
    for i, im in enumerate(images):
        parts += ([sep] if i else []) + [im]
    return np.concatenate(parts, axis=1)


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB or label array as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. ``path`` is a folder: nothing half-written is left behind
        raise
    return path

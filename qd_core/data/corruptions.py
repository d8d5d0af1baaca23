"""Appearance shifts that turn clean synthetic scenes into the target domains (DESIGN §7).

fog, snow and frost come from the ``imagecorruptions`` library (the ImageNet-C corruptions); the library has no
rain, night or art style, so those are made here: rain as motion-blurred random streaks over a dimmed, hazy
image, night as a gamma-darkened, blue-shifted, noisy image with a few lamp glows, and the art style as a
painterly filter, colour posterisation, edge enhancement and a palette swap. The layout (and so the label) is
unchanged by every shift.

``imagecorruptions`` draws from numpy's global random state; ``apply_domain`` seeds it from the generator passed
in and restores it afterwards, so results are reproducible and the caller's global state is untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageOps

TARGET_DOMAINS = ("fog", "snow", "frost", "night", "rain", "art")

# Severities (1..5 in imagecorruptions) drawn per image; moderate, so the scenes stay recognisable.
_LIBRARY_SEVERITY = {"fog": (2, 4), "snow": (1, 2), "frost": (1, 3)}


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _library(name: str) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from imagecorruptions import corrupt  # imported on use: it pulls in numba and scikit-image

        lo, hi = _LIBRARY_SEVERITY[name]
        severity = int(rng.integers(lo, hi + 1))
        with _numpy_global_seed(int(rng.integers(2**32))):
            return corrupt(image, corruption_name=name, severity=severity)

    return shift


def night(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Low light: gamma darkening, a blue cast, sensor noise and a few warm lamp glows. (H, W, 3) uint8."""
    h, w = image.shape[:2]
    x = (image.astype(np.float32) / 255.0) ** rng.uniform(1.6, 2.3) * rng.uniform(0.25, 0.4)
    x *= np.array([0.75, 0.85, 1.2], dtype=np.float32) * (1 + rng.normal(0, 0.05, size=3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0, h * 0.6), rng.uniform(0, w)
        radius = rng.uniform(0.03, 0.1) * max(h, w)
        glow = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        x += glow[..., None] * np.array([0.5, 0.38, 0.18], dtype=np.float32) * rng.uniform(0.3, 0.7)
    # Low light means few photons: noise is large relative to the signal.
    x += rng.normal(0.0, rng.uniform(0.015, 0.035), size=x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def rain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rain: slanted motion-blurred streaks over a dimmed, slightly blurred and hazy image. (H, W, 3) uint8."""
    h, w = image.shape[:2]
    x = image.astype(np.float32) / 255.0
    x = cv2.GaussianBlur(x, (0, 0), sigmaX=rng.uniform(0.5, 1.0))
    haze = np.array([0.55, 0.58, 0.62], dtype=np.float32)
    x = x * rng.uniform(0.6, 0.8) + haze * rng.uniform(0.08, 0.18)
    # Streaks: sparse random drops smeared along one direction by a line-shaped kernel.
    drops = (rng.random((h, w)) < rng.uniform(0.004, 0.01)).astype(np.float32) * rng.uniform(0.6, 1.0, (h, w))
    length = max(3, int(round(h * rng.uniform(0.04, 0.09))))
    kernel = np.zeros((length, length), dtype=np.float32)
    angle = np.deg2rad(rng.uniform(-20, 20))
    c = (length - 1) / 2
    dx, dy = np.sin(angle) * c, np.cos(angle) * c
    cv2.line(kernel, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
    streaks = cv2.filter2D(drops, -1, kernel / max(kernel.sum(), 1.0) * 3.0)
    x = x + np.clip(streaks, 0, 1)[..., None] * np.array([0.75, 0.78, 0.82], dtype=np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def art(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Art style: painterly median filter, posterised colours, enhanced edges, a swapped palette. (H, W, 3) uint8."""
    img = Image.fromarray(image).filter(ImageFilter.MedianFilter(int(rng.choice([3, 5]))))
    img = ImageOps.posterize(img, int(rng.integers(2, 4)))
    img = img.filter(ImageFilter.EDGE_ENHANCE_MORE)
    x = np.asarray(img)
    perm = [(1, 2, 0), (2, 0, 1), (2, 1, 0), (1, 0, 2), (0, 2, 1)][int(rng.integers(5))]
    x = x[..., list(perm)]
    if rng.random() < 0.5:  # invert one channel for a stronger palette change
        ch = int(rng.integers(3))
        x = x.copy()
        x[..., ch] = 255 - x[..., ch]
    return np.ascontiguousarray(x, dtype=np.uint8)


_SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "fog": _library("fog"),
    "snow": _library("snow"),
    "frost": _library("frost"),
    "night": night,
    "rain": rain,
    "art": art,
}


def apply_domain(name: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render ``image`` (H, W, 3) uint8, H and W ≥ 32, in target domain ``name``; returns (H, W, 3) uint8."""
    if name not in _SHIFTS:
        raise ValueError(f"unknown target domain {name!r}; expected one of {', '.join(TARGET_DOMAINS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    return _SHIFTS[name](image, rng)

"""Training augmentation and test-time resizing (METHOD §7, §6.4), numpy + torch only.

Training, in mmseg's order: random short-edge resize to one of ⌊base·k/10⌋, k = 5..20 (long edge capped) → random
crop × crop with cat_max_ratio → horizontal flip → PhotoMetricDistortion → normalise → pad to the crop (image 0
after normalisation, label 255). Every random choice comes from the ``numpy.random.Generator`` passed in, so the
same generator state gives the same sample.

Resizing follows the reference pipeline's OpenCV (mmcv ``imresize``): images bilinearly with half-pixel centres and
no anti-aliasing, in torch, within one grey level of ``cv2.resize(..., INTER_LINEAR)`` (both interpolate uint8 in
fixed point, rounding differently); labels by nearest neighbour at OpenCV's own source index (``nearest_indices``),
identical to ``cv2.resize(..., INTER_NEAREST)``.
Pillow would not do: its bilinear filter widens when shrinking (a softer image at the 2× test-time downscale) and
its nearest neighbour samples pixel centres, shifting labels by up to a pixel against their images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qd_core.data.labels import IGNORE_INDEX

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _check_pair(image: np.ndarray, label: np.ndarray | None) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {tuple(image.shape)}")
    if label is not None and label.shape != image.shape[:2]:
        raise ValueError(f"label must be (H, W) = {tuple(image.shape[:2])} like the image, got {tuple(label.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def scale_choices(base: int) -> list[int]:
    """The 16 short-edge lengths ⌊base·k/10⌋, k = 5..20 (base 512 → 256, 307, …, 1024)."""
    if base < 10:
        raise ValueError(f"scale base must be at least 10 pixels, got {base}")
    return [base * k // 10 for k in range(5, 21)]


def _uint8_tensor(array: np.ndarray) -> Tensor:
    """A uint8 tensor sharing ``array``'s memory where it can. A read-only array (Pillow's ``np.asarray`` gives
    those) is copied: torch cannot share it and would warn."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (OpenCV ``INTER_LINEAR`` sampling, no anti-aliasing) of a uint8 (H, W, 3) image to (h, w)."""
    h, w = size
    if (h, w) == image.shape[:2]:
        return image
    # torch's uint8 kernel works in fixed point like OpenCV's and is as fast as Pillow; interpolating in fp32 and
    # rounding lands closer still to OpenCV (1 pixel value in 8 one level off instead of 3 in 8) at 4x the time.
    chw = _uint8_tensor(image).permute(2, 0, 1)[None]
    out = F.interpolate(chw, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """(n_out,) int64: the source row (or column) of each output one under OpenCV's ``INTER_NEAREST``.

    OpenCV takes ⌊dst · (1 / (out / in))⌋ in float64, capped at in − 1. Neither exact ⌊dst · in / out⌋ nor torch's
    "nearest" (a float32 scale) is that: where dst · in / out is (nearly) whole they land one row off at a few dst
    (1024 → 614 rows, dst 307: torch reads 511, OpenCV 512; 1914 → 1024, exact division differs once).
    """
    scale = 1.0 / (n_out / n_in)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float64) * scale).astype(np.int64), n_in - 1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label to (h, w), identical to ``cv2.resize(..., INTER_NEAREST)``;
    keeps the dtype."""
    h, w = size
    if (h, w) == label.shape:
        return label
    return label[nearest_indices(label.shape[0], h)[:, None], nearest_indices(label.shape[1], w)[None, :]]


def short_edge_size(height: int, width: int, short: int, max_long: int) -> tuple[int, int]:
    """(h, w) with the short edge = ``short``, shrunk so the long edge ≤ ``max_long`` (mmcv ResizeShortestEdge)."""
    scale = short / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_long:
        shrink = max_long / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def fit_size(height: int, width: int, box: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio (h, w) fitting the long edge into max(box) and the short edge into min(box) (mmcv rescale)."""
    long_side, short_side = max(box), min(box)
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, scales: Sequence[int],
                  max_long: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (H, W, 3) and label (H, W) so the short edge is a random choice of ``scales``."""
    short = int(scales[rng.integers(len(scales))])
    size = short_edge_size(image.shape[0], image.shape[1], short, max_long)
    return resize_image(image, size), resize_label(label, size)


def _crop_ok(label: np.ndarray, cat_max_ratio: float, ignore_index: int) -> bool:
    values, counts = np.unique(label, return_counts=True)
    counts = counts[values != ignore_index]
    # mmseg's rule: at least two classes, and the largest below the ratio of labelled pixels.
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, crop: int,
                cat_max_ratio: float = 0.75, max_retries: int = 10,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """Crop a random ``crop`` × ``crop`` window (smaller where the image is), image (H, W, 3), label (H, W).

    With ``cat_max_ratio`` < 1 the window is redrawn up to ``max_retries`` times while one class covers at least
    that share of the labelled pixels; if no try succeeds the last window is kept (as mmseg does).
    """
    h, w = label.shape
    margin_h, margin_w = max(h - crop, 0), max(w - crop, 0)

    def draw() -> tuple[int, int]:
        return int(rng.integers(margin_h + 1)), int(rng.integers(margin_w + 1))

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(max_retries):
            if _crop_ok(label[y:y + crop, x:x + crop], cat_max_ratio, ignore_index):
                break
            y, x = draw()
    return image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image (H, W, 3) and label (H, W) left-right together with probability ``prob``."""
    if rng.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


# ----------------------------------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion)
# ----------------------------------------------------------------------------------------------------------------


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(…, 3) RGB floats → (…, 3) HSV with hue in [0, 1) (a full turn), saturation in [0, 1], value = max(RGB)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    delta = maxc - minc
    sat = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1), 0)
    safe = np.where(delta > 0, delta, 1)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, sat, maxc], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of ``rgb_to_hsv``: (…, 3) HSV → (…, 3) RGB in the value's scale."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    conds = [i == k for k in range(6)]
    r = np.select(conds, [v, q, p, p, t, v])
    g = np.select(conds, [t, v, v, q, p, p])
    b = np.select(conds, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32.0,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg PhotoMetricDistortion on an RGB image (H, W, 3) in 0..255; returns float32 (H, W, 3) in 0..255.

    Brightness (+δ, δ ~ U(±32)), contrast (×α, α ~ U(0.5, 1.5)) before or after the HSV ops at random,
    saturation (×α), hue (+δ on OpenCV's 0..180 hue scale, δ ∈ ±18, i.e. ±36°); each applied with p = 0.5.
    The HSV round trip stays in float instead of mmseg's uint8 HSV image, so no extra quantisation.
    """
    img = image.astype(np.float32)
    if rng.integers(2):
        img = np.clip(img + rng.uniform(-brightness_delta, brightness_delta), 0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(x: np.ndarray) -> np.ndarray:
        if rng.integers(2):
            x = np.clip(x * rng.uniform(*contrast_range), 0, 255)
        return x

    if contrast_first:
        img = contrast(img)
    sat_alpha = rng.uniform(*saturation_range) if rng.integers(2) else None
    hue_shift = int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else None
    if sat_alpha is not None or hue_shift is not None:
        hsv = rgb_to_hsv(img)
        if sat_alpha is not None:
            hsv[..., 1] = np.clip(hsv[..., 1] * sat_alpha, 0, 1)
        if hue_shift is not None:
            hsv[..., 0] = (hsv[..., 0] + hue_shift / 180.0) % 1.0
        img = np.clip(hsv_to_rgb(hsv), 0, 255).astype(np.float32)
    if not contrast_first:
        img = contrast(img)
    return img.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------------


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """RGB image (H, W, 3) in 0..255 → float32 tensor (3, H, W) of (x − mean) / std."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def pad_to(image: Tensor, label: Tensor, size: int, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Pad image (3, h, w) with 0 and label (h, w) with ``ignore_index`` at the bottom/right to (size, size)."""
    h, w = label.shape
    if h > size or w > size:
        raise ValueError(f"cannot pad a {h}x{w} sample down to {size}x{size}")
    if (h, w) == (size, size):
        return image, label
    out_img = image.new_zeros((image.shape[0], size, size))
    out_lbl = label.new_full((size, size), ignore_index)
    out_img[:, :h, :w] = image
    out_lbl[:h, :w] = label
    return out_img, out_lbl


@dataclass
class TrainTransform:
    """The training pipeline of METHOD §7 as one callable.

    ``crop`` is the square crop side; ``scale_base`` (default: ``crop``) sets the 16 short-edge scales
    ⌊scale_base·k/10⌋ and ``max_long`` (default: 4·``crop``, 2048 for 512) caps the long edge.
    """

    crop: int = 512
    scale_base: int | None = None
    max_long: int | None = None
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    mean: Sequence[float] = field(default_factory=lambda: IMAGENET_MEAN)
    std: Sequence[float] = field(default_factory=lambda: IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise ValueError(f"crop must be a positive side length, got {self.crop}")
        self.scales = scale_choices(self.scale_base or self.crop)
        self._max_long = self.max_long or 4 * self.crop

    def __call__(self, image: np.ndarray, label: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """image uint8 (H, W, 3), label (H, W) → image float32 (3, crop, crop), label int64 (crop, crop)."""
        if label is None:
            raise ValueError("training transform needs a label; this dataset has none")
        _check_pair(image, label)
        image, label = random_resize(image, label, rng, self.scales, self._max_long)
        image, label = random_crop(image, label, rng, self.crop, self.cat_max_ratio)
        image, label = random_flip(image, label, rng, self.flip_prob)
        pixels = photometric_distortion(image, rng) if self.photometric else image
        image_t = normalize(pixels, self.mean, self.std)
        label_t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
        return pad_to(image_t, label_t, self.crop)


@dataclass
class EvalTransform:
    """Test-time preprocessing (METHOD §6.4): keep-ratio resize of the image into a (long, short) box, normalise.

    The label stays at its original resolution: predictions are resized back before scoring.
    """

    box: tuple[int, int] = (1024, 512)
    mean: Sequence[float] = field(default_factory=lambda: IMAGENET_MEAN)
    std: Sequence[float] = field(default_factory=lambda: IMAGENET_STD)

    def __call__(self, image: np.ndarray, label: np.ndarray | None = None,
                 rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """image uint8 (H, W, 3), label (H, W) or None → image float32 (3, h, w) fitted to ``box``, label int64
        (H, W) or None. ``rng`` is unused (test-time preprocessing is deterministic)."""
        _check_pair(image, label)
        size = fit_size(image.shape[0], image.shape[1], self.box)
        image_t = normalize(resize_image(image, size), self.mean, self.std)
        label_t = None if label is None else torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))
        return image_t, label_t

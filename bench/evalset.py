"""The images every backend is timed and scored on: real images with labels, at the model's crop size.

Default: the synthetic evaluation set (DESIGN §7), the source-domain validation scenes and the same scenes under
each target-domain shift, taken round-robin over the domains so a few images already cover all of them. A folder
given instead is read as a synthetic root when it holds ``manifest.json``, else as a Cityscapes-layout dataset
(``leftImg8bit/val`` + ``gtFine/val``, as written by ``python -m qd_core.data.convert``).

Each image is resized (bilinear) so its short edge equals the crop and centre-cropped to the crop; its label gets
the same geometry by nearest neighbour, so backends are scored at exactly the resolution they are timed at.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.settings import REPO_ROOT
from qd_core.data import cityscapes_dataset
from qd_core.data.transforms import resize_image, resize_label

SOURCE_DOMAIN = "source"
# Where the synthetic evaluation set is drawn when no folder is given (ignored by git, like all of data/; the
# current folder's data/ for an installed copy).
DEFAULT_ROOT = REPO_ROOT / "data" / "bench-synthetic"


@dataclass
class EvalSet:
    """images: (N, 3, H, W) float32 RGB in [0, 255]; labels: (N, H, W) int64 train ids or 255."""

    images: Tensor
    labels: Tensor
    description: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def center_crop(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the image covers ``size`` = (h, w) with its aspect ratio kept, then cut the centre.

    image: (H, W, 3) uint8; label: (H, W) integer ids. Returns (h, w, 3) and (h, w).
    """
    h, w = size
    scale = max(h / image.shape[0], w / image.shape[1])
    # Round up so the resized image is never a pixel short of the crop.
    rh, rw = max(h, math.ceil(image.shape[0] * scale)), max(w, math.ceil(image.shape[1] * scale))
    image, label = resize_image(image, (rh, rw)), resize_label(label, (rh, rw))
    top, left = (rh - h) // 2, (rw - w) // 2
    return image[top:top + h, left:left + w], label[top:top + h, left:left + w]


def _shown(root: Path) -> str:
    """``root`` relative to the repository when inside it, so reports do not carry this machine's paths."""
    try:
        return str(root.resolve().relative_to(DEFAULT_ROOT.parent.parent))
    except ValueError:
        return str(root)


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]], description: str) -> EvalSet:
    images = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).float().contiguous()
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return EvalSet(images, labels, description)


def synthetic_domains(root: Path) -> list[str]:
    """The domains a synthetic root holds, source first, read from its manifest."""
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the synthetic set's manifest ({e})") from None
    targets = manifest.get("target_domains", []) if isinstance(manifest, dict) else None
    if not isinstance(targets, list):
        raise ValueError(f"{path}: expected a JSON object whose 'target_domains' is a list of domain folders")
    return [SOURCE_DOMAIN, *(str(d) for d in targets if d != SOURCE_DOMAIN)]


def load_synthetic(root: Path, count: int, size: tuple[int, int]) -> EvalSet:
    """``count`` labelled images of a synthetic root, round-robin over its domains, cropped to ``size``."""
    domains = synthetic_domains(root)
    datasets = {d: cityscapes_dataset(root / d, "val") for d in domains}
    available = min(len(ds) for ds in datasets.values()) * len(domains)
    if count > available:
        raise ValueError(f"images: {count} requested but {root} holds {available} (regenerate it with more "
                         f"validation scenes)")
    pairs = []
    for i in range(count):
        image, label = datasets[domains[i % len(domains)]].load(i // len(domains))
        pairs.append(center_crop(image, label, size))
    return _stack(pairs, f"synthetic evaluation set {_shown(root)} ({count} images over {', '.join(domains)})")


def load_cityscapes_layout(root: Path, count: int, size: tuple[int, int]) -> EvalSet:
    """The first ``count`` images of ``root/leftImg8bit/val`` with their labels, cropped to ``size``."""
    dataset = cityscapes_dataset(root, "val")
    if count > len(dataset):
        raise ValueError(f"images: {count} requested but {root} holds {len(dataset)} validation images")
    pairs = [center_crop(*dataset.load(i), size) for i in range(count)]
    return _stack(pairs, f"{_shown(root)} (val, first {count} images)")


def ensure_default_root(count: int, domains: int = 7) -> Path:
    """The synthetic evaluation set with at least ``count`` images over its ``domains`` (source + 6 targets), drawn
    on first use into ``data/bench-synthetic-<scenes per domain>``."""
    per_domain = math.ceil(count / domains)
    # One folder per size: the generator refuses to reuse a folder drawn with other settings.
    root = DEFAULT_ROOT.with_name(f"{DEFAULT_ROOT.name}-{per_domain}")
    try:
        from qd_core.data import ensure_synthetic  # imports OpenCV and the corruption library
    except ImportError:
        if (root / "manifest.json").is_file():
            # Without the generator a finished folder drawn elsewhere is read as it is (even if an older
            # version of the generator drew it), so a machine without OpenCV can still benchmark.
            return root
        raise
    # Redraws a folder drawn by an older version of the generator: the scenes the students are trained on.
    return ensure_synthetic(root, num_train=1, num_val=per_domain, progress=False)


def load_eval_set(data: Path | None, count: int, size: tuple[int, int]) -> EvalSet:
    """``count`` labelled images cropped to ``size`` = (h, w) from ``data`` (see the module docstring)."""
    if count < 1:
        raise ValueError(f"count: expected at least one image, got {count}")
    if data is None:
        return load_synthetic(ensure_default_root(count), count, size)
    if (data / "manifest.json").is_file():
        return load_synthetic(data, count, size)
    try:
        return load_cityscapes_layout(data, count, size)
    except FileNotFoundError as e:
        # Neither layout: say both, not only the Cityscapes folder that was looked for last.
        raise FileNotFoundError(f"{data}: expected a synthetic root (manifest.json) or a Cityscapes-layout folder "
                                f"(leftImg8bit/val + gtFine/val); {e}") from None

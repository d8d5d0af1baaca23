"""Segmentation datasets in their published layouts (METHOD §8), all reduced to (image, train-id label) pairs.

Each reader only finds the pairs; ``SegmentationDataset`` loads and checks them. Without a transform a sample is
``{"image": uint8 (H, W, 3) numpy, "label": int64 (H, W) numpy, "path": str, "label_path": str}``; with one it is
whatever the transform returns for image and label (tensors for the transforms in ``qd_core.data.transforms``).
Image-only datasets (a plain folder) have no ``label``/``label_path`` keys.

Randomness: a transform receives a ``numpy.random.Generator`` seeded by (dataset seed, epoch, index), so a sample
is the same however many DataLoader workers there are and whichever worker draws it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from qd_core.data.files import is_hidden, read_image, read_label
from qd_core.data.labels import check_train_ids

# (image (H, W, 3) uint8, label (H, W) int64 or None, rng) → (image, label or None), usually tensors.
Transform = Callable[[np.ndarray, Optional[np.ndarray], np.random.Generator], tuple[Any, Any]]

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


@dataclass(frozen=True)
class Sample:
    """One image file and its train-id label file (None for image-only datasets)."""

    image: Path
    label: Path | None = None


class SegmentationDataset(torch.utils.data.Dataset):
    """A list of (image, label) files, loaded with checks, optionally transformed.

    Bad files fail on load with one error naming the file: missing or unreadable image or label, a label whose
    size differs from its image, or label values outside the train ids 0..18 ∪ {255}.
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform | None = None, seed: int = 0,
                 name: str = "dataset") -> None:
        if len(samples) == 0:
            raise ValueError(f"dataset {name!r} has no samples")
        self.samples = list(samples)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.name = name
        # index → (image, label as uint8 or None), filled by ``load`` once ``keep_decoded`` is on.
        self._decoded: dict[int, tuple[np.ndarray, np.ndarray | None]] | None = None

    def keep_decoded(self, enabled: bool = True) -> None:
        """Keep every checked pair in memory after its first load, so later epochs skip reading and decoding the
        files (about half the cost of a small training crop). Costs H·W·4 bytes per sample, in each DataLoader
        worker separately: for small data sets such as the synthetic scenes, not for GTA or Mapillary."""
        self._decoded = {} if enabled else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Change the random stream of the transform (call once per epoch, like a DistributedSampler)."""
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The checked raw pair: image uint8 (H, W, 3) and label int64 (H, W) (None without a label).

        With ``keep_decoded`` on, the image is a shared read-only array (transforms must not write into it) and
        the label a fresh int64 copy of the kept uint8 one.
        """
        if self._decoded is None:
            return self._read(index)
        if index not in self._decoded:
            image, label = self._read(index)
            image.flags.writeable = False
            # Train ids fit a byte (checked on read): a quarter of the memory of the int64 label.
            self._decoded[index] = (image, None if label is None else label.astype(np.uint8))
        image, kept = self._decoded[index]
        return image, None if kept is None else kept.astype(np.int64)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        sample = self.samples[index]
        image = read_image(sample.image)
        if sample.label is None:
            return image, None
        label = read_label(sample.label)
        if label.shape != image.shape[:2]:
            raise ValueError(
                f"{sample.label}: label size {label.shape[1]}x{label.shape[0]} (WxH) differs from image "
                f"{sample.image} size {image.shape[1]}x{image.shape[0]}"
            )
        check_train_ids(label, sample.label)
        return image, label.astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        sample = self.samples[index]
        out: dict[str, Any]
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image_t, label_t = self.transform(image, label, rng)
            out = {"image": image_t, "path": str(sample.image)}
            if label_t is not None:
                out["label"] = label_t
        else:
            out = {"image": image, "path": str(sample.image)}
            if label is not None:
                out["label"] = label
        if sample.label is not None:
            out["label_path"] = str(sample.label)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Finding the pairs of each published layout
# ----------------------------------------------------------------------------------------------------------------


def _find(folder: Path, pattern: str, recursive: bool = False) -> list[Path]:
    """Sorted files under ``folder`` matching ``pattern``; a missing or empty folder is an error naming both."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset folder not found (looking for {pattern!r})")
    found = sorted(p for p in (folder.rglob(pattern) if recursive else folder.glob(pattern))
                   if p.is_file() and not is_hidden(p))
    if not found:
        raise FileNotFoundError(f"{folder}: no files match {pattern!r}" + (" (searched recursively)" if recursive
                                                                           else ""))
    return found


def _pair(images: Iterable[Path], label_of: Callable[[Path], Path], labels: bool = True) -> list[Sample]:
    """One sample per image with its label file, which must exist; ``labels=False``: images only (a test split
    whose labels are withheld, predicted for a benchmark server), no label file looked for."""
    if not labels:
        return [Sample(image) for image in images]
    samples = []
    for image in images:
        label = label_of(image)
        if not label.is_file():
            raise FileNotFoundError(f"{label}: label file not found (for image {image})")
        samples.append(Sample(image, label))
    return samples


def _strip(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if name.endswith(suffix) else name


def cityscapes_samples(root: str | Path, split: str = "train", labels: bool = True) -> list[Sample]:
    """Cityscapes: ``leftImg8bit/{split}/<city>/*_leftImg8bit.png`` with ``gtFine/{split}/<city>/
    *_gtFine_labelTrainIds.png`` (made by ``python -m qd_core.data.convert cityscapes``)."""
    root = Path(root)
    images = _find(root / "leftImg8bit" / split, "*/*_leftImg8bit.png")
    return _pair(images, lambda p: root / "gtFine" / split / p.parent.name /
                 (_strip(p.name, "_leftImg8bit.png") + "_gtFine_labelTrainIds.png"), labels)


def gta_samples(root: str | Path, labels: bool = True) -> list[Sample]:
    """GTA5: ``images/*.png`` with ``labels/*_labelTrainIds.png`` (made by ``convert gta``)."""
    root = Path(root)
    images = _find(root / "images", "*.png")
    return _pair(images, lambda p: root / "labels" / f"{p.stem}_labelTrainIds.png", labels)


def mapillary_samples(root: str | Path, split: str = "val", half: bool = True,
                      labels: bool = True) -> list[Sample]:
    """Mapillary Vistas v1.2 after conversion.

    ``half=True`` (val only): ``half/val_img/*.jpg`` with ``half/val_label/*.png`` (``convert mapillary-resize``).
    ``half=False``: ``{training,validation}/images/*.jpg`` with ``cityscapes_trainIdLabel/{train,val}/label/*.png``
    (``convert mapillary --train_id``).
    """
    root = Path(root)
    if split not in ("train", "val"):
        raise ValueError(f"mapillary split must be 'train' or 'val', got {split!r}")
    if half:
        if split != "val":
            raise ValueError("mapillary half-resolution data exists for split 'val' only; pass half=False")
        images = _find(root / "half" / "val_img", "*.jpg")
        return _pair(images, lambda p: root / "half" / "val_label" / f"{p.stem}.png", labels)
    folder = {"train": "training", "val": "validation"}[split]
    images = _find(root / folder / "images", "*.jpg")
    return _pair(images, lambda p: root / "cityscapes_trainIdLabel" / split / "label" / f"{p.stem}.png", labels)


def bdd_samples(root: str | Path, split: str = "val", labels: bool = True) -> list[Sample]:
    """BDD100K: ``images/10k/{split}/*.jpg`` with ``labels/sem_seg/masks/{split}/*.png`` (already train ids)."""
    root = Path(root)
    images = _find(root / "images" / "10k" / split, "*.jpg")
    return _pair(images, lambda p: root / "labels" / "sem_seg" / "masks" / split / f"{p.stem}.png", labels)


def acdc_samples(root: str | Path, conditions: str | Sequence[str] = ACDC_CONDITIONS,
                 split: str = "val", labels: bool = True) -> list[Sample]:
    """ACDC: ``rgb_anon/<cond>/{split}/**/*_rgb_anon.png`` with ``gt/<cond>/{split}/**/*_gt_labelTrainIds.png``."""
    root = Path(root)
    conds = [conditions] if isinstance(conditions, str) else list(conditions)
    if not conds:
        raise ValueError("acdc conditions must name at least one of " + ", ".join(ACDC_CONDITIONS))
    samples: list[Sample] = []
    for cond in conds:
        image_root, label_root = root / "rgb_anon" / cond / split, root / "gt" / cond / split
        images = _find(image_root, "*_rgb_anon.png", recursive=True)
        samples += _pair(images, lambda p: label_root / p.parent.relative_to(image_root) /
                         (_strip(p.name, "_rgb_anon.png") + "_gt_labelTrainIds.png"), labels)
    return samples


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def folder_samples(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Sample]:
    """Every image under ``root`` (recursively), without labels, for visualisation."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    exts = {e.lower() for e in extensions}
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts and not is_hidden(p))
    if not images:
        raise FileNotFoundError(f"{root}: no files with extension {', '.join(sorted(exts))} (searched recursively)")
    return [Sample(p) for p in images]


# ----------------------------------------------------------------------------------------------------------------
# Ready-made datasets
# ----------------------------------------------------------------------------------------------------------------


def cityscapes_dataset(root: str | Path, split: str = "train", transform: Transform | None = None,
                       seed: int = 0, labels: bool = True) -> SegmentationDataset:
    """Cityscapes (or the synthetic scenes, which use its layout); see ``cityscapes_samples``."""
    return SegmentationDataset(cityscapes_samples(root, split, labels), transform, seed, name=f"cityscapes/{split}")


def gta_dataset(root: str | Path, transform: Transform | None = None, seed: int = 0,
                labels: bool = True) -> SegmentationDataset:
    """GTA5; see ``gta_samples``."""
    return SegmentationDataset(gta_samples(root, labels), transform, seed, name="gta")


def mapillary_dataset(root: str | Path, split: str = "val", half: bool = True, transform: Transform | None = None,
                      seed: int = 0, labels: bool = True) -> SegmentationDataset:
    """Mapillary Vistas v1.2; see ``mapillary_samples``."""
    return SegmentationDataset(mapillary_samples(root, split, half, labels), transform, seed,
                               name=f"mapillary/{split}")


def bdd_dataset(root: str | Path, split: str = "val", transform: Transform | None = None,
                seed: int = 0, labels: bool = True) -> SegmentationDataset:
    """BDD100K 10k semantic segmentation; see ``bdd_samples``."""
    return SegmentationDataset(bdd_samples(root, split, labels), transform, seed, name=f"bdd/{split}")


def acdc_dataset(root: str | Path, conditions: str | Sequence[str] = ACDC_CONDITIONS, split: str = "val",
                 transform: Transform | None = None, seed: int = 0, labels: bool = True) -> SegmentationDataset:
    """ACDC, one or several adverse conditions; see ``acdc_samples``."""
    conds = conditions if isinstance(conditions, str) else "+".join(conditions)
    return SegmentationDataset(acdc_samples(root, conditions, split, labels), transform, seed,
                               name=f"acdc/{conds}/{split}")


def folder_dataset(root: str | Path, transform: Transform | None = None, seed: int = 0) -> SegmentationDataset:
    """Images only (no labels), e.g. for the demo; see ``folder_samples``."""
    return SegmentationDataset(folder_samples(root), transform, seed, name=f"folder:{root}")


def collate(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape, keep everything else (paths, differently sized test images) as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out

"""Data: dataset readers in the published layouts, augmentation, the embedded synthetic scenes.

    from qd_core.data import ensure_synthetic, cityscapes_dataset, TrainTransform, EvalTransform
    root = ensure_synthetic(Path("data/synthetic"))
    train = cityscapes_dataset(root / "source", "train", TrainTransform(crop=128), seed=0)
    fog = cityscapes_dataset(root / "fog", "val", EvalTransform(box=(512, 256)))

Converters for the real datasets: ``python -m qd_core.data.convert {gta,cityscapes,mapillary,mapillary-resize}``.
"""
from __future__ import annotations

from typing import Any

from qd_core.data.datasets import (
    Sample,
    SegmentationDataset,
    acdc_dataset,
    bdd_dataset,
    cityscapes_dataset,
    collate,
    folder_dataset,
    gta_dataset,
    mapillary_dataset,
)
from qd_core.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, PALETTE, colorize
from qd_core.data.transforms import EvalTransform, TrainTransform

# Loaded on first use: importing them here would make ``python -m qd_core.data.synthetic`` warn that the module
# is already in sys.modules, and would pull OpenCV (which the corruptions use) into every import of the package.
_LAZY = {
    "ensure_synthetic": "qd_core.data.synthetic",
    "generate_synthetic": "qd_core.data.synthetic",
    "read_manifest": "qd_core.data.synthetic",
    "data_identity": "qd_core.data.synthetic",
    "TARGET_DOMAINS": "qd_core.data.corruptions",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qd_core.data' has no attribute {name!r}")


__all__ = [
    "CLASS_NAMES", "IGNORE_INDEX", "NUM_CLASSES", "PALETTE", "TARGET_DOMAINS", "EvalTransform", "Sample",
    "SegmentationDataset", "TrainTransform", "acdc_dataset", "bdd_dataset", "cityscapes_dataset", "collate",
    "colorize", "data_identity", "ensure_synthetic", "folder_dataset", "generate_synthetic", "gta_dataset",
    "mapillary_dataset", "read_manifest",
]

"""The 19 Cityscapes evaluation classes, their colours, and the label-value checks every reader shares."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qd_core.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from qd_core.visualize import colorize  # noqa: F401  (re-exported for the data package)

NUM_CLASSES = 19
IGNORE_INDEX = 255

# Names and colours live in qd_core.classes; these aliases keep the data package's vocabulary.
CLASS_NAMES = CITYSCAPES_CLASSES
PALETTE = CITYSCAPES_PALETTE

# Cityscapes label id → train id (METHOD §8.2); GTA5 ground truth is stored in label ids.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}


def label_id_lut() -> np.ndarray:
    """A (256,) uint8 lookup table from Cityscapes label ids to train ids, 255 for every other value."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def train_id_to_label_id_lut() -> np.ndarray:
    """A (256,) uint8 lookup table from train ids 0..18 to Cityscapes label ids (what the Cityscapes and ACDC
    benchmark servers score), 0 ("unlabeled") for every other value."""
    lut = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[train_id] = label_id
    return lut


def check_train_ids(label: np.ndarray, path: str | Path) -> None:
    """Raise ValueError naming ``path`` if ``label`` (H, W) holds a value outside 0..18 ∪ {255}."""
    bad = ((label >= NUM_CLASSES) & (label != IGNORE_INDEX)) | (label < 0)
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if values.size > 8 else "")
        raise ValueError(
            f"{path}: label holds unknown class ids [{shown}]; expected train ids 0..{NUM_CLASSES - 1} or "
            f"{IGNORE_INDEX} (run the dataset's converter first, with --overwrite where an earlier run wrote other "
            f"ids)"
        )

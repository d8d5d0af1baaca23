"""Dataset-level semantic segmentation metric: a confusion matrix and the IoU / mIoU read from it (METHOD §8.3).

Per class, IoU = Σ_images intersection / Σ_images union over the whole dataset (not a mean of per-image IoUs);
mIoU is the mean over the classes whose union is non-empty, as the Cityscapes evaluator averages only the
classes it could score. Pixels labelled ``ignore_index`` are not counted at all.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from qd_core.classes import CITYSCAPES_CLASSES


class ConfusionMatrix:
    """Accumulates a (C, C) int64 matrix: rows are ground-truth classes, columns predicted classes."""

    def __init__(self, num_classes: int = 19, ignore_index: int = 255) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive count, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index: {ignore_index} is a valid class id; expected a value outside "
                             f"0..{num_classes - 1}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.matrix = torch.zeros_like(self.matrix)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add one image (H, W) or a batch (B, H, W) of predicted and ground-truth class ids.

        pred: (H, W) or (B, H, W) integer ids in [0, C); label: same shape, ids in [0, C) or ``ignore_index``.
        """
        if pred.shape != label.shape or pred.dim() not in (2, 3):
            raise ValueError(f"pred, label: expected equal (H, W) or (B, H, W) shapes, got {tuple(pred.shape)} "
                             f"and {tuple(label.shape)}")
        for name, t in (("pred", pred), ("label", label)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"{name}: expected integer class ids, got dtype {t.dtype}")
        c = self.num_classes
        pred, label = pred.long(), label.to(pred.device).long()
        outside = (pred < 0) | (pred >= c)
        if bool(outside.any()):
            raise ValueError(f"pred: class id {int(pred[outside][0])} found; expected 0..{c - 1}")
        keep = label != self.ignore_index
        bad_label = keep & ((label < 0) | (label >= c))
        if bool(bad_label.any()):
            raise ValueError(f"label: class id {int(label[bad_label][0])} found; expected 0..{c - 1} "
                             f"or ignore_index {self.ignore_index}")
        counts = torch.bincount(label[keep] * c + pred[keep], minlength=c * c).reshape(c, c)
        self.matrix = self.matrix.to(counts.device) + counts

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add the counts of ``other`` (same classes and ignore index) into this matrix; returns self."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"other: expected num_classes={self.num_classes}, ignore_index={self.ignore_index}; "
                             f"got {other.num_classes}, {other.ignore_index}")
        self.matrix = self.matrix + other.matrix.to(self.matrix.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over DDP ranks when torch.distributed is initialised (a no-op otherwise); returns self."""
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl" and not self.matrix.is_cuda:
                self.matrix = self.matrix.cuda()
            dist.all_reduce(self.matrix)
        return self

    def iou(self) -> Tensor:
        """Per-class IoU (C,) float64; NaN where the class is in neither prediction nor ground truth."""
        m = self.matrix.double().cpu()
        inter = m.diagonal()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes with a non-empty union; NaN if nothing was counted."""
        return float(torch.nanmean(self.iou()))

    def per_class_table(self, names: Sequence[str] | None = None) -> str:
        """IoU of every class in percent, one line each, and the mIoU; "n/a" for classes never seen.

        ``names`` defaults to the Cityscapes classes when C = 19, else "class_<i>".
        """
        if names is None:
            names = CITYSCAPES_CLASSES if self.num_classes == len(CITYSCAPES_CLASSES) else [
                f"class_{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"names: expected {self.num_classes} class names, got {len(names)}")
        width = max(len("mIoU"), *(len(n) for n in names))

        def fmt(v: float) -> str:
            return f"{100.0 * v:7.2f}" if v == v else f"{'n/a':>7}"

        lines = [f"{'class':<{width}}  {'IoU':>7}"]
        lines += [f"{name:<{width}}  {fmt(float(v))}" for name, v in zip(names, self.iou())]
        lines.append(f"{'mIoU':<{width}}  {fmt(self.miou())}")
        return "\n".join(lines)


__all__ = ["ConfusionMatrix"]

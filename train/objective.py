"""The training objective L = L_seg + λ_dist·L_dist + λ_sup·L_sup (METHOD §1, §6.3), reduced so that one optimizer
step gives the same gradient however its images are split into micro-batches and ranks.

``Mask2FormerLoss`` normalises its terms by the counts of the batch it sees and draws its random points from one
generator for the whole batch. Here the same pieces (its matcher, ``classification_loss`` and ``mask_losses``)
run image by image, each image with its own generator seeded by its position in the training stream, and every
term is divided by counts taken over the whole step (all micro-batches, all ranks):

  num_masks  = Σ_images min(N_q, K_b)                         (matched masks; Mask2Former's normaliser)
  cls_weight = Σ_images [min(N_q, K_b) + (N_q − min(N_q, K_b))·w_no-object]   (the weighted CE denominator)

Each micro-batch contributes Σ_its images / (total / world_size); DDP averages over ranks and accumulation sums
micro-batches, so the step's gradient is Σ_all images / total: one large batch. With one process and one
micro-batch this is ``Mask2FormerLoss``'s normalisation (CE normalised over the whole step, [A], instead of per GPU)
and, for one image, its value; for several, its random points differ (one generator per image here, one per batch
there), so the values agree in expectation.
The guidance losses are batch means, scaled by 1/grad_accum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from qd_core.losses import Instances, Mask2FormerLoss, semantic_to_instances


@dataclass(frozen=True)
class StepNorm:
    """Whole-step normalisers of the segmentation terms, already divided by the world size (``num_masks`` ≥ 1,
    ``cls_weight`` > 0)."""

    num_masks: float
    cls_weight: float


def image_counts(labels: Tensor, num_classes: int, num_queries: int, no_object_weight: float,
                 ignore_index: int = 255) -> Tensor:
    """labels (B, H, W) → (2,) float64: Σ matched masks and Σ class-weight denominators of these images."""
    masks, weights = 0.0, 0.0
    for label in labels:
        present = torch.unique(label)
        k = int((present != ignore_index).sum())
        matched = min(num_queries, k)
        masks += matched
        weights += matched + (num_queries - matched) * no_object_weight
    return torch.tensor([masks, weights], dtype=torch.float64)


def step_norm(totals: Tensor, world_size: int) -> StepNorm:
    """totals: (2,) summed ``image_counts`` of the whole step over all ranks → per-rank normalisers."""
    return StepNorm(num_masks=max(float(totals[0]) / world_size, 1.0),
                    cls_weight=max(float(totals[1]) / world_size, 1e-12))


def image_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the random points of the image at stream ``position`` (same on every rank layout)."""
    state = np.random.SeedSequence([int(seed), int(position)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def segmentation_loss(criterion: Mask2FormerLoss, class_logits: Sequence[Tensor], mask_logits: Sequence[Tensor],
                      labels: Tensor, generators: Sequence[torch.Generator], norm: StepNorm) -> dict[str, Tensor]:
    """This micro-batch's share of L_seg.

    class_logits: L tensors (B, N_q, C+1); mask_logits: L tensors (B, N_q, h, w); labels: (B, H, W) train ids;
    generators: one per image. Returns "loss_cls_i", "loss_mask_i", "loss_dice_i" (i < L) and "loss_seg", the
    weighted sum, each this micro-batch's contribution to the step's mean.
    """
    b = labels.shape[0]
    if len(generators) != b:
        raise ValueError(f"generators: expected one per image ({b}), got {len(generators)}")
    targets: list[Instances] = [semantic_to_instances(label, criterion.num_classes, criterion.ignore_index)
                                for label in labels]
    counts = image_counts(labels, criterion.num_classes, class_logits[0].shape[1],
                          float(criterion.class_weights[-1]), criterion.ignore_index)
    losses: dict[str, Tensor] = {}
    total = class_logits[0].new_zeros((), dtype=torch.float32)
    for i, (cls, msk) in enumerate(zip(class_logits, mask_logits)):
        indices = [criterion.matcher(cls[j:j + 1].detach(), msk[j:j + 1].detach(), [targets[j]],
                                     generator=generators[j])[0] for j in range(b)]
        # classification_loss is Σ w·CE / Σ w over this micro-batch; rescale to the whole step's Σ w.
        loss_cls = criterion.classification_loss(cls, targets, indices) * (float(counts[1]) / norm.cls_weight)
        loss_mask = cls.new_zeros((), dtype=torch.float32)
        loss_dice = cls.new_zeros((), dtype=torch.float32)
        for j in range(b):
            m, d = criterion.mask_losses(msk[j:j + 1], [targets[j]], [indices[j]], norm.num_masks,
                                         generator=generators[j])
            loss_mask, loss_dice = loss_mask + m, loss_dice + d
        losses[f"loss_cls_{i}"], losses[f"loss_mask_{i}"], losses[f"loss_dice_{i}"] = loss_cls, loss_mask, loss_dice
        total = total + (criterion.class_weight * loss_cls + criterion.mask_weight * loss_mask
                         + criterion.dice_weight * loss_dice)
    losses["loss_seg"] = total
    return losses


__all__ = ["StepNorm", "image_counts", "image_generator", "segmentation_loss", "step_norm"]

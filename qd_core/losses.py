"""Mask2Former segmentation loss L_seg: Hungarian matching and point-sampled CE / BCE / dice (METHOD §6.3).

Semantic labels become one binary "instance" per class present in the crop. For every decoder output, queries
are matched one-to-one to those masks by a Hungarian assignment on uniformly random points; matched queries get
the class CE plus BCE and dice at importance-sampled points, unmatched queries are pushed to the no-object
class. Deep supervision sums the three weighted terms over all decoder outputs with equal weights.

Point coordinates are normalised to [0, 1] and stored (x, y) — x along the width — which is the order
``F.grid_sample`` reads.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


class Instances(NamedTuple):
    """The ground truth of one image as binary masks: classes (K,) int64, masks (K, H, W) float."""

    classes: Tensor
    masks: Tensor


MatchIndices = list[tuple[Tensor, Tensor]]


def semantic_to_instances(label: Tensor, num_classes: int, ignore_index: int = 255) -> Instances:
    """One binary mask per class present in ``label``; ``ignore_index`` pixels belong to no mask.

    label: (H, W) integer class ids in [0, num_classes) or ``ignore_index``.
    Returns classes (K,) int64 in increasing order and masks (K, H, W) float32 of 0/1.
    """
    if label.dim() != 2:
        raise ValueError(f"label: expected an (H, W) map, got shape {tuple(label.shape)}")
    if label.dtype.is_floating_point or label.dtype.is_complex or label.dtype == torch.bool:
        raise ValueError(f"label: expected an integer dtype, got {label.dtype}")
    label = label.long()
    valid = (label == ignore_index) | ((label >= 0) & (label < num_classes))
    if not bool(valid.all()):
        bad = int(label[~valid][0])
        raise ValueError(f"label: class id {bad} found; expected 0..{num_classes - 1} or ignore_index {ignore_index}")
    classes = torch.unique(label)
    classes = classes[classes != ignore_index]
    masks = (label[None] == classes[:, None, None]).float()
    return Instances(classes, masks)


def point_sample(input: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``input`` at normalised points (grid_sample, align_corners=False, zero padding).

    input: (B, C, H, W); coords: (B, P, 2) in [0, 1], (x, y) order. Returns (B, C, P).
    A point at ((j + 0.5) / W, (i + 0.5) / H) reads pixel (i, j) exactly.
    """
    if input.dim() != 4:
        raise ValueError(f"input: expected (B, C, H, W), got shape {tuple(input.shape)}")
    if coords.dim() != 3 or coords.shape[-1] != 2 or coords.shape[0] != input.shape[0]:
        raise ValueError(f"coords: expected ({input.shape[0]}, P, 2), got shape {tuple(coords.shape)}")
    grid = 2.0 * coords.to(input.dtype) - 1.0
    return F.grid_sample(input, grid[:, :, None, :], mode="bilinear", align_corners=False).squeeze(-1)


def uniform_points(batch: int, num_points: int, device: torch.device,
                   generator: torch.Generator | None = None) -> Tensor:
    """Uniformly random points in the unit square: (batch, num_points, 2), float32 on ``device``.

    The draw happens on the generator's device (``torch.rand`` requires it), then moves to ``device``.
    """
    draw_device = generator.device if generator is not None else device
    return torch.rand(batch, num_points, 2, generator=generator, device=draw_device).to(device)


@torch.no_grad()
def importance_points(logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """Points concentrated where the mask prediction is least certain (PointRend / Mask2Former training).

    logits: (N, 1, h, w) mask logits. Draws ``oversample_ratio·num_points`` uniform candidates, keeps the
    ``importance_sample_ratio·num_points`` with the highest uncertainty −|logit| (read at the candidate points)
    and fills up with uniform points. Returns (N, num_points, 2), the importance points first.
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_important = int(num_points * importance_sample_ratio)
    candidates = uniform_points(n, num_sampled, logits.device, generator)
    uncertainty = -point_sample(logits.float(), candidates)[:, 0].abs()  # (N, num_sampled)
    top = uncertainty.topk(num_important, dim=1).indices
    important = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
    rest = uniform_points(n, num_points - num_important, logits.device, generator)
    return torch.cat([important, rest], dim=1)


def _autocast_off(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth masks, per image (METHOD §6.3).

    cost = cost_class·(−p_q(gt class)) + cost_mask·BCE + cost_dice·(1 − dice), with BCE and dice evaluated on
    ``num_points`` uniformly random points shared by predictions and ground truth. Costs are computed in fp32
    with autocast off: under bf16 the small cost differences that decide the assignment round away.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544) -> None:
        if num_points <= 0:
            raise ValueError(f"num_points: expected a positive count, got {num_points}")
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("cost_class, cost_mask, cost_dice: at least one must be non-zero")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    def cost_matrix(self, class_logits: Tensor, point_logits: Tensor, gt_classes: Tensor,
                    gt_points: Tensor) -> Tensor:
        """Pairwise matching cost of one image.

        class_logits: (Nq, C+1); point_logits: (Nq, P) mask logits at the sampled points; gt_classes: (K,);
        gt_points: (K, P) ground-truth mask values at the same points. Returns (Nq, K) float32.
        """
        with _autocast_off(class_logits.device):
            prob = class_logits.float().softmax(-1)
            x, t = point_logits.float(), gt_points.float()
            num_points = x.shape[-1]
            cost_class = -prob[:, gt_classes]
            # BCE(x, t) = t·softplus(−x) + (1 − t)·softplus(x) is linear in t: all pairs in two matrix products.
            cost_mask = (F.softplus(-x) @ t.T + F.softplus(x) @ (1.0 - t).T) / num_points
            p = x.sigmoid()
            # Dice with eps = 1 in numerator and denominator (Mask2Former's batch_dice_loss).
            dice = (2.0 * p @ t.T + 1.0) / (p.sum(-1)[:, None] + t.sum(-1)[None, :] + 1.0)
            return self.cost_class * cost_class + self.cost_mask * cost_mask + self.cost_dice * (1.0 - dice)

    @torch.no_grad()
    def __call__(self, class_logits: Tensor, mask_logits: Tensor, targets: Sequence[Instances],
                 generator: torch.Generator | None = None, coords: Tensor | None = None) -> MatchIndices:
        """Match every image of the batch.

        class_logits: (B, Nq, C+1); mask_logits: (B, Nq, h, w); targets: B ``Instances`` with masks (K_b, H, W);
        coords: optional fixed points (B, P, 2) replacing the random draw. Returns B pairs (pred_idx, gt_idx) of
        int64 tensors of equal length min(Nq, K_b), sorted by pred_idx, on the logits' device.
        """
        if class_logits.dim() != 3:
            raise ValueError(f"class_logits: expected (B, Nq, C+1), got shape {tuple(class_logits.shape)}")
        b, nq = class_logits.shape[:2]
        if mask_logits.dim() != 4 or tuple(mask_logits.shape[:2]) != (b, nq):
            raise ValueError(f"mask_logits: expected ({b}, {nq}, h, w), got shape {tuple(mask_logits.shape)}")
        if len(targets) != b:
            raise ValueError(f"targets: expected {b} entries (one per image), got {len(targets)}")
        if coords is not None and (coords.dim() != 3 or coords.shape[0] != b or coords.shape[-1] != 2):
            raise ValueError(f"coords: expected ({b}, P, 2), got shape {tuple(coords.shape)}")
        device = class_logits.device
        indices: MatchIndices = []
        for i, target in enumerate(targets):
            if target.classes.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64, device=device)
                indices.append((empty, empty.clone()))
                continue
            with _autocast_off(device):
                pts = (coords[i:i + 1] if coords is not None
                       else uniform_points(1, self.num_points, device, generator))
                point_logits = point_sample(mask_logits[i:i + 1].float(), pts)[0]
                gt_points = point_sample(target.masks[None].float().to(device), pts)[0]
                cost = self.cost_matrix(class_logits[i], point_logits, target.classes.to(device), gt_points)
            cost = cost.cpu()
            if not bool(torch.isfinite(cost).all()):
                raise ValueError(f"class_logits/mask_logits: non-finite matching cost in image {i} of the batch")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64, device=device),
                            torch.as_tensor(cols, dtype=torch.int64, device=device)))
        return indices


def average_num_masks(count: int | Tensor, device: torch.device) -> Tensor:
    """Normaliser of the mask losses: matched masks summed over DDP ranks and divided by the world size, ≥ 1.

    DDP averages gradients over ranks, so dividing each rank's sum by (global count / world size) makes the
    update equal to the global sum over masks divided by the global count. Returns a float32 scalar.
    """
    num = torch.as_tensor(count, dtype=torch.float32, device=device).reshape(())
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1.0)


class Mask2FormerLoss(nn.Module):
    """L_seg = Σ_outputs (class_weight·L_cls + mask_weight·L_mask + dice_weight·L_dice) (METHOD §6.3).

    The class loss is a weighted CE over C+1 classes (1 for real classes, ``no_object_weight`` for the last),
    normalised by the summed weights of the targets. BCE and dice use ``num_points`` importance-sampled points
    per matched mask (``oversample_ratio``, ``importance_sample_ratio``): BCE is averaged over
    num_masks·num_points, dice summed over masks and divided by num_masks.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, no_object_weight: float = 0.1,
                 class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75,
                 ignore_index: int = 255) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes: expected a positive count, got {num_classes}")
        if num_points <= 0:
            raise ValueError(f"num_points: expected a positive count, got {num_points}")
        if oversample_ratio < 1.0:
            raise ValueError(f"oversample_ratio: expected >= 1, got {oversample_ratio}")
        if not 0.0 <= importance_sample_ratio <= 1.0:
            raise ValueError(f"importance_sample_ratio: expected a value in [0, 1], got {importance_sample_ratio}")
        if no_object_weight < 0:
            raise ValueError(f"no_object_weight: expected >= 0, got {no_object_weight}")
        self.num_classes, self.matcher, self.ignore_index = num_classes, matcher, ignore_index
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        # Not persistent: a constant of the loss, never part of a model checkpoint.
        self.register_buffer("class_weights", weight, persistent=False)

    def classification_loss(self, class_logits: Tensor, targets: Sequence[Instances],
                            indices: MatchIndices) -> Tensor:
        """Weighted CE with unmatched queries labelled no-object (index C).

        class_logits: (B, Nq, C+1); targets: B ``Instances``; indices: the matcher's B (pred_idx, gt_idx) pairs.
        Returns a scalar: Σ_q w_{t_q}·CE_q / Σ_q w_{t_q} over all B·Nq queries.
        """
        b, nq, c1 = class_logits.shape
        target = torch.full((b, nq), self.num_classes, dtype=torch.int64, device=class_logits.device)
        for i, (pred_idx, gt_idx) in enumerate(indices):
            target[i, pred_idx] = targets[i].classes.to(class_logits.device)[gt_idx]
        weight = self.class_weights.to(class_logits.device)
        # reduction="mean" with a class weight divides by Σ w_target, exactly the normalisation wanted.
        return F.cross_entropy(class_logits.float().transpose(1, 2), target, weight=weight)

    def mask_losses(self, mask_logits: Tensor, targets: Sequence[Instances], indices: MatchIndices,
                    num_masks: float | Tensor, coords: Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Point-sampled BCE and dice of the matched (query, mask) pairs.

        mask_logits: (B, Nq, h, w); targets: B ``Instances`` with masks (K_b, H, W) at full label resolution;
        indices: the matcher's pairs; num_masks: the normaliser (see ``average_num_masks``); coords: optional
        fixed points (M, P, 2), one row per matched pair in batch order, replacing importance sampling.
        Returns (loss_mask, loss_dice) scalars; both are 0 (still connected to ``mask_logits``) without matches.
        """
        batch_idx = torch.cat([torch.full_like(p, i) for i, (p, _) in enumerate(indices)])
        pred_idx = torch.cat([p for p, _ in indices])
        if pred_idx.numel() == 0:
            zero = mask_logits.sum() * 0.0
            return zero, zero.clone()
        src = mask_logits[batch_idx, pred_idx].float()[:, None]  # (M, 1, h, w)
        gt = torch.cat([t.masks[g.to(t.masks.device)] for t, (_, g) in zip(targets, indices)]).to(src.device)
        if coords is None:
            coords = importance_points(src.detach(), self.num_points, self.oversample_ratio,
                                       self.importance_sample_ratio, generator)
        elif coords.dim() != 3 or coords.shape[0] != src.shape[0] or coords.shape[-1] != 2:
            raise ValueError(f"coords: expected ({src.shape[0]}, P, 2), got shape {tuple(coords.shape)}")
        with torch.no_grad():
            labels = point_sample(gt[:, None].float(), coords)[:, 0]  # (M, P)
        logits = point_sample(src, coords)[:, 0]  # (M, P)
        loss_mask = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
        p = logits.sigmoid()
        dice = (2.0 * (p * labels).sum(-1) + 1.0) / (p.sum(-1) + labels.sum(-1) + 1.0)
        loss_dice = (1.0 - dice).sum() / num_masks
        return loss_mask, loss_dice

    def forward(self, class_logits: Sequence[Tensor], mask_logits: Sequence[Tensor], labels: Tensor,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Losses of every decoder output and their weighted sum.

        class_logits: L tensors (B, Nq, C+1); mask_logits: L tensors (B, Nq, h, w); labels: (B, H, W) integer
        class ids with ``ignore_index``. ``generator`` makes the matching and importance points deterministic.
        Returns scalars "loss_cls_i", "loss_mask_i", "loss_dice_i" for i < L and "loss_seg", the weighted sum.
        """
        if len(class_logits) == 0 or len(class_logits) != len(mask_logits):
            raise ValueError(f"class_logits, mask_logits: expected the same non-zero number of outputs, got "
                             f"{len(class_logits)} and {len(mask_logits)}")
        if labels.dim() != 3:
            raise ValueError(f"labels: expected (B, H, W), got shape {tuple(labels.shape)}")
        b = labels.shape[0]
        for i, (cls, msk) in enumerate(zip(class_logits, mask_logits)):
            if cls.dim() != 3 or cls.shape[0] != b or cls.shape[-1] != self.num_classes + 1:
                raise ValueError(f"class_logits[{i}]: expected ({b}, Nq, {self.num_classes + 1}), "
                                 f"got shape {tuple(cls.shape)}")
            if msk.dim() != 4 or tuple(msk.shape[:2]) != tuple(cls.shape[:2]):
                raise ValueError(f"mask_logits[{i}]: expected ({b}, {cls.shape[1]}, h, w), "
                                 f"got shape {tuple(msk.shape)}")
        targets = [semantic_to_instances(label, self.num_classes, self.ignore_index) for label in labels]
        num_queries = class_logits[0].shape[1]
        num_masks = average_num_masks(sum(min(num_queries, t.classes.numel()) for t in targets),
                                      class_logits[0].device)
        losses: dict[str, Tensor] = {}
        total = class_logits[0].new_zeros((), dtype=torch.float32)
        for i, (cls, msk) in enumerate(zip(class_logits, mask_logits)):
            indices = self.matcher(cls.detach(), msk.detach(), targets, generator=generator)
            loss_cls = self.classification_loss(cls, targets, indices)
            loss_mask, loss_dice = self.mask_losses(msk, targets, indices, num_masks, generator=generator)
            losses[f"loss_cls_{i}"], losses[f"loss_mask_{i}"], losses[f"loss_dice_{i}"] = loss_cls, loss_mask, loss_dice
            total = total + self.class_weight * loss_cls + self.mask_weight * loss_mask + self.dice_weight * loss_dice
        losses["loss_seg"] = total
        return losses


__all__ = ["Instances", "HungarianMatcher", "Mask2FormerLoss", "average_num_masks", "importance_points",
           "point_sample", "semantic_to_instances", "uniform_points"]

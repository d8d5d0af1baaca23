"""The step-normalised segmentation loss: equal to Mask2FormerLoss for one image, and independent of how a
step's images are split into micro-batches."""
from __future__ import annotations

import pytest
import torch

from qd_core.losses import HungarianMatcher, Mask2FormerLoss
from train.objective import image_counts, image_generator, segmentation_loss, step_norm

NQ, C, H, W, P = 6, 5, 16, 16, 64


def _criterion() -> Mask2FormerLoss:
    return Mask2FormerLoss(C, HungarianMatcher(num_points=P), num_points=P)


def _outputs(batch: int, layers: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(batch, NQ, C + 1, generator=g, dtype=torch.float64).float() for _ in range(layers)]
    msk = [torch.randn(batch, NQ, H // 2, W // 2, generator=g) for _ in range(layers)]
    return cls, msk


def _labels(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (batch, H, W), generator=g)
    labels[:, :2] = 255
    labels[0, :, : W // 2] = 0  # images with different class counts, so the normalisers differ per image
    return labels


def test_image_counts_match_the_matched_masks_and_class_weights() -> None:
    labels = torch.full((2, 4, 4), 255)
    labels[0, 0, 0], labels[0, 1, 1] = 1, 3  # two classes
    counts = image_counts(labels, C, NQ, 0.1)
    assert counts.tolist() == pytest.approx([2.0, 2 + (NQ - 2) * 0.1 + NQ * 0.1])


def test_image_counts_match_at_most_one_mask_per_query() -> None:
    labels = torch.arange(16).reshape(1, 4, 4) % 5  # 5 classes in the image
    assert image_counts(labels, C, 2, 0.1).tolist() == pytest.approx([2.0, 2.0])  # 2 queries, both matched


def test_one_image_equals_mask2former_loss_with_the_same_generator() -> None:
    criterion = _criterion()
    cls, msk = _outputs(1)
    labels = _labels(1)
    norm = step_norm(image_counts(labels, C, NQ, 0.1), world_size=1)
    ours = segmentation_loss(criterion, cls, msk, labels, [image_generator(0, 7)], norm)
    reference = criterion(cls, msk, labels, generator=image_generator(0, 7))
    for key, value in reference.items():
        # Same operations on the same float32 values; only the CE's mean/rescale order differs (a few ulp).
        torch.testing.assert_close(ours[key], value, rtol=1e-6, atol=1e-6)


def test_micro_batches_sum_to_the_whole_batch() -> None:
    criterion = _criterion()
    cls, msk = _outputs(4)
    labels = _labels(4)
    positions = [10, 11, 12, 13]
    norm = step_norm(image_counts(labels, C, NQ, 0.1), world_size=1)
    whole = segmentation_loss(criterion, cls, msk, labels, [image_generator(3, p) for p in positions], norm)
    parts = [segmentation_loss(criterion, [c[s] for c in cls], [m[s] for m in msk], labels[s],
                               [image_generator(3, p) for p in positions[s]], norm)
             for s in (slice(0, 1), slice(1, 4))]
    for key in whole:
        # float32 sums of the same per-image terms in another grouping.
        torch.testing.assert_close(parts[0][key] + parts[1][key], whole[key], rtol=1e-5, atol=1e-6)


def test_two_ranks_average_to_the_one_process_loss() -> None:
    criterion = _criterion()
    cls, msk = _outputs(4)
    labels = _labels(4)
    gens = lambda idx: [image_generator(5, p) for p in idx]  # noqa: E731
    totals = image_counts(labels, C, NQ, 0.1)
    single = segmentation_loss(criterion, cls, msk, labels, gens([0, 1, 2, 3]), step_norm(totals, 1))
    per_rank = step_norm(totals, world_size=2)
    rank0 = segmentation_loss(criterion, [c[0::2] for c in cls], [m[0::2] for m in msk], labels[0::2],
                              gens([0, 2]), per_rank)
    rank1 = segmentation_loss(criterion, [c[1::2] for c in cls], [m[1::2] for m in msk], labels[1::2],
                              gens([1, 3]), per_rank)
    # DDP averages the ranks' gradients, i.e. the gradient of the mean of their losses.
    torch.testing.assert_close((rank0["loss_seg"] + rank1["loss_seg"]) / 2, single["loss_seg"], rtol=1e-5, atol=1e-6)


def test_the_image_order_does_not_matter() -> None:
    criterion = _criterion()
    cls, msk = _outputs(3)
    labels = _labels(3)
    norm = step_norm(image_counts(labels, C, NQ, 0.1), 1)
    order = [2, 0, 1]
    a = segmentation_loss(criterion, cls, msk, labels, [image_generator(0, p) for p in range(3)], norm)
    b = segmentation_loss(criterion, [c[order] for c in cls], [m[order] for m in msk], labels[order],
                          [image_generator(0, p) for p in order], norm)
    torch.testing.assert_close(a["loss_seg"], b["loss_seg"], rtol=1e-5, atol=1e-6)


def test_image_generators_differ_by_position_and_seed() -> None:
    draw = lambda g: torch.rand(4, generator=g)  # noqa: E731
    assert torch.equal(draw(image_generator(0, 3)), draw(image_generator(0, 3)))
    assert not torch.equal(draw(image_generator(0, 3)), draw(image_generator(0, 4)))
    assert not torch.equal(draw(image_generator(0, 3)), draw(image_generator(1, 3)))


def test_one_generator_per_image_is_required() -> None:
    cls, msk = _outputs(2)
    labels = _labels(2)
    with pytest.raises(ValueError, match="generators"):
        segmentation_loss(_criterion(), cls, msk, labels, [image_generator(0, 0)],
                          step_norm(image_counts(labels, C, NQ, 0.1), 1))

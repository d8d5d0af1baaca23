"""Mask2Former loss (METHOD §6.3): instances from labels, point sampling, Hungarian matching, CE/BCE/dice, L_seg."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.multiprocessing as mp

import qd_core.losses as losses_module
from qd_core.losses import (HungarianMatcher, Instances, Mask2FormerLoss, average_num_masks, importance_points,
                            point_sample, semantic_to_instances)

C = 5  # classes; the no-object class is index C


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """All pixel centres of an h×w map as normalised (x, y) points, row-major: (h·w, 2)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=-1)


def random_label(h: int, w: int, classes: list[int], seed: int, ignore_frac: float = 0.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    label = torch.tensor(classes)[torch.randint(len(classes), (h, w), generator=g)]
    label[torch.rand(h, w, generator=g) < ignore_frac] = 255
    return label


# --------------------------------------------------------------------------------------------------------------
# semantic_to_instances
# --------------------------------------------------------------------------------------------------------------


def test_semantic_to_instances_one_mask_per_present_class_without_ignore() -> None:
    label = torch.tensor([[3, 3, 255], [0, 3, 0]])
    classes, masks = semantic_to_instances(label, num_classes=C)
    assert classes.tolist() == [0, 3]
    assert classes.dtype == torch.int64 and masks.dtype == torch.float32
    assert masks.tolist() == [[[0, 0, 0], [1, 0, 1]], [[1, 1, 0], [0, 1, 0]]]


def test_semantic_to_instances_all_ignored_gives_no_masks() -> None:
    classes, masks = semantic_to_instances(torch.full((4, 6), 255), num_classes=C)
    assert classes.shape == (0,) and masks.shape == (0, 4, 6)


def test_semantic_to_instances_rejects_unknown_class_id() -> None:
    with pytest.raises(ValueError, match="class id 7"):
        semantic_to_instances(torch.tensor([[0, 7]]), num_classes=C)


# --------------------------------------------------------------------------------------------------------------
# point_sample
# --------------------------------------------------------------------------------------------------------------


def test_point_sample_reads_pixels_exactly_at_their_centres() -> None:
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    coords = pixel_centres(4, 5)[None].expand(2, -1, -1)
    # float64: the only error is rounding of the coordinate transform, ~1e-16 relative.
    torch.testing.assert_close(point_sample(x, coords), x.flatten(2), rtol=0, atol=1e-12)


def test_point_sample_interpolates_linearly_between_centres() -> None:
    x = torch.tensor([[[[1.0, 3.0], [5.0, 11.0]]]], dtype=torch.float64)
    # Midway between the four centres (0.25/0.75 on each axis): the mean of the four pixels.
    out = point_sample(x, torch.tensor([[[0.5, 0.5], [0.5, 0.25]]], dtype=torch.float64))
    assert out.flatten().tolist() == [5.0, 2.0]


# --------------------------------------------------------------------------------------------------------------
# Hungarian matching
# --------------------------------------------------------------------------------------------------------------


def pair_cost(cls_logits: torch.Tensor, point_logits: torch.Tensor, gt_class: int, gt_points: torch.Tensor,
              weights: tuple[float, float, float] = (2.0, 5.0, 5.0)) -> float:
    """The matching cost of one (query, mask) pair, from the definitions, in float64."""
    prob = torch.softmax(cls_logits.double(), -1)[gt_class]
    x, t = point_logits.double(), gt_points.double()
    p = torch.sigmoid(x)
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return float(weights[0] * -prob + weights[1] * bce + weights[2] * dice)


def brute_force(cost: list[list[float]]) -> tuple[float, list[tuple[int, int]]]:
    """Minimum-cost one-to-one assignment by enumerating every injective map of the smaller side."""
    nq, k = len(cost), len(cost[0])
    best = (math.inf, [])
    if nq >= k:
        for queries in itertools.permutations(range(nq), k):
            total = sum(cost[q][j] for j, q in enumerate(queries))
            best = min(best, (total, sorted((q, j) for j, q in enumerate(queries))))
    else:
        for gts in itertools.permutations(range(k), nq):
            total = sum(cost[q][j] for q, j in enumerate(gts))
            best = min(best, (total, sorted(enumerate(gts))))
    return best


@pytest.mark.parametrize("num_queries,seed", [(4, 0), (4, 1), (5, 2), (2, 3)])
def test_matching_equals_brute_force_assignment(num_queries: int, seed: int) -> None:
    h, w = 6, 8
    labels = [random_label(h, w, [0, 2, 4], seed), random_label(h, w, [1, 3, 4], seed + 100)]
    targets = [semantic_to_instances(lbl, C) for lbl in labels]
    g = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(2, num_queries, C + 1, generator=g) * 2
    mask_logits = torch.randn(2, num_queries, h, w, generator=g) * 3
    coords = pixel_centres(h, w).float()[None].expand(2, -1, -1)  # every pixel once: no interpolation
    indices = HungarianMatcher(num_points=h * w)(class_logits, mask_logits, targets, coords=coords)
    for b, (target, (pred_idx, gt_idx)) in enumerate(zip(targets, indices)):
        cost = [[pair_cost(class_logits[b, q], mask_logits[b, q].flatten(), int(target.classes[j]),
                           target.masks[j].flatten()) for j in range(len(target.classes))]
                for q in range(num_queries)]
        best_total, best_pairs = brute_force(cost)
        assert pred_idx.dtype == torch.int64 and gt_idx.dtype == torch.int64
        pairs = list(zip(pred_idx.tolist(), gt_idx.tolist()))
        assert pairs == best_pairs
        assert sum(cost[q][j] for q, j in pairs) == pytest.approx(best_total, abs=1e-9)


def test_cost_matrix_matches_pairwise_definition() -> None:
    g = torch.Generator().manual_seed(0)
    cls, pts = torch.randn(4, C + 1, generator=g), torch.randn(4, 16, generator=g) * 4
    gt_classes, gt_pts = torch.tensor([1, 4, 0]), torch.rand(3, 16, generator=g)  # soft targets: bilinear GT
    cost = HungarianMatcher(cost_class=1.5, cost_mask=3.0, cost_dice=0.5).cost_matrix(cls, pts, gt_classes, gt_pts)
    expected = torch.tensor([[pair_cost(cls[q], pts[q], int(gt_classes[j]), gt_pts[j], (1.5, 3.0, 0.5))
                              for j in range(3)] for q in range(4)])
    # fp32 costs of O(10) magnitude: a few ulps of 1e-6 relative.
    torch.testing.assert_close(cost, expected.float(), rtol=1e-5, atol=1e-5)


def test_cost_matrix_is_fp32_under_bf16_autocast() -> None:
    cls, pts = torch.randn(3, C + 1).bfloat16(), torch.randn(3, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = HungarianMatcher().cost_matrix(cls, pts, torch.tensor([0, 1]), torch.rand(2, 8))
    assert cost.dtype == torch.float32


def test_matcher_is_deterministic_given_a_generator() -> None:
    targets = [semantic_to_instances(random_label(8, 8, [0, 1, 2, 3], 5), C)]
    cls, masks = torch.randn(1, 6, C + 1), torch.randn(1, 6, 4, 4)
    matcher = HungarianMatcher(num_points=32)
    first = matcher(cls, masks, targets, generator=torch.Generator().manual_seed(3))
    second = matcher(cls, masks, targets, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for pa, pb in zip(first, second) for a, b in zip(pa, pb))


def test_matcher_leaves_an_image_without_masks_unmatched() -> None:
    targets = [semantic_to_instances(torch.full((4, 4), 255), C), semantic_to_instances(torch.zeros(4, 4).long(), C)]
    indices = HungarianMatcher(num_points=16)(torch.randn(2, 3, C + 1), torch.randn(2, 3, 4, 4), targets)
    assert indices[0][0].numel() == 0 and indices[0][1].numel() == 0
    assert indices[1][0].numel() == 1 and indices[1][1].tolist() == [0]


def test_matcher_rejects_non_finite_logits() -> None:
    cls = torch.randn(1, 3, C + 1)
    cls[0, 1, 0] = float("nan")
    targets = [semantic_to_instances(torch.zeros(4, 4).long(), C)]
    with pytest.raises(ValueError, match="non-finite"):
        HungarianMatcher(num_points=8)(cls, torch.randn(1, 3, 4, 4), targets)


# --------------------------------------------------------------------------------------------------------------
# Loss terms on fixed points
# --------------------------------------------------------------------------------------------------------------


def make_loss(**kwargs: float) -> Mask2FormerLoss:
    return Mask2FormerLoss(C, HungarianMatcher(num_points=64), num_points=64, **kwargs)


def test_classification_loss_is_weighted_ce_with_no_object_weight() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, C + 1, generator=g, dtype=torch.float64)
    targets = [Instances(torch.tensor([1, 3]), torch.zeros(2, 2, 2)),
               Instances(torch.tensor([2]), torch.zeros(1, 2, 2))]
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([3]), torch.tensor([0]))]
    # Query → class by hand: image 0: q0 ← gt1 (3), q2 ← gt0 (1); image 1: q3 ← gt0 (2); the rest no-object (C).
    wanted = [[3, C, 1, C], [C, C, C, 2]]
    num, den = 0.0, 0.0
    for b in range(2):
        for q in range(4):
            t = wanted[b][q]
            w = 0.1 if t == C else 1.0
            num += w * -float(torch.log_softmax(logits[b, q], -1)[t])
            den += w
    loss = make_loss().classification_loss(logits, targets, indices)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(num / den, rel=1e-6)  # fp32 CE over 8 terms


def hand_mask_losses(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> tuple[float, float]:
    """BCE averaged over masks·points and dice summed over masks, both divided by num_masks (float64)."""
    x, t = logits.double(), targets.double()
    p = 1 / (1 + torch.exp(-x))
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    return float(bce.mean(-1).sum() / num_masks), float(dice.sum() / num_masks)


def test_mask_losses_equal_bce_and_dice_at_fixed_points() -> None:
    h, w = 4, 6
    g = torch.Generator().manual_seed(1)
    mask_logits = torch.randn(2, 3, h, w, generator=g) * 3
    targets = [semantic_to_instances(random_label(h, w, [0, 2], 7), C),
               semantic_to_instances(random_label(h, w, [1, 3, 4], 8), C)]
    indices = [(torch.tensor([2]), torch.tensor([1])), (torch.tensor([0, 1]), torch.tensor([2, 0]))]
    coords = pixel_centres(h, w).float()[None].expand(3, -1, -1)  # all pixels: exact values, no interpolation
    loss_mask, loss_dice = make_loss().mask_losses(mask_logits, targets, indices, num_masks=2.5, coords=coords)
    src = torch.stack([mask_logits[0, 2], mask_logits[1, 0], mask_logits[1, 1]]).flatten(1)
    gt = torch.stack([targets[0].masks[1], targets[1].masks[2], targets[1].masks[0]]).flatten(1)
    bce, dice = hand_mask_losses(src, gt, 2.5)
    assert float(loss_mask) == pytest.approx(bce, rel=1e-5)  # fp32 BCE/sigmoid over 72 points
    assert float(loss_dice) == pytest.approx(dice, rel=1e-5)


def test_ground_truth_is_sampled_at_full_resolution_from_coarser_logits() -> None:
    # Logits at 2×2, labels at 4×4: points at the centres of the 4 interior label pixels read the GT exactly and
    # the logits bilinearly inside their pixel-centre hull, where interpolate() is the same bilinear formula.
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    label = torch.tensor([[0, 0, 0, 0], [0, 0, 255, 0], [0, 3, 0, 0], [0, 0, 0, 0]])
    targets = [semantic_to_instances(label, C)]
    interior = [5, 6, 9, 10]
    coords = pixel_centres(4, 4).float()[interior][None]
    loss_mask, loss_dice = make_loss().mask_losses(logits, targets, [(torch.tensor([0]), torch.tensor([0]))],
                                                   num_masks=1.0, coords=coords)
    bilinear = torch.nn.functional.interpolate(logits.double(), size=(4, 4), mode="bilinear", align_corners=False)
    gt = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # class-0 mask at the interior pixels; ignore counts as 0
    bce, dice = hand_mask_losses(bilinear.flatten(1)[:, interior], gt, 1.0)
    assert float(loss_mask) == pytest.approx(bce, rel=1e-5)
    assert float(loss_dice) == pytest.approx(dice, rel=1e-5)


def test_importance_points_keep_the_most_uncertain_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.tensor([[[[-4.0, 0.2], [1.0, 6.0]]]])  # |logit| at the four pixel centres
    centres = pixel_centres(2, 2).float()
    candidates = centres[[3, 0, 1, 2, 1, 3]][None]  # 6 = oversample 3 × 2 points
    filler = torch.tensor([[[0.1, 0.9]]])
    draws = iter([candidates, filler])
    monkeypatch.setattr(losses_module, "uniform_points", lambda *args, **kwargs: next(draws))
    pts = importance_points(logits, num_points=2, oversample_ratio=3.0, importance_sample_ratio=0.5)
    # Highest −|logit| among candidates is pixel 1 (|0.2|); then the uniform filler point.
    assert torch.equal(pts, torch.cat([centres[[1]][None], filler], dim=1))


def test_importance_sampling_draws_oversample_times_the_points_then_fills_up(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    real = losses_module.uniform_points
    monkeypatch.setattr(losses_module, "uniform_points",
                        lambda n, num_points, *a, **k: asked.append(num_points) or real(n, num_points, *a, **k))
    pts = importance_points(torch.randn(3, 1, 4, 4), num_points=8, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert asked == [24, 2] and pts.shape == (3, 8, 2)  # 24 candidates, the 6 most uncertain kept, 2 uniform


def test_mask_losses_take_their_points_where_the_matched_logits_are_least_certain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without fixed coords the loss points come from importance_points on the matched logits themselves (not
    their sigmoid), with the loss's own ratios: checked through a spy, and by the loss value on masks that are
    uncertain (logit 0) in one strip only."""
    calls: list[tuple] = []
    real = losses_module.importance_points

    def spy(logits, num_points, oversample_ratio, importance_sample_ratio, generator=None):
        calls.append((logits.clone(), num_points, oversample_ratio, importance_sample_ratio))
        return real(logits, num_points, oversample_ratio, importance_sample_ratio, generator)

    monkeypatch.setattr(losses_module, "importance_points", spy)
    h = w = 16
    mask_logits = torch.full((1, 2, h, w), 20.0)
    mask_logits[0, 1, :, 7:9] = 0.0  # the only uncertain place: a 2-pixel-wide strip
    label = torch.zeros(h, w, dtype=torch.int64)
    targets = [semantic_to_instances(label, C)]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    loss = Mask2FormerLoss(C, HungarianMatcher(num_points=64), num_points=64, oversample_ratio=50.0,
                           importance_sample_ratio=1.0)
    loss_mask, _ = loss.mask_losses(mask_logits, targets, indices, num_masks=1.0,
                                    generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    logits, num_points, oversample, importance = calls[0]
    assert torch.equal(logits, mask_logits[0, 1][None, None]) and (num_points, oversample, importance) == (64, 50, 1)
    # Every point inside the strip reads a logit near 0 against a ground truth of 1: BCE ≈ log 2 each. Uniform
    # points would read 20 (BCE ≈ 0) almost everywhere.
    assert float(loss_mask) == pytest.approx(math.log(2), rel=0.05)


def test_more_classes_than_queries_normalise_by_the_matched_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """With K classes in an image and Nq < K queries only Nq masks are matched: num_masks counts min(Nq, K)."""
    counts: list[float] = []
    real = losses_module.average_num_masks
    monkeypatch.setattr(losses_module, "average_num_masks",
                        lambda count, device: counts.append(float(count)) or real(count, device))
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [0, 1, 2, 3], [4, 4, 4, 4]])  # 5 classes
    cls, masks = [torch.randn(1, 2, C + 1)], [torch.randn(1, 2, 4, 4)]  # 2 queries
    make_loss()(cls, masks, label[None], generator=torch.Generator().manual_seed(0))
    assert counts == [2.0]


# --------------------------------------------------------------------------------------------------------------
# The full loss
# --------------------------------------------------------------------------------------------------------------


def fixed_grid_points(batch: int, num_points: int, device: torch.device, generator: object = None) -> torch.Tensor:
    """A deterministic stand-in for the uniform sampler: a fixed low-discrepancy sequence of points."""
    i = torch.arange(num_points, dtype=torch.float32)
    pts = torch.stack([(i * 0.6180339887 + 0.1) % 1.0, (i * 0.7548776662 + 0.3) % 1.0], dim=-1)
    return pts[None].expand(batch, -1, -1).to(device)


def outputs(num_outputs: int, seed: int, b: int = 2, nq: int = 4, hw: int = 4) -> tuple[list, list]:
    g = torch.Generator().manual_seed(seed)
    cls = [torch.randn(b, nq, C + 1, generator=g).requires_grad_() for _ in range(num_outputs)]
    masks = [torch.randn(b, nq, hw, hw, generator=g).requires_grad_() for _ in range(num_outputs)]
    return cls, masks


LABELS = torch.stack([random_label(8, 8, [0, 2, 3], 11), random_label(8, 8, [1, 4], 12)])


def test_forward_returns_three_terms_per_output_and_their_weighted_sum() -> None:
    cls, masks = outputs(3, seed=0)
    out = make_loss()(cls, masks, LABELS, generator=torch.Generator().manual_seed(0))
    assert set(out) == {f"loss_{k}_{i}" for k in ("cls", "mask", "dice") for i in range(3)} | {"loss_seg"}
    expected = sum(2.0 * out[f"loss_cls_{i}"] + 5.0 * out[f"loss_mask_{i}"] + 5.0 * out[f"loss_dice_{i}"]
                   for i in range(3))
    torch.testing.assert_close(out["loss_seg"], expected)


def test_deep_supervision_terms_equal_each_output_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(losses_module, "uniform_points", fixed_grid_points)
    cls, masks = outputs(2, seed=1)
    loss = make_loss()
    both = loss(cls, masks, LABELS)
    for i in range(2):
        alone = loss([cls[i]], [masks[i]], LABELS)
        for k in ("cls", "mask", "dice"):
            torch.testing.assert_close(both[f"loss_{k}_{i}"], alone[f"loss_{k}_0"], rtol=0, atol=0)
    torch.testing.assert_close(both["loss_seg"], loss([cls[0]], [masks[0]], LABELS)["loss_seg"]
                               + loss([cls[1]], [masks[1]], LABELS)["loss_seg"])


def test_forward_terms_equal_hand_computation_on_the_matched_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    # With importance_sample_ratio 0 every loss point is a uniform draw: the fixed grid.
    monkeypatch.setattr(losses_module, "uniform_points", fixed_grid_points)
    cls, masks = outputs(1, seed=2)
    loss = make_loss(importance_sample_ratio=0.0)
    out = loss(cls, masks, LABELS)
    targets = [semantic_to_instances(lbl, C) for lbl in LABELS]
    indices = HungarianMatcher(num_points=64)(cls[0], masks[0], targets, coords=fixed_grid_points(2, 64, "cpu"))
    num_masks = sum(len(t.classes) for t in targets)  # 3 + 2, fewer than the 4 queries per image
    pts = fixed_grid_points(1, 64, "cpu")
    src = torch.cat([point_sample(masks[0][b, p][:, None], pts.expand(len(p), -1, -1))[:, 0]
                     for b, (p, _) in enumerate(indices)])
    gt = torch.cat([point_sample(t.masks[j][:, None], pts.expand(len(j), -1, -1))[:, 0]
                    for t, (_, j) in zip(targets, indices)])
    bce, dice = hand_mask_losses(src.detach(), gt, num_masks)
    assert float(out["loss_mask_0"].detach()) == pytest.approx(bce, rel=1e-5)
    assert float(out["loss_dice_0"].detach()) == pytest.approx(dice, rel=1e-5)


def test_image_without_labels_has_zero_mask_losses_but_stays_in_the_graph() -> None:
    cls, masks = outputs(2, seed=3)
    labels = torch.full((2, 8, 8), 255)
    out = make_loss()(cls, masks, labels, generator=torch.Generator().manual_seed(0))
    assert float(out["loss_mask_0"].detach()) == 0.0 and float(out["loss_dice_1"].detach()) == 0.0
    # Every query is no-object, so L_cls is the plain CE toward class C (weights cancel in the mean).
    expected_cls = torch.nn.functional.cross_entropy(cls[0].detach().reshape(-1, C + 1), torch.full((8,), C))
    assert float(out["loss_cls_0"].detach()) == pytest.approx(float(expected_cls), rel=1e-6)
    out["loss_seg"].backward()
    assert masks[0].grad is not None and torch.count_nonzero(masks[0].grad) == 0
    assert cls[1].grad is not None and torch.count_nonzero(cls[1].grad) > 0


def test_gradients_reach_class_and_mask_logits_of_every_output() -> None:
    cls, masks = outputs(2, seed=4)
    make_loss()(cls, masks, LABELS, generator=torch.Generator().manual_seed(0))["loss_seg"].backward()
    for t in cls + masks:
        assert t.grad is not None and torch.isfinite(t.grad).all() and torch.count_nonzero(t.grad) > 0


def test_forward_rejects_class_logits_with_wrong_class_count() -> None:
    cls, masks = outputs(1, seed=5)
    with pytest.raises(ValueError, match=r"class_logits\[0\]"):
        Mask2FormerLoss(C + 1, HungarianMatcher(num_points=8), num_points=8)(cls, masks, LABELS)


def test_forward_rejects_unequal_output_lists() -> None:
    cls, masks = outputs(2, seed=6)
    with pytest.raises(ValueError, match="same non-zero number of outputs"):
        make_loss()(cls, masks[:1], LABELS)


# --------------------------------------------------------------------------------------------------------------
# num_masks across DDP ranks
# --------------------------------------------------------------------------------------------------------------


def _num_masks_worker(rank: int, world: int, store: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        value = average_num_masks([2, 4][rank], torch.device("cpu"))
        torch.save(value, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_num_masks_is_the_mean_over_ranks_of_the_matched_count(tmp_path) -> None:
    mp.spawn(_num_masks_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    assert [float(torch.load(tmp_path / f"out.{r}", weights_only=True)) for r in range(2)] == [3.0, 3.0]


def test_num_masks_is_at_least_one_without_ddp() -> None:
    assert float(average_num_masks(0, torch.device("cpu"))) == 1.0
    assert float(average_num_masks(7, torch.device("cpu"))) == 7.0

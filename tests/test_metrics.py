"""Confusion-matrix mIoU (METHOD §8.3), checked by hand and against the official Cityscapes evaluator."""
from __future__ import annotations

import importlib
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from qd_core.classes import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
from qd_core.metrics import ConfusionMatrix


def test_small_case_by_hand() -> None:
    label = torch.tensor([[0, 0, 1], [2, 255, 1]])
    pred = torch.tensor([[0, 1, 1], [2, 0, 0]])
    cm = ConfusionMatrix(num_classes=4)
    cm.update(pred, label)
    # Counted pixels (gt → pred): 0→0, 0→1, 1→1, 2→2, 1→0; the ignored pixel is dropped.
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    iou = cm.iou()
    # class 0: inter 1, union 2 + 2 − 1; class 1: the same; class 2: 1/1; class 3 absent from both: NaN.
    assert iou[:3].tolist() == [1 / 3, 1 / 3, 1.0] and math.isnan(iou[3])
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 3 + 1) / 3, abs=1e-12)


def test_rows_are_the_ground_truth_and_columns_the_prediction() -> None:
    # IoU is the same for a matrix and its transpose: pin the orientation with an asymmetric case.
    cm = ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 0]]))
    assert cm.matrix.tolist() == [[1, 1], [0, 0]]


def test_class_only_predicted_scores_zero_not_nan() -> None:
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([[2, 0]]), torch.tensor([[0, 0]]))
    assert cm.iou()[2] == 0.0 and cm.iou()[0] == 0.5 and math.isnan(cm.iou()[1])


def test_batch_update_equals_per_image_updates() -> None:
    g = torch.Generator().manual_seed(0)
    pred, label = torch.randint(5, (3, 6, 7), generator=g), torch.randint(6, (3, 6, 7), generator=g)
    label[label == 5] = 255
    batched, single = ConfusionMatrix(5), ConfusionMatrix(5)
    batched.update(pred, label)
    for p, lbl in zip(pred, label):
        single.update(p, lbl)
    assert torch.equal(batched.matrix, single.matrix) and batched.matrix.dtype == torch.int64


def test_iou_sums_over_images_instead_of_averaging_them() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 0]]))  # image IoU(0) = 1
    cm.update(torch.tensor([[1, 1]]), torch.tensor([[0, 0]]))  # image IoU(0) = 0
    assert cm.iou()[0] == pytest.approx(4 / 6, abs=1e-12)  # not (1 + 0) / 2


def test_prediction_outside_class_range_raises() -> None:
    with pytest.raises(ValueError, match="pred: class id 19"):
        ConfusionMatrix(19).update(torch.tensor([[0, 19]]), torch.tensor([[0, 0]]))


def test_unknown_label_id_raises() -> None:
    with pytest.raises(ValueError, match="label: class id 20"):
        ConfusionMatrix(19).update(torch.tensor([[0, 1]]), torch.tensor([[0, 20]]))


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(ValueError, match="pred, label"):
        ConfusionMatrix(19).update(torch.zeros(2, 3).long(), torch.zeros(3, 2).long())


def test_merge_equals_accumulating_both_streams() -> None:
    g = torch.Generator().manual_seed(1)
    a, b, both = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    for cm in (a, b):
        pred, label = torch.randint(4, (5, 5), generator=g), torch.randint(4, (5, 5), generator=g)
        cm.update(pred, label)
        both.update(pred, label)
    assert torch.equal(a.merge(b).matrix, both.matrix)


def test_merge_rejects_a_different_class_count() -> None:
    with pytest.raises(ValueError, match="other"):
        ConfusionMatrix(4).merge(ConfusionMatrix(5))


def test_miou_of_empty_matrix_is_nan() -> None:
    assert math.isnan(ConfusionMatrix(19).miou())


def test_per_class_table_lists_every_class_and_the_mean() -> None:
    cm = ConfusionMatrix(19)
    cm.update(torch.tensor([[0, 0, 13, 10]]), torch.tensor([[0, 1, 13, 255]]))
    table = cm.per_class_table()
    lines = table.splitlines()
    assert len(lines) == 1 + 19 + 1
    assert lines[1].split() == ["road", "50.00"]
    assert lines[2].split() == ["sidewalk", "0.00"]
    assert lines[1 + 3].split() == ["wall", "n/a"]
    assert lines[-1].split() == ["mIoU", f"{100 * (0.5 + 0 + 1) / 3:.2f}"]


def test_per_class_table_rejects_wrong_number_of_names() -> None:
    with pytest.raises(ValueError, match="names"):
        ConfusionMatrix(3).per_class_table(["a", "b"])


def test_cityscapes_names_and_palette_match_the_official_label_table() -> None:
    from cityscapesscripts.helpers.labels import trainId2label

    assert CITYSCAPES_CLASSES == tuple(trainId2label[i].name for i in range(19))
    assert CITYSCAPES_PALETTE == tuple(tuple(trainId2label[i].color) for i in range(19))


# --------------------------------------------------------------------------------------------------------------
# Agreement with cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling
# --------------------------------------------------------------------------------------------------------------


def official_evaluator(monkeypatch: pytest.MonkeyPatch, root: Path) -> types.ModuleType:
    # The module reads these at import time; CITYSCAPES_EXPORT_DIR must name an existing folder if set.
    monkeypatch.setenv("CITYSCAPES_DATASET", str(root))
    monkeypatch.delenv("CITYSCAPES_EXPORT_DIR", raising=False)
    monkeypatch.delenv("CITYSCAPES_RESULTS", raising=False)
    return importlib.import_module("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")


def evaluator_args(module: types.ModuleType, root: Path) -> types.SimpleNamespace:
    """A private copy of the module's global args, set up for explicit file lists and no side effects."""
    args = types.SimpleNamespace(**vars(module.args))
    args.evalInstLevelScore = False  # needs *_instanceIds.png; nIoU is not our metric
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    args.colorized = False
    args.bold = args.nocol = ""
    args.exportFile = str(root / "result.json")
    args.predictionPath, args.predictionWalk = None, None
    return args


def test_miou_agrees_with_official_cityscapes_evaluator(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cityscapesscripts.helpers.labels import labels as cs_labels
    from cityscapesscripts.helpers.labels import trainId2label

    train_to_id = np.array([trainId2label[i].id for i in range(19)], dtype=np.uint8)
    # Label IDs the evaluator ignores (unlabeled, ego vehicle, …, parking, rail track, guard rail): our 255.
    ignored_ids = np.array([lb.id for lb in cs_labels if lb.ignoreInEval and lb.id >= 0][:10], dtype=np.uint8)
    rng = np.random.default_rng(0)
    # GT uses trainIds 0..11 only and predictions 0..9 plus 15: 12..14 and 16..18 are in neither (NaN), 15 is
    # only predicted (IoU 0), 10 and 11 are only in GT (IoU 0).
    pred_pool = np.array(list(range(10)) + [15])
    cm = ConfusionMatrix(19)
    gt_files, pred_files = [], []
    for i in range(3):
        gt = rng.integers(0, 12, size=(24, 32))
        pred = np.where(rng.random((24, 32)) < 0.6, np.minimum(gt, 9), rng.choice(pred_pool, size=(24, 32)))
        ignore = rng.random((24, 32)) < 0.15
        gt_train = np.where(ignore, 255, gt)
        cm.update(torch.from_numpy(pred), torch.from_numpy(gt_train))

        gt_ids = np.where(ignore, rng.choice(ignored_ids, size=(24, 32)), train_to_id[gt]).astype(np.uint8)
        gt_file = tmp_path / f"city_000000_{i:06d}_gtFine_labelIds.png"
        pred_file = tmp_path / f"city_000000_{i:06d}_pred.png"
        Image.fromarray(gt_ids).save(gt_file)
        Image.fromarray(train_to_id[pred]).save(pred_file)
        gt_files.append(str(gt_file))
        pred_files.append(str(pred_file))

    module = official_evaluator(monkeypatch, tmp_path)
    result = module.evaluateImgLists(pred_files, gt_files, evaluator_args(module, tmp_path))

    iou = cm.iou()
    assert int(torch.isnan(iou).sum()) == 6  # the fixture really has classes absent from both
    for train_id, name in enumerate(CITYSCAPES_CLASSES):
        official = result["classScores"][name]
        if math.isnan(official):
            assert math.isnan(iou[train_id]), name
        else:
            assert float(iou[train_id]) == pytest.approx(official, abs=1e-6), name
    # The evaluator averages the classes it could score, i.e. our nan-mean.
    assert cm.miou() == pytest.approx(result["averageScoreClasses"], abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# DDP
# --------------------------------------------------------------------------------------------------------------


def _all_reduce_worker(rank: int, world: int, store: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([[rank, 2]]), torch.tensor([[0, 2]]))
        torch.save(cm.all_reduce().matrix, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_the_matrices_of_all_ranks(tmp_path: Path) -> None:
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    expected = [[1, 1, 0], [0, 0, 0], [0, 0, 2]]  # rank 0: 0→0, rank 1: 0→1; both: 2→2
    for r in range(2):
        assert torch.load(tmp_path / f"out.{r}", weights_only=True).tolist() == expected


def test_all_reduce_without_ddp_is_a_no_op() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[1]]), torch.tensor([[1]]))
    assert cm.all_reduce().matrix.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]

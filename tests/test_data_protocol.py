"""The data protocol's documented values (METHOD §6.4, §7, §8) checked by behaviour: augmentation distributions,
the crop rule, the label table, test boxes and dataset layouts, each against the documented value written out
here, never against numbers taken from the code's own output."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qd_core.data import SegmentationDataset, Sample, bdd_dataset
from qd_core.data.convert import main as convert_main
from qd_core.data.files import read_image
from qd_core.data.labels import label_id_lut, train_id_to_label_id_lut
from qd_core.data.transforms import TrainTransform, photometric_distortion, random_crop, random_resize, scale_choices

SEEDS = range(200)

# ----------------------------------------------------------------------------------------------------------------
# Label ids (METHOD §8.2: the official Cityscapes table, also what GTA5 ships)
# ----------------------------------------------------------------------------------------------------------------

# cityscapesScripts' labels.py: label id → train id of the 19 evaluated classes; every other id is ignored.
OFFICIAL_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}


def test_label_id_table_is_the_official_one_for_all_256_values() -> None:
    lut = label_id_lut()
    expected = np.full(256, 255)
    for label_id, train_id in OFFICIAL_TRAIN_IDS.items():
        expected[label_id] = train_id
    np.testing.assert_array_equal(lut, expected)  # e.g. polegroup 18, tunnel 16, parking 9 → 255
    back = train_id_to_label_id_lut()
    assert [int(back[t]) for t in range(19)] == sorted(OFFICIAL_TRAIN_IDS, key=OFFICIAL_TRAIN_IDS.get)


# ----------------------------------------------------------------------------------------------------------------
# Geometry (METHOD §7)
# ----------------------------------------------------------------------------------------------------------------


def test_random_resize_draws_every_one_of_the_16_scales() -> None:
    image, label = np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.int64)
    shorts = {random_resize(image, label, np.random.default_rng(s), scale_choices(20), 1000)[1].shape[0]
              for s in range(400)}
    assert shorts == {20 * k // 10 for k in range(5, 21)}


def test_default_scales_are_the_paper_ones_and_the_long_edge_is_capped_at_four_crops() -> None:
    assert TrainTransform(crop=512).scales == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870,
                                               921, 972, 1024]
    # crop 16 → long edge ≤ 64 (2048 for 512). A 10×100 image at any short edge s ≥ 8 is 10·s ≥ 80 wide, so it is
    # shrunk to 64 wide and 6.4 → 6 rows high; the 16×16 sample then has 6 labelled rows over padding.
    t = TrainTransform(crop=16, photometric=False, cat_max_ratio=1.0)
    for seed in range(10):
        _, out_label = t(np.zeros((10, 100, 3), np.uint8), np.zeros((10, 100), np.int64),
                         np.random.default_rng(seed))
        assert (out_label != 255).any(1).sum().item() == 6 and (out_label[:6] != 255).all()


class _ScriptedRng:
    """A generator stand-in whose ``integers(n)`` returns scripted column offsets (row offsets are 0 here)."""

    def __init__(self, xs: list[int]) -> None:
        self.xs = list(xs)

    def integers(self, n: int) -> int:
        return 0 if n == 1 else self.xs.pop(0)


def test_crop_checks_the_first_window_then_redraws_at_most_ten_times() -> None:
    # Window x = 0 holds classes 1 and 0 half and half (passes), x = 8 only class 0 (fails).
    label = np.zeros((8, 16), np.int64)
    label[:, :4] = 1
    image = np.zeros((8, 16, 3), np.uint8)

    def crop(xs: list[int]) -> tuple[np.ndarray, int]:
        rng = _ScriptedRng(xs)
        return random_crop(image, label, rng, 8, 0.75)[1], len(xs) - len(rng.xs)

    good, drawn = crop([0] + [8] * 20)
    assert np.array_equal(good, label[:, :8]) and drawn == 1          # the first window is checked and kept
    good, drawn = crop([8] * 9 + [0] + [8] * 10)
    assert np.array_equal(good, label[:, :8]) and drawn == 10         # the 10th window passes
    last, drawn = crop([8] * 11 + [0] * 10)
    assert np.array_equal(last, label[:, 8:]) and drawn == 11         # 1 + 10 redraws, then the last one is kept


def _passes(label: torch.Tensor | np.ndarray) -> bool:
    """mmseg's rule on the labelled (non-255) pixels: at least two classes, the largest under 75 %."""
    values = np.asarray(label).ravel()
    counts = np.bincount(values[values != 255], minlength=19)
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < 0.75


def test_cat_max_ratio_counts_labelled_pixels_only_and_is_on_by_default() -> None:
    # Columns 0..15 ignored, 16..47 class 0, 48..63 class 1; crop 32 at x = 0..32. Windows x ≤ 7 hold 255 and class
    # 0 only (one labelled class: must fail, though no value reaches 75 % of all pixels); x ≥ 25 pass (8 of 33).
    label = np.full((32, 64), 255, np.int64)
    label[:, 16:48] = 0
    label[:, 48:] = 1
    t = TrainTransform(crop=32, photometric=False)  # default cat_max_ratio: the paper's 0.75
    t.scales = [32]  # no resize (as the trainer sets its scales)
    passed = sum(_passes(t(np.zeros((32, 64, 3), np.uint8), label, np.random.default_rng(s))[1]) for s in range(100))
    assert passed >= 85  # 1 − (25/33)^11 ≈ 95 % of the seeds find a passing window in 11 draws


def test_cat_max_ratio_rejects_a_window_at_exactly_75_percent() -> None:
    # Columns 0..23 class 0, 24..39 class 1; crop 32 at x = 0..8: x = 0 is exactly 24/32 = 75 % (mmseg: "< 0.75"
    # fails), every other window passes. x = 0 comes back only if all 11 draws are 0.
    label = np.zeros((32, 40), np.int64)
    label[:, 24:] = 1
    image = np.zeros((32, 40, 3), np.uint8)
    shares = [np.bincount(random_crop(image, label, np.random.default_rng(s), 32, 0.75)[1].ravel()).max() / 1024
              for s in SEEDS]
    assert max(shares) < 0.75


def test_flip_probability_defaults_to_one_half() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16, 0] = 255
    label = np.ones((32, 32), np.int64)
    label[:, 16:] = 2
    t = TrainTransform(crop=32, photometric=False)
    t.scales = [32]
    flips = sum(int(t(image, label, np.random.default_rng(s))[1][0, 0]) == 2 for s in range(400))
    assert 140 <= flips <= 260  # Binomial(400, 0.5): 200 ± 30 at 3σ (p = 0.25 would give 100 ± 9)


# ----------------------------------------------------------------------------------------------------------------
# PhotoMetricDistortion (METHOD §7: brightness ±32, contrast [0.5, 1.5], saturation [0.5, 1.5], hue ±18, p = 0.5)
# ----------------------------------------------------------------------------------------------------------------

OFF = {"brightness_delta": 0.0, "contrast_range": (1.0, 1.0), "saturation_range": (1.0, 1.0), "hue_delta": 0}


def _distort(pixel: tuple[int, int, int], seed: int, op: str) -> np.ndarray:
    """``photometric_distortion`` with only ``op`` on, at its default range."""
    image = np.array([[pixel, (0, 0, 0), (255, 255, 255)]], np.uint8)
    return photometric_distortion(image, np.random.default_rng(seed), **{k: v for k, v in OFF.items() if k != op})


def test_brightness_shift_is_uniform_in_plus_minus_32_half_the_time_and_clipped() -> None:
    outs = [_distort((128, 128, 128), s, "brightness_delta") for s in SEEDS]
    deltas = np.array([o[0, 0, 0] - 128.0 for o in outs])
    assert all(o.min() >= 0 and o.max() <= 255 for o in outs)  # black and white pixels stay in 0..255
    assert 70 <= (deltas == 0).sum() <= 130 and np.abs(deltas).max() <= 32
    moved = deltas[deltas != 0]
    assert moved.min() < -24 and moved.max() > 24 and abs(moved.mean()) < 6


def test_contrast_factor_is_uniform_in_half_to_one_and_a_half_half_the_time() -> None:
    factors = np.array([_distort((100, 100, 100), s, "contrast_range")[0, 0, 0] / 100.0 for s in SEEDS])
    assert 70 <= np.isclose(factors, 1.0).sum() <= 130
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4
    assert factors.min() < 0.6 and factors.max() > 1.4


def test_saturation_factor_is_uniform_in_half_to_one_and_a_half_half_the_time() -> None:
    # (200, 150, 100): saturation 0.5, so factors up to 1.5 are not clipped.
    factors = np.array([colorsys.rgb_to_hsv(*(_distort((200, 150, 100), s, "saturation_range")[0, 0]
                                               / 255.0))[1] / 0.5 for s in SEEDS])
    assert 70 <= np.isclose(factors, 1.0, atol=1e-4).sum() <= 130
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4
    assert factors.min() < 0.6 and factors.max() > 1.4


def test_hue_shift_is_an_integer_step_within_18_on_the_opencv_scale() -> None:
    # Pure red has hue 0: the shifted hue, in OpenCV's 0..180 units, is the step itself.
    steps = []
    for s in SEEDS:
        hue = colorsys.rgb_to_hsv(*(_distort((255, 0, 0), s, "hue_delta")[0, 0] / 255.0))[0] * 180
        step = (hue + 90) % 180 - 90
        assert abs(step - round(step)) < 0.05
        steps.append(round(step))
    assert max(abs(v) for v in steps) <= 18 and min(steps) <= -15 and max(steps) >= 15
    assert 70 <= steps.count(0) <= 140  # half the time off, plus δ = 0 (1 in 37) when on


def test_train_transform_applies_the_photometric_distortion_by_default() -> None:
    image = np.full((32, 32, 3), 128, np.uint8)
    label = np.zeros((32, 32), np.int64)
    label[:, 16:] = 1
    t = TrainTransform(crop=32)
    t.scales = [32]
    grey = (128 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375])
    changed = sum(not torch.allclose(t(image, label, np.random.default_rng(s))[0][:, 0, 0], grey, atol=1e-3)
                  for s in range(40))
    assert changed >= 20  # brightness or contrast changes grey unless both are off (p = 1/4)


# ----------------------------------------------------------------------------------------------------------------
# Datasets: per-sample randomness, kept labels, 16-bit images, layouts (METHOD §8)
# ----------------------------------------------------------------------------------------------------------------


def _files(tmp_path: Path, count: int, label: np.ndarray) -> list[Sample]:
    samples = []
    for i in range(count):
        img, lbl = tmp_path / f"{i}.png", tmp_path / f"{i}_label.png"
        Image.fromarray(np.full((*label.shape, 3), 10 * i, np.uint8)).save(img)
        Image.fromarray(label.astype(np.uint8)).save(lbl)
        samples.append(Sample(img, lbl))
    return samples


def test_samples_of_one_epoch_draw_different_augmentations(tmp_path: Path) -> None:
    draws: list[int] = []

    def transform(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        draws.append(int(rng.integers(1 << 62)))
        return image, label

    ds = SegmentationDataset(_files(tmp_path, 4, np.zeros((4, 6))), transform, seed=3)
    for i in range(4):
        ds[i]
    assert len(set(draws)) == 4


def test_kept_decoded_labels_keep_the_ignore_index(tmp_path: Path) -> None:
    label = np.zeros((4, 6), np.int64)
    label[0] = 255
    label[1] = 18
    ds = SegmentationDataset(_files(tmp_path, 1, label))
    ds.keep_decoded()
    ds.load(0)
    np.testing.assert_array_equal(ds.load(0)[1], label)
    np.testing.assert_array_equal(ds[0]["label"], label)


def test_a_16_bit_png_keeps_its_high_byte_like_opencv(tmp_path: Path) -> None:
    import cv2

    values = np.array([[0x12AB, 0x12FF, 0x80FF, 0xFF00, 0x00FF]], np.uint16)  # high and low bytes differ
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(image[0, :, 0], [0x12, 0x12, 0x80, 0xFF, 0x00])
    np.testing.assert_array_equal(image, cv2.imread(str(tmp_path / "deep.png"))[..., ::-1])


def test_bdd_train_split_reads_the_train_masks(tmp_path: Path) -> None:
    for split, value in (("train", 3), ("val", 4)):
        (tmp_path / "images/10k" / split).mkdir(parents=True)
        (tmp_path / "labels/sem_seg/masks" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images/10k" / split / "a.jpg")
        Image.fromarray(np.full((4, 6), value, np.uint8)).save(tmp_path / "labels/sem_seg/masks" / split / "a.png")
    assert bdd_dataset(tmp_path, "train")[0]["label"][0, 0] == 3


def test_mapillary_val_is_scored_on_the_half_resolution_copy(tmp_path: Path) -> None:
    from qd_core.config import DatasetSpec, load_config
    from train.data import build_dataset

    for folder, size in (("half/val_img", (4, 6)), ("validation/images", (8, 12))):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(tmp_path / folder / "a.jpg")
    for folder, size in (("half/val_label", (4, 6)), ("cityscapes_trainIdLabel/val/label", (8, 12))):
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(tmp_path / folder / "a.png")
    ds = build_dataset(DatasetSpec(kind="mapillary", root=str(tmp_path), split="val"), load_config("tiny"), None)
    assert "/half/val_img/" in ds.samples[0].image.as_posix() and ds[0]["label"].shape == (4, 6)


def test_default_test_boxes_are_the_papers() -> None:
    from train.data import default_test_size

    # METHOD §6.4 at the 512 window: GTA and BDD (1280, 720), Cityscapes and Mapillary (1024, 512), ACDC (960, 540).
    assert default_test_size("gta", [512, 512]) == [1280, 720]
    assert default_test_size("mapillary", [512, 512]) == [1024, 512]
    assert default_test_size("cityscapes", [1024, 1024]) == [2048, 1024]
    assert default_test_size("acdc", [512, 512]) == [960, 540]


# ----------------------------------------------------------------------------------------------------------------
# Mapillary half resolution (METHOD §8.2: images bicubic, labels nearest, sizes halved)
# ----------------------------------------------------------------------------------------------------------------


def test_mapillary_resize_halves_odd_sizes_down_and_images_bicubic(tmp_path: Path) -> None:
    # Grey (JPEG keeps grey exact to ±1 at quality 100; colour would lose detail to chroma subsampling).
    yy, xx = np.mgrid[0:13, 0:21]
    grey = (128 + 100 * np.sin(xx * 1.3) * np.cos(yy * 0.9)).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=2)
    (tmp_path / "img").mkdir()
    (tmp_path / "lbl").mkdir()
    Image.fromarray(image).save(tmp_path / "img/a.jpg", quality=100)
    source = read_image(tmp_path / "img/a.jpg")
    Image.fromarray(np.zeros((13, 21), np.uint8)).save(tmp_path / "lbl/a.png")
    args = [str(tmp_path / d) for d in ("img", "lbl", "oi", "ol")]
    assert convert_main(["mapillary-resize", *args, "--quality", "100"]) == 0
    out = read_image(tmp_path / "oi/a.jpg").astype(float)
    assert out.shape == (6, 10, 3)                       # ⌊13/2⌋ × ⌊21/2⌋
    assert np.asarray(Image.open(tmp_path / "ol/a.png")).shape == (6, 10)

    def err(resample: int) -> float:
        return float(np.abs(out - np.asarray(Image.fromarray(source).resize((10, 6), resample))).mean())

    assert err(Image.BICUBIC) < 1.0 < 3.0 < min(err(Image.BILINEAR), err(Image.LANCZOS), err(Image.NEAREST))

"""Training augmentation (METHOD §7) and test-time resizing (METHOD §6.4)."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch

from qd_core.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    fit_size,
    hsv_to_rgb,
    normalize,
    pad_to,
    photometric_distortion,
    random_crop,
    random_flip,
    resize_image,
    resize_label,
    rgb_to_hsv,
    scale_choices,
    short_edge_size,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _denorm(image: torch.Tensor) -> torch.Tensor:
    return image * STD + MEAN


def _scene(h: int = 60, w: int = 90, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 19, size=(h // 10 + 1, w // 10 + 1)).repeat(10, 0).repeat(10, 1)[:h, :w]
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), label.astype(np.int64)


def test_scale_choices_are_the_16_paper_scales() -> None:
    assert scale_choices(512) == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]
    assert scale_choices(128) == [64, 76, 89, 102, 115, 128, 140, 153, 166, 179, 192, 204, 217, 230, 243, 256]


def test_short_edge_resize_caps_the_long_edge() -> None:
    assert short_edge_size(1024, 2048, 512, 2048) == (512, 1024)
    assert short_edge_size(2048, 1024, 768, 2048) == (1536, 768)
    # 100x1000 → short 512 would make the long edge 5120; shrink to 2048 (0.4x): 204.8 → 205.
    assert short_edge_size(100, 1000, 512, 2048) == (205, 2048)


def test_test_time_resize_fits_the_long_short_box() -> None:
    assert fit_size(1024, 2048, (1024, 512)) == (512, 1024)        # Cityscapes
    assert fit_size(1080, 1920, (960, 540)) == (540, 960)          # ACDC, 512 config
    assert fit_size(720, 1280, (1280, 720)) == (720, 1280)         # BDD: already fits
    assert fit_size(1000, 1000, (1024, 512)) == (512, 512)         # the short side binds
    assert fit_size(1224, 1632, (1024, 512)) == (512, 683)         # 682.7 rounds half up, as mmcv's int(x + 0.5)


# (in_h, in_w, out_h, out_w): the 2x test-time downscale (OpenCV takes its area path there), up- and downscales of
# a GTA-shaped image as the training scales make them, and ragged sizes both ways.
RESIZES = [(128, 256, 64, 128), (105, 191, 256, 466), (105, 191, 51, 93), (61, 97, 100, 173), (97, 131, 40, 55)]


@pytest.mark.parametrize("in_h,in_w,out_h,out_w", RESIZES)
def test_resizing_matches_opencv_as_the_reference_pipeline_uses_it(in_h: int, in_w: int, out_h: int,
                                                                   out_w: int) -> None:
    # mmseg resizes with cv2: INTER_LINEAR for images (no anti-aliasing), INTER_NEAREST for labels.
    import cv2

    rng = np.random.default_rng(in_h * out_w)
    image = rng.integers(0, 256, size=(in_h, in_w, 3), dtype=np.uint8)
    label = rng.integers(0, 19, size=(in_h, in_w), dtype=np.uint8)
    label[rng.random((in_h, in_w)) < 0.1] = 255
    ours = resize_image(image, (out_h, out_w))
    ref = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - ref)
    # Both interpolate in fixed point and round differently: never more than one level apart, most pixels equal.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.5
    wide = label.astype(np.int64)
    assert np.array_equal(resize_label(label, (out_h, out_w)), cv2.resize(label, (out_w, out_h),
                                                                          interpolation=cv2.INTER_NEAREST))
    assert resize_label(wide, (out_h, out_w)).dtype == np.int64


def test_label_resizing_takes_opencvs_source_rows_where_torch_and_exact_division_do_not() -> None:
    """Cityscapes-sized labels at training scales (1024 → 614, 460, 972; 2048 → 920, 1228, 1944), where torch's
    float32 "nearest" reads a row too low, GTA's 1914 → 1024, where exact ⌊dst · in / out⌋ differs, the 128 → 82 of
    the C++ runner's tests, and every size pair from 1 to 64 both ways: always cv2's rows."""
    import cv2

    pairs = [(1024, 614), (1024, 460), (1024, 972), (2048, 920), (2048, 1228), (2048, 1944), (1914, 1024),
             (128, 82)] + [(a, b) for a in range(1, 65) for b in range(1, 65)]
    for n_in, n_out in pairs:
        column = (np.arange(n_in) % 251).astype(np.uint8).reshape(n_in, 1)  # neighbouring rows always differ
        want = cv2.resize(column, (1, n_out), interpolation=cv2.INTER_NEAREST).reshape(-1)
        assert np.array_equal(resize_label(column, (n_out, 1))[:, 0], want), (n_in, n_out)
        row = column.reshape(1, n_in)
        assert np.array_equal(resize_label(row, (1, n_out))[0], want), (n_in, n_out)


def test_resizing_to_the_same_size_returns_the_input() -> None:
    image, label = _scene(20, 30)
    assert resize_image(image, (20, 30)) is image and resize_label(label, (20, 30)) is label


def test_resizing_takes_read_only_arrays_and_leaves_them_alone() -> None:
    # Decoded images arrive read-only (np.asarray of a Pillow image); torch cannot share their memory.
    image, label = _scene(20, 30)
    label = label.astype(np.uint8)
    frozen_image, frozen_label = image.copy(), label.copy()
    frozen_image.flags.writeable = frozen_label.flags.writeable = False
    assert np.array_equal(resize_image(frozen_image, (40, 60)), resize_image(image, (40, 60)))
    assert np.array_equal(resize_label(frozen_label, (40, 60)), resize_label(label, (40, 60)))
    assert np.array_equal(frozen_image, image) and np.array_equal(frozen_label, label)


def test_train_transform_outputs_crop_sized_tensors() -> None:
    image, label = _scene(60, 90)
    out_image, out_label = TrainTransform(crop=32)(image, label, np.random.default_rng(0))
    assert out_image.shape == (3, 32, 32) and out_image.dtype == torch.float32
    assert out_label.shape == (32, 32) and out_label.dtype == torch.int64


def test_same_generator_state_gives_the_same_sample() -> None:
    image, label = _scene()
    t = TrainTransform(crop=32)
    a = t(image, label, np.random.default_rng(7))
    b = t(image, label, np.random.default_rng(7))
    c = t(image, label, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_padding_is_zero_in_the_image_and_ignored_in_the_label() -> None:
    image, label = _scene(30, 40)
    # Scales ⌊20·k/10⌋ = 10..40 keep the short edge ≤ 40 < 64, so the sample is always padded.
    out_image, out_label = TrainTransform(crop=64, scale_base=20, photometric=False)(image, label,
                                                                                     np.random.default_rng(3))
    valid = out_label != 255
    rows, cols = valid.any(1).nonzero().max().item() + 1, valid.any(0).nonzero().max().item() + 1
    assert rows < 64 and cols < 64
    assert (out_label[rows:] == 255).all() and (out_label[:, cols:] == 255).all()
    assert (out_image[:, rows:] == 0).all() and (out_image[:, :, cols:] == 0).all()
    assert valid[:rows, :cols].all()  # the source has no ignored pixels, so only padding is 255


def test_pad_to_rejects_a_sample_larger_than_the_crop() -> None:
    with pytest.raises(ValueError, match="cannot pad a 5x9 sample down to 8x8"):
        pad_to(torch.zeros(3, 5, 9), torch.zeros(5, 9, dtype=torch.int64), 8)


def _dominant_share(label: np.ndarray) -> float:
    counts = np.bincount(label[label != 255].ravel())
    return counts.max() / counts.sum()


def test_cat_max_ratio_is_respected_when_a_crop_allows_it() -> None:
    # Class 0 fills columns 0..47, class 1 columns 48..63: only crops starting at x ≥ 25 (8 of 33) keep class 0
    # under 75 %, so a single random draw succeeds ~24 % of the time and eleven draws ~95 %.
    label = np.zeros((32, 64), np.int64)
    label[:, 48:] = 1
    image = np.zeros((32, 64, 3), np.uint8)
    with_ratio = [_dominant_share(random_crop(image, label, np.random.default_rng(s), 32, 0.75)[1]) < 0.75
                  for s in range(40)]
    without = [_dominant_share(random_crop(image, label, np.random.default_rng(s), 32, 1.0)[1]) < 0.75
               for s in range(40)]
    assert sum(with_ratio) >= 34 and sum(without) <= 20


def test_cat_max_ratio_ignores_the_ignore_index() -> None:
    # Only one real class besides 255 in every window: no crop can pass, the transform still returns one.
    label = np.full((32, 64), 255, np.int64)
    label[:, :10] = 3
    crop_image, crop_label = random_crop(np.zeros((32, 64, 3), np.uint8), label, np.random.default_rng(0), 32)
    assert crop_image.shape == (32, 32, 3) and crop_label.shape == (32, 32)


def test_flip_mirrors_image_and_label_together() -> None:
    image, label = _scene(10, 16)
    flipped_image, flipped_label = random_flip(image, label, np.random.default_rng(0), prob=1.0)
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])
    same_image, same_label = random_flip(image, label, np.random.default_rng(0), prob=0.0)
    assert same_image is image and same_label is label


def test_geometry_keeps_image_and_label_aligned_through_the_pipeline() -> None:
    # Left half red with class 1, right half blue with class 2: after resize, crop and flip, class-1 pixels must
    # still be red. Both flip outcomes must occur over the seeds.
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, :40, 0] = 255
    image[:, 40:, 2] = 255
    label = np.full((40, 80), 1, np.int64)
    label[:, 40:] = 2
    t = TrainTransform(crop=48, scale_base=40, photometric=False, cat_max_ratio=1.0)
    sides = set()
    for seed in range(12):
        out_image, out_label = t(image, label, np.random.default_rng(seed))
        rgb = _denorm(out_image)
        one, two = out_label == 1, out_label == 2
        if one.any():
            assert rgb[0][one].mean() > 200 and rgb[2][one].mean() < 55
        if two.any():
            assert rgb[2][two].mean() > 200 and rgb[0][two].mean() < 55
        if one.any() and two.any():
            cols = torch.arange(48).expand(48, 48)
            sides.add(bool(cols[one].float().mean() < cols[two].float().mean()))
    assert sides == {True, False}


def test_hsv_matches_colorsys_and_round_trips() -> None:
    rgb = np.random.default_rng(0).uniform(0, 255, size=(50, 3))
    hsv = rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*(px / 255.0)) for px in rgb])
    np.testing.assert_allclose(hsv[:, :2], ref[:, :2], atol=1e-9)
    np.testing.assert_allclose(hsv[:, 2], ref[:, 2] * 255, atol=1e-9)
    np.testing.assert_allclose(hsv_to_rgb(hsv), rgb, atol=1e-9)  # float64 round trip


def test_photometric_ops_leave_grey_untouched_when_brightness_and_contrast_are_off() -> None:
    # Saturation scaling and hue rotation cannot change a pixel with R = G = B.
    grey = np.full((6, 6, 3), 97, np.uint8)
    for seed in range(8):
        out = photometric_distortion(grey, np.random.default_rng(seed), brightness_delta=0.0,
                                     contrast_range=(1.0, 1.0))
        np.testing.assert_allclose(out, 97.0, atol=1e-3)  # float32 HSV round trip


def test_photometric_brightness_is_a_bounded_shift() -> None:
    image = np.random.default_rng(0).integers(60, 190, size=(6, 6, 3)).astype(np.uint8)
    shifts = []
    for seed in range(10):
        out = photometric_distortion(image, np.random.default_rng(seed), contrast_range=(1.0, 1.0),
                                     saturation_range=(1.0, 1.0), hue_delta=0)
        diff = out - image.astype(np.float32)
        np.testing.assert_allclose(diff, diff.flat[0], atol=1e-3)
        shifts.append(float(diff.flat[0]))
    assert all(abs(s) <= 32 for s in shifts) and any(s == 0 for s in shifts) and any(s != 0 for s in shifts)


def test_hue_shift_follows_the_opencv_scale() -> None:
    # +18 on OpenCV's 0..180 hue scale is +36°: pure red becomes (255, 153, 0).
    hsv = rgb_to_hsv(np.array([[255.0, 0.0, 0.0]]))
    hsv[:, 0] = (hsv[:, 0] + 18 / 180) % 1.0
    np.testing.assert_allclose(hsv_to_rgb(hsv), [[255.0, 153.0, 0.0]], atol=1e-9)


def test_normalize_uses_rgb_mean_and_std() -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 1] = 255
    out = normalize(image)
    assert out.shape == (3, 2, 3)
    expected = torch.tensor([(0 - 123.675) / 58.395, (255 - 116.28) / 57.12, (0 - 103.53) / 57.375])
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_eval_transform_resizes_the_image_but_not_the_label() -> None:
    image, label = _scene(100, 200)
    out_image, out_label = EvalTransform(box=(100, 50))(image, label)
    assert out_image.shape == (3, 50, 100)
    assert torch.equal(out_label, torch.from_numpy(label))
    # The values: the bilinear uint8 resize, then RGB normalisation (not BGR, not a float resize).
    torch.testing.assert_close(out_image, normalize(resize_image(image, (50, 100))), rtol=0, atol=0)
    red = np.zeros((4, 8, 3), np.uint8)
    red[..., 0] = 255
    out_red, _ = EvalTransform(box=(8, 4))(red)
    torch.testing.assert_close(out_red[:, 0, 0], torch.tensor([(255 - 123.675) / 58.395, -116.28 / 57.12,
                                                               -103.53 / 57.375]))


def test_train_transform_requires_a_label() -> None:
    image, _ = _scene()
    with pytest.raises(ValueError, match="needs a label"):
        TrainTransform(crop=16)(image, None, np.random.default_rng(0))


def test_mismatched_image_and_label_are_rejected() -> None:
    image, label = _scene(20, 30)
    with pytest.raises(ValueError, match=r"label must be \(H, W\) = \(20, 30\)"):
        TrainTransform(crop=16)(image, label[:, :-1], np.random.default_rng(0))

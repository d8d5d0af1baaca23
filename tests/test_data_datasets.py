"""Dataset readers on tiny fixture trees in each published layout, and every bad-input error."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qd_core.data import (
    Sample,
    SegmentationDataset,
    TrainTransform,
    acdc_dataset,
    bdd_dataset,
    cityscapes_dataset,
    collate,
    folder_dataset,
    gta_dataset,
    mapillary_dataset,
)

H, W = 8, 12


def _image(path: Path, value: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((*size, 3), value, dtype=np.uint8)
    arr[0, 0] = (value, 255 - value, 7)
    Image.fromarray(arr).save(path, **({"quality": 100} if path.suffix.lower() == ".jpg" else {}))
    return arr


def _label(path: Path, value: int, size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(size, value, dtype=np.uint8)
    arr[-1, -1] = 255
    Image.fromarray(arr).save(path)
    return arr


def test_cityscapes_pairs_images_with_train_id_labels(tmp_path: Path) -> None:
    for i, city in enumerate(["aachen", "bonn"]):
        _image(tmp_path / "leftImg8bit/val" / city / f"{city}_000000_000019_leftImg8bit.png", 10 * i)
        _label(tmp_path / "gtFine/val" / city / f"{city}_000000_000019_gtFine_labelTrainIds.png", i + 3)
    ds = cityscapes_dataset(tmp_path, "val")
    assert len(ds) == 2
    sample = ds[1]
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (H, W, 3)
    assert sample["label"].dtype == np.int64 and sample["label"].shape == (H, W)
    assert sample["label"][0, 0] == 4 and sample["label"][-1, -1] == 255
    assert sample["path"].endswith("bonn_000000_000019_leftImg8bit.png")
    assert sample["label_path"].endswith("bonn_000000_000019_gtFine_labelTrainIds.png")


def test_gta_pairs_images_with_converted_labels(tmp_path: Path) -> None:
    _image(tmp_path / "images/00001.png", 50)
    _label(tmp_path / "labels/00001_labelTrainIds.png", 13)
    _label(tmp_path / "labels/00001.png", 26)  # the original label-id file beside it is not read
    sample = gta_dataset(tmp_path)[0]
    assert sample["label"][0, 0] == 13 and sample["image"][1, 1, 0] == 50


def test_mapillary_half_resolution_val(tmp_path: Path) -> None:
    _image(tmp_path / "half/val_img/abc.jpg", 100)
    _label(tmp_path / "half/val_label/abc.png", 7)
    sample = mapillary_dataset(tmp_path, "val", half=True)[0]
    assert sample["label"][0, 0] == 7 and abs(int(sample["image"][2, 2, 0]) - 100) <= 2  # JPEG rounding


def test_a_16_bit_grey_png_is_read_by_its_high_byte(tmp_path: Path) -> None:
    # Pillow's convert("RGB") would clip these to 255: mid-grey 128 · 257 became white.
    from qd_core.data.files import read_image

    Image.fromarray(np.array([[128 * 257, 255 * 257, 0]], dtype=np.uint16)).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == np.uint8 and image.shape == (1, 3, 3)
    np.testing.assert_array_equal(image[0, :, 0], [128, 255, 0])
    assert (image == image[..., :1]).all()


def exif_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    """A JPEG of ``pixels`` whose EXIF says how to turn it upright (as cameras store portrait photos)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_jpeg_is_turned_upright_by_its_exif_orientation_as_opencv_reads_it(tmp_path: Path,
                                                                            orientation: int) -> None:
    """mmseg reads images with OpenCV, which applies the EXIF orientation: a phone photo must not be segmented
    sideways. Labels (PNG, read unchanged) are never turned."""
    import cv2

    from qd_core.data.files import read_image

    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    path = exif_jpeg(tmp_path / "photo.jpg", pixels, orientation)
    image = read_image(path)
    assert image.shape == ((50, 30, 3) if orientation >= 5 else (30, 50, 3))
    np.testing.assert_array_equal(image, cv2.imread(str(path))[..., ::-1])


def test_readers_never_take_a_killed_writes_temp_file_for_data(tmp_path: Path) -> None:
    # An atomic write killed before its rename leaves ".<stem>.tmp<pid><suffix>" beside the real files.
    _image(tmp_path / "half/val_img/abc.jpg", 100)
    _label(tmp_path / "half/val_label/abc.png", 7)
    _image(tmp_path / "half/val_img/.def.tmp31337.jpg", 50)
    assert [s.image.name for s in mapillary_dataset(tmp_path, "val", half=True).samples] == ["abc.jpg"]
    _image(tmp_path / "photos/.a.tmp99.png", 1)
    _image(tmp_path / "photos/b.png", 2)
    assert [s.image.name for s in folder_dataset(tmp_path / "photos").samples] == ["b.png"]


def test_mapillary_converter_layout(tmp_path: Path) -> None:
    _image(tmp_path / "training/images/t1.jpg", 30)
    _label(tmp_path / "cityscapes_trainIdLabel/train/label/t1.png", 2)
    assert mapillary_dataset(tmp_path, "train", half=False)[0]["label"][0, 0] == 2


def test_mapillary_half_exists_for_val_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="half=False"):
        mapillary_dataset(tmp_path, "train", half=True)


def test_bdd_pairs_jpg_images_with_mask_pngs(tmp_path: Path) -> None:
    _image(tmp_path / "images/10k/val/7d06fefd-f7be05a6.jpg", 80)
    _label(tmp_path / "labels/sem_seg/masks/val/7d06fefd-f7be05a6.png", 10)
    sample = bdd_dataset(tmp_path, "val")[0]
    assert sample["label"][0, 0] == 10


def test_acdc_reads_nested_folders_of_several_conditions(tmp_path: Path) -> None:
    for cond, value in (("fog", 1), ("night", 2)):
        seq = "GOPR0475" if cond == "fog" else "GP010376"
        _image(tmp_path / "rgb_anon" / cond / "val" / seq / f"{seq}_frame_000041_rgb_anon.png", value)
        _label(tmp_path / "gt" / cond / "val" / seq / f"{seq}_frame_000041_gt_labelTrainIds.png", value)
    both = acdc_dataset(tmp_path, ["fog", "night"], "val")
    assert [int(both[i]["label"][0, 0]) for i in range(2)] == [1, 2]
    assert "/night/" in both[1]["label_path"]
    assert len(acdc_dataset(tmp_path, "fog", "val")) == 1


def test_folder_dataset_lists_images_without_labels(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 1)
    _image(tmp_path / "sub/b.JPG", 2)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = folder_dataset(tmp_path)
    assert len(ds) == 2
    sample = ds[0]
    assert set(sample) == {"image", "path"} and sample["image"].shape == (H, W, 3)


# ----------------------------------------------------------------------------------------------------------------
# Transforms and seeding through the dataset
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def striped(tmp_path: Path) -> Path:
    for i in range(3):
        img = tmp_path / "images" / f"{i}.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(img)
        stripes = np.repeat(np.arange(6, dtype=np.uint8), 10)[None].repeat(40, 0)
        lbl = tmp_path / "labels" / f"{i}_labelTrainIds.png"
        lbl.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(stripes).save(lbl)
    return tmp_path


def test_transform_draws_depend_on_seed_epoch_and_index_only(striped: Path) -> None:
    ds = gta_dataset(striped, TrainTransform(crop=16), seed=5)
    first = [ds[i]["image"] for i in (2, 0, 1)]
    again = [ds[i]["image"] for i in (0, 1, 2)]  # other access order, same samples
    assert torch.equal(first[0], again[2]) and torch.equal(first[1], again[0])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], again[0])


def test_transformed_samples_stack_in_a_batch(striped: Path) -> None:
    ds = gta_dataset(striped, TrainTransform(crop=16))
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["label"].shape == (2, 16, 16)
    assert batch["label"].dtype == torch.int64 and len(batch["path"]) == 2


def test_kept_decoded_samples_equal_fresh_reads_and_skip_the_files(striped: Path) -> None:
    fresh = gta_dataset(striped, TrainTransform(crop=16), seed=3)
    expected = {}
    for epoch in (0, 1):
        fresh.set_epoch(epoch)
        expected.update({(epoch, i): fresh[i] for i in range(3)})
    kept = gta_dataset(striped, TrainTransform(crop=16), seed=3)
    kept.keep_decoded()
    for i in range(3):
        kept.load(i)
    for path in striped.rglob("*.png"):  # every later read must come from memory
        path.unlink()
    for (epoch, i), want in expected.items():
        kept.set_epoch(epoch)
        got = kept[i]
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["label"], want["label"])
    image, label = kept.load(0)
    assert label is not None and label.dtype == np.int64 and not image.flags.writeable


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file
# ----------------------------------------------------------------------------------------------------------------


def _pair(tmp_path: Path, label: np.ndarray | None = None, image_size: tuple[int, int] = (H, W)) -> Sample:
    img, lbl = tmp_path / "img.png", tmp_path / "lbl.png"
    _image(img, 5, image_size)
    Image.fromarray(np.zeros((H, W), np.uint8) if label is None else label).save(lbl)
    return Sample(img, lbl)


def test_missing_label_is_named_when_listing(tmp_path: Path) -> None:
    _image(tmp_path / "images/00002.png", 1)
    with pytest.raises(FileNotFoundError, match=r"00002_labelTrainIds\.png: label file not found"):
        gta_dataset(tmp_path)


def test_missing_image_is_named_on_load(tmp_path: Path) -> None:
    sample = _pair(tmp_path)
    sample.image.unlink()
    with pytest.raises(FileNotFoundError, match=r"img\.png: image file not found"):
        SegmentationDataset([sample])[0]


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    sample = _pair(tmp_path)
    sample.image.write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    with pytest.raises(ValueError, match=r"img\.png: unreadable image"):
        SegmentationDataset([sample])[0]


def test_unreadable_label_is_named(tmp_path: Path) -> None:
    sample = _pair(tmp_path)
    sample.label.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"lbl\.png: unreadable label"):
        SegmentationDataset([sample])[0]


def test_colour_label_is_rejected(tmp_path: Path) -> None:
    sample = _pair(tmp_path)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(sample.label)
    with pytest.raises(ValueError, match=r"lbl\.png: label image has mode 'RGB'"):
        SegmentationDataset([sample])[0]


def test_label_size_mismatch_is_named(tmp_path: Path) -> None:
    sample = _pair(tmp_path, image_size=(H, W + 2))
    with pytest.raises(ValueError, match=rf"lbl\.png: label size {W}x{H} \(WxH\) differs from image .*img\.png "
                                         rf"size {W + 2}x{H}"):
        SegmentationDataset([sample])[0]


def test_unknown_class_ids_are_named(tmp_path: Path) -> None:
    label = np.zeros((H, W), np.uint8)
    label[0, :3] = (19, 200, 254)
    sample = _pair(tmp_path, label)
    with pytest.raises(ValueError, match=r"lbl\.png: label holds unknown class ids \[19, 200, 254\]"):
        SegmentationDataset([sample])[0]


def test_negative_ids_and_colours_outside_the_palette() -> None:
    """A label array of a signed type (a converter's int32, not a PNG) with -1 is refused like any id outside
    0..18 ∪ {255}; colorize draws ids without a colour, negative ones included, in black, not in road's colour."""
    from qd_core.data.labels import check_train_ids
    from qd_core.visualize import colorize

    with pytest.raises(ValueError, match=r"x\.png: label holds unknown class ids \[-1\]"):
        check_train_ids(np.array([[-1, 3, 255]], np.int32), "x.png")
    check_train_ids(np.array([[0, 18, 255]], np.int32), "x.png")
    rgb = colorize(np.array([[-1, 0, 18, 19, 255, 300]]))
    assert (rgb[0, [0, 3, 4, 5]] == 0).all() and rgb[0, 1].any() and rgb[0, 2].any()


def test_ignore_index_and_all_train_ids_are_accepted(tmp_path: Path) -> None:
    label = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 19
    label[0, 0] = 255
    sample = _pair(tmp_path, label)
    assert np.array_equal(SegmentationDataset([sample])[0]["label"], label.astype(np.int64))


def test_empty_folder_names_folder_and_pattern(tmp_path: Path) -> None:
    (tmp_path / "leftImg8bit/val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val: no files match '\*/\*_leftImg8bit\.png'"):
        cityscapes_dataset(tmp_path, "val")


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images/10k/train: dataset folder not found"):
        bdd_dataset(tmp_path, "train")

"""Converters on tiny fixture files in the real formats give the expected train ids (METHOD §8.2)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qd_core.data import convert
from qd_core.data.convert import mapillary_class, mapillary_lut
from qd_core.data.labels import LABEL_ID_TO_TRAIN_ID, PALETTE


def _palette_png(path: Path, indices: np.ndarray) -> None:
    """A palette-mode PNG whose pixel values are class indices, as GTA5 and Mapillary ship them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", (indices.shape[1], indices.shape[0]), indices.astype(np.uint8).tobytes())
    img.putpalette([c for rgb in PALETTE for c in rgb] + [0] * (768 - 3 * len(PALETTE)))
    img.save(path)


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------------------------------------------
# GTA5
# ----------------------------------------------------------------------------------------------------------------


def test_gta_label_ids_become_train_ids(tmp_path: Path) -> None:
    # road 7→0, sidewalk 8→1, car 26→13, unlabelled 0→255, license plate 34→255, bicycle 33→18, parking 9→255.
    ids = np.array([[7, 8, 26, 0], [34, 33, 9, 23]])
    _palette_png(tmp_path / "labels/00001.png", ids)
    assert convert.main(["gta", str(tmp_path)]) == 0
    out = _read(tmp_path / "labels/00001_labelTrainIds.png")
    np.testing.assert_array_equal(out, [[0, 1, 13, 255], [255, 18, 255, 10]])


def test_gta_rerun_skips_existing_outputs_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _palette_png(tmp_path / "labels/00001.png", np.full((2, 2), 7))
    convert.main(["gta", str(tmp_path)])
    out = tmp_path / "labels/00001_labelTrainIds.png"
    Image.fromarray(np.full((2, 2), 5, np.uint8)).save(out)
    convert.main(["gta", str(tmp_path)])
    assert "converted 0, skipped 1" in capsys.readouterr().out and _read(out)[0, 0] == 5
    convert.main(["gta", str(tmp_path), "--overwrite"])
    assert _read(out)[0, 0] == 0


def test_gta_leaves_an_interrupted_writes_temp_file_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A killed worker leaves its temporary sibling behind; it is neither a source nor an output.
    _palette_png(tmp_path / "labels/00001.png", np.full((2, 2), 7))
    leftover = tmp_path / "labels/.00001_labelTrainIds.tmp4242.png"
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(leftover)
    assert convert.main(["gta", str(tmp_path)]) == 0
    assert "converted 1, skipped 0" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [leftover.name, "00001.png",
                                                                       "00001_labelTrainIds.png"]


def test_an_unwritable_output_is_one_error_line(mapillary_root: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("not a folder")
    assert convert.main(["mapillary", str(mapillary_root), str(tmp_path / "afile" / "out"), "--train_id"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'afile'}") and err.count("\n") == 1, err


def test_gta_missing_labels_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert convert.main(["gta", str(tmp_path)]) == 2
    assert f"{tmp_path / 'labels'}: GTA5 labels folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Cityscapes
# ----------------------------------------------------------------------------------------------------------------


def _polygons(path: Path, objects: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"imgHeight": 10, "imgWidth": 16, "objects": objects}))


def test_cityscapes_polygons_become_train_ids(tmp_path: Path) -> None:
    src = tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_polygons.json"
    _polygons(src, [
        {"label": "road", "polygon": [[0, 5], [15, 5], [15, 9], [0, 9]]},
        {"label": "sky", "polygon": [[0, 0], [15, 0], [15, 2], [0, 2]]},
        {"label": "cargroup", "polygon": [[2, 6], [5, 6], [5, 8], [2, 8]]},
        {"label": "license plate", "polygon": [[3, 7], [4, 7], [4, 7], [3, 7]]},  # id −1: never drawn
        {"label": "guard rail", "polygon": [[12, 3], [14, 3], [14, 4], [12, 4]]},  # not a train class
    ])
    assert convert.main(["cityscapes", str(tmp_path)]) == 0
    out = _read(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png")
    assert out.shape == (10, 16)
    assert out[9, 0] == 0 and out[0, 15] == 10 and out[7, 3] == 13 and out[7, 4] == 13
    assert out[3, 13] == 255 and out[4, 8] == 255  # guard rail and unlabelled background


def test_cityscapes_unknown_label_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "gtFine/train/bonn/bonn_000000_000019_gtFine_polygons.json"
    _polygons(src, [{"label": "spaceship", "polygon": [[0, 0], [3, 0], [3, 3]]}])
    assert convert.main(["cityscapes", str(tmp_path)]) == 2
    assert f"{src}: unknown Cityscapes label 'spaceship'" in capsys.readouterr().err
    assert not list(src.parent.glob("*.png"))


@pytest.mark.parametrize("annotation, reason", [
    ({"objects": [{"label": "road", "polygon": [[0, 0], [3, 0], [3, 3]]}]}, "KeyError: 'imgWidth'"),
    ({"imgWidth": 4, "imgHeight": 4, "objects": [{"label": "road"}]}, "KeyError: 'polygon'"),
    ({"imgWidth": 4, "imgHeight": 4, "objects": [{"label": "road", "polygon": [[1, 1]]}]}, "TypeError"),
    ({"imgWidth": 4, "imgHeight": 4, "objects": [{"label": 5, "polygon": [[0, 0], [3, 0], [3, 3]]}]},
     "label 5 is not a string"),
])
def test_cityscapes_malformed_polygons_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     annotation: dict, reason: str) -> None:
    src = tmp_path / "gtFine/train/bonn/bonn_000000_000019_gtFine_polygons.json"
    src.parent.mkdir(parents=True)
    src.write_text(json.dumps(annotation))
    assert convert.main(["cityscapes", str(tmp_path)]) == 2
    err = capsys.readouterr().err.split("\n")  # the progress bar's carriage-return updates, then the error
    assert err[-2].startswith(f"error: {src}: not a Cityscapes polygon file (") and reason in err[-2], err
    assert err[-1] == "" and sorted(p.name for p in src.parent.iterdir()) == [src.name]


# ----------------------------------------------------------------------------------------------------------------
# Mapillary
# ----------------------------------------------------------------------------------------------------------------

# A subset of config_v1.2.json, in file order, and the train / label id each name should map to.
_MAPILLARY = [
    ("Bird", 255, 255), ("Curb", 1, 8), ("Road", 0, 7), ("Lane Marking - General", 0, 7),
    ("Traffic Sign (Front)", 7, 20), ("Bicyclist", 12, 25), ("Street Light", 5, 17), ("On Rails", 16, 31),
    ("Car", 13, 26), ("Sky", 10, 23), ("Traffic Light", 6, 19), ("Bicycle", 18, 33),
]


@pytest.fixture
def mapillary_root(tmp_path: Path) -> Path:
    root = tmp_path / "mapillary"
    root.mkdir()
    labels = [{"readable": name, "name": name.lower(), "color": [0, 0, 0]} for name, _, _ in _MAPILLARY]
    (root / "config_v1.2.json").write_text(json.dumps({"labels": labels}))
    indices = np.arange(len(_MAPILLARY)).reshape(3, 4)
    _palette_png(root / "training/v1.2/labels/t0.png", indices)
    _palette_png(root / "validation/v1.2/labels/v0.png", indices[::-1])
    return root


def test_mapillary_names_map_to_train_ids(mapillary_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "cityscapes_trainIdLabel"
    assert convert.main(["mapillary", str(mapillary_root), str(out), "--train_id"]) == 0
    expected = np.array([t for _, t, _ in _MAPILLARY]).reshape(3, 4)
    np.testing.assert_array_equal(_read(out / "train/label/t0.png"), expected)
    np.testing.assert_array_equal(_read(out / "val/label/v0.png"), expected[::-1])


def test_mapillary_without_train_id_writes_cityscapes_label_ids(mapillary_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ids"
    assert convert.main(["mapillary", str(mapillary_root), str(out)]) == 0
    np.testing.assert_array_equal(_read(out / "train/label/t0.png"),
                                  np.array([i for _, _, i in _MAPILLARY]).reshape(3, 4))


def test_mapillary_rerun_with_the_other_ids_is_refused_unless_overwrite(mapillary_root: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    # A rerun skips existing files: without the check, --train_id after a run without it would keep label ids.
    out = tmp_path / "cityscapes_trainIdLabel"
    assert convert.main(["mapillary", str(mapillary_root), str(out)]) == 0
    capsys.readouterr()
    assert convert.main(["mapillary", str(mapillary_root), str(out), "--train_id"]) == 2
    err = capsys.readouterr().err
    assert "holds labels converted without --train_id (label ids), this run writes train ids" in err
    assert "--overwrite" in err and err.count("\n") == 1
    assert convert.main(["mapillary", str(mapillary_root), str(out), "--train_id", "--overwrite"]) == 0
    np.testing.assert_array_equal(_read(out / "train/label/t0.png"),
                                  np.array([t for _, t, _ in _MAPILLARY]).reshape(3, 4))
    assert convert.main(["mapillary", str(mapillary_root), str(out), "--train_id"]) == 0  # same ids: resumes
    assert "converted 0, skipped 2" in capsys.readouterr().out


def test_mapillary_rules_on_the_v12_names() -> None:
    groups = {
        "road": ["Road", "Bike Lane", "Crosswalk - Plain", "Parking", "Service Lane", "Lane Marking - Crosswalk",
                 "Lane Marking - General"],
        "sidewalk": ["Sidewalk", "Curb", "Curb Cut", "Pedestrian Area"],
        "pole": ["Pole", "Utility Pole", "Street Light"],
        "traffic sign": ["Traffic Sign (Front)", "Traffic Sign (Back)", "Traffic Sign Frame"],
        "rider": ["Bicyclist", "Motorcyclist", "Other Rider"],
        "train": ["On Rails"],
        "motorcycle": ["Motorcycle"],
        None: ["Bird", "Rail Track", "Guard Rail", "Pothole", "Bike Rack", "Caravan", "Trailer", "Ego Vehicle",
               "Unlabeled"],
    }
    for cls, names in groups.items():
        for name in names:
            assert mapillary_class(name) == cls, name


def test_mapillary_index_beyond_the_config_names_the_file(mapillary_root: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    bad = mapillary_root / "training/v1.2/labels/t1.png"
    _palette_png(bad, np.full((2, 2), 40))
    assert convert.main(["mapillary", str(mapillary_root), str(tmp_path / "o"), "--train_id"]) == 2
    assert f"{bad}: label index 40 is beyond the 12 labels" in capsys.readouterr().err


def test_mapillary_missing_config_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config_v1.2.json: Mapillary config file not found"):
        mapillary_lut(tmp_path / "config_v1.2.json")


def test_mapillary_resize_halves_images_bicubic_and_labels_nearest(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "img/a.jpg")
    blocks = rng.integers(0, 19, (6, 10)).astype(np.uint8)
    label = blocks.repeat(2, 0).repeat(2, 1)
    _palette_png(tmp_path / "lbl/a.png", label)
    args = ["mapillary-resize", *(str(tmp_path / d) for d in ("img", "lbl", "half/val_img", "half/val_label"))]
    assert convert.main(args) == 0
    assert Image.open(tmp_path / "half/val_img/a.jpg").size == (10, 6)
    assert Image.open(tmp_path / "half/val_img/a.jpg").format == "JPEG"
    np.testing.assert_array_equal(_read(tmp_path / "half/val_label/a.png"), blocks)


def test_mapillary_resize_missing_label_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img/b.jpg")
    (tmp_path / "lbl").mkdir()
    args = ["mapillary-resize", *(str(tmp_path / d) for d in ("img", "lbl", "o1", "o2"))]
    assert convert.main(args) == 2
    assert f"{tmp_path / 'lbl/b.png'}: label file not found" in capsys.readouterr().err


def test_gta_with_worker_processes_matches_one_process(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 35, (6, 8))
    for i in range(3):
        _palette_png(tmp_path / f"labels/{i:05d}.png", ids + i)
    assert convert.main(["gta", str(tmp_path), "--nproc", "2"]) == 0
    to_train = np.vectorize(lambda v: LABEL_ID_TO_TRAIN_ID.get(int(v), 255))
    for i in range(3):
        np.testing.assert_array_equal(_read(tmp_path / f"labels/{i:05d}_labelTrainIds.png"), to_train(ids + i))


def test_every_argument_has_help() -> None:
    parser = convert.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"gta", "cityscapes", "mapillary", "mapillary-resize"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name}: {action.dest} has no help"

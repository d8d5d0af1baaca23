"""The embedded synthetic scenes: layout, label validity, determinism, overwrite protection, reuse."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qd_core.data import cityscapes_dataset
from qd_core.data.corruptions import TARGET_DOMAINS, apply_domain
from qd_core.data.labels import IGNORE_INDEX, NUM_CLASSES
from qd_core.data.scenes import draw_scene
from qd_core.data import synthetic
from qd_core.data.synthetic import ensure_synthetic, generate_synthetic, image_path, label_path

SMALL = dict(seed=3, num_train=3, num_val=2, size=(48, 80), progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "data", **SMALL)


def test_same_seed_writes_identical_bytes(tree: Path, tmp_path: Path) -> None:
    again = generate_synthetic(tmp_path / "again", **SMALL)
    assert _hashes(again) == _hashes(tree)


def test_another_seed_draws_other_scenes(tree: Path, tmp_path: Path) -> None:
    other = generate_synthetic(tmp_path / "other", **{**SMALL, "seed": 4})
    rel = image_path(Path(""), "source", "train", 0)
    assert (other / rel).read_bytes() != (tree / rel).read_bytes()


def test_every_domain_and_split_is_written(tree: Path) -> None:
    for i in range(SMALL["num_train"]):
        assert image_path(tree, "source", "train", i).is_file() and label_path(tree, "source", "train", i).is_file()
    for domain in ("source", *TARGET_DOMAINS):
        images = sorted((tree / domain / "leftImg8bit" / "val" / "synth").glob("*_leftImg8bit.png"))
        labels = sorted((tree / domain / "gtFine" / "val" / "synth").glob("*_gtFine_labelTrainIds.png"))
        assert len(images) == len(labels) == SMALL["num_val"], domain
    assert not (tree / "fog" / "leftImg8bit" / "train").exists()  # target domains are validation-only


def test_manifest_records_the_settings(tree: Path) -> None:
    manifest = json.loads((tree / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["size"] == [48, 80]
    assert manifest["num_train"] == 3 and manifest["num_val"] == 2
    assert manifest["target_domains"] == list(TARGET_DOMAINS)
    assert manifest["domains"]["source"] == {"train": 3, "val": 2}
    assert manifest["version"] == synthetic.GENERATOR_VERSION


def test_labels_are_train_ids_and_match_their_image_size(tree: Path) -> None:
    for label_file in tree.rglob("*_gtFine_labelTrainIds.png"):
        label = np.asarray(Image.open(label_file))
        image_file = Path(str(label_file).replace("gtFine", "leftImg8bit", 1).replace(
            "_gtFine_labelTrainIds.png", "_leftImg8bit.png"))
        image = Image.open(image_file)
        assert label.ndim == 2 and image.mode == "RGB" and image.size == (label.shape[1], label.shape[0])
        assert np.isin(label, [*range(NUM_CLASSES), IGNORE_INDEX]).all(), label_file


def test_target_domains_show_the_source_val_scenes_shifted(tree: Path) -> None:
    src_label = label_path(tree, "source", "val", 1).read_bytes()
    src_image = np.asarray(Image.open(image_path(tree, "source", "val", 1)), dtype=np.int16)
    for domain in TARGET_DOMAINS:
        assert label_path(tree, domain, "val", 1).read_bytes() == src_label, domain
        shifted = np.asarray(Image.open(image_path(tree, domain, "val", 1)), dtype=np.int16)
        assert np.abs(shifted - src_image).mean() > 5, domain  # a visible appearance change, not a copy


def test_the_cityscapes_reader_reads_the_tree(tree: Path) -> None:
    sample = cityscapes_dataset(tree / "night", "val")[0]
    assert sample["image"].shape == (48, 80, 3) and sample["label"].shape == (48, 80)


def test_scenes_cover_all_19_classes() -> None:
    seen = np.zeros(256, dtype=bool)
    for i in range(60):
        _, label = draw_scene(96, 192, np.random.default_rng([11, i]))
        seen[np.unique(label)] = True
    assert seen[:NUM_CLASSES].all(), np.flatnonzero(~seen[:NUM_CLASSES])


def test_frost_uses_the_images_shipped_with_the_library() -> None:
    image = np.full((40, 56, 3), 90, dtype=np.uint8)
    out = apply_domain("frost", image, np.random.default_rng(0))
    # A flat grey input only gains texture from the packaged frost photographs.
    assert out.shape == image.shape and out.dtype == np.uint8 and out.std() > 3


def test_library_shifts_leave_numpy_global_state_alone() -> None:
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    apply_domain("fog", np.full((40, 40, 3), 128, dtype=np.uint8), np.random.default_rng(1))
    assert np.random.random() == expected


def test_unknown_domain_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown target domain 'hail'"):
        apply_domain("hail", np.zeros((40, 40, 3), dtype=np.uint8), np.random.default_rng(0))


def test_refuses_to_overwrite_without_the_flag(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_synthetic(out, **SMALL)
    assert (out / "keep.txt").read_text() == "user data"
    generate_synthetic(out, **SMALL, overwrite=True)
    assert not (out / "keep.txt").exists() and _hashes(out) == _hashes(tree)


def test_cli_writes_the_tree_and_refuses_a_second_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--out", str(tmp_path / "cli"), "--seed", "1", "--num-train", "1", "--num-val", "1", "--size", "40", "48",
            "--no-progress"]
    assert synthetic.main(args) == 0
    assert image_path(tmp_path / "cli", "art", "val", 0).is_file()
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(args)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_too_small_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size must be"):
        generate_synthetic(tmp_path / "x", **{**SMALL, "size": (16, 80)})


def test_ensure_reuses_a_matching_folder(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("regenerated a folder whose manifest matches")

    monkeypatch.setattr(synthetic, "generate_synthetic", fail)
    assert ensure_synthetic(tree, **SMALL) == tree


def test_ensure_generates_once(tmp_path: Path) -> None:
    root = ensure_synthetic(tmp_path / "cache", **SMALL)
    assert (root / "manifest.json").is_file()


def test_ensure_rejects_a_folder_made_with_other_settings(tree: Path) -> None:
    with pytest.raises(ValueError, match="seed=3"):
        ensure_synthetic(tree, **{**SMALL, "seed": 9})


def test_ensure_redraws_scenes_of_an_older_generator_version(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = ensure_synthetic(tmp_path / "old", **SMALL)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": synthetic.GENERATOR_VERSION - 1}))
    (root / "stale.txt").write_text("from the old version")
    assert ensure_synthetic(root, **SMALL) == root
    assert json.loads((root / "manifest.json").read_text())["version"] == synthetic.GENERATOR_VERSION
    assert not (root / "stale.txt").exists() and "drawing version" in capsys.readouterr().err

"""``python -m train.evaluate`` and ``python -m train.visualize`` on a saved student."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qd_core.checkpoint import save_student
from qd_core.config import DatasetSpec, load_config
from qd_core.data import TARGET_DOMAINS, ensure_synthetic
from qd_core.metrics import ConfusionMatrix
from train.data import build_dataset, eval_transform
from train.evaluate import evaluate, main as evaluate_main, miou_table
from train.visualize import main as visualize_main


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=2, num_val=2, size=[64, 128], progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    cfg = load_config("tiny", [f"data.synthetic.root={data_root}", "data.num_workers=0"])
    torch.manual_seed(0)
    from qd_core.model import build_student

    return save_student(build_student(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "student")


def test_evaluate_prints_per_class_and_per_dataset_tables(checkpoint: Path, data_root: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", f"synthetic:{data_root}", "--mode", "whole",
                          "--device", "cpu", "--num-workers", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "synthetic/source (2 images)" in out and "road" in out and "bicycle" in out
    for domain in TARGET_DOMAINS:
        assert f"synthetic/{domain}" in out
    assert "mean over targets" in out
    # The checkpoint was trained on this folder's source domain (its config names the folder as the synthetic
    # root, its training spec has none): a source, so not in the target mean.
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("synthetic/")}
    assert rows["synthetic/source"][-1] == "source" and rows["synthetic/fog"][-1] == "target", rows


def test_evaluate_scores_at_the_label_resolution_like_a_direct_computation(checkpoint: Path,
                                                                           data_root: Path) -> None:
    from qd_core.checkpoint import load_student

    model, cfg = load_student(checkpoint)
    spec = DatasetSpec(kind="synthetic", root=str(data_root), domain="fog", test_size=[64, 32])
    (score,) = evaluate(model, [spec], cfg, mode="whole")
    expected = ConfusionMatrix(19)
    for sample in build_dataset(spec, cfg, eval_transform(spec, cfg)):
        assert tuple(sample["image"].shape[-2:]) == (32, 64)  # the test-time box (64, 32)
        logits = model.predict_logits(sample["image"][None], "whole")
        up = torch.nn.functional.interpolate(logits, size=sample["label"].shape, mode="bilinear",
                                             align_corners=False)
        expected.update(up.argmax(1)[0], sample["label"])
    assert torch.equal(score.matrix.matrix, expected.matrix)
    assert score.target and score.images == 2


def test_show_dir_writes_colour_predictions_and_overlays(checkpoint: Path, data_root: Path,
                                                         tmp_path: Path) -> None:
    show = tmp_path / "show"
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", f"synthetic/night:{data_root}", "--mode", "whole",
                          "--show-dir", str(show), "--num-workers", "0"])
    assert code == 0
    files = sorted(p.name for p in (show / "synthetic_night").iterdir())
    assert len(files) == 4 and sum(f.endswith("_pred.png") for f in files) == 2
    pred = np.asarray(Image.open(show / "synthetic_night" / files[-1]))
    assert pred.shape == (64, 128, 3)
    assert evaluate_main(["--checkpoint", str(checkpoint), "--data", f"synthetic/night:{data_root}",
                          "--show-dir", str(show)]) == 2  # not empty any more: needs --overwrite


def _acdc_test_split(data_root: Path, root: Path) -> list[Path]:
    """An ACDC-layout test split (fog, no gt folder at all) made of the synthetic val images; returns the images."""
    images = []
    for i, src in enumerate(sorted((data_root / "fog" / "leftImg8bit" / "val").rglob("*.png"))):
        dst = root / "rgb_anon" / "fog" / "test" / "GOPR0475" / f"GOPR0475_frame_{i:06d}_rgb_anon.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        images.append(dst)
    return images


def test_format_only_writes_label_id_pngs_and_a_zip_for_a_test_split_without_labels(
        checkpoint: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from qd_core.data.labels import LABEL_ID_TO_TRAIN_ID

    images = _acdc_test_split(data_root, tmp_path / "acdc")
    out = tmp_path / "submit"
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", f"acdc/fog:{tmp_path / 'acdc'}:test",
                          "--mode", "whole", "--format-only", str(out), "--num-workers", "0"])
    assert code == 0 and "wrote 2 predictions (Cityscapes label ids)" in capsys.readouterr().out
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(f"{p.stem}.png" for p in images)
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == names
        assert all(zf.read(n) == (out / n).read_bytes() for n in names)
    assert set(np.unique(np.asarray(Image.open(out / names[0])))) <= set(LABEL_ID_TO_TRAIN_ID)  # label ids
    # Train ids on request; a scored evaluation of the same split still needs its labels.
    assert evaluate_main(["--checkpoint", str(checkpoint), "--data", f"acdc/fog:{tmp_path / 'acdc'}:test",
                          "--mode", "whole", "--format-only", str(out), "--format-ids", "train", "--overwrite"]) == 0
    train_ids = np.asarray(Image.open(out / names[0]))
    assert train_ids.max() < 19 and set(np.unique(train_ids)) <= set(LABEL_ID_TO_TRAIN_ID.values())
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(checkpoint), "--data", f"acdc/fog:{tmp_path / 'acdc'}:test"]) == 2
    assert "label file not found" in capsys.readouterr().err


class _IntensityClasses(torch.nn.Module):
    """A stand-in student whose class map follows the image: logit_k = -(red - t_k)² for 19 thresholds t_k, so
    the written predictions hold many classes (a random-weight student predicts one class everywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("t", torch.linspace(-2.0, 2.0, 19).view(1, 19, 1, 1))
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def predict_logits(self, images: torch.Tensor, mode: str | None) -> torch.Tensor:
        return -(images[:, :1] - self.t) ** 2


def test_format_predictions_are_the_argmax_at_image_resolution_in_label_ids(data_root: Path, tmp_path: Path) -> None:
    from qd_core.data.labels import LABEL_ID_TO_TRAIN_ID
    from train.evaluate import format_predictions

    _acdc_test_split(data_root, tmp_path / "acdc")
    cfg = load_config("tiny")
    spec = DatasetSpec(kind="acdc", root=str(tmp_path / "acdc"), split="test", domain="fog", test_size=[96, 48])
    model = _IntensityClasses()
    assert format_predictions(model, [spec], cfg, tmp_path / "out", ids="label") == 2
    to_label = np.zeros(256, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        to_label[train_id] = label_id
    classes = set()
    for sample in build_dataset(spec, cfg, eval_transform(spec, cfg), labels=False):
        assert tuple(sample["image"].shape[-2:]) == (48, 96)  # the test box, then back to the image's 64 × 128
        up = torch.nn.functional.interpolate(model.predict_logits(sample["image"][None], None), size=(64, 128),
                                             mode="bilinear", align_corners=False)
        expected = to_label[up.argmax(1)[0].numpy()]
        written = np.asarray(Image.open(tmp_path / "out" / f"{Path(sample['path']).stem}.png"))
        assert written.dtype == np.uint8 and np.array_equal(written, expected)
        classes |= set(np.unique(written).tolist())
    assert len(classes) >= 5


def test_format_only_refuses_clashing_file_names_and_a_used_folder(checkpoint: Path, data_root: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "submit"
    # The synthetic domains share their file names: two predictions would land on one file.
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", f"synthetic/fog:{data_root}", "--data",
                          f"synthetic/snow:{data_root}", "--format-only", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "would overwrite" in err[0] and "snow" in err[0]
    assert list(out.iterdir()) == []  # refused before anything was predicted
    (out / "old.png").write_bytes(b"x")
    assert evaluate_main(["--checkpoint", str(checkpoint), "--data", f"synthetic/fog:{data_root}",
                          "--format-only", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_evaluate_reports_a_missing_dataset_in_one_line(checkpoint: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", f"cityscapes:{tmp_path / 'nothing'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing" in err[0]


def test_evaluate_reports_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = evaluate_main(["--checkpoint", str(tmp_path / "none.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "none" in err[0]


def test_visualize_writes_outputs_at_each_image_size(checkpoint: Path, data_root: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    source = sorted((data_root / "source" / "leftImg8bit" / "val").rglob("*.png"))
    shutil.copy(source[0], images / "a.png")
    Image.open(source[1]).resize((96, 48)).save(images / "sub" / "b.jpg")
    out = tmp_path / "vis"
    assert visualize_main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
                           "--mode", "whole"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_overlay.png", "a_pred.png", "sub__b_overlay.png",
                                                     "sub__b_pred.png"]
    assert np.asarray(Image.open(out / "sub__b_pred.png")).shape == (48, 96, 3)
    assert np.asarray(Image.open(out / "a_overlay.png")).shape == (64, 128, 3)


def test_visualize_shows_a_progress_bar_unless_told_not_to(checkpoint: Path, data_root: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted((data_root / "source" / "leftImg8bit" / "val").rglob("*.png"))[0], images / "a.png")
    argv = ["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "vis"), "--mode",
            "whole", "--overwrite"]
    capsys.readouterr()
    assert visualize_main(argv) == 0
    assert "visualize" in capsys.readouterr().err  # the bar's description
    assert visualize_main(argv + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_visualize_never_reads_its_own_outputs_inside_the_image_folder(checkpoint: Path, data_root: Path,
                                                                      tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((data_root / "source" / "leftImg8bit" / "val").rglob("*.png"))
    shutil.copy(source[0], images / "a.png")
    out = images / "vis"
    argv = ["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out), "--mode", "whole"]
    assert visualize_main(argv) == 0
    assert visualize_main(argv + ["--overwrite"]) == 0  # the first run's pictures are not taken for photos
    assert sorted(p.name for p in out.iterdir()) == ["a_overlay.png", "a_pred.png"]


def test_visualize_refuses_two_images_that_would_write_the_same_pictures(checkpoint: Path, data_root: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    source = sorted((data_root / "source" / "leftImg8bit" / "val").rglob("*.png"))
    shutil.copy(source[0], images / "a" / "b.png")
    shutil.copy(source[1], images / "a__b.png")
    code = visualize_main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "vis")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"'{images / 'a' / 'b.png'}' and '{images / 'a__b.png'}' would both write a__b_pred.png" in err
    assert not (tmp_path / "vis").exists()


def test_visualize_reports_an_empty_folder(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    code = visualize_main(["--checkpoint", str(checkpoint), "--images", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "vis")])
    assert code == 2 and "no files" in capsys.readouterr().err


def test_train_ids_map_back_to_the_cityscapes_label_ids() -> None:
    from qd_core.data.labels import label_id_lut, train_id_to_label_id_lut

    to_label, to_train = train_id_to_label_id_lut(), label_id_lut()
    assert np.array_equal(to_train[to_label[np.arange(19)]], np.arange(19))
    assert to_label[255] == 0 and to_label[19] == 0


def test_miou_table_marks_targets_and_averages_them() -> None:
    from train.evaluate import DatasetScore

    def score(name: str, correct: bool, target: bool) -> DatasetScore:
        m = ConfusionMatrix(2)
        m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]) if correct else torch.tensor([[1, 0]]))
        return DatasetScore(name, m, target, 1)

    table = miou_table([score("src", True, False), score("a", True, True), score("b", False, True)])
    lines = table.splitlines()
    assert lines[1].split() == ["src", "100.00", "source"]
    assert lines[-1].split()[-1] == "50.00"
    # A dataset with no labelled pixel is named, not averaged in silently.
    empty = DatasetScore("unlabelled", ConfusionMatrix(2), True, 3)
    lines = miou_table([score("a", True, True), empty]).splitlines()
    assert lines[2].split() == ["unlabelled", "n/a", "target"]
    assert lines[3].split()[-1] == "100.00"
    assert lines[4] == "n/a: no labelled pixel was scored in unlabelled (left out of the means)"


def test_an_unlabelled_folder_is_refused_for_scoring(checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "photos").mkdir()
    code = evaluate_main(["--checkpoint", str(checkpoint), "--data", f"folder:{tmp_path / 'photos'}",
                          "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has no labels to score" in err and "--format-only" in err


def test_figure_shows_input_truth_and_the_prediction_per_domain(checkpoint: Path, data_root: Path,
                                                                tmp_path: Path) -> None:
    from qd_core.checkpoint import load_student
    from qd_core.visualize import colorize
    from train import figure
    from train.evaluate import predict_dataset

    out = tmp_path / "fig.png"
    assert figure.main(["--checkpoint", str(checkpoint), "--out", str(out), "--index", "1", "--domains", "source",
                        "night", "--device", "cpu"]) == 0
    picture = np.asarray(Image.open(out).convert("RGB"))
    row_h = figure.TEXT_H + 4 + 64 + figure.GAP  # caption, the 64x128 panels, gap
    assert picture.shape[1] == 3 * 128 + 2 * figure.GAP
    assert picture.shape[0] == 2 * row_h + figure.legend(picture.shape[1]).shape[0]
    model, cfg = load_student(checkpoint)
    spec = figure.domain_spec(cfg, "night", str(data_root))
    pred = next(predict_dataset(model, build_dataset(spec, cfg, eval_transform(spec, cfg)), device=torch.device("cpu"),
                                mode=None, indices=[1]))
    top = row_h + figure.TEXT_H + 4  # the night row's panels
    assert np.array_equal(picture[top:top + 64, :128], np.asarray(Image.open(pred.image_path).convert("RGB")))
    assert np.array_equal(picture[top:top + 64, 128 + figure.GAP:256 + figure.GAP], colorize(pred.label))
    assert np.array_equal(picture[top:top + 64, 256 + 2 * figure.GAP:], colorize(pred.pred))


def test_figure_names_a_scene_index_out_of_range(checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    from train import figure

    assert figure.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "f.png"), "--index", "5",
                        "--device", "cpu"]) == 2
    assert "--index 5: synthetic/source" in capsys.readouterr().err and not (tmp_path / "f.png").exists()


def test_figure_refuses_an_out_that_is_a_directory_before_predicting(checkpoint: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from train import figure

    def no_loading(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr("qd_core.checkpoint.load_student", no_loading)
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert figure.main(["--checkpoint", str(checkpoint), "--out", str(folder), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out '{folder}': is a directory; expected the path of the PNG file to write\n"
    assert sorted(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())  # no .pictures.tmp beside it


def test_figure_write_leaves_no_temp_file_when_the_rename_fails(tmp_path: Path) -> None:
    from train import figure

    (tmp_path / "fig.png").mkdir()  # appears after the up-front check: the final rename onto it fails
    with pytest.raises(ValueError, match="--out .*fig.png.*: cannot write the picture"):
        figure.write_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "fig.png")
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


def test_figure_names_the_valid_domains(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from train import figure

    assert figure.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "f.png"), "--domains", "source",
                        "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --domains nope: no such synthetic domain; expected some of source ")
    assert all(domain in err for domain in TARGET_DOMAINS) and err.count("\n") == 1
    assert not (tmp_path / "f.png").exists()


def test_visualize_skips_an_unreadable_image_and_writes_the_others(checkpoint: Path, data_root: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((data_root / "source" / "leftImg8bit" / "val").rglob("*.png"))
    shutil.copy(source[0], images / "a.png")
    (images / "b.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "vis"
    assert visualize_main(["--checkpoint", str(checkpoint), "--images", str(images), "--out", str(out),
                           "--mode", "whole"]) == 1
    captured = capsys.readouterr()
    assert "skipped:" in captured.err and "b.png" in captured.err
    assert "1 unreadable image(s) skipped" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["a_overlay.png", "a_pred.png"]

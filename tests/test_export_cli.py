"""``python -m export`` on bad input: each case ends in one ``error:`` line naming the problem, exit code 2."""
from __future__ import annotations

import json

import pytest
import torch

from export import cli
from qd_core import build_student, load_config
from qd_core.checkpoint import save_student


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config("tiny")
    return save_student(build_student(cfg), cfg, tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_every_flag_has_help_text():
    parser = cli.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"checkpoint", "config", "out", "fp16", "opset", "batch", "height", "width",
                                         "msda", "engine", "overwrite", "random_init", "data"}
    assert all(a.help and len(a.help) > 10 for a in options)


def test_without_a_checkpoint_and_no_runs_it_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["--out", tmp_path / "out"], capsys)
    assert code == 2
    assert_one_error_line(err, "runs/*/best.safetensors", "python -m train")
    assert not (tmp_path / "out").exists()


def test_newest_best_checkpoint_is_preferred_over_last(tmp_path, monkeypatch):
    import os

    monkeypatch.chdir(tmp_path)
    for run, name, mtime in (("a", "best", 100), ("b", "best", 200), ("c", "last", 300)):
        path = tmp_path / "runs" / run / f"{name}.safetensors"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    assert cli.find_latest_checkpoint() == cli.RUNS_DIR / "b" / "best.safetensors"
    for p in (tmp_path / "runs").glob("*/best.safetensors"):
        p.unlink()
    assert cli.find_latest_checkpoint() == cli.RUNS_DIR / "c" / "last.safetensors"


def test_checkpoint_from_another_config_names_the_differing_keys(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--config", "vits16_256", "--out", tmp_path / "o"],
                           capsys)
    assert code == 2
    assert_one_error_line(err, str(tiny_checkpoint), "different model", "model.backbone.embed_dim")


def test_weights_that_do_not_fit_their_config_list_the_mismatch(tiny_checkpoint, tmp_path, capsys):
    # The same weights with a config claiming a deeper backbone: the strict key check must name what is missing.
    weights = tmp_path / "deeper.safetensors"
    weights.write_bytes(tiny_checkpoint.read_bytes())
    meta = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    meta["config"]["model"]["backbone"]["depth"] = 6
    weights.with_suffix(".json").write_text(json.dumps(meta))
    code, _, err = run_cli(["--checkpoint", weights, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_error_line(err, "do not fit the model", "missing key")


def test_existing_output_is_not_overwritten_without_the_flag(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"keep me")
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", out], capsys)
    assert code == 2
    assert_one_error_line(err, str(out), "--overwrite")
    assert (out / "model.onnx").read_bytes() == b"keep me"


def test_unwritable_output_folder_is_one_clear_message(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", blocker / "out"], capsys)
    assert code == 2
    assert_one_error_line(err, str(blocker / "out"), "not writable")


def test_output_path_that_is_a_file_is_refused(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("")
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", target], capsys)
    assert code == 2
    assert_one_error_line(err, "is not a folder")


@pytest.mark.parametrize("batch", ["4:2:8", "0:1:1", "1:x:2", "1:2"])
def test_bad_batch_range_is_refused_by_the_parser(batch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--random-init", "--config", "tiny", "--out", str(tmp_path), "--batch", batch])
    assert exit_info.value.code == 2
    assert "MIN:OPT:MAX" in capsys.readouterr().err


def test_random_init_needs_a_config(tmp_path, capsys):
    code, _, err = run_cli(["--random-init", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_error_line(err, "--random-init needs --config")


def test_size_that_is_not_a_multiple_of_32_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["--random-init", "--config", "tiny", "--height", "100", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_error_line(err, "--height 100", "multiple of 32")


def test_evaluation_folder_in_an_unknown_layout_is_refused_before_exporting(tmp_path, capsys):
    data = tmp_path / "photos"
    data.mkdir()
    code, _, err = run_cli(["--random-init", "--config", "tiny", "--data", data, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_error_line(err, str(data), "manifest.json", "leftImg8bit/val")
    assert not (tmp_path / "o" / "model.onnx").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_before_exporting(tmp_path, capsys):
    code, _, err = run_cli(["--random-init", "--config", "tiny", "--height", "64", "--width", "64", "--device", "cuda",
                            "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_error_line(err, "--device cuda", "no CUDA device", "--device cpu")
    assert not (tmp_path / "o").exists()


def test_nan_logits_are_an_infinite_error_not_zero():
    # Python's max() drops NaN (nan > x is False): a broken fp16 graph's NaN logits once read as error 0.
    from export.report import EvalSample, evaluate_parity

    class Reference:
        def run(self, images):
            logits = torch.zeros(len(images), 19, 2, 2)
            logits[:, 0] = 1.0
            return logits, torch.zeros(len(images), 4, 4, dtype=torch.int64)

    class Broken(Reference):
        def __init__(self, bad_batch):
            self.calls, self.bad_batch = 0, bad_batch

        def run(self, images):
            logits, labels = super().run(images)
            self.calls += 1
            return (logits.fill_(float("nan")) if self.calls == self.bad_batch else logits), labels

    samples = [EvalSample(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.int64), "source", f"{i}.png")
               for i in range(3)]
    # Call 1 is each backend's untimed warm-up; calls 2..4 are the three scored batches.
    result = evaluate_parity(Reference(), {"first": Broken(2), "last": Broken(4), "fine": Broken(0)}, samples)
    errors = {name: a["max_abs_logit_error"] for name, a in result["artifacts"].items()}
    assert errors == {"first": float("inf"), "last": float("inf"), "fine": 0.0}
    relative = {name: a["logit_rel_error"] for name, a in result["artifacts"].items()}
    assert relative == {"first": float("inf"), "last": float("inf"), "fine": 0.0}


def test_an_artifact_that_strays_from_pytorch_fails_the_export_after_its_report(tiny_checkpoint, tmp_path, capsys,
                                                                                monkeypatch):
    """The parity numbers are judged, not only recorded: ONNX Runtime giving another image's logits (labels
    unchanged, as a random student's are) must fail the command, with the report still written."""
    from export.runtime import OrtSegmenter
    from qd_core.data import ensure_synthetic

    data = ensure_synthetic(tmp_path / "synthetic", num_train=1, num_val=1, size=(128, 256), progress=False)
    run = OrtSegmenter.run

    def other_images_logits(self, images):
        logits, labels = run(self, images)
        return logits.roll(1, dims=0) * 1.5, labels

    monkeypatch.setattr(OrtSegmenter, "run", other_images_logits)
    out = tmp_path / "out"
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", out, "--data", data, "--max-images", "1",
                            "--batch", "1:2:2"], capsys)
    assert code == 1
    assert_one_error_line(err, "parity against the PyTorch fp32 reference failed for onnx_fp32",
                          "logit relative error", "exceeds the fp32 tolerance 1e-04", "report.json")
    report = json.loads((out / "report.json").read_text())
    parity = next(a for a in report["artifacts"] if a["name"] == "onnx_fp32")["parity"]
    assert parity["passed"] is False and parity["logit_rel_error"] > 1e-4


def test_a_corrupt_parity_image_stops_the_export_before_anything_is_written(tiny_checkpoint, tmp_path, capsys):
    import shutil

    from qd_core.data import ensure_synthetic

    data = tmp_path / "synthetic"
    shutil.copytree(ensure_synthetic(tmp_path / "made", num_train=1, num_val=1, size=(128, 256), progress=False),
                    data)
    broken = next((data / "fog").rglob("*_leftImg8bit.png"))
    broken.write_bytes(b"not a png")
    out = tmp_path / "out"
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", out, "--data", data, "--max-images", "1"],
                           capsys)
    assert code == 2
    assert_one_error_line(err, broken.name)
    assert not out.exists() or not any(out.iterdir())


def test_overwrite_removes_what_an_earlier_export_left(tiny_checkpoint, tmp_path, capsys):
    """An fp16 ONNX of an earlier run must not stay beside a report that does not list it."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model_fp16.onnx", "model_fp16.onnx.data", "model_fp16.engine", "report.json", "student.pt2"):
        (out / name).write_bytes(b"earlier run")
    (out / "timing.cache").write_bytes(b"kernel timings")
    (out / "notes.txt").write_text("the user's")
    code, _, err = run_cli(["--checkpoint", tiny_checkpoint, "--out", out, "--max-images", "0", "--overwrite"],
                           capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt", "report.json", "timing.cache"]
    assert json.loads((out / "report.json").read_text())["artifacts"][0]["name"] == "onnx_fp32"

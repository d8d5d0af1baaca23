"""How a run ends when something goes wrong: signals, a non-finite loss, bad data, a reused run folder."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train.trainer as trainer_module
from qd_core.checkpoint import load_student, read_student_meta
from qd_core.config import Config, load_config
from qd_core.data import ensure_synthetic
from train.checkpointing import RunFiles, load_training_state
from train.logger import read_metrics
from train.run import main, run_training
from train.trainer import NonFiniteLossError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=8, num_val=1, size=[64, 128], progress=False)


def overrides(data_root: Path, *extra: str) -> list[str]:
    return [f"data.synthetic.root={data_root}", "data.synthetic.num_train=8", "data.synthetic.num_val=1",
            "data.synthetic.size=[64,128]", "data.val=[{kind: synthetic, domain: source, test_size: [128, 64]}]",
            "data.crop_size=64", "data.num_workers=0", "teacher.enabled=false", "model.backbone.pretrain=false",
            "train.batch_size=2",
            "train.num_points=256", "train.log_interval=1", "train.eval_interval=1000",
            "train.checkpoint_interval=1000", *extra]


def tiny_config(data_root: Path, *extra: str) -> Config:
    return load_config("tiny", overrides(data_root, *extra))


def test_sigterm_saves_a_loadable_last_checkpoint_and_exits_143(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "train", "--out", str(out), "--no-progress",
                             *overrides(data_root, "train.iters=100000")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "training did not log two steps in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "stopped by signal" in output
    step = read_student_meta(out / "last.safetensors")["step"]
    assert step >= 2
    assert load_training_state(out / "train_state.pt")["step"] == step
    assert max(r["step"] for r in read_metrics(metrics)) == step
    model, _ = load_student(out / "last.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = trainer_module.segmentation_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            losses["loss_seg"] = losses["loss_seg"] * float("nan")
        return losses

    monkeypatch.setattr(trainer_module, "segmentation_loss", poisoned)
    files = RunFiles(tmp_path / "run")
    cfg = tiny_config(data_root, "train.iters=10", "train.checkpoint_interval=2")
    with pytest.raises(NonFiniteLossError) as info:
        run_training(cfg, files, progress=False)
    message = str(info.value)
    assert "step 3" in message and "loss_seg=nan" in message and "loss_cls=" in message and "\n" not in message
    assert read_student_meta(files.last)["step"] == 2
    assert load_training_state(files.state)["step"] == 2
    model, _ = load_student(files.last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_loss_is_one_error_line_with_exit_code_2(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    real = trainer_module.segmentation_loss

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        losses["loss_seg"] = losses["loss_seg"] * float("inf")
        return losses

    monkeypatch.setattr(trainer_module, "segmentation_loss", poisoned)
    code = main(["--out", str(tmp_path / "run"), "--no-progress", *overrides(data_root, "train.iters=3")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: non-finite loss at step 1:")


def test_unreadable_training_image_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = ensure_synthetic(tmp_path / "syn", num_train=8, num_val=1, size=[64, 128], progress=False)
    broken = sorted((root / "source" / "leftImg8bit" / "train").rglob("*.png"))[3]
    broken.write_bytes(b"\x89PNG but not really")
    # A DataLoader worker reads the file: its traceback must not reach the user.
    code = main(["--out", str(tmp_path / "run"), "--no-progress",
                 *overrides(root, "train.iters=20", "data.num_workers=1")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and broken.name in err[0]
    assert "Traceback" not in err[0]


def test_missing_dataset_folder_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   data_root: Path) -> None:
    code = main(["--out", str(tmp_path / "run"), "--no-progress",
                 *overrides(data_root, "data.train.kind=cityscapes", f"data.train.root={tmp_path / 'nowhere'}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nowhere" in err[0]


def test_non_empty_run_folder_needs_resume_or_overwrite(tmp_path: Path, data_root: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["--out", str(out), "--no-progress", *overrides(data_root, "train.iters=1")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--no-progress", "--overwrite", *overrides(data_root, "train.iters=1")]) == 0
    assert (out / "last.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_resume_without_a_run_is_an_error(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path / "none"), "--resume", *overrides(data_root)]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_refuses_model_changes(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    run_training(copy.deepcopy(tiny_config(data_root, "train.iters=2")), RunFiles(out), stop_at=1, progress=False)
    capsys.readouterr()
    for change in ("model.head.decoder_layers=2", "model.head.dim=32", "model.reins.lora_dim=4"):
        assert main(["--out", str(out), "--resume", "--no-progress", change]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["error: --resume: model.* overrides would change the model of the run; start a new run "
                       "instead"], change


def test_a_start_that_fails_leaves_nothing_that_blocks_the_corrected_command(
        tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    missing = tmp_path / "no_backbone.safetensors"
    assert main(["--out", str(out), "--no-progress",
                 *overrides(data_root, "train.iters=1", f"model.backbone.checkpoint={missing}")]) == 2
    assert missing.name in capsys.readouterr().err
    assert not (out / "config.yaml").exists()
    assert main(["--out", str(out), "--no-progress", *overrides(data_root, "train.iters=1")]) == 0


def test_a_run_stopped_before_its_first_checkpoint_says_to_start_over(
        tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("name: tiny\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    for extra in ([], ["--resume"]):
        assert main(["--out", str(out), "--no-progress", *extra, *overrides(data_root, "train.iters=1")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "before its first checkpoint" in err[0] and "--overwrite" in err[0]


def test_resume_overrides_become_the_runs_config_and_a_finished_run_is_not_logged_twice(
        tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    from qd_core.config import read_yaml

    out = tmp_path / "run"
    assert main(["--out", str(out), "--no-progress", "--stop-at", "1", *overrides(data_root, "train.iters=2")]) == 0
    assert "stopped at step 1 of 2 (--stop-at)" in capsys.readouterr().out
    assert main(["--out", str(out), "--resume", "--no-progress", "train.iters=3"]) == 0
    assert read_yaml(out / "config.yaml")["train"]["iters"] == 3
    assert "step 3/3" in capsys.readouterr().out
    for _ in range(2):  # a finished run resumed: scored again, shown, not logged again
        assert main(["--out", str(out), "--resume", "--no-progress"]) == 0
        assert "step 3/3" in capsys.readouterr().out
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval" in r]
    assert [r["step"] for r in evals] == [3]
    assert main(["--out", str(out), "--resume", "--no-progress", "train.iters=2"]) == 0
    assert "already at step 3, past train.iters=2: nothing trained" in capsys.readouterr().out

"""Exact resume: N steps straight equal N/2 steps, a stop, and a resume for the rest."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from qd_core.checkpoint import load_torch_file, read_student_meta
from qd_core.config import Config, load_config
from qd_core.data import ensure_synthetic
from train.checkpointing import RunFiles, load_training_state
from train.logger import read_metrics
from train.run import run_training
from train.trainer import LOGGED_TERMS


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=8, num_val=1, size=[64, 128], progress=False)


def tiny_config(data_root: Path, *extra: str) -> Config:
    return load_config("tiny", [
        f"data.synthetic.root={data_root}", "data.synthetic.num_train=8", "data.synthetic.num_val=1",
        "data.synthetic.size=[64,128]", "data.val=[{kind: synthetic, domain: source, test_size: [128, 64]}]",
        "data.crop_size=64", "data.num_workers=0", "teacher.enabled=false", "model.backbone.pretrain=false",
        "train.batch_size=2",
        "train.num_points=256", "train.lr=0.001", "train.log_interval=1", "train.eval_interval=1000",
        "train.checkpoint_interval=1000", *extra])


def training_losses(files: RunFiles) -> list[dict[str, float]]:
    return [{k: r[k] for k in ("step", *LOGGED_TERMS)} for r in read_metrics(files.metrics) if "loss" in r]


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_path: Path, data_root: Path) -> None:
    # grad_accum 2 over 4 micro-batches per epoch: the stop at step 3 falls in the middle of epoch 1.
    cfg = tiny_config(data_root, "train.iters=5", "train.grad_accum=2")
    straight, split = RunFiles(tmp_path / "straight"), RunFiles(tmp_path / "split")
    run_training(copy.deepcopy(cfg), straight, progress=False)
    first = run_training(copy.deepcopy(cfg), split, stop_at=3, progress=False)
    assert first.step == 3 and load_training_state(split.state)["step"] == 3
    resumed = run_training(copy.deepcopy(cfg), split, resume=True, progress=False)
    assert resumed.step == 5

    a, b = load_torch_file(straight.last), load_torch_file(split.last)
    assert a.keys() == b.keys()
    for key in a:
        # The same float32 operations in the same order on the CPU: the resumed run is bit-identical.
        assert torch.equal(a[key], b[key]), key
    assert training_losses(straight) == training_losses(split)
    assert [r["step"] for r in training_losses(split)] == [1, 2, 3, 4, 5]
    assert read_student_meta(split.last)["step"] == 5


@pytest.mark.parametrize("enabled", [False, True])
def test_cudnn_benchmark_follows_the_config(tmp_path: Path, data_root: Path, enabled: bool) -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = not enabled
        run_training(tiny_config(data_root, "train.iters=1", f"train.cudnn_benchmark={str(enabled).lower()}"),
                     RunFiles(tmp_path / "run"), progress=False)
        assert torch.backends.cudnn.benchmark is enabled
    finally:
        torch.backends.cudnn.benchmark = before


def test_resume_drops_metrics_logged_after_the_last_checkpoint(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_config(data_root, "train.iters=3")
    files = RunFiles(tmp_path / "run")
    run_training(copy.deepcopy(cfg), files, stop_at=2, progress=False)
    with open(files.metrics, "a") as f:  # as if the interrupted run had logged step 3 and died before saving
        f.write('{"step": 3, "loss": 123.0}\n{"step": 4, "lo')
    run_training(copy.deepcopy(cfg), files, resume=True, progress=False)
    steps = [r["step"] for r in read_metrics(files.metrics) if "loss" in r]
    assert steps == [1, 2, 3] and all(r["loss"] != 123.0 for r in read_metrics(files.metrics) if "loss" in r)


def test_resume_with_another_global_batch_is_refused(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_config(data_root, "train.iters=2")
    files = RunFiles(tmp_path / "run")
    run_training(copy.deepcopy(cfg), files, stop_at=1, progress=False)
    changed = tiny_config(data_root, "train.iters=2", "train.batch_size=4")
    with pytest.raises(ValueError, match="same global batch"):
        run_training(changed, files, resume=True, progress=False)


def test_rng_restore_sets_only_the_cuda_devices_this_process_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training state saved with 8 GPUs visible resumes where 4 are (another CUDA_VISIBLE_DEVICES, or fewer ranks
    at a larger batch): the first 4 devices get their states back, and the rest are not indexed at all."""
    from train.checkpointing import capture_rng, restore_rng

    state = capture_rng()
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("indexes every saved state"))
    restore_rng(state)
    assert restored == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_resume_applies_the_configs_optimizer_settings(tmp_path: Path, data_root: Path) -> None:
    # The optimizer's saved state carries the old group settings; overrides given on a resume (and written to
    # config.yaml) must be the ones it uses.
    from train.distributed import DistEnv
    from train.trainer import Trainer

    files = RunFiles(tmp_path / "run")
    run_training(tiny_config(data_root, "train.iters=3"), files, stop_at=1, progress=False)
    changed = tiny_config(data_root, "train.iters=3", "train.weight_decay=0.5", "train.betas=[0.5,0.9]",
                          "train.eps=0.1")
    trainer = Trainer(changed, files, DistEnv(), progress=False)
    trainer.load()
    assert trainer.step == 1
    decays = sorted({group["weight_decay"] for group in trainer.optimizer.param_groups})
    assert decays == [0.0, 0.5]  # the no-decay group stays at 0
    assert all(group["betas"] == (0.5, 0.9) and group["eps"] == 0.1 for group in trainer.optimizer.param_groups)
    assert trainer.optimizer.state  # the moments themselves are restored


def test_a_refused_resume_leaves_the_run_config_as_it_was(tmp_path: Path, data_root: Path) -> None:
    files = RunFiles(tmp_path / "run")
    run_training(tiny_config(data_root, "train.iters=3"), files, stop_at=1, progress=False)
    before = files.config.read_text()
    with pytest.raises(ValueError, match="the data order needs the same global batch"):
        run_training(tiny_config(data_root, "train.iters=3", "train.batch_size=4"), files, resume=True,
                     progress=False)
    assert files.config.read_text() == before  # a plain --resume still works
    assert run_training(tiny_config(data_root, "train.iters=3"), files, resume=True, progress=False).step == 3


def test_resume_may_turn_fp16_loss_scaling_on(tmp_path: Path, data_root: Path) -> None:
    files = RunFiles(tmp_path / "run")
    run_training(tiny_config(data_root, "train.iters=2"), files, stop_at=1, progress=False)  # no loss scaler
    result = run_training(tiny_config(data_root, "train.iters=2", "train.amp=fp16"), files, resume=True,
                          progress=False)
    assert result.step == 2 and load_training_state(files.state)["scaler"]  # a fresh scaler, now saved


def test_a_failed_evaluation_keeps_the_steps_trained_before_it(tmp_path: Path, data_root: Path) -> None:
    import shutil

    from train.data import DataError

    val = tmp_path / "val"
    shutil.copytree(data_root / "source", val)
    image = next((val / "leftImg8bit" / "val").rglob("*.png"))
    image.write_bytes(b"\x89PNG but not really")
    cfg = tiny_config(data_root, "train.iters=2", "train.eval_interval=2", "train.checkpoint_interval=2",
                      f"data.val=[{{kind: cityscapes, root: {val}, test_size: [128, 64]}}]")
    files = RunFiles(tmp_path / "run")
    with pytest.raises(DataError, match="unreadable image"):
        run_training(cfg, files, progress=False)
    assert load_training_state(files.state)["step"] == 2 and files.last.is_file()


def test_a_missing_validation_folder_fails_before_the_first_step(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_config(data_root, "train.iters=2",
                      f"data.val=[{{kind: cityscapes, root: {tmp_path / 'nowhere'}, test_size: [128, 64]}}]")
    files = RunFiles(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_training(cfg, files, progress=False)
    assert not files.metrics.exists() and not files.state.exists()


def test_resume_refuses_a_backbone_file_replaced_since_the_run_began(tmp_path: Path, data_root: Path) -> None:
    # The training state leaves the frozen DINOv2 weights out; the run continued on whatever file sat there.
    from qd_core.checkpoint import save_state_file
    from qd_core.model import build_student

    cfg = tiny_config(data_root, "train.iters=3")
    dino = tmp_path / "dino.safetensors"
    torch.manual_seed(0)
    save_state_file(build_student(cfg).backbone.state_dict(), dino)
    with_file = tiny_config(data_root, "train.iters=3", f"model.backbone.checkpoint={str(dino)!r}")
    files = RunFiles(tmp_path / "run")
    run_training(copy.deepcopy(with_file), files, stop_at=1, progress=False)
    torch.manual_seed(1)
    save_state_file(build_student(cfg).backbone.state_dict(), dino)  # same shapes, other weights
    with pytest.raises(ValueError, match="but the run was trained on a backbone with"):
        run_training(copy.deepcopy(with_file), files, resume=True, progress=False)

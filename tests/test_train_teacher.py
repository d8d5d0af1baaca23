"""Training with the diffusion guidance on (a random tiny diffusers teacher) and with it off (the Rein-style
baseline)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from qd_core.checkpoint import load_torch_file
from qd_core.config import Config, load_config
from qd_core.data import ensure_synthetic
from train.checkpointing import RunFiles, load_training_state
from train.logger import read_metrics
from train.run import run_training


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=8, num_val=1, size=[64, 128], progress=False)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained diffusers folder with the tiny teacher's architecture (VAE ×4, UNet with 4 up blocks)."""
    from safetensors.torch import save_file

    from train.teacher import CONTEXT_DIM, sd_scheduler, tiny_unet, tiny_vae

    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    tiny_vae(64).save_pretrained(folder / "vae")
    tiny_unet(16).save_pretrained(folder / "unet")
    sd_scheduler().save_pretrained(folder / "scheduler")
    save_file({"embedding": torch.randn(1, 2, CONTEXT_DIM)}, str(folder / "empty_prompt.safetensors"))
    return folder


def tiny_config(data_root: Path, *extra: str) -> Config:
    return load_config("tiny", [
        f"data.synthetic.root={data_root}", "data.synthetic.num_train=8", "data.synthetic.num_val=1",
        "data.synthetic.size=[64,128]", "data.val=[{kind: synthetic, domain: source, test_size: [128, 64]}]",
        "data.crop_size=64", "data.num_workers=0", "train.batch_size=2", "train.num_points=256",
        "train.lr=0.001", "train.log_interval=1", "train.eval_interval=1000", "train.checkpoint_interval=1000",
        "teacher.feature_size=8", "teacher.bottleneck_dim=16", "model.backbone.pretrain=false", *extra])


def losses(files: RunFiles) -> list[dict]:
    return [r for r in read_metrics(files.metrics) if "loss" in r]


def test_teacher_off_trains_the_baseline(tmp_path: Path, data_root: Path) -> None:
    files = RunFiles(tmp_path / "off")
    result = run_training(tiny_config(data_root, "teacher.enabled=false", "train.iters=2"), files, progress=False)
    assert result.step == 2 and result.scores and result.scores[0].name == "synthetic/source"
    records = losses(files)
    assert all(r["loss_dist"] == 0.0 and r["loss_sup"] == 0.0 and r["loss"] == r["loss_seg"] for r in records)
    assert load_training_state(files.state)["guidance"] is None


def test_noise_seeds_differ_by_step_micro_batch_and_rank_and_repeat_for_the_same_ones() -> None:
    from train.trainer import noise_seed

    seeds = {noise_seed(2024, step, micro, rank) for step in range(3) for micro in range(2) for rank in range(2)}
    assert len(seeds) == 12
    assert noise_seed(2024, 1, 0, 0) == noise_seed(2024, 1, 0, 0) != noise_seed(2025, 1, 0, 0)


def test_teacher_on_adds_both_guidance_losses_and_trains_the_aggregator(tmp_path: Path, data_root: Path,
                                                                        teacher_dir: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from qd_core.teacher import DiffusionTeacher

    seeds: list[int | None] = []
    reset = DiffusionTeacher.reset_noise
    monkeypatch.setattr(DiffusionTeacher, "reset_noise",
                        lambda self, seed=None: seeds.append(seed) or reset(self, seed))
    files = RunFiles(tmp_path / "on")
    run_training(tiny_config(data_root, f"teacher.path={teacher_dir}", "train.iters=2",
                             "train.grad_accum=2"), files, progress=False)
    # Fresh noise for every micro-batch of every step (METHOD §4.2), not one noise reused.
    assert len(seeds) == 4 and len(set(seeds)) == 4, seeds
    for r in losses(files):
        assert r["loss_dist"] > 0 and r["loss_sup"] > 0
        assert r["loss"] == pytest.approx(r["loss_seg"] + r["loss_dist"] + r["loss_sup"], rel=1e-6)
    state = load_training_state(files.state)
    assert any(k.startswith("aggregator.") for k in state["guidance"])
    assert not any(k.startswith(("vae.", "unet.", "teacher.")) for k in state["guidance"])  # frozen, not saved
    names = [n for g in state["optimizer"]["param_groups"] for n in g["names"]]
    guided = [i for g in state["optimizer"]["param_groups"] for n, i in zip(g["names"], g["params"])
              if n.startswith("guidance.")]
    assert "guidance.aggregator.mixing_logits" in names
    assert all(i in state["optimizer"]["state"] for i in guided)  # each received gradients and an Adam update
    # The student file stays the student: export and evaluation never see the guidance.
    assert not any(k.startswith("guidance.") for k in load_torch_file(files.last))


def test_teacher_on_resumes_exactly(tmp_path: Path, data_root: Path, teacher_dir: Path) -> None:
    cfg = tiny_config(data_root, f"teacher.path={teacher_dir}", "train.iters=3")
    straight, split = RunFiles(tmp_path / "straight"), RunFiles(tmp_path / "split")
    run_training(copy.deepcopy(cfg), straight, progress=False)
    run_training(copy.deepcopy(cfg), split, stop_at=1, progress=False)
    run_training(copy.deepcopy(cfg), split, resume=True, progress=False)
    # The teacher's noise is keyed by the step, so the resumed run draws the same noise: bit-identical.
    assert [r["loss"] for r in losses(straight)] == [r["loss"] for r in losses(split)]
    a, b = load_torch_file(straight.last), load_torch_file(split.last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ga, gb = load_training_state(straight.state)["guidance"], load_training_state(split.state)["guidance"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_missing_teacher_folder_is_a_clear_error(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(ValueError, match="teacher.path"):
        run_training(tiny_config(data_root, f"teacher.path={tmp_path / 'no-teacher'}", "train.iters=1"),
                     RunFiles(tmp_path / "run"), progress=False)

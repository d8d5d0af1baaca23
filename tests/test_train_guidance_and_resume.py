"""Diffusion guidance, the tiny teacher's DDPM training and the training state (atomic writes, RNG, resume of
step, best score, loss scale and learning-rate schedule), each checked against math written out here or values
documented in METHOD.md, never against numbers copied from the code's own output."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from qd_core.data import ensure_synthetic
from qd_core.guidance import GuidanceLoss
from train.checkpointing import (
    RunFiles,
    capture_rng,
    load_training_state,
    restore_rng,
    save_training_state,
)
from train.distributed import DistEnv
from train.run import run_training
from train.trainer import Trainer

# The resume tests' tiny run, and the tiny-teacher tests' single-thread setting (an autouse fixture).
from test_tiny_teacher import one_thread  # noqa: F401
from test_teacher import sd_alphas_cumprod
from test_train_resume import tiny_config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic(tmp_path_factory.mktemp("syn"), num_train=8, num_val=1, size=[64, 128], progress=False)


# ------------------------------------------------------------------------------------------------------------------
# Guidance loss: F_s is a stop-gradient target (METHOD §4.5: q = softmax_c(sg(F_s)))
# ------------------------------------------------------------------------------------------------------------------


def test_distribution_loss_sends_no_gradient_into_the_strong_features() -> None:
    torch.manual_seed(0)
    loss = GuidanceLoss(12)
    q = torch.randn(2, 5, 12, requires_grad=True)
    fw = torch.randn(2, 7, 12, requires_grad=True)
    fs = torch.randn(2, 7, 12, requires_grad=True)
    loss(q, fw, fs)["loss_dist"].backward()
    assert fs.grad is None or not fs.grad.any(), "L_dist must treat F_s as a constant target"
    assert q.grad is not None and q.grad.abs().sum() > 0 and fw.grad is not None and fw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------------
# Tiny teacher DDPM training (train/teacher.py): ε-prediction on SD's schedule, t uniform in [0, 1000)
# ------------------------------------------------------------------------------------------------------------------


class _ZeroUNet(nn.Module):
    """Predicts zeros and records what it was given: the loss is then mean(target²), whatever the target is."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        self.seen.append((x.detach().clone(), t.detach().clone()))
        return SimpleNamespace(sample=self.w * torch.zeros_like(x))


def test_tiny_teacher_ddpm_regresses_the_noise_of_sd_forward_diffusion_over_all_timesteps() -> None:
    from train import teacher as tiny

    z0_value = 2.0
    mean = torch.full((4, 4, 8, 8), z0_value)  # a constant latent with no posterior spread: z0 is known exactly
    std = torch.zeros_like(mean)
    unet = _ZeroUNet()
    losses = tiny.train_unet(unet, tiny.sd_scheduler(), (mean, std), torch.zeros(1, 2, 3), 12,
                             torch.Generator().manual_seed(0), batch_size=8, progress=False)
    ac = sd_alphas_cumprod()
    assert len(losses) == len(unet.seen) == 12
    timesteps = torch.cat([t for _, t in unet.seen])
    # 96 draws of t uniform in [0, 1000): the whole range is used, not a part of it.
    assert int(timesteps.min()) >= 0 and int(timesteps.max()) < 1000
    assert int(timesteps.min()) < 100 and int(timesteps.max()) > 900
    for loss, (z_t, t) in zip(losses, unet.seen):
        a = torch.from_numpy(ac[t.numpy()]).view(-1, 1, 1, 1)
        # z_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε  ⇒  ε recovered from z_t; the ε-prediction loss of a zero output is mean(ε²).
        eps = (z_t.double() - a.sqrt() * z0_value) / (1 - a).sqrt()
        assert eps.std().item() == pytest.approx(1.0, abs=0.2)  # it is standard normal noise
        assert loss == pytest.approx((eps ** 2).mean().item(), rel=1e-3)


def test_tiny_teacher_samples_latents_with_mean_and_std_both_scaled(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The DDPM trains on scaling·(mean + std·n): the posterior std must be scaled like the mean."""
    from train import teacher as tiny

    raw: dict[str, torch.Tensor] = {}
    given: dict[str, torch.Tensor] = {}
    encode = tiny.encode_tiles

    def recording_encode(vae, tiles, batch_size=64):
        raw["mean"], raw["std"] = encode(vae, tiles, batch_size)
        return raw["mean"], raw["std"]

    def recording_train_unet(unet, scheduler, latents, context, steps, generator, *, batch_size, progress):
        given["mean"], given["std"] = latents
        return [1.0] * steps

    # An untrained VAE is fine: only the scaling of its latents is checked.
    monkeypatch.setattr(tiny, "train_vae", lambda vae, tiles, steps, generator, **kw: [1.0] * steps)
    monkeypatch.setattr(tiny, "encode_tiles", recording_encode)
    monkeypatch.setattr(tiny, "train_unet", recording_train_unet)
    data = ensure_synthetic(tmp_path / "syn", num_train=2, num_val=1, size=(64, 128), progress=False)
    out = tiny.make_tiny_teacher(tmp_path / "teacher", data, seed=3, steps=2, vae_steps=1, image_size=32,
                                 batch_size=4, progress=False)
    scaling = json.loads((out / "teacher.json").read_text())["scaling_factor"]
    assert given["mean"].std().item() == pytest.approx(1.0, rel=1e-4)  # unit-variance latents (SD's 0.18215 rule)
    torch.testing.assert_close(given["mean"], raw["mean"] * scaling)
    torch.testing.assert_close(given["std"], raw["std"] * scaling)


# ------------------------------------------------------------------------------------------------------------------
# Training state: atomic write, RNG round trip
# ------------------------------------------------------------------------------------------------------------------


def test_a_state_write_that_fails_leaves_the_previous_state_readable(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "train_state.pt"
    save_training_state(path, {"step": 1})

    def dies_half_way(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")  # what a killed or out-of-space torch.save leaves
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        save_training_state(path, {"step": 2})
    monkeypatch.undo()
    assert load_training_state(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["train_state.pt"]  # no temp file left behind


def test_rng_states_survive_a_save_and_restore(tmp_path: Path) -> None:
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    save_training_state(tmp_path / "s.pt", {"rng": capture_rng()})
    expected = (torch.rand(6), np.random.rand(6), np.random.randn(), [random.random() for _ in range(3)],
                random.gauss(0, 1))
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    restore_rng(load_training_state(tmp_path / "s.pt")["rng"])
    got = (torch.rand(6), np.random.rand(6), np.random.randn(), [random.random() for _ in range(3)],
           random.gauss(0, 1))
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert got[3] == expected[3] and got[4] == expected[4]


# ------------------------------------------------------------------------------------------------------------------
# Trainer.load: step, best, RNG, loss scaler; the learning rate of the resumed steps
# ------------------------------------------------------------------------------------------------------------------


def _rewrite_state(files: RunFiles, **changes) -> None:
    state = load_training_state(files.state)
    state.update(changes)
    save_training_state(files.state, {k: v for k, v in state.items() if k not in ("format", "version")})


def test_resume_restores_step_best_and_rng_and_continues_the_poly_schedule(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_config(data_root, "train.iters=3", "train.warmup_iters=0", "train.min_lr=0", "train.poly_power=0.9")
    files = RunFiles(tmp_path / "run")
    run_training(copy.deepcopy(cfg), files, stop_at=1, progress=False)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    saved_rng = capture_rng()
    expected = (torch.rand(5), np.random.rand(5), random.random())
    _rewrite_state(files, best=42.5, rng=saved_rng)

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    trainer = Trainer(copy.deepcopy(cfg), files, DistEnv(), progress=False)
    trainer.load()
    got = (torch.rand(5), np.random.rand(5), random.random())
    assert trainer.step == 1
    assert trainer.best == 42.5  # a worse score after the resume must not replace best.safetensors
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]

    lrs: list[float] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"] / opt.param_groups[0].get("lr_mult", 1.0)))
    trainer.fit()
    # METHOD §7 PolyLR, no warm-up, η_min 0: update k of N uses lr·(1 − k/N)^0.9; the resumed updates are k = 1, 2.
    assert lrs == pytest.approx([1e-3 * (1 - 1 / 3) ** 0.9, 1e-3 * (1 - 2 / 3) ** 0.9], rel=1e-9)


def test_resume_restores_the_fp16_loss_scale(tmp_path: Path, data_root: Path) -> None:
    cfg = tiny_config(data_root, "train.iters=2", "train.amp=fp16")
    files = RunFiles(tmp_path / "run")
    run_training(copy.deepcopy(cfg), files, stop_at=1, progress=False)
    scaler = load_training_state(files.state)["scaler"]
    assert scaler
    _rewrite_state(files, scaler={**scaler, "scale": 1234.0, "_growth_tracker": 7})
    trainer = Trainer(copy.deepcopy(cfg), files, DistEnv(), progress=False)
    trainer.load()
    assert trainer.scaler.get_scale() == 1234.0
    assert trainer.scaler._get_growth_tracker() == 7


def test_best_checkpoint_is_written_only_when_the_mean_miou_improves(tmp_path: Path, data_root: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import train.trainer as trainer_module

    files = RunFiles(tmp_path / "run")
    files.root.mkdir()
    trainer = Trainer(tiny_config(data_root, "train.iters=3"), files, DistEnv(), progress=False)
    means = iter([40.0, 30.0, 50.0, 45.0, float("nan"), 50.0])
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a, **k: [
        SimpleNamespace(name="synthetic/source", miou=next(means), target=False, images=1)])
    saved: list[tuple[Path, float]] = []
    monkeypatch.setattr(trainer_module, "save_student",
                        lambda student, cfg, path, **kw: saved.append((Path(path), kw["extra"]["miou_mean"])))
    for _ in range(6):
        trainer.evaluate(log=False)
    assert saved == [(files.best, 40.0), (files.best, 50.0)]
    assert trainer.best == 50.0


class _ConstantGuidance(nn.Module):
    """Stands in for QueryDiffGuidance: L_dist = 3 and L_sup = 5 for every micro-batch (with a path to Q)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = SimpleNamespace(reset_noise=lambda seed: None)

    def forward(self, images: torch.Tensor, agent_queries: torch.Tensor) -> dict[str, torch.Tensor]:
        one = agent_queries.float().sum() * 0 + 1
        return {"loss_dist": 3.0 * one, "loss_sup": 5.0 * one}


def test_guidance_losses_are_averaged_over_accumulated_micro_batches(tmp_path: Path, data_root: Path) -> None:
    """One step = grad_accum micro-batches; like L_seg, the guidance terms of a step are their mean over the
    micro-batches, not their sum (which would scale λ_dist and λ_sup by grad_accum)."""
    from train.logger import read_metrics

    files = RunFiles(tmp_path / "run")
    files.root.mkdir()
    trainer = Trainer(tiny_config(data_root, "train.iters=2", "train.grad_accum=2"), files, DistEnv(), progress=False)
    trainer.guidance = _ConstantGuidance()
    trainer.fit(stop_at=1)
    (record,) = [r for r in read_metrics(files.metrics) if "loss" in r]
    assert record["loss_dist"] == pytest.approx(3.0) and record["loss_sup"] == pytest.approx(5.0)
    assert record["loss"] == pytest.approx(record["loss_seg"] + 8.0)

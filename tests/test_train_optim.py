"""AdamW parameter groups and the PolyLR schedule (METHOD §7)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qd_core.config import TrainConfig, load_config
from qd_core.model import build_student
from train.optim import build_optimizer, lr_at, param_groups, set_lr


class Toy(nn.Module):
    """Names that exercise every no-decay rule, plus a frozen parameter and plain weights."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.bn = nn.BatchNorm2d(4)
        self.query_embed = nn.Embedding(3, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.reins = nn.Module()
        self.reins.learnable_tokens_a = nn.Parameter(torch.zeros(2, 4))
        self.reins.scale = nn.Parameter(torch.tensor(1e-3))
        self.reins.mlp = nn.Linear(4, 4)
        self.decoder_norm_like = nn.Linear(4, 4)  # "norm" in the name: decay 0 by the substring rule
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _decay_of(groups: list[dict]) -> dict[str, float]:
    return {name: g["weight_decay"] for g in groups for name in g["names"]}


def test_no_decay_rules_give_zero_weight_decay() -> None:
    decay = _decay_of(param_groups({"": Toy()}, 0.05))
    zero = {"gn.weight", "gn.bias", "ln.weight", "ln.bias", "bn.weight", "bn.bias", "query_embed.weight",
            "level_embed", "reins.learnable_tokens_a", "reins.scale", "decoder_norm_like.weight",
            "decoder_norm_like.bias"}
    assert {n for n, wd in decay.items() if wd == 0.0} == zero
    assert {n for n, wd in decay.items() if wd == 0.05} == {"proj.weight", "proj.bias", "reins.mlp.weight",
                                                            "reins.mlp.bias"}


def test_frozen_parameters_are_not_optimised() -> None:
    names = set(_decay_of(param_groups({"": Toy()}, 0.05)))
    assert not any(n.startswith("frozen.") for n in names)


def test_second_module_is_prefixed_and_follows_the_same_rules() -> None:
    guidance = nn.Module()
    guidance.blocks = nn.Sequential(nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2))
    decay = _decay_of(param_groups({"": nn.Linear(2, 2), "guidance": guidance}, 0.05))
    assert decay["guidance.blocks.0.weight"] == 0.05
    assert decay["guidance.blocks.1.weight"] == 0.0 and decay["guidance.blocks.1.bias"] == 0.0
    assert decay["weight"] == 0.05


def test_student_groups_cover_exactly_its_trainable_parameters() -> None:
    student = build_student(load_config("tiny"))
    groups = param_groups({"": student}, 0.05)
    in_groups = {id(p) for g in groups for p in g["params"]}
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert in_groups == trainable
    decay = _decay_of(groups)
    assert decay["reins.scale"] == 0.0 and decay["pixel_decoder.level_embed"] == 0.0
    assert decay["decoder.layers.0.norm1.weight"] == 0.0 and decay["query_link.weight"] == 0.05
    assert not any(n.startswith("backbone.") for n in decay)


def _poly(step: int, base: float, iters: int, power: float, eta_min: float) -> float:
    return (base - eta_min) * (1 - step / iters) ** power + eta_min


@pytest.mark.parametrize("step", [0, 1, 500, 999])
def test_polylr_matches_the_formula(step: int) -> None:
    cfg = TrainConfig(iters=1000, lr=1e-4, poly_power=0.9, min_lr=1e-6)
    assert lr_at(step, cfg) == pytest.approx(_poly(step, 1e-4, 1000, 0.9, 1e-6), rel=1e-12)


def test_polylr_reaches_min_lr_at_the_end() -> None:
    cfg = TrainConfig(iters=10, lr=1.0, min_lr=0.25)
    assert lr_at(10, cfg) == pytest.approx(0.25)


def test_linear_warmup_then_poly_from_the_warmup_end() -> None:
    cfg = TrainConfig(iters=100, lr=6e-5, warmup_iters=10, warmup_ratio=1e-6, poly_power=0.9)
    assert lr_at(0, cfg) == pytest.approx(6e-5 * 1e-6, rel=1e-9)
    assert lr_at(5, cfg) == pytest.approx(6e-5 * (1e-6 + (1 - 1e-6) * 0.5), rel=1e-12)
    assert lr_at(10, cfg) == pytest.approx(6e-5, rel=1e-12)
    assert lr_at(55, cfg) == pytest.approx(6e-5 * (1 - 45 / 90) ** 0.9, rel=1e-12)


def test_optimizer_is_adamw_with_config_hyperparameters() -> None:
    cfg = TrainConfig(lr=3e-4, betas=[0.8, 0.95], eps=1e-7, weight_decay=0.01)
    opt = build_optimizer({"": Toy()}, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-7 for g in opt.param_groups)
    set_lr(opt, 2e-5)
    assert all(math.isclose(g["lr"], 2e-5) for g in opt.param_groups)


def test_no_trainable_parameters_is_an_error() -> None:
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer({"": frozen}, TrainConfig())


def test_negative_step_is_an_error() -> None:
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, TrainConfig())

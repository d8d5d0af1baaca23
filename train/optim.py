"""AdamW parameter groups and the PolyLR schedule with optional linear warm-up (METHOD §7)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from qd_core.config import TrainConfig

# mmseg paramwise_cfg custom_keys of the reference configs: decay_mult 0, lr_mult 1 for every key.
NO_DECAY_KEYS = ("norm", "query_embed", "level_embed", "learnable_tokens", "reins.scale")
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def no_decay_names(modules: Mapping[str, nn.Module]) -> set[str]:
    """Names (``prefix.name``) of the parameters that get weight decay 0: a name containing one of
    ``NO_DECAY_KEYS``, or a parameter of a GroupNorm/LayerNorm/BatchNorm module."""
    names: set[str] = set()
    for prefix, module in modules.items():
        head = f"{prefix}." if prefix else ""
        for module_name, sub in module.named_modules():
            if isinstance(sub, NORM_TYPES):
                for name, _ in sub.named_parameters(recurse=False):
                    names.add(f"{head}{module_name}.{name}" if module_name else f"{head}{name}")
        for name, _ in module.named_parameters():
            if any(key in f"{head}{name}" for key in NO_DECAY_KEYS):
                names.add(f"{head}{name}")
    return names


def param_groups(modules: Mapping[str, nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters of ``modules`` (a name prefix → module map, e.g.
    ``{"": student, "guidance": guidance}``): ``weight_decay`` for most, 0 for ``no_decay_names``.

    Each group carries the parameter names under "names" (for reports and tests); frozen parameters are left
    out, so the optimizer state holds nothing for them.
    """
    skip = no_decay_names(modules)
    groups: dict[bool, dict[str, Any]] = {
        True: {"params": [], "names": [], "weight_decay": float(weight_decay)},
        False: {"params": [], "names": [], "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for prefix, module in modules.items():
        head = f"{prefix}." if prefix else ""
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            group = groups[f"{head}{name}" not in skip]
            group["params"].append(param)
            group["names"].append(f"{head}{name}")
    return [g for g in groups.values() if g["params"]]


def build_optimizer(modules: Mapping[str, nn.Module], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW(lr, betas, eps) over ``param_groups``; the learning rate is set per step by ``set_lr``."""
    groups = param_groups(modules, cfg.weight_decay)
    if not groups:
        raise ValueError("modules: no trainable parameters to optimise")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0-based).

    Warm-up (step < warmup_iters): lr·(r + (1 − r)·step/warmup_iters), r = warmup_ratio (mmengine LinearLR).
    Then PolyLR from warmup_iters to iters: (lr − min_lr)·(1 − (step − w)/(iters − w))^power + min_lr.
    """
    if step < 0:
        raise ValueError(f"step: expected a non-negative update index, got {step}")
    warmup = min(cfg.warmup_iters, cfg.iters)
    if step < warmup:
        return cfg.lr * (cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * step / warmup)
    progress = min(1.0, (step - warmup) / max(1, cfg.iters - warmup))
    return (cfg.lr - cfg.min_lr) * (1.0 - progress) ** cfg.poly_power + cfg.min_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


__all__ = ["NO_DECAY_KEYS", "build_optimizer", "lr_at", "no_decay_names", "param_groups", "set_lr"]

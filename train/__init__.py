"""QueryDiff training: ``python -m train`` (loop, DDP, AMP, exact resume), ``python -m train.evaluate`` and
``python -m train.visualize``.

    from train import Trainer, run_training, evaluate
"""
from __future__ import annotations

from typing import Any

# Loaded on first use, so that ``python -m train.evaluate`` does not find its own module already imported
# (runpy warns about that) and ``python -m train teacher`` does not import the trainer.
_LAZY = {
    "DatasetScore": "train.evaluate",
    "evaluate": "train.evaluate",
    "miou_table": "train.evaluate",
    "build_optimizer": "train.optim",
    "lr_at": "train.optim",
    "param_groups": "train.optim",
    "run_training": "train.run",
    "NonFiniteLossError": "train.trainer",
    "TrainResult": "train.trainer",
    "Trainer": "train.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'train' has no attribute {name!r}")


__all__ = sorted(_LAZY)

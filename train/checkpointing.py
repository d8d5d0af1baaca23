"""The files of a training run and the training state that makes a resume exact.

    runs/<name>/config.yaml                 the resolved config of the run
    runs/<name>/metrics.jsonl               one JSON record per logged step and per evaluation
    runs/<name>/last.safetensors + .json    student weights (qd_core.checkpoint.save_student): export and eval
    runs/<name>/best.safetensors + .json    the student with the best mean mIoU so far
    runs/<name>/train_state.pt              everything else a resume needs (below)

The training state holds the trainable student tensors, the guidance's trainable tensors, the optimizer, the
AMP scaler, the step, the best score and the RNG states of torch (CPU and CUDA), numpy and Python. The data
order needs no state of its own: it is a function of (seed, step) (see ``train.data``). The file is written to
a temp file in the run folder and renamed into place, and it is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qd_core.checkpoint import CheckpointError, atomic_write

STATE_FORMAT = "querydiff-train-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class RunFiles:
    """Paths of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "train_state.pt"

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def owned(self) -> list[Path]:
        """Every file or folder a run writes here (what ``--overwrite`` removes)."""
        return [self.config, self.metrics, self.state, self.last, self.last.with_suffix(".json"), self.best,
                self.best.with_suffix(".json"), self.tensorboard]


def prepare_run_dir(files: RunFiles, *, resume: bool, overwrite: bool) -> None:
    """Create the run folder; a non-empty one is reused only with ``resume`` and cleared only with ``overwrite``."""
    root = files.root
    if root.exists() and not root.is_dir():
        raise ValueError(f"run folder '{root}' exists and is not a folder")
    if resume:
        if not files.state.is_file():
            raise ValueError(f"--resume: '{files.state}' does not exist (nothing to resume in '{root}'"
                             + ("; its run stopped before its first checkpoint: pass --overwrite instead of --resume "
                                "to start it over)" if root.is_dir() and any(root.iterdir()) else ")"))
        return
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            if files.config.is_file() and not files.state.is_file():
                raise ValueError(f"run folder '{root}' holds a run that stopped before its first checkpoint (no "
                                 f"{files.state.name} to resume): pass --overwrite to start it over, or --out to "
                                 f"use another folder")
            raise ValueError(f"run folder '{root}' is not empty: pass --resume to continue it, --overwrite to "
                             f"start over, or --out to use another folder")
        remove_run_files(files)
    root.mkdir(parents=True, exist_ok=True)


def forget_failed_start(files: RunFiles) -> None:
    """Remove what a fresh start wrote (its config.yaml, metrics) when it failed before its first checkpoint, so
    that the corrected command can run in the same folder without --overwrite. A folder with a training state
    is left alone (it is a run to resume)."""
    if not files.state.is_file():
        remove_run_files(files)


def remove_run_files(files: RunFiles) -> None:
    """Delete every file and folder a run writes in its folder (``RunFiles.owned``); anything else stays."""
    for path in files.owned():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temp file in the same folder and a rename: readers see the old file or the new."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and every CUDA device), numpy and Python, in weights_only-loadable types."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # One state per device visible when saved; a resume may see fewer (another CUDA_VISIBLE_DEVICES, fewer
        # ranks at a larger batch): set_rng_state_all would index past the last generator.
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_torch_save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, path)


def load_training_state(path: Path) -> dict[str, Any]:
    """Read a training state written by ``save_training_state``; CheckpointError naming the file otherwise."""
    if not path.is_file():
        raise CheckpointError(f"training state '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises several unrelated types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"training state '{path}' could not be read: {first}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"'{path}' is not a training state (expected format '{STATE_FORMAT}')")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"'{path}': training state version {state.get('version')!r}, expected {STATE_VERSION}")
    return state


__all__ = ["RunFiles", "atomic_torch_save", "capture_rng", "forget_failed_start", "load_training_state",
           "prepare_run_dir", "remove_run_files", "restore_rng", "save_training_state"]

"""Metrics of a run: one JSON object per line in ``metrics.jsonl``, and TensorBoard scalars when
``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package). Only rank 0 writes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qd_core.checkpoint import atomic_write


def truncate_after(path: Path, step: int) -> None:
    """Drop records with "step" > ``step``: those of steps a resumed run will redo (logged after the last
    checkpoint of the interrupted run)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption
        if int(record.get("step", 0)) <= step:
            kept.append(line)
    text = "".join(line + "\n" for line in kept)
    # Through a temporary file: an interruption while this runs (before the trainer's signal handling is in place)
    # must leave the old file, not an empty one.
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and mirrors their numbers to TensorBoard when available."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None, *, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.writer: Any = None
        if enabled and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional (extra "train")
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it must hold an integer "step"."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = int(record["step"])
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


__all__ = ["MetricsLogger", "read_metrics", "truncate_after"]

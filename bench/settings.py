"""What the backend suites measure, read from the environment so that plain ``pytest bench`` and ``python -m bench``
run the same code: the CLI turns its arguments into these variables before it starts pytest.

    QD_BENCH_DEVICE      cpu | cuda                     (default: cuda when available, else cpu)
    QD_BENCH_CONFIG      config name or YAML path       (default: the checkpoint's config, else "tiny")
    QD_BENCH_CHECKPOINT  student .safetensors | "none"  (default: newest runs/*/best.safetensors, else random init)
    QD_BENCH_DATA        evaluation data folder         (default: the synthetic evaluation set, generated once)
    QD_BENCH_IMAGES      number of evaluation images    (default 7 on CPU, 28 on CUDA)
    QD_BENCH_BATCH       the larger timed batch         (default 4 on CPU, 8 on CUDA; batch 1 is always timed)
    QD_BENCH_BACKENDS    comma-separated backend names to run (default: all)
    QD_BENCH_CPU_COMPILE 1 to build torch.compile / AOTInductor on CPU too (minutes of C++ compilation; the CLI
                         sets it, a plain CPU test run leaves it off)
    QD_BENCH_WORK        folder for exported models     (default: a temporary folder per session)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

_PACKAGE_PARENT = Path(__file__).resolve().parent.parent
IN_CHECKOUT = (_PACKAGE_PARENT / "pyproject.toml").is_file()
# Where the benchmark looks for runs/ and keeps data/, build/ and (by default) its results: the checkout it lives
# in, or, for a copy installed with pip, the current folder (site-packages is no place for them).
REPO_ROOT = _PACKAGE_PARENT if IN_CHECKOUT else Path.cwd()
DEFAULT_CONFIG = "tiny"
# Synthetic scenes are drawn round-robin over the source and the six target domains, so 7 images is one of each.
DEFAULT_IMAGES = {"cpu": 7, "cuda": 28}
DEFAULT_BATCH = {"cpu": 4, "cuda": 8}
NO_CHECKPOINT = "none"
ENV_PREFIX = "QD_BENCH_"


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark session. ``checkpoint`` None means a randomly initialised student (latency only)."""

    device: str
    config: str
    checkpoint: Path | None
    data: Path | None
    images: int
    batch: int
    backends: tuple[str, ...] | None
    cpu_compile: bool
    work: Path | None

    @property
    def batches(self) -> tuple[int, ...]:
        """The timed batch sizes: 1 and the larger batch."""
        return (1,) if self.batch == 1 else (1, self.batch)

    @property
    def model_label(self) -> str:
        """How the report names the weights (relative to the working folder when inside it, so that a committed
        report names no machine's paths); random weights are called out because their mIoU means nothing."""
        if self.checkpoint is None:
            return "random-init (mIoU not meaningful)"
        try:
            return str(self.checkpoint.resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(self.checkpoint)


def checkpoint_config_name(path: Path) -> str:
    """The config name stored beside a student checkpoint (``<stem>.json``), or '' when unreadable."""
    meta = path.with_suffix(".json")
    try:
        return str(json.loads(meta.read_text()).get("config", {}).get("name", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def newest_checkpoint(runs: Path, config: str | None = None) -> Path | None:
    """The most recently written ``runs/*/best.safetensors`` (whose config is named ``config``, when given)."""
    if not runs.is_dir():
        return None
    found = [p for p in runs.glob("*/best.safetensors") if p.is_file()]
    if config is not None:
        found = [p for p in found if checkpoint_config_name(p) == Path(config).stem]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(ENV_PREFIX + name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{ENV_PREFIX}{name}={text!r}: expected a positive integer")
    return value


def backend_names(text: str) -> tuple[str, ...] | None:
    """Comma-separated backend names (QD_BENCH_BACKENDS, ``python -m bench --backends``) → a tuple; None (all
    backends) for an empty text. Commas without a name (``","``) are a ValueError, not "all"."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names and text.strip():
        raise ValueError(f"backends {text!r}: no backend named; expected comma-separated names, or nothing for all")
    return names or None


def settings_from_env(env: Mapping[str, str] | None = None, cuda_available: bool | None = None) -> BenchSettings:
    """Read and validate the ``QD_BENCH_*`` variables (see the module docstring)."""
    env = os.environ if env is None else env
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    device = env.get(ENV_PREFIX + "DEVICE", "").strip().lower() or ("cuda" if cuda_available else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"{ENV_PREFIX}DEVICE={device!r}: expected 'cpu' or 'cuda'")
    if device == "cuda" and not cuda_available:
        raise ValueError(f"{ENV_PREFIX}DEVICE=cuda: torch sees no CUDA device on this machine")

    config = env.get(ENV_PREFIX + "CONFIG", "").strip() or None
    ckpt_text = env.get(ENV_PREFIX + "CHECKPOINT", "").strip()
    checkpoint: Path | None
    if ckpt_text.lower() == NO_CHECKPOINT:
        checkpoint = None
    elif ckpt_text:
        checkpoint = Path(ckpt_text)
        if not checkpoint.is_file():
            raise ValueError(f"{ENV_PREFIX}CHECKPOINT={ckpt_text!r}: no such student checkpoint file")
    else:
        checkpoint = newest_checkpoint(REPO_ROOT / "runs", config)
    if checkpoint is not None and config is None:
        config = checkpoint_config_name(checkpoint) or None
    config = config or DEFAULT_CONFIG

    data_text = env.get(ENV_PREFIX + "DATA", "").strip()
    data = Path(data_text) if data_text else None
    if data is not None and not data.is_dir():
        raise ValueError(f"{ENV_PREFIX}DATA={data_text!r}: no such folder")

    images = _positive_int(env, "IMAGES", DEFAULT_IMAGES[device])
    batch = _positive_int(env, "BATCH", DEFAULT_BATCH[device])
    if batch > images:
        raise ValueError(f"{ENV_PREFIX}BATCH={batch}: expected at most {ENV_PREFIX}IMAGES={images} (the timed "
                         f"batches are real evaluation images)")
    backends = backend_names(env.get(ENV_PREFIX + "BACKENDS", ""))
    cpu_compile = env.get(ENV_PREFIX + "CPU_COMPILE", "").strip().lower() in ("1", "true", "yes", "on")
    work_text = env.get(ENV_PREFIX + "WORK", "").strip()
    return BenchSettings(device=device, config=config, checkpoint=checkpoint, data=data, images=images,
                         batch=batch, backends=backends, cpu_compile=cpu_compile,
                         work=Path(work_text) if work_text else None)

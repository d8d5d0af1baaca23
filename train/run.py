"""``python -m train``: resolve the config and run folder, make the default data, teacher and backbone once,
train, report.

    python -m train                                  # tiny config, synthetic scenes, tiny teacher, CPU
    python -m train --config vitl16_512 data.train.kind=gta data.train.root=/data/gta ...
    python -m train --resume                         # continue runs/<config name> from its last checkpoint
    torchrun --nproc_per_node 8 -m train --config vitl16_512 ...

Exit codes: 0 done; 2 bad input, config or data (one ``error:`` line), or a non-finite loss; 130 / 143 stopped by
SIGINT / SIGTERM after saving ``last`` (resume with ``--resume``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from qd_core.checkpoint import CheckpointError, atomic_write
from qd_core.config import (Config, ConfigError, DatasetSpec, apply_overrides, config_from_dict, dump_config,
                            load_config, read_yaml)
from train.checkpointing import RunFiles, forget_failed_start, prepare_run_dir
from train.data import DataError, synthetic_root, val_specs
from train.distributed import DistEnv, barrier, init_distributed, main_first, shutdown_distributed
from train.evaluate import miou_table
from train.trainer import TrainResult, Trainer

DEFAULT_CONFIG = "tiny"
TINY_TEACHER_DIR = Path("data/teacher-tiny")
# Failures reported as one "error:" line (exit code 2) instead of a traceback.
USER_ERRORS = (ConfigError, CheckpointError, DataError, ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train QueryDiff. Without arguments: the tiny config on the embedded synthetic scenes with a tiny "
                    "diffusion teacher, on the CPU, then a per-domain mIoU table. `python -m train teacher --help` "
                    "makes a tiny teacher.")
    p.add_argument("--config", default=None,
                   help=f"shipped config name or YAML path (default: {DEFAULT_CONFIG}; with --resume: the run "
                        f"folder's config.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its last checkpoint (train_state.pt); the config "
                        "is the run's config.yaml plus the overrides given here")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default: train.out_dir, else runs/<config name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a non-empty run folder (its checkpoints and metrics are replaced)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available (under torchrun: this rank's GPU)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save `last` and stop after this step, keeping the schedule of train.iters (continue "
                        "later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.iters=200 data.crop_size=128 teacher.enabled=false")
    return p


def run_folder(cfg: Config, out: Path | None) -> Path:
    return out or (Path(cfg.train.out_dir) if cfg.train.out_dir else Path("runs") / cfg.name)


def resolve_config(args: argparse.Namespace) -> tuple[Config, RunFiles]:
    """The config and run folder; with ``--resume`` the config comes from the run folder (plus overrides)."""
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    files = RunFiles(run_folder(cfg, args.out))
    if args.resume:
        if not files.config.is_file():
            raise ValueError(f"--resume: '{files.config}' does not exist (nothing to resume in '{files.root}')")
        stored = read_yaml(files.config)
        try:
            cfg = config_from_dict(apply_overrides(stored, args.overrides))
        except ConfigError as err:
            raise ConfigError(f"{files.config}: {err}") from None
        if cfg.model != config_from_dict(stored).model:
            raise ValueError("--resume: model.* overrides would change the model of the run; start a new run instead")
    return cfg, files


def prepare_inputs(cfg: Config, progress: bool) -> None:
    """Generate the synthetic scenes (when used) and the tiny teacher (when the teacher is on without a path).

    Fills ``cfg.teacher.path`` in place so that the run's config.yaml names the teacher it used.
    """
    syn = cfg.data.synthetic
    roots = {synthetic_root(cfg, spec) for spec in [cfg.data.train, *val_specs(cfg)] if spec.kind == "synthetic"}
    for root in sorted(roots):
        from qd_core.data import ensure_synthetic

        ensure_synthetic(root, seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val, size=syn.size,
                         progress=progress)
    if cfg.teacher.enabled and not cfg.teacher.path:
        if cfg.data.train.kind != "synthetic":
            raise ConfigError("config key 'teacher.path' is empty: expected a local Stable Diffusion 2 diffusers "
                              "folder (the tiny teacher is made from the synthetic scenes only), or set "
                              "teacher.enabled=false")
        from train.teacher import ensure_tiny_teacher

        cfg.teacher.path = str(ensure_tiny_teacher(TINY_TEACHER_DIR, synthetic_root(cfg, cfg.data.train),
                                                   progress=progress))
    if cfg.model.backbone.pretrain and not cfg.model.backbone.checkpoint:
        if cfg.data.train.kind != "synthetic":
            raise ConfigError("config key 'model.backbone.pretrain' is true: the stand-in backbone is pretrained on "
                              "the synthetic scenes only; set model.backbone.checkpoint to a DINOv2 file or "
                              "model.backbone.pretrain=false")
        from train.backbone import ensure_tiny_backbone

        root = synthetic_root(cfg, cfg.data.train)
        spec = DatasetSpec(kind="synthetic", domain="source", split="train", root=str(root))
        cfg.model.backbone.checkpoint = str(ensure_tiny_backbone(cfg, spec, root.parent, progress=progress))


def run_training(cfg: Config, files: RunFiles, env: DistEnv | None = None, *, resume: bool = False,
                 overwrite: bool = False, stop_at: int | None = None, progress: bool = True) -> TrainResult:
    """Prepare the run folder and inputs (rank 0), then train. The Python entry point behind ``python -m train``."""
    env = env or DistEnv()

    def write_config() -> None:
        text = dump_config(cfg)
        atomic_write(files.config, lambda tmp: tmp.write_text(text))

    def prepare() -> Config:
        prepare_run_dir(files, resume=resume, overwrite=overwrite)
        prepare_inputs(cfg, progress)
        if not resume:
            write_config()
        return cfg

    main_first(env, prepare)
    if env.distributed and cfg.teacher.enabled and not cfg.teacher.path:
        cfg.teacher.path = read_yaml(files.config)["teacher"]["path"]  # filled in by rank 0
    if env.distributed and cfg.model.backbone.pretrain and not cfg.model.backbone.checkpoint:
        cfg.model.backbone.checkpoint = read_yaml(files.config)["model"]["backbone"]["checkpoint"]  # likewise
    barrier(env)
    try:
        trainer = Trainer(cfg, files, env, progress=progress)
        if resume:
            trainer.load()
            # The overrides of a resume (e.g. a longer train.iters) are the run's config from now on, once the
            # training state accepted them: a refused one must not become the config of the next --resume.
            if env.is_main:
                write_config()
    except BaseException:
        # A fresh start that cannot begin (a missing backbone file, unreadable data, ...) leaves nothing behind
        # that would make the corrected command ask for --overwrite.
        if not resume and env.is_main:
            forget_failed_start(files)
        raise
    return trainer.fit(stop_at)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["teacher"]:
        from train.teacher import main as teacher_main

        return teacher_main(argv[1:])
    if argv[:1] == ["backbone"]:
        from train.backbone import main as backbone_main

        return backbone_main(argv[1:])
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    env: DistEnv | None = None
    try:
        if args.stop_at is not None and args.stop_at < 1:
            raise ValueError(f"--stop-at {args.stop_at}: expected a positive step")
        env = init_distributed(args.device)
        cfg, files = resolve_config(args)
        result = run_training(cfg, files, env, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at,
                              progress=not args.no_progress)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    if env.is_main:
        if result.step > cfg.train.iters:
            print(f"the run was already at step {result.step}, past train.iters={cfg.train.iters}: nothing trained")
        if result.scores:
            print(f"\nstep {result.step}/{cfg.train.iters}, run folder {files.root}")
            print(miou_table(result.scores))
        print(f"wall time {time.perf_counter() - start:.0f} s")
        if result.stop_signal is not None:
            print(f"stopped by signal {result.stop_signal} at step {result.step}; `last` saved in {files.root} "
                  f"(continue with --resume)")
        elif result.step < cfg.train.iters:
            print(f"stopped at step {result.step} of {cfg.train.iters} (--stop-at); `last` saved in {files.root} "
                  f"(continue with --resume)")
    return 128 + result.stop_signal if result.stop_signal is not None else 0


__all__ = ["build_parser", "main", "prepare_inputs", "resolve_config", "run_training"]

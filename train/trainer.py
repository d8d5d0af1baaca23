"""The training loop: one readable class, DDP from torchrun's environment, exact resume.

One step = ``grad_accum`` micro-batches of ``batch_size`` images per rank:

    lr ← PolyLR(step)                                  (METHOD §7)
    for each micro-batch:  out = student(images)                      (bf16 autocast on CUDA)
                           loss = L_seg(out) + guidance(images, out.agent_queries)
                           backward                                   (DDP reduces at the last micro-batch)
    loss not finite on any rank → stop, checkpoint untouched
    average the guidance's gradients, clip, AdamW step
    log / evaluate / checkpoint at their intervals; stop cleanly after SIGINT or SIGTERM

Everything random is keyed by the step: data order and augmentation by (seed, stream position), the loss's
points by (seed, position of the image), the teacher's noise by (teacher seed, step, micro-batch, rank). A run
stopped and resumed therefore computes exactly what an uninterrupted run computes.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from qd_core.checkpoint import file_sha256, save_student, with_zero_biases_added
from qd_core.config import Config
from qd_core.data import TrainTransform
from qd_core.losses import HungarianMatcher, Mask2FormerLoss
from qd_core.model import QueryDiffStudent, build_student
from train.checkpointing import RunFiles, capture_rng, load_training_state, restore_rng, save_training_state
from train.data import DataError, SafeDataset, StreamSampler, build_dataset, check_batch, collate_safe, val_specs
from train.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    average_gradients,
    sync_batchnorm,
)
from train.evaluate import DatasetScore, evaluate, overall_mean, target_mean
from train.logger import MetricsLogger, truncate_after
from train.objective import image_counts, image_generator, segmentation_loss, step_norm
from train.optim import build_optimizer, lr_at, set_lr

# Loss terms reduced over ranks every step and logged (the per-output terms are those of the last output).
LOGGED_TERMS = ("loss", "loss_seg", "loss_cls", "loss_mask", "loss_dice", "loss_dist", "loss_sup")


class NonFiniteLossError(ValueError):
    """The loss of a step was NaN or infinite; the message names the step and every term."""


@dataclass
class TrainResult:
    """How a training session ended: the step reached, the last evaluation, and the signal that stopped it."""

    step: int
    scores: list[DatasetScore] = field(default_factory=list)
    stop_signal: int | None = None


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None = fp32). "auto" is bf16 on CUDA, off on CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float16


def build_criterion(cfg: Config) -> Mask2FormerLoss:
    """The Mask2Former loss of ``cfg.train`` (METHOD §6.3), its matcher's costs being the loss weights."""
    tr = cfg.train
    matcher = HungarianMatcher(cost_class=tr.class_weight, cost_mask=tr.mask_weight, cost_dice=tr.dice_weight,
                               num_points=tr.num_points)
    return Mask2FormerLoss(cfg.model.head.num_classes, matcher, no_object_weight=tr.no_object_weight,
                           class_weight=tr.class_weight, mask_weight=tr.mask_weight, dice_weight=tr.dice_weight,
                           num_points=tr.num_points, oversample_ratio=tr.oversample_ratio,
                           importance_sample_ratio=tr.importance_sample_ratio)


def noise_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the teacher's noise for one micro-batch: fresh noise every call (METHOD §4.2), reproducible."""
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


def _ignore_sigint(_: int) -> None:
    # DataLoader workers share the terminal's process group: without this, Ctrl-C would kill them before the
    # main process has finished its step and saved.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train_transform(cfg: Config) -> TrainTransform:
    """The METHOD §7 augmentation at ``data.crop_size`` with short-edge scales crop·k/10, k in [scale_min,
    scale_max] (TrainTransform fixes k = 5..20; the config may narrow or widen the range)."""
    d = cfg.data
    transform = TrainTransform(crop=d.crop_size, cat_max_ratio=d.cat_max_ratio, mean=cfg.model.pixel_mean,
                               std=cfg.model.pixel_std)
    transform.scales = [d.crop_size * k // 10 for k in range(d.scale_min, d.scale_max + 1)]
    return transform


class Trainer:
    """Student (+ guidance), optimizer, data stream, evaluation and checkpoints of one run folder."""

    def __init__(self, cfg: Config, files: RunFiles, env: DistEnv, *, progress: bool = True) -> None:
        self.cfg, self.files, self.env, self.progress = cfg, files, env, progress
        tr = cfg.train
        torch.backends.cudnn.benchmark = tr.cudnn_benchmark  # read by cuDNN only: no effect on a CPU run
        torch.manual_seed(tr.seed)  # the same initial weights on every rank
        student = build_student(cfg).to(env.device)
        if env.distributed:
            student = sync_batchnorm(student, env.device)
        self.student: QueryDiffStudent = student
        self.guidance = self._build_guidance()
        if env.distributed:
            # Only the student is wrapped: the frozen backbone has no gradients and the teacher sits outside.
            self.model: nn.Module = nn.parallel.DistributedDataParallel(
                student, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        else:
            self.model = student
        self.criterion = build_criterion(cfg).to(env.device)
        modules: dict[str, nn.Module] = {"": student}
        if self.guidance is not None:
            modules["guidance"] = self.guidance
        self.optimizer = build_optimizer(modules, tr)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.autocast_dtype = amp_dtype(tr.amp, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.autocast_dtype == torch.float16)
        self.dataset = build_dataset(cfg.data.train, cfg, train_transform(cfg), seed=tr.seed)
        self.dataset.keep_decoded(cfg.data.keep_decoded)
        self.val_specs = val_specs(cfg)
        # The training state and the student checkpoints leave a DINOv2 file's weights out; its hash, taken once,
        # ties a resume and every saved student to the same file.
        backbone_file = Path(cfg.model.backbone.checkpoint) if cfg.model.backbone.checkpoint else None
        self.backbone_sha256 = file_sha256(backbone_file) if backbone_file and backbone_file.is_file() else None
        for spec in self.val_specs:
            # Listed now (not rebuilt until each evaluation): a mistyped data.val root fails before the first step,
            # not thousands of steps later at the first evaluation.
            build_dataset(spec, cfg, None)
        self.step = 0
        self.best = -math.inf
        self.scores: list[DatasetScore] = []
        self.scores_step = -1
        self.stop_signal: int | None = None
        self.logger = MetricsLogger(files.metrics, files.tensorboard, enabled=env.is_main)

    # ----------------------------------------------------------------------------------------------------------
    def _build_guidance(self) -> nn.Module | None:
        if not self.cfg.teacher.enabled:
            return None
        from qd_core.teacher import build_guidance  # diffusers is imported only when a teacher is used

        guidance = build_guidance(self.cfg, self.env.device)
        # Same initial aggregator on every rank: its gradients are averaged by hand (it is not DDP-wrapped).
        if guidance is not None and self.env.distributed:
            for tensor in guidance.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        return guidance

    @property
    def global_micro_batch(self) -> int:
        return self.cfg.train.batch_size * self.env.world_size

    def _loader(self, stop: int) -> Iterator[dict[str, Any]]:
        tr, accum = self.cfg.train, self.cfg.train.grad_accum
        sampler = StreamSampler(len(self.dataset), tr.batch_size, seed=tr.seed, rank=self.env.rank,
                                world_size=self.env.world_size, start=self.step * accum,
                                count=(stop - self.step) * accum)
        workers = self.cfg.data.num_workers
        loader = DataLoader(SafeDataset(self.dataset), batch_sampler=sampler, num_workers=workers,
                            collate_fn=collate_safe, pin_memory=self.env.device.type == "cuda",
                            worker_init_fn=_ignore_sigint if workers > 0 else None)
        return iter(loader)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=self.autocast_dtype)

    # ----------------------------------------------------------------------------------------------------------
    def train_step(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over this rank's ``grad_accum`` micro-batches; returns the rank-averaged terms.

        Each batch holds "image" (B, 3, H, W) normalised, "label" (B, H, W) train ids and "position" (B,) the
        stream positions of its images (see ``train.data``).
        """
        cfg, env, accum = self.cfg, self.env, len(batches)
        set_lr(self.optimizer, lr_at(self.step, cfg.train))
        nq = cfg.model.head.num_queries
        counts = sum(image_counts(b["label"], cfg.model.head.num_classes, nq, cfg.train.no_object_weight)
                     for b in batches)
        norm = step_norm(all_reduce_sum(counts.to(env.device), env).cpu(), env.world_size)
        terms = torch.zeros(len(LOGGED_TERMS), dtype=torch.float64)
        for micro, batch in enumerate(batches):
            images = batch["image"].to(env.device, non_blocking=True)
            labels = batch["label"].to(env.device, non_blocking=True)
            generators = [image_generator(cfg.train.seed, int(p)) for p in batch["position"]]
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or not env.distributed else self.model.no_sync()
            with sync:
                with self._autocast():
                    out = self.model(images)
                    seg = segmentation_loss(self.criterion, out.class_logits, out.mask_logits, labels, generators,
                                            norm)
                    loss = seg["loss_seg"]
                    guide = {"loss_dist": loss.new_zeros(()), "loss_sup": loss.new_zeros(())}
                    if self.guidance is not None:
                        self.guidance.teacher.reset_noise(noise_seed(cfg.teacher.seed, self.step, micro, env.rank))
                        guide = {k: v / accum for k, v in self.guidance(images, out.agent_queries).items()}
                        loss = loss + guide["loss_dist"] + guide["loss_sup"]
                self.scaler.scale(loss).backward()
            n = len(out.class_logits) - 1
            values = [loss, seg["loss_seg"], seg[f"loss_cls_{n}"], seg[f"loss_mask_{n}"], seg[f"loss_dice_{n}"],
                      guide["loss_dist"], guide["loss_sup"]]
            terms += torch.stack([v.detach().double().cpu() for v in values])
        terms = all_reduce_sum(terms.to(env.device), env).cpu() / env.world_size
        reduced = dict(zip(LOGGED_TERMS, terms.tolist()))
        if not all(math.isfinite(v) for v in reduced.values()):
            self.optimizer.zero_grad(set_to_none=True)
            shown = ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1}: {shown}; stopped without saving "
                                     f"(the last checkpoint in '{self.files.root}' is untouched)")
        if self.guidance is not None:
            average_gradients(self.guidance.parameters(), env)
        if cfg.train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            reduced["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.train.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return reduced

    # ----------------------------------------------------------------------------------------------------------
    def evaluate(self, log: bool = True) -> list[DatasetScore]:
        """Score the student on the validation datasets, log it (unless ``log`` is off), and keep ``best`` by the
        mean mIoU."""
        scores = evaluate(self.student, self.val_specs, self.cfg, env=self.env,
                          batch_size=self.cfg.train.batch_size, num_workers=self.cfg.data.num_workers,
                          progress=self.progress)
        self.scores, self.scores_step = scores, self.step
        mean = overall_mean(scores)
        record: dict[str, Any] = {"step": self.step, "eval": {s.name: s.miou for s in scores}, "miou_mean": mean}
        if any(s.target for s in scores):
            record["miou_target_mean"] = target_mean(scores)
        if log:
            self.logger.log(record)
        if scores and math.isfinite(mean) and mean > self.best:
            self.best = mean
            if self.env.is_main:
                save_student(self.student, self.cfg, self.files.best, backbone_sha256=self.backbone_sha256,
                             extra={"step": self.step, "miou": record["eval"], "miou_mean": mean})
        return scores

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs beyond the config (see ``train.checkpointing``)."""
        backbone_file = bool(self.cfg.model.backbone.checkpoint)
        model = {k: v for k, v in self.student.state_dict().items()
                 if not (backbone_file and k.startswith("backbone."))}
        return {
            "step": self.step,
            "best": self.best,
            "backbone_sha256": self.backbone_sha256,
            "global_micro_batch": self.global_micro_batch,
            "grad_accum": self.cfg.train.grad_accum,
            "model": model,
            "guidance": self.guidance.state_dict() if self.guidance is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng(),
        }

    def save_last(self) -> None:
        """Write the training state, then ``last`` (student weights for export and evaluation). Rank 0 only."""
        if self.env.is_main:
            save_training_state(self.files.state, self.state_dict())
            save_student(self.student, self.cfg, self.files.last, extra={"step": self.step},
                         backbone_sha256=self.backbone_sha256)

    def load(self) -> None:
        """Continue from ``train_state.pt`` of the run folder."""
        state = load_training_state(self.files.state)
        if state["global_micro_batch"] != self.global_micro_batch or state["grad_accum"] != self.cfg.train.grad_accum:
            raise ValueError(f"--resume: the run was trained with batch_size × world_size = "
                             f"{state['global_micro_batch']} and grad_accum = {state['grad_accum']}, now "
                             f"{self.global_micro_batch} and {self.cfg.train.grad_accum}; the data order needs the "
                             f"same global batch")
        recorded = state.get("backbone_sha256")  # absent from states saved before it was recorded
        if recorded and self.backbone_sha256 and recorded != self.backbone_sha256:
            raise ValueError(f"--resume: backbone checkpoint '{self.cfg.model.backbone.checkpoint}' has SHA-256 "
                             f"{self.backbone_sha256[:16]}…, but the run was trained on a backbone with "
                             f"{recorded[:16]}…; point model.backbone.checkpoint at that file")
        if (state["guidance"] is None) != (self.guidance is None):
            raise ValueError(f"--resume: the run was trained with teacher.enabled="
                             f"{state['guidance'] is not None}, the config now says {self.guidance is not None}")
        model_state = with_zero_biases_added(self.student.state_dict(), state["model"])
        missing, unexpected = self.student.load_state_dict(model_state, strict=False)
        missing = [k for k in missing if not (self.cfg.model.backbone.checkpoint and k.startswith("backbone."))]
        if missing or unexpected:
            raise ValueError(f"--resume: '{self.files.state}' does not fit the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        if self.guidance is not None:
            self.guidance.load_state_dict(state["guidance"])
        # load_state_dict restores the saved group settings too; the config's weight decay, betas and eps (which a
        # resume may override, and config.yaml then records) are put back. The learning rate is set every step.
        configured = [{k: group[k] for k in ("weight_decay", "betas", "eps")} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, configured):
            group.update(settings)
        # The loss scaler's state exists only where fp16 scaling was on, before and now (train.amp may change on a
        # resume: a scaler turned on starts afresh, one turned off has nothing to restore).
        if state["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), float(state["best"])
        restore_rng(state["rng"])

    # ----------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, save ``last`` and stop; a second Ctrl-C quits at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train from ``self.step`` to ``train.iters`` (or to ``stop_at``, saving ``last`` there)."""
        tr, env = self.cfg.train, self.env
        end = tr.iters if stop_at is None else min(stop_at, tr.iters)
        if self.step >= tr.iters and self.scores_step != self.step:
            # A finished run, resumed: its scores at this step are in metrics.jsonl already (every run evaluates
            # at its last step), so they are shown, not logged a second time.
            return TrainResult(self.step, self.evaluate(log=False))
        if env.is_main:
            truncate_after(self.files.metrics, self.step)  # records of steps this run is about to redo
        self.model.train()
        if self.guidance is not None:
            self.guidance.train()
        bar = tqdm(total=tr.iters, initial=self.step, desc="train", unit="it", mininterval=1.0,
                   disable=not (self.progress and env.is_main), dynamic_ncols=True)
        start_time, start_step = time.perf_counter(), self.step
        try:
            with self._stop_on_signals():
                batches_iter = self._loader(end)
                while self.step < end:
                    batches, error = self._next_batches(batches_iter)
                    # Every rank must leave the loop together, or the others would wait in the next all-reduce.
                    data_failed, interrupted = any_rank([error is not None, batches is None and error is None], env)
                    if data_failed:
                        raise DataError(error or "another rank could not load its training data (see its error)")
                    if interrupted:  # a signal arrived while loading; nothing of this step ran
                        self.stop_signal = self.stop_signal or signal.SIGTERM
                        break
                    assert batches is not None
                    terms = self.train_step(batches)
                    elapsed = time.perf_counter() - start_time
                    bar.update()
                    bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr_at(self.step - 1, tr):.2e}")
                    if self.step % tr.log_interval == 0 or self.step == tr.iters:
                        self.logger.log({"step": self.step, "lr": lr_at(self.step - 1, tr), **terms,
                                         "it_s": (self.step - start_step) / max(elapsed, 1e-9),
                                         "samples": self.step * tr.grad_accum * self.global_micro_batch})
                    if self.step % tr.eval_interval == 0 or self.step == tr.iters:
                        try:
                            self.evaluate()
                        except Exception:
                            # A failed evaluation (a bad validation file, out of memory) must not take the steps
                            # trained since the last checkpoint with it: keep them, then report the failure.
                            self.save_last()
                            raise
                        self.model.train()
                    if any_rank([self.stop_signal is not None], env)[0]:
                        self.stop_signal = self.stop_signal or signal.SIGTERM
                        break
                    if self.step % tr.checkpoint_interval == 0 and self.step < end:
                        self.save_last()
                self.save_last()  # at the end, at stop_at, or after a signal
        finally:
            bar.close()
            self.logger.close()
        return TrainResult(self.step, self.scores if self.scores_step == self.step else [], self.stop_signal)

    def _next_batches(self, batches_iter: Iterator[dict[str, Any]]) -> tuple[list[dict[str, Any]] | None, str | None]:
        """This step's micro-batches, or (None, message) for a file that failed to load, or (None, None) when a
        signal stopped the DataLoader."""
        batches = []
        for _ in range(self.cfg.train.grad_accum):
            try:
                batches.append(check_batch(next(batches_iter)))
            except DataError as err:
                return None, str(err)
            except RuntimeError:
                if self.stop_signal is not None:
                    return None, None
                raise
        return batches, None


__all__ = ["LOGGED_TERMS", "NonFiniteLossError", "TrainResult", "Trainer", "amp_dtype", "build_criterion",
           "noise_seed", "train_transform"]

"""torchrun / DistributedDataParallel plumbing: process group from the environment, rank-0 helpers,
gradient averaging for modules outside DDP, and a batch norm whose statistics span all ranks on any backend.

    torchrun --nproc_per_node 2 -m train ...        # env:// rendezvous; nccl on CUDA, gloo on CPU
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda`` (this process's GPU under torchrun) or None = CUDA when available."""
    if name not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected 'cpu' or 'cuda'")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single-process env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistEnv(rank, world_size, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def main_first(env: DistEnv, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only. If it fails there with an OSError or ValueError (bad input: one line), every rank
    raises a ValueError with its message; any other exception is re-raised on rank 0 and the other ranks raise a
    RuntimeError naming it.

    Without the broadcast, the other ranks would wait at the next collective for a rank that already left.
    """
    result: T | None = None
    error: list[Any] = [None]  # None, or (exception class, message) to raise on every rank
    crash: Exception | None = None
    if env.is_main:
        try:
            result = fn()
        except (OSError, ValueError) as err:
            error[0] = (ValueError, str(err))
        except Exception as err:
            crash = err
            error[0] = (RuntimeError, f"rank 0 failed: {type(err).__name__}: {err}")
    if env.distributed:
        dist.broadcast_object_list(error, src=0)
    if crash is not None:
        raise crash
    if error[0] is not None:
        kind, message = error[0]
        raise kind(message)
    return result


def all_reduce_sum(tensor: Tensor, env: DistEnv) -> Tensor:
    """Sum of ``tensor`` over ranks (a copy; the input is unchanged). Identity in a single process."""
    out = tensor.detach().clone()
    if env.distributed:
        dist.all_reduce(out)
    return out


def average_gradients(params: Iterable[nn.Parameter], env: DistEnv) -> None:
    """Average the gradients of ``params`` over ranks in one flat all-reduce (for trainable modules that are
    not wrapped in DDP, such as the guidance head beside the frozen teacher)."""
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def any_rank(flags: list[bool], env: DistEnv) -> list[bool]:
    """For each flag: True on every rank if it is True on any rank (a stop signal or a data error seen by one
    process must stop all of them). One small all-reduce; the flags themselves in a single process."""
    if not env.distributed:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=env.device)
    dist.all_reduce(t)
    return [bool(v > 0) for v in t.tolist()]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients (each rank's output feeds
    that rank's loss, and the global loss is their sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are taken over the batch of all ranks together.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this one works on any backend (gloo on CPU), so a run with two
    processes of batch b normalises exactly like one process of batch 2b. Mean and variance come from two
    autograd-aware all-reduces (sum, then sum of squared deviations: no E[x²] − E[x]² cancellation); their
    backward all-reduces the gradients, which is the exact gradient of the global batch statistics.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) → (B, C, H, W)."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        count = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], device=x.device, dtype=torch.float32)
        total = all_reduce(torch.cat([x.float().sum((0, 2, 3)), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x.float() - mean[None, :, None, None]
        var = all_reduce(centred.pow(2).sum((0, 2, 3))) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1).clamp(min=1)  # running_var is unbiased, as in F.batch_norm
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm2d of ``module`` normalise over the global batch: torch's SyncBatchNorm on CUDA,
    ``DistributedBatchNorm2d`` elsewhere. Parameters and buffers are reused, so names and values stay."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = DistributedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, device))
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


__all__ = [
    "DistEnv", "DistributedBatchNorm2d", "all_reduce_sum", "any_rank", "average_gradients", "barrier",
    "init_distributed", "main_first", "resolve_device", "shutdown_distributed", "sync_batchnorm", "unwrap",
]

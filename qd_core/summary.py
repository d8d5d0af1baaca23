"""Parameter counts per module and FLOPs of one image, for reports and MFU.

    python -m qd_core.summary --config vitl16_512 [--height 512 --width 512] [--json]

FLOPs are counted by ``torch.utils.flop_counter`` on the meta device (no memory, no compute): matrix products,
convolutions and attention, 2 FLOPs per multiply-add. Elementwise work (norms, softmax, bilinear sampling) is
not counted, as is usual for MFU. A second pass counts the ATen operations of one eager forward (with the PyTorch
attention path), those that are not views being about one GPU kernel launch each: at batch 1 an eager forward is
bound by their host cost, so this is the figure that fewer-launch rewrites move.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from qd_core.config import Config, ConfigError, load_config


@dataclass
class ModuleCount:
    name: str
    trainable: int
    frozen: int


def parameter_counts(model: nn.Module) -> list[ModuleCount]:
    """Trainable and frozen parameter counts of each top-level child of ``model``."""
    rows = []
    for name, child in model.named_children():
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in child.parameters() if not p.requires_grad)
        rows.append(ModuleCount(name, trainable, frozen))
    return rows


class _OwnerFlopCounter(FlopCounterMode):
    """FlopCounterMode that also books each operation to the top-level child of the model whose module (the child
    or any descendant) is innermost when it runs, ``None`` outside them. A child's descendant called from outside
    the child's own forward (e.g. the Rein token values, computed once per pass for all blocks) is still that
    child's work, and an adapter called inside the backbone's forward is the adapter's, not both."""

    def __init__(self, owner: list[str]) -> None:
        super().__init__(display=False)
        self.owner = owner
        self.by_owner: dict[str | None, int] = {}

    def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001 (FlopCounterMode's hook)
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            key = self.owner[-1] if self.owner else None
            self.by_owner[key] = self.by_owner.get(key, 0) + flops
        return super()._count_flops(func_packet, out, args, kwargs)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active: all, and those that are not views."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.computing = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (TorchDispatchMode's hook)
        self.ops += 1
        self.computing += not getattr(func, "is_view", False)
        return func(*args, **(kwargs or {}))


def count_ops(model: nn.Module, height: int, width: int, batch: int = 1) -> tuple[int, int]:
    """(all, not views) ATen operations of ``model.semantic_logits`` on one (batch, 3, H, W) input, in a pass of
    its own: FlopCounterMode changes which operations run (it decomposes some)."""
    images = torch.zeros(batch, 3, height, width, device="meta")
    with _OpCounter() as ops, torch.no_grad():
        model.semantic_logits(images)
    return ops.ops, ops.computing


def count_flops(model: nn.Module, height: int, width: int, batch: int = 1) -> tuple[int, dict[str, int]]:
    """FLOPs of ``model.semantic_logits`` on one (batch, 3, H, W) input; returns (total, per top-level child)."""
    images = torch.zeros(batch, 3, height, width, device="meta")
    owner: list[str] = []

    def leave(_module: nn.Module, _args: object, _out: object) -> None:  # a hook's return would replace the output
        owner.pop()

    handles = []
    for name, child in model.named_children():
        for module in child.modules():
            handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: owner.append(name)))
            handles.append(module.register_forward_hook(leave))
    counter = _OwnerFlopCounter(owner)
    try:
        with counter, torch.no_grad():
            model.semantic_logits(images)
    finally:
        for handle in handles:
            handle.remove()
    total = counter.get_total_flops()
    if total and not counter.by_owner:
        raise RuntimeError("qd_core.summary: FlopCounterMode no longer reports operations through _count_flops "
                           f"(torch {torch.__version__}); the per-module FLOPs cannot be booked")
    return total, {name: flops for name, flops in counter.by_owner.items() if name is not None}


def build_meta_student(cfg: Config) -> nn.Module:
    """The student with parameters on the meta device (a ViT-L builds instantly and takes no memory)."""
    from qd_core.model import QueryDiffStudent

    with torch.device("meta"):
        return QueryDiffStudent(cfg).eval()


def check_input_size(cfg: Config, height: int, width: int) -> None:
    """ValueError naming the flag when an input side is not one the forward accepts: counting is done on the
    unpadded forward (what the FLOPs of a (1, 3, H, W) input mean), which takes no other size."""
    from qd_core.model import input_size_multiple

    k = input_size_multiple(cfg)
    for flag, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % k:
            raise ValueError(f"{flag} {value}: expected a positive multiple of {k} (the '{cfg.name}' student's "
                             f"input size multiple)")


def summarize(cfg: Config, height: int | None = None, width: int | None = None) -> dict:
    # ``is None``, not ``or``: an explicit 0 is a bad size, not a request for the default.
    height = cfg.inference.window[0] if height is None else height
    width = cfg.inference.window[1] if width is None else width
    check_input_size(cfg, height, width)
    model = build_meta_student(cfg)
    rows = parameter_counts(model)
    # FlopCounterMode's module tracker hooks autograd on parameters that require grad; counting needs none.
    total, per_module = count_flops(model.requires_grad_(False), height, width)
    ops, computing = count_ops(model, height, width)
    modules = [{"name": r.name, "trainable": r.trainable, "frozen": r.frozen,
                "gflops": per_module.get(r.name, 0) / 1e9} for r in rows]
    # Work done by the student itself outside its children: the class × mask product of the semantic logits and
    # the Rein tokens' A·B product (a matmul of parameters, done once per pass for all blocks and the queries).
    modules.append({"name": "(combine)", "trainable": 0, "frozen": 0,
                    "gflops": (total - sum(per_module.get(r.name, 0) for r in rows)) / 1e9})
    return {
        "config": cfg.name,
        "input": [1, 3, height, width],
        "modules": modules,
        "trainable": sum(r.trainable for r in rows),
        "frozen": sum(r.frozen for r in rows),
        "gflops": total / 1e9,
        "eager_ops": ops,
        "eager_ops_not_views": computing,
    }


def format_summary(s: dict) -> str:
    lines = [f"QueryDiff student '{s['config']}', input {'x'.join(map(str, s['input']))}",
             f"{'module':<16}{'trainable':>14}{'frozen':>14}{'GFLOPs':>10}"]
    for m in s["modules"]:
        lines.append(f"{m['name']:<16}{m['trainable']:>14,}{m['frozen']:>14,}{m['gflops']:>10.1f}")
    lines.append(f"{'total':<16}{s['trainable']:>14,}{s['frozen']:>14,}{s['gflops']:>10.1f}")
    lines.append(f"eager operations per forward: {s['eager_ops_not_views']:,} computing + "
                 f"{s['eager_ops'] - s['eager_ops_not_views']:,} views (PyTorch attention path)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qd_core.summary", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="vitl16_512", help="shipped config name or YAML path (default vitl16_512)")
    ap.add_argument("--height", type=int, default=None, help="input height (default: the inference window)")
    ap.add_argument("--width", type=int, default=None, help="input width (default: the inference window)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.head.decoder_layers=6")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        s = summarize(cfg, args.height, args.width)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=2) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

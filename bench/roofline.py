"""The ideal time of one ``predict`` on a given GPU: what the op graph would cost if every kernel ran at the
GPU's peak arithmetic rate or its memory bandwidth, whichever binds.

    python -m bench.roofline [--config F] [--batch N] [--size H W] [--dtype bf16|fp16|fp32] [--gpu h100-sxm|...]
                             [--peak-tflops F --bandwidth-tbs F] [--top K] [--json]

The measured side is ``python -m bench.op_profile`` (GPU time per module); this is the other side, computed on
the meta device in seconds on any machine: per top-level module of the student (and the export wrapper around
it, as ``(wrapper)``), the FLOPs, the bytes its operations read and write, the kernels it launches in eager mode,
and the bound Σ_ops max(FLOPs / peak, bytes / bandwidth). A module far above its bound has slow kernels; a module
near it can only get faster by moving fewer bytes (fusion) or doing less work.

The graph counted is the one the Triton backends run: attention (the ViT's, the agent and the masked
cross-attention) as one fused kernel that reads q, k, v (and the mask) and writes its output, the deformable
attention's sampling as one kernel that reads the value maps, locations and weights and writes its output, the
refinement's four depthwise convolutions as one kernel that reads their shared input once and writes the four
outputs, and the full-size labels as one kernel that reads the last prediction and writes the labels. Every
floating tensor is counted at ``--dtype`` (the ideal: under autocast some stay fp32, e.g. LayerNorm outputs), index
and mask tensors at their own size; views move nothing. Matrix products run at the tensor-core peak in bf16/fp16
and at the fp32 peak (no TF32, as the fp32 reference) in fp32; other operations are counted as memory-bound. Kernels
are taken as running one after another, each from an empty cache: no overlap, no reuse between them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bench.arguments import description, positive
from bench.backends import attention_backend
from bench.metrics import GPUS, GpuSpec
from qd_core.config import load_config

WRAPPER = "(wrapper)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = {dtype: name for name, dtype in DTYPES.items()}
# Operations that return a tensor sharing its input's storage without being marked as views, or that only
# record metadata: no kernel, no bytes.
_NO_DATA = {"aten._unsafe_view", "aten.detach", "aten.alias", "aten.lift_fresh", "aten._reshape_alias",
            "aten.set_", "aten.resize_", "aten.empty", "aten.empty_like", "aten.empty_strided"}


@dataclass
class Cost:
    """What a set of operations costs: FLOPs, bytes moved, kernels launched, ideal seconds."""

    flops: float = 0.0
    bytes: float = 0.0
    kernels: int = 0
    seconds: float = 0.0

    def add(self, flops: float, nbytes: float, seconds: float) -> None:
        self.flops += flops
        self.bytes += nbytes
        self.kernels += 1
        self.seconds += seconds


def _distinct_elements(x: Tensor) -> int:
    """Elements a kernel must read of ``x``: a broadcast (stride-0) dimension holds one value, read once."""
    count = 1
    for size, stride in zip(x.shape, x.stride()):
        if stride != 0:
            count *= size
    return count if x.numel() else 0


def _bytes(x: Any, dtype: torch.dtype) -> int:
    if isinstance(x, Tensor):
        size = torch.finfo(dtype).bits // 8 if x.is_floating_point() else x.element_size()
        return _distinct_elements(x) * size
    if isinstance(x, (list, tuple)):
        return sum(_bytes(y, dtype) for y in x)
    if isinstance(x, dict):
        return sum(_bytes(y, dtype) for y in x.values())
    return 0


class _Counter(TorchDispatchMode):
    """Books every ATen operation that moves data to each module open on ``owners`` (a stack whose bottom is
    the wrapper), or to the wrapper alone when none is; ``fused`` books a whole call as one kernel and silences the
    operations inside it."""

    def __init__(self, spec: GpuSpec, dtype: torch.dtype, owners: list[str]) -> None:
        super().__init__()
        self.spec, self.dtype, self.owners = spec, dtype, owners
        self.by_owner: dict[str, Cost] = defaultdict(Cost)
        self.by_op: dict[str, Cost] = defaultdict(Cost)
        self.silent = 0

    def book(self, op: str, flops: float, nbytes: float, matmul: bool) -> None:
        peak = self.spec.peak(PRECISIONS[self.dtype]) if matmul else float("inf")
        seconds = max(flops / peak, nbytes / (1e12 * self.spec.bandwidth_tbs))
        # Inclusive, as the profiler's ranges: a module running inside another counts in both.
        for owner in set(self.owners[1:]) or (WRAPPER,):
            self.by_owner[owner].add(flops, nbytes, seconds)
        self.by_op[op].add(flops, nbytes, seconds)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (TorchDispatchMode's hook)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if self.silent or getattr(func, "is_view", False) or str(packet) in _NO_DATA:
            return out
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        self.book(str(packet), flops, _bytes(args, self.dtype) + _bytes(kwargs, self.dtype)
                  + _bytes(out, self.dtype), matmul=flops > 0)
        return out

    @contextlib.contextmanager
    def fused(self, op: str, flops: float, tensors: Sequence[Tensor]) -> Iterator[list[Tensor]]:
        """Count the block as one kernel reading ``tensors`` and writing what is appended to the yielded list."""
        outputs: list[Tensor] = []
        self.silent += 1
        try:
            yield outputs
        finally:
            self.silent -= 1
        self.book(op, flops, _bytes(list(tensors), self.dtype) + _bytes(outputs, self.dtype), matmul=flops > 0)


class _FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as one kernel: q, k, v and the mask in, the output out."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (TorchFunctionMode's hook)
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        # QKᵀ and PV: 2 · 2 FLOPs per (query, key, channel); k, v broadcast over q's batch and heads.
        flops = 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        with self.counter.fused("attention (fused)", flops, [t for t in (q, k, v, mask) if t is not None]) as outs:
            out = func(*args, **kwargs)
            outs.append(out)
        return out


def _fused(counter: _Counter, op: str, fn: Callable[..., Any], reads: Callable[..., list[Tensor]],
           flops: Callable[..., float] = lambda *args, **kwargs: 0.0) -> Callable[..., Any]:
    """``fn`` counted as one kernel that reads ``reads(*args)`` and writes its result (as the Triton backends run
    it), with ``flops(*args)`` of matrix-product work."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with counter.fused(op, flops(*args, **kwargs), reads(*args, **kwargs)) as outs:
            out = fn(*args, **kwargs)
            outs.append(out)
        return out
    return run


@contextlib.contextmanager
def _owners(model: nn.Module, stack: list[str], inside: dict[str, str]) -> Iterator[None]:
    """Push each top-level child's name on ``stack`` while its own forward runs, and note in ``inside`` the module
    it runs inside, if any: the ranges ``bench.op_profile`` times, so the two tables line up."""
    handles = []
    for name, child in model.named_children():
        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            enclosing = [n for n in stack[1:] if n != name]
            inside.setdefault(name, enclosing[-1] if enclosing else "")
            stack.append(name)

        handles += [child.register_forward_pre_hook(pre),
                    child.register_forward_hook(lambda _m, _a, _o: stack.pop() and None)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class Roofline:
    config: str
    gpu: str
    dtype: str
    input: list[int]
    modules: dict[str, dict[str, float]]  # name → flops, bytes, kernels, seconds (inclusive of nested modules)
    inside: dict[str, str]  # module → the module it runs inside ("" at top level)
    ops: dict[str, dict[str, float]]
    total: dict[str, float]


def roofline(model: nn.Module, spec: GpuSpec, *, batch: int, size: tuple[int, int], dtype: torch.dtype,
             config: str = "") -> Roofline:
    """Count one ``ExportWrapper(model)`` forward (``predict``) on (batch, 3, *size) meta images. ``model`` must
    live on the meta device (``qd_core.summary.build_meta_student``)."""
    from export.wrapper import ExportWrapper
    from qd_core.head import msda
    from qd_core.head.refine import Refinement

    owners, inside = [WRAPPER], {}
    counter = _Counter(spec, dtype, owners)
    wrapper = ExportWrapper(model.requires_grad_(False).eval())
    images = torch.zeros(batch, 3, *size, device="meta")
    with contextlib.ExitStack() as stack:
        stack.enter_context(_owners(model, owners, inside))
        stack.enter_context(attention_backend("sdpa"))
        stack.enter_context(torch.no_grad())
        wrapper(images)  # steady state: the size-only constants (qd_core.constants) are made here, not counted
        # The deformable sampling (kernels.ms_deform_attn) and the full-size labels (kernels.semantic_labels).
        stack.enter_context(mock.patch.object(msda, "ms_deform_attn_core", _fused(
            counter, "ms_deform_attn (fused)", msda.ms_deform_attn_core,
            reads=lambda value, _shapes, _starts, locations, weights, **_: [value, locations, weights])))
        # The refinement's four depthwise convolutions of one map (kernels.depthwise_conv3x3): nine multiply-adds
        # per output element, memory-bound at any peak.
        stack.enter_context(mock.patch.object(Refinement, "_depthwise", _fused(
            counter, "depthwise 3x3 (fused)", Refinement._depthwise,
            reads=lambda self, x: [x, *[f.depthwise.weight for f in self.fusions]],
            flops=lambda self, x: 2 * 9 * x.numel() * len(self.fusions))))
        stack.enter_context(mock.patch.object(model, "full_size_labels", _fused(
            counter, "semantic_labels (fused)", model.full_size_labels,
            reads=lambda class_logits, mask_logits, _size: [class_logits, mask_logits],
            flops=lambda class_logits, mask_logits, size: (2 * mask_logits.shape[:2].numel() * size[0] * size[1]
                                                           * (class_logits.shape[-1] - 1)))))
        stack.enter_context(_FusedAttention(counter))
        stack.enter_context(counter)
        wrapper(images)
    if owners != [WRAPPER]:
        raise RuntimeError(f"bench.roofline: module hooks left {owners[1:]} open; the booking would be wrong")

    def row(c: Cost) -> dict[str, float]:
        return {"flops": c.flops, "bytes": c.bytes, "kernels": c.kernels, "seconds": c.seconds}

    total = Cost()
    for name, c in counter.by_owner.items():
        if not inside.get(name):
            total.flops, total.bytes = total.flops + c.flops, total.bytes + c.bytes
            total.kernels, total.seconds = total.kernels + c.kernels, total.seconds + c.seconds
    order = sorted(counter.by_owner, key=lambda n: (n == WRAPPER, -counter.by_owner[n].seconds))
    ops = sorted(counter.by_op.items(), key=lambda kv: -kv[1].seconds)
    return Roofline(config=config, gpu=spec.name, dtype=str(dtype).removeprefix("torch."),
                    input=[batch, 3, *size], modules={n: row(counter.by_owner[n]) for n in order},
                    inside={n: inside.get(n, "") for n in order},
                    ops={n: row(c) for n, c in ops}, total=row(total))


def render(r: Roofline, top: int = 15) -> str:
    t = r.total
    ms = t["seconds"] * 1e3
    lines = [f"Ideal time of one predict: {r.config}, input {'x'.join(map(str, r.input))}, {r.dtype}, on {r.gpu}",
             "",
             f"{ms:.3f} ms if every kernel ran at peak FLOP/s or bandwidth (whichever binds), one after another; "
             f"{t['flops'] / 1e9:.1f} GFLOP, {t['bytes'] / 1e9:.3f} GB moved, {t['kernels']:.0f} eager kernels.",
             "",
             "| module | GFLOP | GB moved | kernels | ideal ms | % of ideal |", "|---|---|---|---|---|---|"]
    for name, m in r.modules.items():
        where = f" (inside {r.inside[name]})" if r.inside.get(name) else ""
        lines.append(f"| {name}{where} | {m['flops'] / 1e9:.1f} | {m['bytes'] / 1e9:.3f} | {m['kernels']:.0f} | "
                     f"{m['seconds'] * 1e3:.3f} | {100 * m['seconds'] / t['seconds']:.1f} % |")
    lines += ["", f"Top {min(top, len(r.ops))} operations by ideal time:", "",
              "| operation | GFLOP | GB moved | kernels | ideal ms |", "|---|---|---|---|---|"]
    for name, o in list(r.ops.items())[:top]:
        lines.append(f"| `{name}` | {o['flops'] / 1e9:.1f} | {o['bytes'] / 1e9:.3f} | {o['kernels']:.0f} | "
                     f"{o['seconds'] * 1e3:.3f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.roofline", description=description(__doc__))
    ap.add_argument("--config", default="vitl16_512", help="config name or YAML (default vitl16_512)")
    ap.add_argument("--batch", type=int, default=1, help="images per forward (default 1)")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="input height and width (default: the config's inference window, as python -m bench)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                    help="dtype of every floating tensor and of the matrix products (default bf16)")
    ap.add_argument("--gpu", choices=tuple(GPUS), default="h100-sxm", help="datasheet peaks to use (default h100-sxm)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="override the GPU's matrix-product peak for --dtype, TFLOP/s")
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="override the GPU's memory bandwidth, TB/s")
    ap.add_argument("--top", type=int, default=15, help="operations listed (default 15)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from qd_core.summary import build_meta_student

    args = build_parser().parse_args(argv)
    try:
        for flag, value in (("--batch", args.batch), ("--top", args.top), ("--peak-tflops", args.peak_tflops),
                            ("--bandwidth-tbs", args.bandwidth_tbs)):
            positive(flag, value)
        cfg = load_config(args.config)
    except ValueError as e:  # ConfigError is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    spec = GPUS[args.gpu]
    if args.peak_tflops is not None or args.bandwidth_tbs is not None:
        peak = args.peak_tflops or (spec.fp32_tflops if dtype == torch.float32 else spec.tensor_tflops)
        spec = GpuSpec(f"{spec.name}, overridden", peak, peak, args.bandwidth_tbs or spec.bandwidth_tbs)
    size = tuple(args.size) if args.size else tuple(cfg.inference.window)
    model = build_meta_student(cfg)
    multiple = int(getattr(model, "size_multiple", 32))
    if min(size) < 1 or size[0] % multiple or size[1] % multiple:
        print(f"error: --size {size[0]} {size[1]}: expected positive multiples of {multiple}", file=sys.stderr)
        return 2
    r = roofline(model, spec, batch=args.batch, size=size, dtype=dtype, config=cfg.name)
    print(json.dumps(asdict(r), indent=2) if args.json else render(r, args.top), end="" if not args.json else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

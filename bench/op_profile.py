"""Where one forward of the student spends its time, per top-level module and per GPU kernel.

    python -m bench.op_profile [--device cpu|cuda] [--config F] [--checkpoint C] [--backend B ...] [--batch N ...]
                               [--iters N] [--top K] [--out FILE.md] [--trace FILE.json]

The end-to-end benchmark says how long ``predict`` takes; this says where that time goes. It builds the student as
``python -m bench`` does (same backends, same evaluation images, random weights unless a checkpoint is given),
runs ``--iters`` forwards of each batch size under ``torch.profiler`` after two untimed ones, and writes:

- per top-level module of the student (``backbone``, ``agent_queries``, ``pixel_decoder``, ...), plus the wrapper
  around it (normalisation, semantic logits, full-size labels) as ``(wrapper)``: the GPU time of the kernels it
  launched, their count, and its host time. GPU time below host time means the module is launch-bound: the GPU
  waits for the host, which CUDA graphs or compilation remove; the GPU column is what would be left.
  On a GPU in ``bench.roofline``'s table (H100, H200, A100 SXM), each module's ideal time on it too, and how
  many times over it the GPU time is: the modules far over it are the ones with slow kernels.
- the kernels with the largest total GPU time (on CPU: the operators with the largest own host time).

Module rows need eager backends (module hooks do not fire inside a replayed graph or a compiled one); their kernels
are those a CUDA graph of the same backend replays, and ``torch-triton-bf16-graphs`` is profiled as exactly that:
its model, precision and attention, run eagerly. The torch.compile backends are profiled compiled, without their
CUDA graphs (a replayed graph hides its kernels from the profiler) and without module ranges (a range opened inside
the compiled code would break its graph): one row for the whole forward, beside the whole forward's ideal, and the
table of the kernels Inductor generated and called (the first forward compiles: minutes for the ViT-L student).
``--trace`` also writes the Chrome trace (chrome://tracing, Perfetto).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.autograd import DeviceType

from bench.arguments import description, output_file
from bench.backends import (REFERENCE, BackendSpec, BenchSession, TorchBackend, select_backends, torch_recipe,
                            unavailable_reason)
from bench.cli import resolve_device
from bench.roofline import Roofline
from bench.settings import BenchSettings, checkpoint_config_name
from qd_core.checkpoint import atomic_write

DEFAULT_CONFIG = "vitl16_512"
# What is profiled without --backend: the Triton path on CUDA; on a CPU, where the Triton kernels and autocast
# to fp16 need CUDA (BackendSpec.cuda_only), the fp32 reference, which reports host time per module and operator.
DEFAULT_BACKEND = {"cuda": "torch-triton-bf16", "cpu": REFERENCE.name}
PROFILABLE = ("torch-fp32", "torch-bf16", "torch-fp16", "torch-bf16-pure", "torch-triton-fp32", "torch-triton-bf16",
              "torch-triton-bf16-graphs", "torch-compile", "torch-compile-bf16", "torch-compile-triton-bf16")
RANGE_PREFIX = "qd::"
WRAPPER = "(wrapper)"
UNBOOKED = "(not booked)"
COMPILED = "(whole forward, compiled)"


@dataclass(frozen=True)
class ModuleTime:
    """One top-level module's share of a forward, per forward (means over the profiled iterations)."""

    name: str
    device_ms: float
    host_ms: float
    kernels: float
    inside: str  # the enclosing module's name when this one runs inside another (its time is counted there too)


@dataclass(frozen=True)
class KernelTime:
    name: str
    total_ms: float  # per forward
    calls: float  # per forward


def profiler_range(name: str) -> Any:
    """A profiler range (a context manager) that the kernels launched inside it are linked to.

    Not ``torch.profiler.record_function``: that opens a user-scope range, whose correlation id the profiler keeps
    apart from the operators'; a kernel is linked only to the innermost operator (or function-scope range) open at
    its launch, so a kernel launched outside every ATen operator (the Triton kernels' direct launches) would be
    booked to no module. A function-scope range, as Inductor wraps its own Triton launches in, is such an
    operator.
    """
    return torch._C._profiler._RecordFunctionFast(name)


@contextlib.contextmanager
def module_ranges(model: nn.Module) -> Iterator[None]:
    """Each top-level child of ``model`` runs inside a profiler range ``qd::<name>`` while the block is open."""
    open_ranges: dict[str, list[Any]] = defaultdict(list)
    handles = []
    for name, child in model.named_children():
        def pre(_m: nn.Module, _args: Any, name: str = name) -> None:
            rf = profiler_range(RANGE_PREFIX + name)
            rf.__enter__()
            open_ranges[name].append(rf)

        def post(_m: nn.Module, _args: Any, _out: Any, name: str = name) -> None:
            if open_ranges[name]:
                open_ranges[name].pop().__exit__(None, None, None)
        handles += [child.register_forward_pre_hook(pre), child.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _kernels_below(event: Any) -> tuple[int, float]:
    """(count, µs) of the device kernels launched by ``event`` and everything below it."""
    count, us = len(event.kernels), sum(k.duration for k in event.kernels)
    for child in event.cpu_children:
        c, t = _kernels_below(child)
        count, us = count + c, us + t
    return count, us


def _enclosing_range(event: Any) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(RANGE_PREFIX) and parent.name != RANGE_PREFIX + "forward":
            return parent.name.removeprefix(RANGE_PREFIX)
        parent = parent.cpu_parent
    return ""


def _is_device_event(event: Any) -> bool:
    """A kernel, copy or memset on the GPU's timeline; not the GPU-side span of a record_function range (a
    "user annotation"), which would count its kernels twice."""
    return (getattr(event, "device_type", None) == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith(RANGE_PREFIX))


def summarize(events: Sequence[Any], iters: int, top: int) -> tuple[list[ModuleTime], list[KernelTime], float, float]:
    """Module and kernel tables from the profiler's events: (modules, kernels, device ms, host ms) per forward.

    Kernels are booked to the innermost module range open when they were launched (the profiler links each
    kernel to the CPU operation or range that launched it). The GPU total and the kernel table come from the
    device's own events when the profile has them, so a kernel the profiler could not link to its launch (a
    launch outside every operation) still counts, in a ``(not booked)`` row.
    """
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    inside: dict[str, str] = {}
    booked_device = total_host = 0.0
    for e in events:
        if not e.name.startswith(RANGE_PREFIX) or _is_device_event(e):
            continue
        count, us = _kernels_below(e)
        name = e.name.removeprefix(RANGE_PREFIX)
        if name == "forward":
            booked_device += us / 1e3
            total_host += e.cpu_time_total / 1e3
            sums[WRAPPER][0] += us / 1e3
            sums[WRAPPER][1] += e.cpu_time_total / 1e3
            sums[WRAPPER][2] += count
            continue
        s = sums[name]
        s[0], s[1], s[2] = s[0] + us / 1e3, s[1] + e.cpu_time_total / 1e3, s[2] + count
        inside[name] = _enclosing_range(e)
        if not inside[name]:  # the wrapper's own share is the forward less its top-level modules
            w = sums[WRAPPER]
            w[0], w[1], w[2] = w[0] - us / 1e3, w[1] - e.cpu_time_total / 1e3, w[2] - count

    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    device_events = [e for e in events if _is_device_event(e)]
    if device_events:
        for e in device_events:
            per_kernel[e.name][0] += (e.time_range.end - e.time_range.start) / 1e3
            per_kernel[e.name][1] += 1
    elif any(e.kernels for e in events):
        for e in events:
            for k in e.kernels:
                per_kernel[k.name][0] += k.duration / 1e3
                per_kernel[k.name][1] += 1
    else:  # CPU: operators by own host time
        for e in events:
            if not e.name.startswith(RANGE_PREFIX):
                per_kernel[e.name][0] += e.self_cpu_time_total / 1e3
                per_kernel[e.name][1] += 1
    total_device = sum(t for t, _ in per_kernel.values()) if device_events else booked_device
    unbooked = total_device - booked_device
    if device_events and unbooked > 0.005 * total_device:
        sums[UNBOOKED] = [unbooked, 0.0, sum(c for _, c in per_kernel.values()) - sum(
            _kernels_below(e)[0] for e in events if e.name == RANGE_PREFIX + "forward")]
    modules = [ModuleTime(n, s[0] / iters, s[1] / iters, s[2] / iters, inside.get(n, "")) for n, s in sums.items()]
    modules.sort(key=lambda m: (m.name in (WRAPPER, UNBOOKED), m.name == UNBOOKED, -m.device_ms, -m.host_ms))
    kernels = sorted((KernelTime(n, t / iters, c / iters) for n, (t, c) in per_kernel.items()),
                     key=lambda k: -k.total_ms)[:top]
    return modules, kernels, total_device / iters, total_host / iters


def whole_forward(modules: Sequence[ModuleTime], device_ms: float, host_ms: float) -> ModuleTime:
    """``summarize``'s rows as one row for the whole forward (a compiled backend, profiled without module ranges):
    its GPU and host time, and its kernels (top-level rows, the wrapper's and unbooked ones; a nested row's kernels
    are already in its parent's)."""
    return ModuleTime(COMPILED, device_ms, host_ms, sum(m.kernels for m in modules if not m.inside), "")


def render(modules: Sequence[ModuleTime], kernels: Sequence[KernelTime], device_ms: float, host_ms: float, *,
           title: str, gpu: bool, ideal: Roofline | None = None) -> str:
    """Markdown tables; with ``ideal`` (``bench.roofline`` of the same forward on this GPU) each module's GPU time
    is also set against its ideal time, which points at the modules whose kernels are slow."""
    lines = [f"# {title}", ""]
    if gpu:
        lines += [f"One forward: {device_ms:.2f} ms of GPU kernels, {host_ms:.2f} ms on the host "
                  f"({'launch-bound: the GPU waits for the host' if host_ms > device_ms else 'GPU-bound'}).", ""]
        if ideal is not None:
            ideal_ms = ideal.total["seconds"] * 1e3
            lines += [f"Ideal (`python -m bench.roofline`, {ideal.dtype}, {ideal.gpu} datasheet peaks): "
                      f"{ideal_ms:.3f} ms; the GPU time is {device_ms / ideal_ms:.1f}× that.", ""]
        extra = " ideal ms | × ideal |" if ideal is not None else ""
        lines += ["| module | GPU ms | % of GPU | kernels | host ms |" + extra,
                  "|---|---|---|---|---|" + ("---|---|" if ideal is not None else "")]
        for m in modules:
            share = 100 * m.device_ms / device_ms if device_ms else 0.0
            where = f" (inside {m.inside})" if m.inside else ""
            cells = ""
            if ideal is not None:
                row = ideal.total if m.name == COMPILED else ideal.modules.get(m.name)
                cells = (f" {row['seconds'] * 1e3:.3f} | {m.device_ms / (row['seconds'] * 1e3):.1f}× |"
                         if row and row["seconds"] > 0 else " | |")
            lines.append(f"| {m.name}{where} | {m.device_ms:.3f} | {share:.1f} % | {m.kernels:.0f} | "
                         f"{m.host_ms:.3f} |" + cells)
        lines += ["", f"Top {len(kernels)} kernels by GPU time per forward:", "",
                  "| kernel | GPU ms | % of GPU | calls |", "|---|---|---|---|"]
        for k in kernels:
            share = 100 * k.total_ms / device_ms if device_ms else 0.0
            lines.append(f"| `{_short(k.name)}` | {k.total_ms:.3f} | {share:.1f} % | {k.calls:.0f} |")
    else:
        lines += [f"One forward: {host_ms:.2f} ms on the host (no GPU: host times only).", "",
                  "| module | host ms | % |", "|---|---|---|"]
        for m in modules:
            where = f" (inside {m.inside})" if m.inside else ""
            lines.append(f"| {m.name}{where} | {m.host_ms:.3f} | {100 * m.host_ms / host_ms if host_ms else 0:.1f} % |")
        lines += ["", f"Top {len(kernels)} operators by own host time per forward:", "",
                  "| operator | host ms | calls |", "|---|---|---|"]
        for k in kernels:
            lines.append(f"| `{_short(k.name)}` | {k.total_ms:.3f} | {k.calls:.0f} |")
    return "\n".join(lines) + "\n"


def _short(name: str, width: int = 110) -> str:
    name = name.replace("|", "/").replace("`", "'")
    return name if len(name) <= width else name[:width - 1] + "…"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.op_profile", description=description(__doc__))
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--config", default=None,
                    help=f"config name or YAML (default: the checkpoint's, else {DEFAULT_CONFIG})")
    ap.add_argument("--checkpoint", default=None, help="student .safetensors (default: random weights)")
    ap.add_argument("--data", type=Path, default=None, help="evaluation data, as for python -m bench")
    ap.add_argument("--backend", nargs="+", default=None, choices=PROFILABLE, metavar="B",
                    help="backends to profile, one after another on the same model and images: "
                         f"{', '.join(PROFILABLE)} (default: {DEFAULT_BACKEND['cuda']} on CUDA, "
                         f"{DEFAULT_BACKEND['cpu']} on a CPU, where the Triton kernels cannot run; "
                         "torch-triton-bf16-graphs is profiled as its eager twin, the torch-compile ones compiled "
                         "without CUDA graphs and without module rows)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1],
                    help="images per forward; several sizes are profiled one after another (default 1)")
    ap.add_argument("--iters", type=int, default=3, help="profiled forwards, after two untimed ones (default 3)")
    ap.add_argument("--top", type=int, default=25, help="kernels listed (default 25)")
    ap.add_argument("--out", type=Path, default=None, help="also write the tables to this Markdown file")
    ap.add_argument("--trace", type=Path, default=None,
                    help="also write the Chrome trace to this JSON file (one per backend and batch size, named "
                         "-<backend>-b<N>, when several are given)")
    return ap


def _profile(backend: TorchBackend, session: BenchSession, spec: BackendSpec, batch: int, args: argparse.Namespace,
             gpu: bool) -> str:
    """Profile ``args.iters`` forwards of ``backend`` at ``batch``; print and return the tables."""
    images = session.inputs(batch)

    def forward() -> None:
        with profiler_range(RANGE_PREFIX + "forward"):
            backend.predict(images)
        if gpu:
            torch.cuda.synchronize()

    compiled = bool((torch_recipe(spec) or {}).get("compile"))
    with contextlib.nullcontext() if compiled else module_ranges(backend.wrapper.model):
        for _ in range(2):  # compilation, autotuning, allocator growth and lazy initialisation stay out of it
            forward()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.iters):
                forward()
    modules, kernels, device_ms, host_ms = summarize(prof.events(), args.iters, args.top)
    if compiled:  # no module ranges: everything the forward did, in one row
        modules = [whole_forward(modules, device_ms, host_ms)]
    h, w = session.size
    title = (f"Where one forward goes: {session.cfg.name}, {spec.name}, batch {batch} at {h}×{w}, "
             f"{session.device_name}, torch {torch.__version__}, mean of {args.iters}")
    text = render(modules, kernels, device_ms, host_ms, title=title, gpu=gpu,
                  ideal=session.roofline(batch, spec.precision))
    print(text, flush=True)
    if args.trace is not None:
        tag = (f"-{spec.name}" if len(args.backend) > 1 else "") + (f"-b{batch}" if len(args.batch) > 1 else "")
        prof.export_chrome_trace(str(args.trace.with_name(f"{args.trace.stem}{tag}{args.trace.suffix}")))
    return text


def check_arguments(args: argparse.Namespace, device: str) -> tuple[BenchSettings, list[BackendSpec]]:
    """The settings and backends of the run, every argument checked before anything is loaded or profiled
    (ValueError naming the flag and value); fills in ``args.backend`` and ``args.config`` where not given."""
    for flag, value in (("--batch", min(args.batch)), ("--iters", args.iters), ("--top", args.top)):
        if value < 1:
            raise ValueError(f"{flag} {value}: expected a positive integer")
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None and not checkpoint.is_file():
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file")
    if args.data is not None and not args.data.is_dir():
        raise ValueError(f"--data {args.data}: no such folder")
    output_file("--out", args.out)
    output_file("--trace", args.trace)
    args.backend = args.backend or [DEFAULT_BACKEND[device]]
    if args.config is None:  # a checkpoint brings its own config: the default would be refused against another
        args.config = (checkpoint_config_name(checkpoint) if checkpoint is not None else "") or DEFAULT_CONFIG
    settings = BenchSettings(device=device, config=args.config, checkpoint=checkpoint, data=args.data,
                             images=max(args.batch), batch=max(args.batch), backends=tuple(args.backend),
                             cpu_compile=False, work=None)
    specs = select_backends(tuple(args.backend))
    for spec in specs:
        reason = unavailable_reason(spec, settings)
        if reason is not None:
            raise ValueError(f"--backend {spec.name}: {reason}")
    return settings, specs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        settings, specs = check_arguments(args, device)
        # The config, the checkpoint and the evaluation images are loaded here, before any profiling.
        session = BenchSession(settings)
    except (ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu = device == "cuda"
    texts: list[str] = []
    try:
        for spec in specs:
            # Without CUDA graphs: a graph backend's eager twin (module hooks do not fire inside a replayed graph),
            # a compiled backend's Inductor code launching its kernels one by one (a replay hides them).
            backend = TorchBackend(session.model, name=spec.name, **{**torch_recipe(spec), "cuda_graphs": False})
            for batch in args.batch:
                texts.append(_profile(backend, session, spec, batch, args, gpu))
                if args.out is not None:
                    # After every profile: a run stopped at its time limit (SIGINT) keeps the ones that finished.
                    text = "\n".join(texts)
                    atomic_write(args.out, lambda p: p.write_text(text))
    except KeyboardInterrupt:
        print(f"stopped: {len(texts)} profile(s) finished" + (f", in {args.out}" if args.out and texts else ""),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

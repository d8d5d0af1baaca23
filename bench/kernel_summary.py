"""Summarise a kernel microbenchmark JSON (``bench/test_kernels.py`` on CUDA) against the kernel targets.

    python -m bench.kernel_summary RESULTS.json [--out RESULTS.md] [--bandwidth-tbs 3.35]

For every case and mode it puts the Triton kernel beside the best PyTorch path (the reference and
``F.scaled_dot_product_attention``; SDPA with a materialised mask for the masked kind), and gives:

- speed-up = best PyTorch median / Triton median (targets: agent ≥ 1.5×, masked ≥ 2× over SDPA);
- bandwidth = the bytes the operation must move at least / the Triton median, as a share of the GPU's peak
  (target for the agent kernel: ≥ 60 %). Forward: q, k, v (and the mask factors) read once, o written once.
  Forward+backward: the forward's bytes, then q, k, v, o, dO (and the factors) read and dq, dk, dv written;
- peak memory one call adds (``added_mem_mib``), Triton against SDPA.

Times are given twice where the JSON has both: wall-clock medians per call ending in ``torch.cuda.synchronize()``
(Python launch cost included; at these sizes that cost is a large part of each call, and it is what a user pays in
eager mode), and GPU-only times (``device_ms``: one call captured in a CUDA graph and replayed, as a graphed or
compiled model runs it). Speed-up and bandwidth share are judged against the targets in each. Further tables,
where the JSON has their benchmarks: the masked kernel's two mask paths, the resizes' and depthwise convolutions'
layouts, the refinement's four depthwise convolutions in PyTorch against the Triton kernel, and the config each
autotuner chose per shape.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bench.arguments import description, output_file, positive, read_benchmark_json, write_text_atomic

H100_BANDWIDTH_TBS = 3.35  # H100 SXM5 HBM3 peak, TB/s
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MASK_QUERIES, MASK_CHANNELS = 100, 256  # the decoder cases of bench/test_kernels.py
TARGET_SPEEDUP = {"agent": 1.5, "masked": 2.0}
TARGET_BANDWIDTH = {"agent": 0.60}
_ID = re.compile(r"test_(agent|masked)_attention\[(.+)-(triton|triton-bits|triton-factors|reference|sdpa|flex|xformers)"
                 r"-(fwd\+bwd|fwd)\]")
MASK_PATHS = ("triton-bits", "triton-factors")  # the masked kernel forced to its other way of deciding the mask
_LAYOUT_ID = re.compile(r"test_(resize|depthwise)\[(.+)-(nchw|channels-last)-(fwd\+bwd|fwd)\]")
_REFINE_DW_ID = re.compile(r"test_refine_depthwise\[(.+)-(nchw|channels-last|triton)\]")
REFINE_DW_IMPLS = ("nchw", "channels-last", "triton")


@dataclass(frozen=True)
class Row:
    """One (kind, case, mode) with the medians of its implementations in seconds."""

    kind: str
    case: str
    mode: str
    median: dict[str, float]
    added_mib: dict[str, float]
    min_bytes: int
    device_ms: dict[str, float]

    @property
    def best_torch(self) -> tuple[str, float]:
        """(name, median) of the fastest PyTorch implementation."""
        options = {k: v for k, v in self.median.items() if k in ("reference", "sdpa")}
        name = min(options, key=options.get)
        return name, options[name]

    @property
    def speedup(self) -> float:
        return self.best_torch[1] / self.median["triton"]

    def bandwidth_share(self, peak_tbs: float) -> float:
        return self.min_bytes / self.median["triton"] / (peak_tbs * 1e12)

    @property
    def best_torch_device(self) -> tuple[str, float] | None:
        """(name, GPU-only ms) of the PyTorch implementation with the shortest GPU-only time, if any has one."""
        options = {k: v for k, v in self.device_ms.items() if k in ("reference", "sdpa")}
        if not options:
            return None
        name = min(options, key=options.get)
        return name, options[name]

    @property
    def device_speedup(self) -> float | None:
        """Speed-up in GPU-only time (CUDA graph replay), host launch cost excluded; None without those times."""
        best = self.best_torch_device
        if best is None or "triton" not in self.device_ms:
            return None
        return best[1] / self.device_ms["triton"]

    def device_bandwidth_share(self, peak_tbs: float) -> float | None:
        """Bandwidth share in the kernel's GPU-only time; None without it."""
        if "triton" not in self.device_ms:
            return None
        return self.min_bytes / (self.device_ms["triton"] * 1e-3) / (peak_tbs * 1e12)


def minimum_bytes(kind: str, case: str, mode: str, shapes: Sequence[Sequence[int]], dtype: str) -> int:
    """Bytes the operation must move at least (see the module docstring)."""
    size = DTYPE_BYTES[dtype]
    q, k, v = (int(_prod(s)) for s in shapes[:3])
    factors = 0
    if kind == "masked":
        b, seq = (int(x) for x in re.match(r"decoder-b(\d+)-L(\d+)", case).groups())  # type: ignore[union-attr]
        factors = b * MASK_QUERIES * MASK_CHANNELS + b * MASK_CHANNELS * seq
    fwd = q + k + v + factors + q  # inputs read, output (q's shape) written
    if mode == "fwd":
        return fwd * size
    return (fwd + (q + k + v + factors + 2 * q) + (q + k + v)) * size  # + reads incl. o and dO, + grads written


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def collect(bench_json: dict[str, Any]) -> list[Row]:
    """Rows for every case with a Triton entry and at least one PyTorch entry, in file order."""
    medians: dict[tuple[str, str, str], dict[str, float]] = {}
    added: dict[tuple[str, str, str], dict[str, float]] = {}
    nbytes: dict[tuple[str, str, str], int] = {}
    device: dict[tuple[str, str, str], dict[str, float]] = {}
    for entry in bench_json["benchmarks"]:
        match = _ID.fullmatch(entry["name"])
        if not match:
            continue
        kind, case, impl, mode = match.groups()
        key = (kind, case, mode)
        medians.setdefault(key, {})[impl] = float(entry["stats"]["median"])
        info = entry.get("extra_info", {})
        if info.get("device_ms") is not None:
            device.setdefault(key, {})[impl] = float(info["device_ms"])
        if "added_mem_mib" in info:
            added.setdefault(key, {})[impl] = float(info["added_mem_mib"])
        if impl == "triton":
            nbytes[key] = minimum_bytes(kind, case, mode, info["shapes"], info["dtype"])
    return [Row(*key, medians[key], added.get(key, {}), nbytes[key], device.get(key, {})) for key in medians
            if "triton" in medians[key] and key in nbytes and {"reference", "sdpa"} & set(medians[key])]


def _verdict(value: float | None, target: float | None, fmt: str) -> str:
    """'1.23× (1.5×: missed)'-style cell; fmt renders value and target alike."""
    if value is None:
        return "n/a"
    if target is None:
        return fmt.format(value)
    return f"{fmt.format(value)} ({fmt.format(target)}: {'met' if value >= target else 'missed'})"


def render(rows: Sequence[Row], peak_tbs: float, title: str) -> str:
    """Markdown table of ``rows`` with each target's verdict, in wall-clock time and in GPU-only time."""
    lines = [f"# {title}", "",
             f"Bandwidth share against {peak_tbs} TB/s. Wall: medians of calls ending in a synchronize (host launch "
             "cost included). GPU-only: one call captured in a CUDA graph and replayed (host cost excluded); the "
             "best PyTorch path is chosen separately in each.", "",
             "| kernel | case | mode | Triton ms | best PyTorch | its ms | speed-up (target) | bandwidth share "
             "(target) | GPU-only ms Triton / reference / SDPA | GPU-only speed-up (target) | GPU-only bandwidth "
             "share (target) | added MiB Triton / SDPA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name, best = r.best_torch
        target = TARGET_SPEEDUP[r.kind]
        bw_target = TARGET_BANDWIDTH.get(r.kind)
        share, device_share = r.bandwidth_share(peak_tbs), r.device_bandwidth_share(peak_tbs)
        mem = (f"{r.added_mib.get('triton', float('nan')):.1f} / {r.added_mib.get('sdpa', float('nan')):.1f}"
               if r.added_mib else "n/a")
        lines.append(
            f"| {r.kind} | {r.case} | {r.mode} | {1e3 * r.median['triton']:.3f} | {name} | {1e3 * best:.3f} | "
            f"{_verdict(r.speedup, target, '{:.2f}×')} | "
            f"{_verdict(100 * share, bw_target and 100 * bw_target, '{:.1f} %')} | {_device(r)} | "
            f"{_verdict(r.device_speedup, target, '{:.2f}×')} | "
            f"{_verdict(device_share and 100 * device_share, bw_target and 100 * bw_target, '{:.1f} %')} | {mem} |")
    return "\n".join(lines) + "\n"


def _timings(entry: dict[str, Any]) -> tuple[float, float | None]:
    """(wall-clock median in s, GPU-only ms or None) of one benchmark entry."""
    device_ms = entry.get("extra_info", {}).get("device_ms")
    return float(entry["stats"]["median"]), None if device_ms is None else float(device_ms)


def _table(caption: str, header: str, lines: list[str]) -> str:
    """A captioned Markdown table of ``lines`` under ``header`` ('| a | b |'); '' when there are no lines."""
    if not lines:
        return ""
    rule = "|" + "---|" * header.count(" | ") + "---|"
    return "\n".join([caption, "", header, rule, *lines]) + "\n"


def render_mask_paths(rows: Sequence[Row]) -> str:
    """Markdown table of the masked kernel's two mask paths, where the JSON times both: its default at that L
    (``triton``) against the other one, in wall-clock and GPU-only time; '' when it times only one."""
    lines = []
    for r in rows:
        other = next((p for p in MASK_PATHS if p in r.median), None)
        if r.kind != "masked" or other is None:
            continue
        default = "factors" if other == "triton-bits" else "bit mask"
        wall = f"{1e3 * r.median['triton']:.3f} / {1e3 * r.median[other]:.3f}"
        if "triton" in r.device_ms and other in r.device_ms:
            gpu = (f"{r.device_ms['triton']:.3f} / {r.device_ms[other]:.3f} "
                   f"({r.device_ms[other] / r.device_ms['triton']:.2f}×)")
        else:
            gpu = "n/a"
        lines.append(f"| {r.case} | {r.mode} | {default} | {wall} | {gpu} |")
    return _table("The masked kernel's mask paths: the default at each L (from the factors per key tile below "
                  "BITS_MIN_KEYS keys, from the per-image bit mask from there on) against the other. Above 1× the "
                  "default is faster.",
                  "| case | mode | default path | wall ms default / other | GPU-only ms default / other (ratio) |",
                  lines)


def render_layouts(bench_json: dict[str, Any]) -> str:
    """Markdown table of the model's resizes and depthwise convolutions in PyTorch's own layout (``nchw``) against
    channels-last (what the model does), in wall-clock and GPU-only time; '' when the JSON has neither."""
    times: dict[tuple[str, str, str], dict[str, tuple[float, float | None]]] = {}
    for entry in bench_json["benchmarks"]:
        match = _LAYOUT_ID.fullmatch(entry["name"])
        if match:
            op, case, layout, mode = match.groups()
            times.setdefault((op, case, mode), {})[layout] = _timings(entry)

    def pair(a: float | None, b: float | None, scale: float) -> str:
        if a is None or b is None:
            return "n/a"
        return f"{scale * a:.3f} / {scale * b:.3f} ({a / b:.2f}×)"

    lines = [f"| {op} | {case} | {mode} | {pair(t['nchw'][0], t['channels-last'][0], 1e3)} | "
             f"{pair(t['nchw'][1], t['channels-last'][1], 1.0)} |"
             for (op, case, mode), t in times.items() if {"nchw", "channels-last"} <= set(t)]
    return _table("Layouts: the student's resizes and depthwise convolutions as PyTorch lays them out by itself "
                  "(nchw) against channels-last, as the model runs them (qd_core.layers). Above 1× channels-last is "
                  "faster.",
                  "| op | case | mode | wall ms nchw / channels-last (ratio) | GPU-only ms nchw / channels-last "
                  "(ratio) |", lines)


def render_refine_depthwise(bench_json: dict[str, Any]) -> str:
    """Markdown table of the refinement's four depthwise convolutions: PyTorch in its own layout and channels-last
    against the Triton kernel, wall-clock and GPU-only; '' when the JSON has none."""
    times: dict[str, dict[str, tuple[float, float | None]]] = {}
    for entry in bench_json["benchmarks"]:
        match = _REFINE_DW_ID.fullmatch(entry["name"])
        if match:
            median_s, device_ms = _timings(entry)
            times.setdefault(match.group(1), {})[match.group(2)] = (median_s * 1e3, device_ms)

    def cells(t: dict[str, tuple[float, float | None]], which: int) -> str:
        values = {impl: t[impl][which] for impl in REFINE_DW_IMPLS if impl in t and t[impl][which] is not None}
        text = " / ".join(f"{values[i]:.3f}" if i in values else "n/a" for i in REFINE_DW_IMPLS)
        torch_best = min((values[i] for i in ("nchw", "channels-last") if i in values), default=None)
        if torch_best is not None and "triton" in values:
            text += f" ({torch_best / values['triton']:.2f}×)"
        return text

    lines = [f"| {case} | {cells(t, 0)} | {cells(t, 1)} |" for case, t in times.items()]
    return _table("Refinement depthwise convolutions (all four dilations, forward): four PyTorch convolutions in "
                  "PyTorch's layout (nchw) and channels-last, against one Triton kernel (kernels.depthwise_conv3x3); "
                  "the ratio is the faster PyTorch layout over Triton.",
                  "| case | wall ms nchw / channels-last / triton | GPU-only ms nchw / channels-last / triton |", lines)


def render_autotuned(bench_json: dict[str, Any]) -> str:
    """Markdown table of the config each autotuned kernel chose per tuning key (recorded by the benchmark that tuned
    it, ``extra_info["autotuned"]``); '' when the JSON has none (CPU runs, older JSON files)."""
    lines = []
    for entry in bench_json["benchmarks"]:
        for kernel, chosen in (entry.get("extra_info", {}).get("autotuned") or {}).items():
            lines += [f"| {kernel} | {key} | {config} | {entry['name'].removeprefix('test_')} |"
                      for key, config in chosen.items()]
    return _table("Autotuned configs: what each kernel's autotuner chose, per tuning key (the key arguments' values, "
                  "then the tensors' dtypes), and the benchmark that tuned it.",
                  "| kernel | tuning key | config | tuned by |", lines)


def _device(r: Row) -> str:
    """GPU-only times (CUDA graph replay), where the JSON has them."""
    if not r.device_ms:
        return "n/a"
    return " / ".join(f"{r.device_ms[i]:.3f}" if i in r.device_ms else "n/a" for i in ("triton", "reference", "sdpa"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.kernel_summary", description=description(__doc__))
    ap.add_argument("json", type=Path, help="pytest-benchmark JSON of bench/test_kernels.py")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    ap.add_argument("--bandwidth-tbs", type=float, default=H100_BANDWIDTH_TBS,
                    help=f"peak memory bandwidth in TB/s (default {H100_BANDWIDTH_TBS}, an H100 SXM)")
    return ap


def summary(data: dict[str, Any], peak_tbs: float) -> str:
    """The Markdown of a benchmark JSON (``bench.arguments.read_benchmark_json``'s shape); ValueError when it has
    no Triton kernel benchmark with a PyTorch counterpart, or an entry is not as ``bench/test_kernels.py`` writes
    it."""
    try:
        rows = collect(data)
        if not rows:
            raise ValueError("no Triton kernel benchmark with a PyTorch counterpart in it")
        device = next((b["extra_info"].get("device") for b in data["benchmarks"] if "extra_info" in b), "unknown")
        text = render(rows, peak_tbs, f"Kernel microbenchmarks on {device}")
        for extra in (render_mask_paths(rows), render_layouts(data), render_refine_depthwise(data),
                      render_autotuned(data)):
            text += ("\n" + extra) if extra else ""
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        # An entry without the stats or extra_info its name promises (a hand-edited or foreign JSON): say what is
        # missing instead of a traceback.
        raise ValueError(f"a benchmark entry is not as bench/test_kernels.py writes it ({type(e).__name__}: {e})"
                         ) from None
    return text


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        positive("--bandwidth-tbs", args.bandwidth_tbs, "bandwidth in TB/s")
        output_file("--out", args.out)
        data = read_benchmark_json(args.json)
        try:
            text = summary(data, args.bandwidth_tbs)
        except ValueError as e:
            raise ValueError(f"{args.json}: {e}") from None
    except ValueError as e:
        # Like argparse's own errors: exit status 2 through SystemExit, but one line, without the usage.
        ap.exit(2, f"error: {e}\n")
    if args.out is not None:
        write_text_atomic(args.out, text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

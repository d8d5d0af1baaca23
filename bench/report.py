"""Turn a pytest-benchmark JSON (``--benchmark-json``) of the suites into the report: Markdown, JSON and a PNG.

Latency percentiles come from each benchmark's raw timings (``stats.data``, one value per round: round time /
iterations), which ``--benchmark-json`` always includes; an entry without them (a JSON saved without data) falls
back to the median for p50 and leaves p90/p99 empty. Images per second = batch / p50. MFU = FLOPs per image ×
batch / p50 / peak FLOP/s of the device at the backend's precision (``bench.metrics.GPUS``; n/a on CPUs
unless a peak is given). The speed ratio of a backend is the reference's p50 over its own at the same batch
(> 1 = faster than PyTorch fp32 eager).
"""
from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench.metrics import LOGIT_TOLERANCE, mfu, peak_flops, percentile

REFERENCE_BACKEND = "torch-fp32"


@dataclass
class LatencyRow:
    backend: str
    precision: str
    batch: int
    p50_ms: float
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float
    rounds: int
    images_per_s: float
    peak_mem_mib: float | None
    mfu: float | None
    speedup: float | None = None  # reference p50 / this p50 at the same batch
    ideal_ms: float | None = None  # bench.roofline's ideal time of the call on this GPU; None elsewhere
    memory_method: str | None = None  # how peak_mem_mib was measured (rows of one report may differ)
    timing_note: str | None = None  # what the timed call includes beyond the others' (host-device copies)


@dataclass
class AccuracyRow:
    backend: str
    precision: str
    miou: float
    reference_miou: float
    delta_points: float
    tolerance_points: float
    agreement: float
    passed: bool
    images: int
    logit_rel_error: float | None = None  # ‖L − L_ref‖ / ‖L_ref‖ of the semantic logits; None where not available


@dataclass
class KernelRow:
    group: str
    name: str
    p50_ms: float
    p90_ms: float | None
    mean_ms: float
    rounds: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class NotRun:
    """A test that was skipped or failed, with pytest's reason."""

    test: str
    outcome: str
    reason: str


@dataclass
class Report:
    meta: dict[str, Any]
    latency: list[LatencyRow]
    accuracy: list[AccuracyRow]
    kernels: list[KernelRow]
    not_run: list[NotRun]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "latency": [asdict(r) for r in self.latency],
                "accuracy": [asdict(r) for r in self.accuracy], "kernels": [asdict(r) for r in self.kernels],
                "not_run": [asdict(r) for r in self.not_run]}


# ------------------------------------------------------------------------------------------------ parsing


def latency_percentiles(stats: dict[str, Any]) -> tuple[float, float | None, float | None]:
    """(p50, p90, p99) in seconds of one pytest-benchmark ``stats`` block (see the module docstring)."""
    data = stats.get("data")
    if data:
        return percentile(data, 50), percentile(data, 90), percentile(data, 99)
    if "median" not in stats:
        raise ValueError("stats: expected raw timings ('data') or a 'median'")
    return float(stats["median"]), None, None


def _latency_row(entry: dict[str, Any], peak_override: float | None) -> LatencyRow:
    info, stats = entry["extra_info"], entry["stats"]
    if "samples_s" in info:  # a backend timed by its own process (bench.native): its samples replace the stats
        samples = [float(s) for s in info["samples_s"]]
        if not samples:  # the pytest round would stand in: a process start and a model load, not a latency
            raise ValueError(f"{entry.get('name')}: extra_info.samples_s is empty; expected the timed passes")
        stats = {"data": samples, "mean": sum(samples) / len(samples), "rounds": len(samples)}
    p50, p90, p99 = latency_percentiles(stats)
    batch = int(info["batch"])
    peak = peak_flops(str(info.get("device_name", "")), str(info["precision"]), peak_override)
    flops = info.get("flops_per_image")
    ms = 1e3
    return LatencyRow(
        backend=str(info["backend"]), precision=str(info["precision"]), batch=batch, p50_ms=p50 * ms,
        p90_ms=None if p90 is None else p90 * ms, p99_ms=None if p99 is None else p99 * ms,
        mean_ms=float(stats["mean"]) * ms, rounds=int(stats["rounds"]), images_per_s=batch / p50,
        peak_mem_mib=info.get("peak_mem_mib"), mfu=mfu(float(flops), batch, p50, peak) if flops else None,
        ideal_ms=None if info.get("ideal_ms") is None else float(info["ideal_ms"]),
        memory_method=None if info.get("memory_method") is None else str(info["memory_method"]),
        timing_note=None if info.get("timing_note") is None else str(info["timing_note"]))


def _accuracy_row(entry: dict[str, Any]) -> AccuracyRow:
    info = entry["extra_info"]
    return AccuracyRow(backend=str(info["backend"]), precision=str(info["precision"]), miou=float(info["miou"]),
                       reference_miou=float(info["reference_miou"]), delta_points=float(info["delta_points"]),
                       tolerance_points=float(info["tolerance_points"]), agreement=float(info["agreement"]),
                       passed=bool(info["passed"]), images=int(info["images"]),
                       logit_rel_error=(None if info.get("logit_rel_error") is None
                                        else float(info["logit_rel_error"])))


def _kernel_row(entry: dict[str, Any]) -> KernelRow:
    p50, p90, _ = latency_percentiles(entry["stats"])
    extra = {k: v for k, v in entry.get("extra_info", {}).items() if k in ("mode", "dtype", "peak_mem_mib",
                                                                            "fwd_flops", "shapes")}
    return KernelRow(group=str(entry.get("group") or ""), name=str(entry["name"]), p50_ms=p50 * 1e3,
                     p90_ms=None if p90 is None else p90 * 1e3, mean_ms=float(entry["stats"]["mean"]) * 1e3,
                     rounds=int(entry["stats"]["rounds"]), extra=extra)


def session_meta(benchmarks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The session facts the suites record in every entry (device, config, model, images, FLOPs)."""
    keys = ("device", "device_name", "config", "model", "eval_set", "height", "width", "flops_per_image", "torch",
            "backend_settings")
    for entry in benchmarks:
        info = entry.get("extra_info", {})
        if info.get("kind") in ("latency", "accuracy"):
            return {k: info[k] for k in keys if k in info}
    return {}


def build_report(bench_json: dict[str, Any], meta: dict[str, Any] | None = None,
                 not_run: Iterable[NotRun] = (), peak_override: float | None = None) -> Report:
    """The report of one pytest-benchmark JSON; ``meta`` (versions, date, ...) is merged over what the entries say.

    Entries of kind ``latency`` and ``accuracy`` come from ``bench/test_backends.py``; any other entry (the kernel
    microbenchmarks of ``bench/test_kernels.py``) is listed as a kernel row.
    """
    if not isinstance(bench_json, dict) or not isinstance(bench_json.get("benchmarks"), list):
        raise ValueError("bench_json: expected a pytest-benchmark JSON object with a 'benchmarks' list")
    entries = bench_json["benchmarks"]
    latency, accuracy, kernels = [], [], []
    for entry in entries:
        info = entry.get("extra_info", {})
        kind = info.get("kind")
        if kind == "latency":
            latency.append(_latency_row(entry, peak_override))
        elif kind == "accuracy":
            if "miou" in info:  # without it the test failed after its timed pass: listed under "not run or failed"
                accuracy.append(_accuracy_row(entry))
        elif not str(entry.get("name", "")).startswith(("test_latency[", "test_accuracy[")):
            kernels.append(_kernel_row(entry))
    reference = {r.batch: r.p50_ms for r in latency if r.backend == REFERENCE_BACKEND}
    for row in latency:
        if row.batch in reference:
            row.speedup = reference[row.batch] / row.p50_ms
    latency.sort(key=lambda r: (r.batch, r.p50_ms))
    kernels.sort(key=lambda r: (r.group, r.name))
    full_meta = session_meta(entries)
    full_meta["peak_flops_override"] = peak_override
    full_meta.update(meta or {})
    if "machine_info" in bench_json:
        full_meta.setdefault("machine_info", {k: bench_json["machine_info"].get(k) for k in
                                              ("node", "processor", "machine", "python_version", "cpu")
                                              if k in bench_json["machine_info"]})
    return Report(full_meta, latency, accuracy, kernels, list(not_run))


# ------------------------------------------------------------------------------------------------ Markdown


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(report: Report) -> str:
    """The report as Markdown: session facts, latency table, accuracy table, kernel table, tests not run."""
    m = report.meta
    title = f"# QueryDiff benchmark: {m.get('device', '?')}"
    if m.get("date"):
        title += f", {m['date']}"
    lines = [title, ""]
    facts = [
        ("device", m.get("device_name")),
        ("config", f"{m.get('config')} at {m.get('height')}x{m.get('width')} "
                   f"({_num(m.get('flops_per_image') and m['flops_per_image'] / 1e9, '.2f')} GFLOPs per image, "
                   f"qd_core.summary)" if m.get("config") else None),
        ("weights", m.get("model")),
        ("images", m.get("eval_set")),
        ("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) or None),
        ("settings", m.get("backend_settings")),
        ("stopped", m.get("stopped_note")),
        ("host load", m.get("load_note")),
        ("memory", m.get("memory_note")),
        ("MFU", m.get("mfu_note")),
        ("command", f"`{m['command']}`" if m.get("command") else None),
    ]
    lines += [f"- **{k}**: {v}" for k, v in facts if v]
    if str(m.get("model", "")).startswith("random-init"):
        lines += ["", "> Random weights: latency is meaningful, mIoU is not (parity still compares each backend "
                      "with the reference on the same images)."]

    lines += ["", "## Latency (predict: RGB in, full-size labels out)", ""]
    ideal = any(r.ideal_ms for r in report.latency)
    if ideal:
        lines += ["Ideal: the call's time if each of its kernels ran at the GPU's datasheet peak FLOP/s or "
                  "bandwidth, whichever binds (`python -m bench.roofline`); × ideal = p50 / ideal.", ""]
    # Where rows measured their peak memory differently (a CUDA-graph replay against an eager call), each peak
    # carries a note number, and the notes follow the table: the column is not one comparable quantity then.
    methods = list(dict.fromkeys(r.memory_method for r in report.latency if r.memory_method))
    marks = {m: f" [{i + 1}]" for i, m in enumerate(methods)} if len(methods) > 1 else {}

    def peak(r: LatencyRow) -> str:
        return _num(r.peak_mem_mib, ".0f") + (marks.get(r.memory_method or "", "") if r.peak_mem_mib is not None
                                              else "")

    # Rows whose timed call does more than the others' (a backend that takes host images on a GPU) are marked.
    timing_notes = list(dict.fromkeys(r.timing_note for r in report.latency if r.timing_note))
    timing_marks = {n: " " + "*" * (i + 1) for i, n in enumerate(timing_notes)}

    def p50(r: LatencyRow) -> str:
        return _num(r.p50_ms, ".2f") + timing_marks.get(r.timing_note or "", "")

    # The round count says what the percentiles rest on (a p99 of a handful of rounds is their maximum).
    lines += _table(["backend", "precision", "batch", "rounds", "p50 ms", "p90 ms", "p99 ms", "img/s",
                     f"× {REFERENCE_BACKEND}", "peak MiB", "MFU"] + (["ideal ms", "× ideal"] if ideal else []),
                    [[r.backend, r.precision, str(r.batch), str(r.rounds), p50(r), _num(r.p90_ms, ".2f"),
                      _num(r.p99_ms, ".2f"), _num(r.images_per_s, ".1f"), _num(r.speedup, ".2f"),
                      peak(r), "n/a" if r.mfu is None else f"{100 * r.mfu:.1f}%"]
                     + ([_num(r.ideal_ms, ".2f"), _num(r.ideal_ms and r.p50_ms / r.ideal_ms, ".1f")] if ideal else [])
                     for r in report.latency])
    if marks or timing_marks:
        lines += [""]
    lines += [f"- p50{mark}: {note}" for note, mark in timing_marks.items()]
    lines += [f"- peak MiB{mark}: {method}" for method, mark in marks.items()]
    if report.accuracy:
        ref = report.accuracy[0]
        lines += ["", f"## Accuracy parity against {REFERENCE_BACKEND} ({ref.images} images)", ""]
        lines += _table(["backend", "precision", "mIoU", "Δ points", "Δ tolerance", "argmax agreement",
                         "logit rel. error", "logit tolerance", "result"],
                        [[r.backend, r.precision, f"{100 * r.miou:.2f}", f"{r.delta_points:+.3f}",
                          f"±{r.tolerance_points}", f"{100 * r.agreement:.3f}%", _num(r.logit_rel_error, ".2e"),
                          f"{LOGIT_TOLERANCE.get(r.precision, math.nan):.0e}", "pass" if r.passed else "FAIL"]
                         for r in report.accuracy])
    if report.kernels:
        lines += ["", "## Kernel microbenchmarks", ""]
        lines += _table(["group", "name", "p50 ms", "p90 ms", "mean ms", "rounds"],
                        [[r.group, r.name, _num(r.p50_ms, ".4f"), _num(r.p90_ms, ".4f"), _num(r.mean_ms, ".4f"),
                          str(r.rounds)] for r in report.kernels])
    if report.not_run:
        lines += ["", "## Not run or failed", ""]
        lines += _table(["test", "outcome", "reason"],
                        [[f"`{r.test}`", r.outcome, r.reason.replace("|", "\\|").replace("\n", " ")]
                         for r in report.not_run])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ PNG


def write_png(report: Report, path: Path) -> Path:
    """Two panels: p50 latency per backend (one bar per batch, p90 as whisker) and each backend's mIoU delta to
    the fp32 reference inside its tolerance band, labelled with its mIoU and argmax agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(dict.fromkeys(r.backend for r in report.latency))
    acc_backends = [r.backend for r in report.accuracy]
    batches = sorted({r.batch for r in report.latency})
    fig, (ax_lat, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)

    width = 0.8 / max(1, len(batches))
    for i, batch in enumerate(batches):
        rows = {r.backend: r for r in report.latency if r.batch == batch}
        xs = [k + i * width for k, b in enumerate(backends) if b in rows]
        p50 = [rows[b].p50_ms for b in backends if b in rows]
        err = [max(0.0, (rows[b].p90_ms or rows[b].p50_ms) - rows[b].p50_ms) for b in backends if b in rows]
        ax_lat.bar(xs, p50, width, yerr=[[0.0] * len(err), err], capsize=3, label=f"batch {batch}")
    ax_lat.set_xticks([k + width * (len(batches) - 1) / 2 for k in range(len(backends))], backends,
                      rotation=30, ha="right")
    ax_lat.set_ylabel("p50 latency per call (ms), whisker to p90")
    ax_lat.set_title(f"Latency, {report.meta.get('device_name') or report.meta.get('device', '')}", fontsize=10)
    if batches:
        ax_lat.legend()

    # The deltas are a few hundredths of a point where the mIoU is tens: bars of mIoU from 0 would all look equal,
    # so the panel plots each backend's delta inside its own tolerance band and writes the mIoU above it.
    rows = report.accuracy
    xs = range(len(rows))
    tolerances = [r.tolerance_points for r in rows]
    ax_acc.bar(xs, [2 * t for t in tolerances], bottom=[-t for t in tolerances], width=0.8, color="0.88",
               label="tolerance")
    ax_acc.bar(xs, [r.delta_points for r in rows], width=0.45,
               color=["tab:green" if r.passed else "tab:red" for r in rows])
    # A dot per backend: a delta of exactly 0 (most fp32 backends) has no bar to see.
    ax_acc.scatter(xs, [r.delta_points for r in rows], s=14, zorder=3,
                   color=["tab:green" if r.passed else "tab:red" for r in rows])
    ax_acc.axhline(0.0, color="k", lw=0.8)
    reach = max([0.1] + tolerances + [abs(r.delta_points) for r in rows])
    for x, r in zip(xs, rows):
        top = max(r.tolerance_points, r.delta_points)
        ax_acc.annotate(f"{100 * r.miou:.2f}\n{100 * r.agreement:.2f}%", (x, top + 0.03 * reach), ha="center",
                        va="bottom", fontsize=7)
    ax_acc.set_ylim(-1.25 * reach, 1.45 * reach)
    if rows:
        ax_acc.legend(loc="lower right", fontsize=8)
    ax_acc.set_xticks(range(len(acc_backends)), acc_backends, rotation=30, ha="right")
    ax_acc.set_ylabel(f"mIoU − {REFERENCE_BACKEND} mIoU (points)")
    reference = f" ({100 * rows[0].reference_miou:.2f})" if rows else ""
    title = (f"mIoU against {REFERENCE_BACKEND}{reference}: green within tolerance, red over;\n"
             f"above each bar its mIoU and argmax agreement")
    if str(report.meta.get("model", "")).startswith("random-init"):
        title += "; random weights: mIoU not meaningful"
    ax_acc.set_title(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")  # the format is named: write_report saves to a temporary name
    plt.close(fig)
    return path


def write_report(report: Report, out_dir: Path, stem: str, overwrite: bool = False) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir``; returns the paths written.

    Existing files are kept (FileExistsError naming the first) unless ``overwrite``. The three files are written
    to temporary names first and renamed only once all are complete, so a failure while writing any of them (a
    full disk) leaves the earlier report as it was: never a new table beside an old plot. Without matplotlib no
    PNG is written (two paths are returned) and an earlier ``<stem>.png``, a plot of another run, is removed.
    """
    paths = [out_dir / f"{stem}.{ext}" for ext in ("md", "json", "png")]

    def refuse_existing() -> None:
        for p in paths:
            if p.exists():
                raise FileExistsError(f"{p}: exists; pass --overwrite to replace it")

    if not overwrite:
        refuse_existing()
    out_dir.mkdir(parents=True, exist_ok=True)
    temps = [p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp") for p in paths]
    try:
        temps[0].write_text(render_markdown(report))
        temps[1].write_text(json.dumps(report.to_json(), indent=2, default=str) + "\n")
        try:
            write_png(report, temps[2])
        except ImportError:  # matplotlib is optional; the caller says so
            temps[2].unlink(missing_ok=True)
        written = [(t, p) for t, p in zip(temps, paths) if t.exists()]
        for tmp, _ in written:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if not overwrite:
            refuse_existing()  # another run may have written them while this one ran
        for tmp, path in written:
            os.replace(tmp, path)
        if len(written) < len(paths):
            paths[2].unlink(missing_ok=True)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return [path for _, path in written]

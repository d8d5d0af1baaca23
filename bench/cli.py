"""``python -m bench``: run the benchmark suites and write bench/results/<device>-<date>.{md,json,png}.

    python -m bench [--device cpu|cuda] [--config F] [--checkpoint C] [--data DIR] [--quick] [--out DIR]

The suites run in this process through ``pytest.main`` with ``--benchmark-json``; the settings reach them as
``QD_BENCH_*`` environment variables (``bench.settings``). Without ``--checkpoint`` the newest
``runs/*/best.safetensors`` (of ``--config``, when given) is used, else a randomly initialised student, which the
report labels as such: its latency is meaningful, its mIoU is not. The arguments, the config, the checkpoint and
the data folder are checked (the model and the images loaded) before any suite runs: one that cannot be used is one
``error:`` line and exit status 2, with nothing written. Otherwise the exit status is pytest's (1 when a backend
fails its accuracy tolerance, 2 when interrupted); the report is written either way. Ctrl-C or SIGTERM (a time
limit such as ``timeout``) stops the suites after the test in progress and still writes the report of what ran,
marked as stopped. ``--time-limit S`` is the gentler stop: tests expected to end after S seconds (the time spent
plus the longest earlier test of the same backend) are skipped (the report lists them), so nothing is interrupted
mid-call.
"""
from __future__ import annotations

import _thread
import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from bench.arguments import output_folder, positive, read_benchmark_json
from bench.report import NotRun, build_report, render_markdown, write_report
from bench.settings import (ENV_PREFIX, IN_CHECKOUT, NO_CHECKPOINT, REPO_ROOT, backend_names, newest_checkpoint,
                            settings_from_env)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" if IN_CHECKOUT else Path("bench-results")
# (images, larger batch, min rounds, max seconds per benchmark, pytest-benchmark warm-up calls on top of the suite's
# own untimed first call); 7 images = one per synthetic domain.
PRESETS = {
    ("cpu", True): (7, 4, 5, 0.5, 0),
    ("cpu", False): (28, 4, 30, 4.0, 3),
    ("cuda", True): (14, 8, 20, 1.0, 3),
    ("cuda", False): (70, 8, 100, 5.0, 10),
}
VERSION_PACKAGES = ("torch", "triton", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "numpy",
                    "pytest-benchmark")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--config", default=None,
                    help="config name or YAML (default: the checkpoint's, else tiny)")
    ap.add_argument("--checkpoint", default=None,
                    help="student .safetensors, or 'none' for random weights (default: newest "
                         "runs/*/best.safetensors, else random weights)")
    ap.add_argument("--data", type=Path, default=None,
                    help="evaluation data: a synthetic root or a Cityscapes-layout folder (default: the "
                         "synthetic evaluation set, drawn into data/ on first use)")
    ap.add_argument("--quick", action="store_true", help="fewer images and rounds (a smoke run)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="report folder (default bench/results; ./bench-results for an installed copy)")
    ap.add_argument("--images", type=int, default=None, help="evaluation images (default: by device and --quick)")
    ap.add_argument("--batch", type=int, default=None, help="the larger timed batch (batch 1 is always timed)")
    ap.add_argument("--backends", default=None, help="comma-separated backends to run (default: all)")
    ap.add_argument("--no-compile", action="store_true",
                    help="on CPU, leave out torch.compile, AOTInductor and qd-infer, the C++ runner of the "
                         "AOTInductor package (minutes of C++ compilation)")
    ap.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=None,
                    help="also run bench/test_kernels.py (default: on CUDA only; on CPU it times the Triton "
                         "interpreter, which says nothing about the kernels)")
    ap.add_argument("--kernels-json", type=Path, action="append", default=[],
                    help="a pytest-benchmark JSON of the kernel microbenchmarks to include (repeatable)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak TFLOP/s for MFU, overriding the table (needed for an MFU on CPUs)")
    ap.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="skip the tests expected to end after this many seconds (time spent + the longest "
                         "earlier test of the same backend; the report lists them); default: no limit")
    ap.add_argument("--overwrite", action="store_true", help="replace today's report files if they exist")
    return ap


def resolve_device(requested: str | None) -> str:
    """``--device``'s value, else cuda when torch sees a GPU, else cpu; ValueError (one line) when cuda is asked
    for on a machine without one."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device on this machine")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def device_slug(device: str) -> str:
    """'cpu', or 'cuda-<gpu name>' in lower-case dashes (e.g. cuda-nvidia-h100-80gb-hbm3)."""
    if device == "cpu":
        return "cpu"
    import torch

    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


# What --time-limit expects of a backend's first test before any has run: Inductor's compilation (and CUDA-graph
# capture) of the ViT-L student took ~130 s per batch size on an H100 (and minutes of C++ on a CPU); the exported
# backends build their artifact inside their first test: AOTInductor's package (87 s for the tiny student on the
# 2-core CPU; qd-infer compiles it too when aoti did not run, besides building itself) and a TensorRT engine
# (minutes for the ViT-L student). Others (eager, ONNX export): 0, their first test is seconds.
FIRST_TEST_S = {"torch-compile": 150.0, "torch-compile-bf16": 150.0, "torch-compile-triton-bf16": 150.0,
                "aoti": 150.0, "qd-infer": 150.0, "trt-fp16": 300.0}


class OutcomeCollector:
    """A pytest plugin that keeps every skipped or failed test with its reason, and whether the run was cut short,
    for the report; prints one progress line per test (a GPU run spends minutes in compilation and capture, and
    pytest's dots do not say where); and, given ``time_limit``, skips the tests that would end after it.

    A test "would end after it" when the time spent plus the longest test so far of the same backend (its
    ``spec`` parameter: torch.compile's first call at each batch size takes minutes, an eager backend's seconds)
    exceeds the limit. A limit the run respects is what lets it write its report; a stop by signal in the middle of
    a compilation or a CUDA-graph capture may leave the process unable to."""

    def __init__(self, time_limit: float | None = None, progress: Any = None, start: float | None = None) -> None:
        self.not_run: list[NotRun] = []
        self.passed = 0
        self.interrupted = False
        self.session: Any = None
        self.stop_timer: threading.Timer | None = None  # armed by stop_on_signals
        self.time_limit = time_limit
        self.progress = progress
        self.start = time.monotonic() if start is None else start  # time.monotonic() when the run began
        self._longest: dict[str, float] = {}  # backend -> longest setup + call seconds of its tests so far
        self._durations: dict[str, float] = {}  # nodeid -> its setup + call seconds so far

    @staticmethod
    def _backend(item_or_report: Any) -> str:
        callspec = getattr(item_or_report, "callspec", None)
        spec = callspec.params.get("spec") if callspec is not None else None
        return str(getattr(spec, "name", "")) if spec is not None else ""

    def pytest_sessionstart(self, session: Any) -> None:
        self.session = session

    def pytest_keyboard_interrupt(self, excinfo: Any) -> None:
        self.interrupted = True
        self.cancel_stop_timer()  # stopped: nothing may interrupt the saving of the results

    def cancel_stop_timer(self) -> None:
        if self.stop_timer is not None:
            self.stop_timer.cancel()

    @pytest.hookimpl(tryfirst=True)  # before the fixtures: a skipped test builds nothing
    def pytest_runtest_setup(self, item: Any) -> None:
        if self.time_limit is None:
            return
        spent = time.monotonic() - self.start
        backend = self._backend(item)
        if backend in self._longest:
            expected = self._longest[backend]
            why = f" and ~{expected:.1f} s expected from an earlier test of its backend"
        else:
            expected = FIRST_TEST_S.get(backend, 0.0)
            why = f" and ~{expected:.0f} s expected for its backend's first test (compilation)" if expected else ""
        if spent + expected > self.time_limit:
            pytest.skip(f"--time-limit {self.time_limit:g} s: {spent:.1f} s spent{why}")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> None:
        # Keyed by backend here, where the item (and its parameters) is at hand; logreport only sees the report.
        # A skipped test (by the limit itself, or for want of CUDA) says nothing of how long the backend takes:
        # counted, its near-zero time would stand in for torch.compile's minutes at the next batch size.
        skipped = call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception)
        if call.when in ("setup", "call") and self._backend(item) and not skipped:
            total = self._durations.get(item.nodeid, 0.0) + call.duration
            self._durations[item.nodeid] = total
            backend = self._backend(item)
            self._longest[backend] = max(self._longest.get(backend, 0.0), total)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if self.progress is not None and (report.when == "call" or report.outcome != "passed"):
            print(f"[{time.monotonic() - self.start:6.0f} s] {report.nodeid.split('::')[-1]}: {report.outcome} "
                  f"({report.when}, {report.duration:.1f} s)", file=self.progress, flush=True)
        if report.passed and report.when == "call":
            self.passed += 1
        elif report.skipped and report.when in ("setup", "call"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.not_run.append(NotRun(report.nodeid.split("::")[-1], "skipped", reason.removeprefix("Skipped: ")))
        elif report.failed:
            # The exception's own first line ("NativeError: configuring qd_infer failed: CMake Error: ..."): the last
            # "E " line of the traceback is the last line of a long message, often a tool's boilerplate.
            crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
            first = [ln.strip() for ln in str(getattr(crash, "message", "")).splitlines() if ln.strip()]
            text = getattr(report, "longreprtext", "") or str(report.longrepr)
            last = [ln for ln in text.splitlines() if ln.startswith("E ")]
            reason = (first[0] if first else last[-1][1:].strip() if last
                      else (text.splitlines() or ["failed"])[-1])
            self.not_run.append(NotRun(report.nodeid.split("::")[-1], f"failed ({report.when})", reason))


def resolve_checkpoint(checkpoint: str | None, config: str | None) -> str:
    """The checkpoint to pass on: the given one, else the newest of runs/, else 'none' (random weights)."""
    if checkpoint and checkpoint.lower() == NO_CHECKPOINT:
        return NO_CHECKPOINT
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise ValueError(f"--checkpoint {checkpoint}: no such file")
        return str(Path(checkpoint).resolve())
    found = newest_checkpoint(REPO_ROOT / "runs", config)
    return str(found) if found is not None else NO_CHECKPOINT


STOP_GRACE_S = 15.0  # how long a signalled stop waits for the test in progress (gpu_check kills 30 s after)


@contextlib.contextmanager
def stop_on_signals(collector: OutcomeCollector) -> Iterator[None]:
    """Within the block the first SIGTERM or SIGINT (a time limit such as ``timeout``, Ctrl-C) asks pytest to stop
    after the test in progress: the session finishes, pytest-benchmark saves the JSON of the tests that ran, and
    the report can still be written. A second signal, or the test still running ``STOP_GRACE_S`` later, stops it
    at once (KeyboardInterrupt). Not at once from the start: an exception raised at an arbitrary instruction can
    land where Python 3.11 has no line number, and pytest then fails while printing it and saves nothing.
    (Signal handlers belong to the main thread; elsewhere the block changes nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        if collector.session is None or collector.stop_timer is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        collector.interrupted = True
        collector.session.shouldstop = f"signal {signum}"
        print(f"signal {signum}: stopping after the test in progress (at most {STOP_GRACE_S:g} s; again to stop now)",
              file=sys.stderr, flush=True)
        # interrupt_main delivers SIGINT to this handler, which then raises.
        collector.stop_timer = threading.Timer(STOP_GRACE_S, _thread.interrupt_main)
        collector.stop_timer.daemon = True
        collector.stop_timer.start()

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        collector.cancel_stop_timer()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_arguments(args: argparse.Namespace, images: int, batch: int) -> tuple[str, list[dict[str, Any]]]:
    """Every check that needs no model, before anything runs: ValueError naming the flag and value. Returns the
    checkpoint to pass on (``resolve_checkpoint``) and the entries of the ``--kernels-json`` files, read now so
    that a broken one is not found after the suites ran."""
    if args.config:
        from qd_core.config import load_config

        load_config(args.config)  # cheap, and a name that does not resolve is the likeliest bad input
    checkpoint = resolve_checkpoint(args.checkpoint, args.config)
    if args.data is not None and not args.data.is_dir():
        raise ValueError(f"--data {args.data}: no such folder")
    output_folder("--out", args.out)
    kernel_entries = []
    for path in args.kernels_json:
        if not path.is_file():
            raise ValueError(f"--kernels-json {path}: no such file")
        kernel_entries += read_benchmark_json(path, "--kernels-json")["benchmarks"]
    for flag, value in (("--images", images), ("--batch", batch)):
        if value < 1:
            raise ValueError(f"{flag} {value}: expected a positive integer")
    positive("--time-limit", args.time_limit, "number of seconds")
    positive("--peak-tflops", args.peak_tflops, "peak in TFLOP/s")
    if batch > images:
        raise ValueError(f"--batch {batch}: expected at most --images {images} (batches are evaluation images)")
    if args.backends:
        from bench.backends import select_backends

        select_backends(backend_names(args.backends), source="--backends")
    return checkpoint, kernel_entries


def mfu_note(peak_tflops: float | None, device: str, bench_json: dict[str, Any]) -> str:
    """What the MFU column is measured against: the --peak-tflops value (for every row, whatever its precision),
    or the datasheet entry of the GPU the run found, named with both its peaks."""
    from bench.metrics import gpu_spec_for

    if peak_tflops:
        return f"against {peak_tflops:g} TFLOP/s given by --peak-tflops, for every row whatever its precision"
    if device == "cpu":
        return "n/a on CPU (no peak FLOP/s table for CPUs; --peak-tflops sets one)"
    names = {str(b.get("extra_info", {}).get("device_name")) for b in bench_json.get("benchmarks", [])
             if b.get("extra_info", {}).get("device_name")}
    specs = {gpu_spec_for(n) for n in names}
    if len(specs) != 1 or None in specs:
        return (f"n/a: no datasheet entry in bench.metrics.GPUS for {', '.join(sorted(names)) or 'this GPU'} "
                f"(--peak-tflops sets one)")
    (spec,) = specs
    return (f"against the dense datasheet peak of {spec.name} at the row's precision: bf16/fp16 "
            f"{spec.tensor_tflops:g}, fp32 {spec.fp32_tflops:g} TFLOP/s (bench.metrics.GPUS)")


def build_session(env: dict[str, str]) -> None:
    """Load the model and the evaluation images now, as the suites' ``session`` fixture would: a config that does
    not resolve, a checkpoint that does not load or a data folder in neither layout is then one error (ValueError,
    OSError) instead of one failed setup per test and a report of nothing. ``get_session`` keeps the session, and
    the suites read the same settings from the same variables, so nothing is loaded twice."""
    from bench.backends import get_session

    get_session(settings_from_env({**os.environ, **env}))


def main(argv: Sequence[str] | None = None) -> int:
    start = time.monotonic()  # --time-limit counts the loading of the model and the images too
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        images, batch, min_rounds, max_time, warmup = PRESETS[(device, args.quick)]
        images = args.images if args.images is not None else images
        batch = args.batch if args.batch is not None else batch
        checkpoint, kernel_entries = check_arguments(args, images, batch)
        env = {ENV_PREFIX + key: value for key, value in (
            ("DEVICE", device), ("CONFIG", args.config or ""), ("CHECKPOINT", checkpoint),
            ("DATA", str(args.data.resolve()) if args.data else ""), ("IMAGES", str(images)),
            ("BATCH", str(batch)), ("BACKENDS", args.backends or ""),
            ("CPU_COMPILE", "0" if args.no_compile else "1"))}
    except (ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    today = dt.date.today().isoformat()
    stem = f"{device_slug(device)}-{today}"
    existing = [args.out / f"{stem}.{ext}" for ext in ("md", "json", "png") if (args.out / f"{stem}.{ext}").exists()]
    if existing and not args.overwrite:
        print(f"error: {existing[0]}: exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    try:  # after the cheap checks: loading a ViT-L takes a while
        build_session(env)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted while loading the model and the images; nothing ran, nothing written",
              file=sys.stderr)
        return 2
    if checkpoint != NO_CHECKPOINT:
        weights = checkpoint
    elif args.checkpoint:
        weights = "random (--checkpoint none)"
    else:
        weights = f"random (no {REPO_ROOT / 'runs'}/*/best.safetensors; --checkpoint C names one)"
    print(f"weights: {weights}", file=sys.stderr)  # the report says so too, but only at the end
    os.environ.update(env)

    run_kernels = args.kernels if args.kernels is not None else device == "cuda"
    suites = [str(BENCH_DIR / "test_backends.py")] + ([str(BENCH_DIR / "test_kernels.py")] if run_kernels else [])
    collector = OutcomeCollector(args.time_limit, progress=sys.stderr, start=start)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="qd-bench-json-") as tmp, stop_on_signals(collector):
        json_path = Path(tmp) / "benchmark.json"
        rc = pytest.main([*suites, "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO_ROOT),
                          f"--benchmark-json={json_path}", f"--benchmark-min-rounds={min_rounds}",
                          f"--benchmark-max-time={max_time}", f"--benchmark-warmup={'on' if warmup else 'off'}",
                          f"--benchmark-warmup-iterations={max(warmup, 1)}", "--benchmark-disable-gc",
                          "--benchmark-sort=name"],
                         plugins=[collector])
        if json_path.is_file():
            bench_json = json.loads(json_path.read_text())
        else:  # pytest-benchmark writes nothing when no benchmark ran: the report still says what did not, and why
            why = "interrupted before any benchmark finished" if collector.interrupted else f"pytest exit {int(rc)}"
            print(f"warning: no benchmark finished ({why}); the report lists the tests that did not run",
                  file=sys.stderr)
            bench_json = {"benchmarks": []}
    bench_json["benchmarks"] += kernel_entries

    methods = sorted({str(b["extra_info"]["memory_method"]) for b in bench_json["benchmarks"]
                      if "memory_method" in b.get("extra_info", {})})
    meta = {
        "device": device,  # also when no benchmark ran to say it
        "date": today,
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "versions": versions(),
        "memory_note": ("memory one predict call adds at its peak; " + "; ".join(methods)) if methods else None,
        "mfu_note": mfu_note(args.peak_tflops, device, bench_json),
        "quick": args.quick,
        # Other processes on the machine inflate and scatter the timings; the load says how much to trust them.
        "load_note": f"1-minute load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end, on "
                     f"{os.cpu_count()} logical CPUs",
        "stopped_note": (f"interrupted (Ctrl-C or SIGTERM) after {collector.passed} passed tests; the tests after "
                         "them did not run" if collector.interrupted else None),
    }
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    report = build_report(bench_json, meta, collector.not_run, peak_override=peak)
    print(render_markdown(report))  # first: the results are on screen even where the files cannot be written
    try:
        try:
            paths = write_report(report, args.out, stem, overwrite=args.overwrite)
        except FileExistsError:
            # Another run wrote today's report while this one ran: keep both.
            stem = next(f"{stem}-{n}" for n in range(2, 10_000)
                        if not any((args.out / f"{stem}-{n}.{ext}").exists() for ext in ("md", "json", "png")))
            print(f"warning: today's report appeared in {args.out} during this run; writing this one as "
                  f"{stem}.*", file=sys.stderr)
            paths = write_report(report, args.out, stem)
    except OSError as e:
        print(f"error: cannot write the report into {args.out}: {e}", file=sys.stderr)
        return 2
    if len(paths) < 3:
        print("warning: no PNG plot (matplotlib is not installed); pip install matplotlib for it", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths))
    return int(rc)

"""The benchmark's settings (QD_BENCH_* variables), backend selection, evaluation crops and CLI argument checks."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from bench.backends import BACKENDS, select_backends
from bench.cli import main
from bench.evalset import center_crop, load_synthetic
from bench.settings import backend_names, newest_checkpoint, settings_from_env


def env(**values: str) -> dict[str, str]:
    return {f"QD_BENCH_{k}": v for k, v in values.items()}


def test_defaults_on_cpu_are_small_random_weight_runs():
    s = settings_from_env(env(CHECKPOINT="none"), cuda_available=False)
    assert (s.device, s.config, s.checkpoint, s.images, s.batches) == ("cpu", "tiny", None, 7, (1, 4))
    assert s.model_label.startswith("random-init")


def test_the_weights_are_named_relative_to_the_working_folder(tmp_path, monkeypatch):
    inside = tmp_path / "runs" / "best.safetensors"
    inside.parent.mkdir()
    inside.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    s = settings_from_env(env(CHECKPOINT=str(inside)), cuda_available=False)
    assert s.model_label == str(Path("runs") / "best.safetensors")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert s.model_label == str(inside)  # outside the working folder: the path as given


@pytest.mark.parametrize("name, value, message", [
    ("DEVICE", "gpu", "'cpu' or 'cuda'"),
    ("DEVICE", "cuda", "no CUDA"),
    ("IMAGES", "0", "positive integer"),
    ("BATCH", "x", "positive integer"),
    ("CHECKPOINT", "/nonexistent/best.safetensors", "no such student checkpoint"),
    ("DATA", "/nonexistent", "no such folder"),
])
def test_bad_variables_raise_one_clear_error(name: str, value: str, message: str):
    with pytest.raises(ValueError, match=f"QD_BENCH_{name}.*{message}"):
        settings_from_env(env(**{"CHECKPOINT": "none", name: value}), cuda_available=False)


def test_larger_batch_cannot_exceed_the_image_count():
    with pytest.raises(ValueError, match="QD_BENCH_BATCH=8"):
        settings_from_env(env(CHECKPOINT="none", IMAGES="4", BATCH="8"), cuda_available=False)


def _checkpoint(folder: Path, config: str, mtime: float) -> Path:
    folder.mkdir(parents=True)
    path = folder / "best.safetensors"
    path.write_bytes(b"")
    path.with_suffix(".json").write_text(json.dumps({"config": {"name": config}}))
    os.utime(path, (mtime, mtime))
    return path


def test_newest_checkpoint_prefers_the_latest_of_the_requested_config(tmp_path: Path):
    old_tiny = _checkpoint(tmp_path / "a", "tiny", 1_000)
    new_tiny = _checkpoint(tmp_path / "b", "tiny", 2_000)
    newest = _checkpoint(tmp_path / "c", "vitl16_512", 3_000)
    assert newest_checkpoint(tmp_path) == newest
    assert newest_checkpoint(tmp_path, "tiny") == new_tiny != old_tiny
    assert newest_checkpoint(tmp_path, "vits16_256") is None
    assert newest_checkpoint(tmp_path / "missing") is None


def test_backend_selection_keeps_canonical_order_and_rejects_unknown_names():
    assert [b.name for b in select_backends(("ort-fp32", "torch-fp32"))] == ["torch-fp32", "ort-fp32"]
    assert select_backends(None) == list(BACKENDS)
    with pytest.raises(ValueError, match="unknown backend.*torch-int8"):
        select_backends(("torch-int8",))


@pytest.mark.parametrize("text, expected", [("", None), ("  ", None), ("ort-fp32, aoti,", ("ort-fp32", "aoti"))])
def test_backend_names_empty_means_all(text: str, expected):
    assert backend_names(text) == expected


@pytest.mark.parametrize("text", [",", " , ,"])
def test_backend_names_of_commas_alone_are_an_error_not_all(text: str):
    with pytest.raises(ValueError, match="no backend named"):
        backend_names(text)


def test_center_crop_keeps_image_and_label_aligned():
    # A 64x128 image whose red channel and label both encode the column (0..127): after resizing by 2 and cutting
    # the centre 128x128, the label's column index must still match the image's red channel.
    cols = np.tile(np.arange(128, dtype=np.uint8), (64, 1))
    image = np.stack([cols, np.zeros_like(cols), np.zeros_like(cols)], axis=-1)
    label = cols.astype(np.int64) % 19
    out_img, out_label = center_crop(image, label, (128, 128))
    assert out_img.shape == (128, 128, 3) and out_label.shape == (128, 128)
    # Nearest-neighbour label at output column j comes from input column 32 + j // 2 (the centre half).
    assert out_label[0].tolist() == [(32 + j // 2) % 19 for j in range(128)]
    assert np.abs(out_img[0, :, 0].astype(int) - (32 + np.arange(128) // 2)).max() <= 1


def test_synthetic_images_come_round_robin_over_the_domains(tmp_path: Path):
    from qd_core.data import TARGET_DOMAINS, ensure_synthetic

    root = ensure_synthetic(tmp_path / "synth", num_train=1, num_val=1, size=(64, 128), progress=False)
    eval_set = load_synthetic(root, 7, (64, 64))
    assert tuple(eval_set.images.shape) == (7, 3, 64, 64) and tuple(eval_set.labels.shape) == (7, 64, 64)
    assert eval_set.images.dtype.is_floating_point and float(eval_set.images.max()) <= 255
    # Every domain shows the same scene, so the labels are equal and the images differ.
    assert all(bool((eval_set.labels[i] == eval_set.labels[0]).all()) for i in range(7))
    assert len({eval_set.images[i].sum().item() for i in range(7)}) == 1 + len(TARGET_DOMAINS)
    with pytest.raises(ValueError, match="8 requested"):
        load_synthetic(root, 8, (64, 64))


def test_cli_refuses_cuda_without_a_gpu(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_cli_keeps_an_existing_report_without_overwrite(tmp_path: Path, capsys):
    existing = tmp_path / f"cpu-{dt.date.today().isoformat()}.md"
    existing.write_text("earlier run")
    assert main(["--device", "cpu", "--out", str(tmp_path), "--checkpoint", ""]) == 2
    assert "--overwrite" in capsys.readouterr().err and existing.read_text() == "earlier run"


@pytest.mark.parametrize("args, message", [(["--images", "0"], "--images 0"),
                                           (["--images", "2", "--batch", "4"], "--batch 4: expected at most"),
                                           (["--backends", "torch-fp32,torch-fp33"],
                                            "--backends: unknown backend(s) torch-fp33; expected names from")])
def test_cli_rejects_bad_image_and_batch_counts(args: list[str], message: str, capsys):
    assert main(["--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_stopped_by_sigterm_still_writes_the_report_of_what_ran(tmp_path: Path):
    """A time limit (``timeout`` sends SIGTERM) must not lose the benchmarks that finished: the report is written,
    says it was stopped, and holds fewer rows than a full run would."""
    import signal
    import subprocess
    import sys

    from bench.settings import REPO_ROOT
    from qd_core.data import ensure_synthetic

    root = ensure_synthetic(tmp_path / "synth", num_train=1, num_val=1, size=(64, 128), progress=False)
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "bench", "--device", "cpu", "--quick", "--checkpoint", "none", "--no-kernels",
           "--backends", "torch-fp32,torch-bf16", "--images", "2", "--batch", "2", "--data", str(root),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = ""
    try:
        # pytest -q prints one character per finished test: stop the run after the first of six has passed.
        while True:
            ch = proc.stdout.read(1).decode(errors="replace")
            assert ch, "the benchmark ended before its first test finished"
            line = "" if ch == "\n" else line + ch
            if line and set(line) <= set(".sF") and "." in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, rest.decode(errors="replace")[-2000:]
    report = json.loads(next(out.glob("cpu-*.json")).read_text())
    assert report["meta"]["stopped_note"].startswith("interrupted")
    assert 1 <= len(report["latency"]) < 4
    assert "**stopped**: interrupted" in next(out.glob("cpu-*.md")).read_text()


def test_time_limit_skips_the_tests_that_would_end_after_it(tmp_path: Path):
    """``--time-limit``: a test runs only when the time spent plus the longest earlier test of its backend fits
    the limit; skipped ones carry the reason the report shows; each test prints a progress line."""
    import io

    from bench.cli import OutcomeCollector

    suite = tmp_path / "test_slow.py"
    suite.write_text(
        "import time\nimport pytest\n\n"
        "class Spec:\n    def __init__(self, name, seconds):\n        self.name, self.seconds = name, seconds\n\n"
        "SPECS = [Spec('slow', 1.0), Spec('fast', 0.0)]\n\n"
        "@pytest.mark.parametrize('spec', SPECS, ids=lambda s: s.name)\n"
        "@pytest.mark.parametrize('batch', [1, 8])\n"
        "def test_latency(spec, batch):\n    time.sleep(spec.seconds)\n\n"
        "def test_after():\n    pass\n")
    progress = io.StringIO()
    # slow-b1 runs (1 s); slow-b8 would end at ~2 s > 2.0 and is skipped; the fast ones and the unparametrised
    # test (no backend, no expectation) start well before the limit and run.
    collector = OutcomeCollector(time_limit=2.0, progress=progress)
    rc = pytest.main([str(suite), "-q", "-p", "no:cacheprovider"], plugins=[collector])
    assert rc == 0 and collector.passed == 4
    assert [(n.test, n.outcome) for n in collector.not_run] == [("test_latency[8-slow]", "skipped")]
    reason = collector.not_run[0].reason
    assert re.fullmatch(r"--time-limit 2 s: 1\.\d s spent and ~1\.\d s expected from an earlier test of its backend",
                        reason), reason
    names = [ln.split("] ")[1].split(":")[0] for ln in progress.getvalue().splitlines()]
    assert names == ["test_latency[1-slow]", "test_latency[1-fast]", "test_latency[8-slow]",
                     "test_latency[8-fast]", "test_after"]

    late = OutcomeCollector(time_limit=1e-9, progress=None)  # spent before the first test: every test is skipped
    assert pytest.main([str(suite), "-q", "-p", "no:cacheprovider"], plugins=[late]) == 0
    assert late.passed == 0 and len(late.not_run) == 5
    # (no test of the backend has run, so nothing is expected of it)
    assert re.fullmatch(r"--time-limit 1e-09 s: \d+\.\d s spent", late.not_run[0].reason), late.not_run[0].reason


@pytest.mark.parametrize("compiled", ["torch-compile-bf16", "aoti", "qd-infer", "trt-fp16"])
def test_time_limit_expects_minutes_of_a_compiled_backends_first_test(tmp_path: Path, compiled: str):
    """Before any test of torch.compile (or of a backend that builds an AOTInductor package or a TensorRT engine in
    its first test) has run, nothing to go by, its first test is expected to compile for minutes: with 100 s left it
    is skipped, not started and then killed mid-compilation; an eager one runs."""
    from bench.cli import FIRST_TEST_S, OutcomeCollector

    suite = tmp_path / f"test_compiled_{compiled.replace('-', '_')}.py"  # one module name per file: pytest caches it
    suite.write_text(
        "import pytest\n\nclass Spec:\n    def __init__(self, name):\n        self.name = name\n\n"
        f"@pytest.mark.parametrize('spec', [Spec('{compiled}'), Spec('torch-fp32')], ids=lambda s: s.name)\n"
        "def test_latency(spec):\n    pass\n")
    collector = OutcomeCollector(time_limit=100.0, progress=None)
    assert pytest.main([str(suite), "-q", "-p", "no:cacheprovider"], plugins=[collector]) == 0
    assert collector.passed == 1 and [n.test for n in collector.not_run] == [f"test_latency[{compiled}]"]
    assert f"~{FIRST_TEST_S[compiled]:.0f} s expected for its backend's first test" in collector.not_run[0].reason


def test_a_failed_test_is_reported_by_its_exceptions_first_line(tmp_path: Path):
    """A long error message (a build tool's output after its headline) is reported by its first line, not by the
    traceback's last "E " line, which is the message's last line."""
    from bench.cli import OutcomeCollector

    suite = tmp_path / "test_failing.py"
    suite.write_text("def test_build():\n"
                     "    raise RuntimeError('building failed: CMake Error: no CMakeLists.txt\\n-- lots of output\\n"
                     "Specify --help for usage')\n")
    collector = OutcomeCollector(progress=None)
    assert pytest.main([str(suite), "-q", "-p", "no:cacheprovider"], plugins=[collector]) == 1
    assert [(n.test, n.outcome, n.reason) for n in collector.not_run] == [
        ("test_build", "failed (call)", "RuntimeError: building failed: CMake Error: no CMakeLists.txt")]


def test_time_limit_learns_nothing_from_a_skipped_test(tmp_path: Path):
    """torch.compile's test skipped at batch 1 (its first test, minutes of compilation expected) took no time; its
    batch-8 test must still be expected to compile for minutes, not to take that skip's milliseconds."""
    from bench.cli import OutcomeCollector

    suite = tmp_path / "test_compiled_batches.py"
    suite.write_text(
        "import pytest\n\nclass Spec:\n    def __init__(self, name):\n        self.name = name\n\n"
        "@pytest.mark.parametrize('spec', [Spec('torch-compile'), Spec('torch-fp32')], ids=lambda s: s.name)\n"
        "@pytest.mark.parametrize('batch', [1, 8])\n"
        "def test_latency(spec, batch):\n    pass\n")
    collector = OutcomeCollector(time_limit=100.0, progress=None)
    assert pytest.main([str(suite), "-q", "-p", "no:cacheprovider"], plugins=[collector]) == 0
    assert collector.passed == 2
    assert [n.test for n in collector.not_run] == ["test_latency[1-torch-compile]", "test_latency[8-torch-compile]"]
    assert all("expected for its backend's first test" in n.reason for n in collector.not_run)


def test_cli_writes_the_report_when_no_benchmark_ran(tmp_path: Path, capsys: pytest.CaptureFixture):
    """pytest-benchmark writes no JSON when nothing ran (here: a time limit spent before the first test); the
    report is still written, listing every test that did not run and why. The weights are named at the start."""
    from qd_core.data import ensure_synthetic

    root = ensure_synthetic(tmp_path / "synth", num_train=1, num_val=1, size=(64, 128), progress=False)
    out = tmp_path / "report"
    assert main(["--device", "cpu", "--quick", "--checkpoint", "none", "--no-kernels", "--backends", "torch-fp32",
                 "--images", "1", "--batch", "1", "--data", str(root), "--time-limit", "1e-6", "--out",
                 str(out)]) == 0
    assert capsys.readouterr().err.startswith("weights: random (--checkpoint none)\n")
    report = json.loads(next(out.glob("cpu-*.json")).read_text())
    assert not report["latency"]
    text = next(out.glob("cpu-*.md")).read_text()
    assert "`test_latency[torch-fp32-b1]` | skipped | --time-limit 1e-06 s" in text
    assert "`test_accuracy[torch-fp32]` | skipped" in text


def _no_suite(monkeypatch: pytest.MonkeyPatch) -> list:
    """Make ``pytest.main`` (how the CLI starts the suites) record its calls instead of running anything."""
    import bench.cli

    calls: list = []
    monkeypatch.setattr(bench.cli.pytest, "main", lambda *a, **k: calls.append(a) or 0)
    return calls


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _bad_input(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    """(arguments, what the error line must name) of one unusable input."""
    if kind == "config":
        return ["--config", "no-such-config"], "'no-such-config'"
    if kind == "checkpoint":
        garbage = tmp_path / "garbage.safetensors"
        garbage.write_text("garbage\n")
        return ["--checkpoint", str(garbage)], str(tmp_path / "garbage")
    if kind == "data":
        (tmp_path / "empty").mkdir()
        return ["--data", str(tmp_path / "empty")], f"{tmp_path / 'empty'}: expected a synthetic root"
    if kind == "peak":
        return ["--peak-tflops", "-1"], "--peak-tflops -1: expected a positive"
    if kind == "out":
        (tmp_path / "file.safetensors").write_text("keep me")
        return ["--out", str(tmp_path / "file.safetensors")], f"--out {tmp_path / 'file.safetensors'}: exists and is"
    (tmp_path / "k.json").write_text('{"machine_info": {}}')
    return ["--kernels-json", str(tmp_path / "k.json")], f"--kernels-json {tmp_path / 'k.json'}: expected a"


@pytest.mark.parametrize("kind", ["config", "checkpoint", "data", "peak", "out", "kernels-json"])
def test_cli_refuses_unusable_inputs_in_one_line_before_any_suite_runs(kind: str, tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """A config that does not resolve, a checkpoint that does not load, a data folder in neither layout or a bad
    argument: exit 2 with one line naming it, no suite started, no report written, the environment untouched."""
    suites = _no_suite(monkeypatch)
    args, needle = _bad_input(tmp_path, kind)
    out = tmp_path / "report"
    argv = ["--device", "cpu", "--quick", "--out", str(out), "--no-kernels"]
    if kind != "checkpoint":
        argv += ["--checkpoint", "none"]
    before = {k: v for k, v in os.environ.items() if k.startswith("QD_BENCH_")}
    assert main(argv + args) == 2
    assert needle in _one_error_line(capsys)
    assert suites == [] and not out.exists()
    assert {k: v for k, v in os.environ.items() if k.startswith("QD_BENCH_")} == before
    if kind == "out":
        assert (tmp_path / "file.safetensors").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["config", "peak"])
def test_cli_names_a_bad_input_before_an_existing_report(kind: str, tmp_path: Path, capsys,
                                                         monkeypatch: pytest.MonkeyPatch):
    """'pass --overwrite' must not hide a bad argument: passing it would only lead to that error next."""
    suites = _no_suite(monkeypatch)
    existing = tmp_path / f"cpu-{dt.date.today().isoformat()}.md"
    existing.write_text("earlier run")
    args, needle = _bad_input(tmp_path, kind)
    assert main(["--device", "cpu", "--quick", "--checkpoint", "none", "--out", str(tmp_path), *args]) == 2
    line = _one_error_line(capsys)
    assert needle in line and "--overwrite" not in line
    assert suites == [] and existing.read_text() == "earlier run"


def test_cli_loads_the_model_once_for_its_checks_and_the_suites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The up-front check builds the session the suites then use (the same settings from the same variables):
    the model and the images are loaded once, not once for the check and again for the tests."""
    import sys

    from bench import backends
    from qd_core.data import ensure_synthetic

    built: list = []

    class CountedSession(backends.BenchSession):
        def __init__(self, settings) -> None:
            built.append(settings)
            super().__init__(settings)

    monkeypatch.setattr(backends, "BenchSession", CountedSession)
    monkeypatch.setattr(backends, "_SESSIONS", {})
    # The suite module reads its settings when imported: import it afresh, and put the variables back afterwards.
    monkeypatch.delitem(sys.modules, "bench.test_backends", raising=False)
    for name in ("DEVICE", "CONFIG", "CHECKPOINT", "DATA", "IMAGES", "BATCH", "BACKENDS", "CPU_COMPILE", "WORK"):
        monkeypatch.setenv(f"QD_BENCH_{name}", os.environ.get(f"QD_BENCH_{name}", ""))
    root = ensure_synthetic(tmp_path / "synth", num_train=1, num_val=1, size=(64, 128), progress=False)
    out = tmp_path / "report"
    assert main(["--device", "cpu", "--quick", "--checkpoint", "none", "--no-kernels", "--backends", "torch-fp32",
                 "--images", "1", "--batch", "1", "--data", str(root), "--out", str(out)]) == 0
    report = json.loads(next(out.glob("cpu-*.json")).read_text())
    assert [r["backend"] for r in report["latency"]] == ["torch-fp32"] and len(report["accuracy"]) == 1
    assert len(built) == 1, built


def test_a_report_written_by_another_run_meanwhile_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys):
    """Today's files are checked before the run and again when writing: one that another run wrote while this one
    ran is kept, and this run's report goes beside it under the next free name."""
    from qd_core.data import ensure_synthetic

    for name in ("DEVICE", "CONFIG", "CHECKPOINT", "DATA", "IMAGES", "BATCH", "BACKENDS", "CPU_COMPILE", "WORK"):
        monkeypatch.setenv(f"QD_BENCH_{name}", os.environ.get(f"QD_BENCH_{name}", ""))
    root = ensure_synthetic(tmp_path / "synth", num_train=1, num_val=1, size=(64, 128), progress=False)
    out = tmp_path / "report"
    stem = f"cpu-{dt.date.today().isoformat()}"

    def other_run_writes(*args, **kwargs) -> int:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text("results of another run")
        return 0

    import bench.cli

    monkeypatch.setattr(bench.cli.pytest, "main", other_run_writes)
    assert main(["--device", "cpu", "--quick", "--checkpoint", "none", "--no-kernels", "--backends", "torch-fp32",
                 "--images", "1", "--batch", "1", "--data", str(root), "--out", str(out)]) == 0
    assert (out / f"{stem}.md").read_text() == "results of another run"
    assert (out / f"{stem}-2.md").read_text().startswith("# QueryDiff benchmark: cpu")
    assert (out / f"{stem}-2.json").is_file()
    assert f"writing this one as {stem}-2.*" in capsys.readouterr().err


def test_the_mfu_note_names_the_peak_the_column_was_measured_against():
    from bench.cli import mfu_note

    def run(*names: str) -> dict:
        return {"benchmarks": [{"extra_info": {"device_name": n}} for n in names]}

    assert "H100 PCIe" in mfu_note(None, "cuda", run("NVIDIA H100 PCIe")) and "756" in mfu_note(
        None, "cuda", run("NVIDIA H100 PCIe"))
    assert "989" in mfu_note(None, "cuda", run("NVIDIA H100 80GB HBM3"))
    assert mfu_note(None, "cuda", run("NVIDIA GeForce RTX 4090")).startswith("n/a")
    assert mfu_note(None, "cuda", run()).startswith("n/a")
    assert "400 TFLOP/s given by --peak-tflops" in mfu_note(400.0, "cuda", run("NVIDIA H100 PCIe"))
    assert mfu_note(None, "cpu", run("Intel Xeon")).startswith("n/a on CPU")

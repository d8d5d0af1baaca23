"""The benchmark report read from a hand-made pytest-benchmark JSON: percentiles, derived columns, files written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.metrics import percentile
from bench.report import build_report, latency_percentiles, render_markdown, write_png, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def latency_entry(backend: str, precision: str, batch: int, data_s: list[float], *,
                  device_name: str = "Intel Xeon (2 threads)", flops: float = 4e8, peak_mem: float | None = 12.0,
                  with_data: bool = True) -> dict:
    stats = {"min": min(data_s), "max": max(data_s), "mean": float(np.mean(data_s)),
             "stddev": float(np.std(data_s)), "median": float(np.median(data_s)), "rounds": len(data_s),
             "iterations": 1}
    if with_data:
        stats["data"] = data_s
    return {"group": f"latency b{batch}", "name": f"test_latency[{backend}-b{batch}]",
            "fullname": f"bench/test_backends.py::test_latency[{backend}-b{batch}]", "params": None,
            "extra_info": {"kind": "latency", "backend": backend, "precision": precision, "batch": batch,
                           "device": "cpu", "device_name": device_name, "config": "tiny", "height": 128,
                           "width": 128, "flops_per_image": flops, "model": "random-init (mIoU not meaningful)",
                           "eval_set": "synthetic", "peak_mem_mib": peak_mem},
            "stats": stats}


def accuracy_entry(backend: str, precision: str, miou: float, reference: float, passed: bool,
                   logit_rel_error: float | None = None) -> dict:
    return {"group": "accuracy", "name": f"test_accuracy[{backend}]",
            "extra_info": {"kind": "accuracy", "backend": backend, "precision": precision, "miou": miou,
                           "reference_miou": reference, "delta_points": 100 * (miou - reference),
                           "tolerance_points": 0.1 if precision == "fp32" else 0.5, "agreement": 0.99,
                           "logit_rel_error": logit_rel_error, "passed": passed, "images": 7},
            "stats": {"mean": 1.0, "median": 1.0, "rounds": 1, "data": [1.0]}}


def kernel_entry() -> dict:
    return {"group": "agent refine-b1 fwd", "name": "test_agent_attention[refine-b1-triton-fwd]",
            "extra_info": {"mode": "fwd", "dtype": "bfloat16", "fwd_flops": 123},
            "stats": {"mean": 2e-4, "median": 2e-4, "rounds": 3, "data": [1e-4, 2e-4, 3e-4]}}


# Reference: 1..100 ms; ORT: a constant 25 ms, so its speed ratio over the reference p50 is exactly 50.5 / 25.
REFERENCE_MS = [float(i) for i in range(1, 101)]


@pytest.fixture
def bench_json() -> dict:
    return {"machine_info": {"node": "ci", "python_version": "3.11"}, "benchmarks": [
        latency_entry("torch-fp32", "fp32", 1, [t / 1e3 for t in REFERENCE_MS]),
        latency_entry("ort-fp32", "fp32", 1, [0.025] * 10),
        latency_entry("torch-fp32", "fp32", 4, [0.2] * 5),
        accuracy_entry("torch-fp32", "fp32", 0.5, 0.5, True, logit_rel_error=0.0),
        accuracy_entry("ort-fp16", "fp16", 0.49, 0.5, False, logit_rel_error=3.25e-3),
        kernel_entry(),
    ]}


def test_percentile_matches_numpy_linear_interpolation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_rejects_empty_input_and_bad_q():
    with pytest.raises(ValueError, match="values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q"):
        percentile([1.0], 101)


def test_latency_percentiles_from_raw_data():
    p50, p90, p99 = latency_percentiles({"data": [t / 1e3 for t in REFERENCE_MS], "median": 0})
    # Linear interpolation over the ranks of 1..100: rank (n - 1)·q/100 → 1 + 99·q/100.
    assert (p50, p90, p99) == pytest.approx((50.5e-3, 90.1e-3, 99.01e-3), rel=1e-12)


def test_latency_percentiles_fall_back_to_median_without_data():
    assert latency_percentiles({"median": 0.3, "mean": 0.4}) == (0.3, None, None)


def test_report_has_one_latency_row_per_entry_with_derived_columns(bench_json):
    report = build_report(bench_json)
    rows = {(r.backend, r.batch): r for r in report.latency}
    assert set(rows) == {("torch-fp32", 1), ("ort-fp32", 1), ("torch-fp32", 4)}
    ref, ort = rows[("torch-fp32", 1)], rows[("ort-fp32", 1)]
    assert (ref.p50_ms, ref.p90_ms, ref.p99_ms) == pytest.approx((50.5, 90.1, 99.01), rel=1e-12)
    assert ort.p50_ms == pytest.approx(25.0)
    assert ort.speedup == pytest.approx(50.5 / 25.0) and ref.speedup == pytest.approx(1.0)
    assert rows[("torch-fp32", 4)].images_per_s == pytest.approx(4 / 0.2)
    assert ort.mfu is None  # no peak FLOP/s for a CPU


def test_mfu_uses_the_gpu_peak_at_the_backend_precision():
    entry = latency_entry("torch-bf16", "bf16", 8, [0.5] * 3, device_name="NVIDIA H100 80GB HBM3", flops=1e12)
    row = build_report({"benchmarks": [entry]}).latency[0]
    assert row.mfu == pytest.approx(8 * 1e12 / 0.5 / 989.4e12)  # the H100 SXM datasheet's dense bf16 rate
    fp32 = latency_entry("torch-fp32", "fp32", 8, [0.5] * 3, device_name="NVIDIA H200", flops=1e12)
    assert build_report({"benchmarks": [fp32]}).latency[0].mfu == pytest.approx(8 * 1e12 / 0.5 / 66.9e12)
    pcie = latency_entry("torch-bf16", "bf16", 8, [0.5] * 3, device_name="NVIDIA H100 PCIe", flops=1e12)
    assert build_report({"benchmarks": [pcie]}).latency[0].mfu == pytest.approx(8 * 1e12 / 0.5 / 756.5e12)


def test_latency_is_set_against_the_ideal_time_where_the_entries_have_one(bench_json):
    assert "× ideal" not in render_markdown(build_report(bench_json))  # CPU: no ideal, no column
    entry = latency_entry("torch-bf16-pure", "bf16", 8, [0.020] * 3, device_name="NVIDIA H100 80GB HBM3")
    entry["extra_info"]["ideal_ms"] = 5.0
    report = build_report({"benchmarks": [entry]})
    assert report.latency[0].ideal_ms == 5.0 and report.to_json()["latency"][0]["ideal_ms"] == 5.0
    text = render_markdown(report)
    assert "| ideal ms | × ideal |" in text and "| 5.00 | 4.0 |" in text


def test_peak_override_gives_a_cpu_mfu(bench_json):
    report = build_report(bench_json, peak_override=1e12)
    ref = next(r for r in report.latency if r.backend == "torch-fp32" and r.batch == 1)
    assert ref.mfu == pytest.approx(4e8 / 50.5e-3 / 1e12)


def test_accuracy_and_kernel_entries_become_their_own_rows(bench_json):
    report = build_report(bench_json)
    assert [(r.backend, r.passed) for r in report.accuracy] == [("torch-fp32", True), ("ort-fp16", False)]
    assert [k.name for k in report.kernels] == ["test_agent_attention[refine-b1-triton-fwd]"]
    assert report.kernels[0].p50_ms == pytest.approx(0.2)


def test_markdown_lists_every_row_and_marks_the_failing_backend(bench_json):
    text = render_markdown(build_report(bench_json, meta={"date": "2025-01-01"}))
    assert "| ort-fp32 | fp32 | 1 | 10 | 25.00 | 25.00 | 25.00 | 40.0 | 2.02 | 12 | n/a |" in text
    assert "| torch-fp32 | fp32 | 1 | 100 | 50.50 | 90.10 | 99.01 | 19.8 | 1.00 | 12 | n/a |" in text
    assert "| ort-fp16 | fp16 | 49.00 | -1.000 | ±0.5 | 99.000% | 3.25e-03 | 5e-02 | FAIL |" in text
    assert "| torch-fp32 | fp32 | 50.00 | +0.000 | ±0.1 | 99.000% | 0.00e+00 | 1e-04 | pass |" in text
    assert "random-init" in text and "mIoU is not" in text
    assert "## Kernel microbenchmarks" in text


def test_markdown_names_the_library_settings_the_backends_ran_under(bench_json):
    assert "**settings**" not in render_markdown(build_report(bench_json))  # a CPU session sets none
    for entry in bench_json["benchmarks"]:
        entry["extra_info"]["backend_settings"] = "TF32 off, cuDNN autotuning on"
    assert "- **settings**: TF32 off, cuDNN autotuning on" in render_markdown(build_report(bench_json))


def test_report_rejects_a_json_without_benchmarks():
    with pytest.raises(ValueError, match="benchmarks"):
        build_report({"machine_info": {}})


def test_png_is_written(bench_json, tmp_path: Path):
    path = write_png(build_report(bench_json), tmp_path / "plot.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_png_is_written_for_a_report_without_accuracy_rows(bench_json, tmp_path: Path):
    # A latency-only run (e.g. the accuracy suite deselected) still gets its plot.
    report = build_report(bench_json)
    report.accuracy.clear()
    assert write_png(report, tmp_path / "plot.png").read_bytes().startswith(PNG_SIGNATURE)


def test_write_report_writes_md_json_png_and_keeps_existing_files(bench_json, tmp_path: Path):
    report = build_report(bench_json)
    paths = write_report(report, tmp_path, "cpu-2025-01-01")
    assert [p.name for p in paths] == ["cpu-2025-01-01.md", "cpu-2025-01-01.json", "cpu-2025-01-01.png"]
    saved = json.loads(paths[1].read_text())
    assert {r["backend"] for r in saved["latency"]} == {"torch-fp32", "ort-fp32"}
    assert saved["accuracy"][1]["passed"] is False
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_report(report, tmp_path, "cpu-2025-01-01")
    write_report(report, tmp_path, "cpu-2025-01-01", overwrite=True)


def test_an_externally_timed_backend_is_read_from_its_own_samples(bench_json):
    """qd_infer times itself (bench.native): the row comes from extra_info's samples, not the one pytest round."""
    entry = latency_entry("qd-infer", "fp32", 1, [3.0])  # the pytest-benchmark round: process start and all
    entry["extra_info"]["samples_s"] = [0.010, 0.020, 0.030, 0.040]
    bench_json["benchmarks"].append(entry)
    row = next(r for r in build_report(bench_json).latency if r.backend == "qd-infer")
    assert row.p50_ms == pytest.approx(25.0) and row.rounds == 4 and row.mean_ms == pytest.approx(25.0)


def test_a_backend_without_logits_reads_n_a_in_the_accuracy_table(bench_json):
    """qd-infer returns labels only: its logit error is reported as n/a, not as 0."""
    bench_json["benchmarks"].append(accuracy_entry("qd-infer", "fp32", 0.5, 0.5, True))
    text = render_markdown(build_report(bench_json, meta={"date": "2025-01-01"}))
    assert "| qd-infer | fp32 | 50.00 | +0.000 | ±0.1 | 99.000% | n/a | 1e-04 | pass |" in text


def test_a_write_that_fails_midway_leaves_the_earlier_report_whole(bench_json, tmp_path: Path, monkeypatch):
    """The three files are renamed only once all are written: a PNG that fails half-written leaves the old
    Markdown, JSON and PNG as they were (not a new table beside the old plot) and no stray file."""
    import bench.report

    paths = write_report(build_report(bench_json), tmp_path, "cpu-2025-01-01")
    before = [p.read_bytes() for p in paths]

    def half_written(report, path: Path) -> Path:
        path.write_bytes(before[2][:100])
        raise OSError("disk full")

    monkeypatch.setattr(bench.report, "write_png", half_written)
    other_run = build_report({**bench_json, "benchmarks": bench_json["benchmarks"][1:]})
    with pytest.raises(OSError, match="disk full"):
        write_report(other_run, tmp_path, "cpu-2025-01-01", overwrite=True)
    assert [p.read_bytes() for p in paths] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_without_matplotlib_an_earlier_plot_is_removed_not_left_beside_the_new_table(bench_json, tmp_path: Path,
                                                                                     monkeypatch):
    import bench.report

    paths = write_report(build_report(bench_json), tmp_path, "cpu-2025-01-01")

    def no_matplotlib(report, path: Path) -> Path:
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(bench.report, "write_png", no_matplotlib)
    other_run = build_report({**bench_json, "benchmarks": bench_json["benchmarks"][1:]})
    assert write_report(other_run, tmp_path, "cpu-2025-01-01", overwrite=True) == paths[:2]
    assert not paths[2].exists()
    assert paths[0].read_text() == render_markdown(other_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths[:2])


def test_an_accuracy_test_that_failed_after_its_timed_pass_is_not_a_kernel_row(bench_json):
    # pytest-benchmark keeps the entry of a test that failed after benchmark.pedantic: it carries only its name.
    failed = accuracy_entry("ort-fp32", "fp32", 0.5, 0.5, True)
    failed["extra_info"] = {"kind": "accuracy", "backend": "ort-fp32", "precision": "fp32"}
    unnamed = accuracy_entry("aoti", "fp32", 0.5, 0.5, True)
    unnamed["extra_info"], unnamed["group"] = {}, None
    report = build_report({**bench_json, "benchmarks": [*bench_json["benchmarks"], failed, unnamed]})
    assert [r.backend for r in report.accuracy] == ["torch-fp32", "ort-fp16"]
    assert [r.name for r in report.kernels] == [kernel_entry()["name"]]


def test_peaks_measured_differently_are_told_apart(bench_json):
    entries = bench_json["benchmarks"]
    entries[0]["extra_info"]["memory_method"] = "CUDA: max_memory_allocated of one call"
    entries[1]["extra_info"]["memory_method"] = "CUDA: of a replay (the graph's pool not counted)"
    text = render_markdown(build_report(bench_json))
    # Numbered in the table's row order: ort-fp32 (faster) first.
    assert "- peak MiB [1]: CUDA: of a replay (the graph's pool not counted)" in text
    assert "- peak MiB [2]: CUDA: max_memory_allocated of one call" in text
    assert "| ort-fp32 | fp32 | 1 |" in text and "| 12 [1] |" in text and "| 12 [2] |" in text
    entries[1]["extra_info"]["memory_method"] = entries[0]["extra_info"]["memory_method"]
    assert "[1]" not in render_markdown(build_report(bench_json))  # one method: no notes


def test_rows_whose_timing_includes_host_copies_are_marked(bench_json):
    bench_json["benchmarks"][1]["extra_info"]["timing_note"] = "includes copying the images to the GPU"
    text = render_markdown(build_report(bench_json))
    assert "| ort-fp32 | fp32 | 1 | 10 | 25.00 * | 25.00 |" in text
    assert "- p50 *: includes copying the images to the GPU" in text
    assert "| torch-fp32 | fp32 | 1 | 100 | 50.50 | 90.10 |" in text

"""Report numbers, each checked against math written out here: p50-based
throughput and MFU on skewed timings, the fp16 peak, speed ratios at the same batch, row order, kernel p90, the
printed MFU and GFLOPs, peak memory units (CPU and a stand-in CUDA allocator), kernel-summary bytes and bandwidth
at the given peak, the roofline's overrides and shares, and the eager-operation count of qd_core.summary."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench import kernel_summary as ks
from bench import memory
from bench.metrics import gpu_spec_for, peak_flops
from bench.report import build_report, render_markdown
from bench.settings import settings_from_env

from test_bench_report import latency_entry as cpu_latency_entry
from test_kernel_summary import entry as kernel

H100 = "NVIDIA H100 80GB HBM3"
H100_DENSE_TENSOR = 989.4e12  # H100 SXM datasheet: dense bf16 = dense fp16 tensor-core FLOP/s
MIB = 2 ** 20


def latency_entry(backend: str, precision: str, batch: int, data_s: list[float], *, flops: float = 1e12) -> dict:
    """test_bench_report's entry, timed on an H100."""
    entry = cpu_latency_entry(backend, precision, batch, data_s, device_name=H100, flops=flops, peak_mem=1.0)
    entry["extra_info"]["device"] = "cuda"
    return entry


# ------------------------------------------------------------------------------------------- metrics / report


def test_fp16_runs_against_the_tensor_core_peak_like_bf16():
    assert peak_flops(H100, "fp16") == pytest.approx(H100_DENSE_TENSOR)
    row = build_report({"benchmarks": [latency_entry("ort-fp16", "fp16", 8, [0.5] * 3)]}).latency[0]
    assert row.mfu == pytest.approx(1e12 * 8 / 0.5 / H100_DENSE_TENSOR)


@pytest.mark.parametrize("name", ["NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"])
def test_an_a100_pcie_is_not_taken_for_the_sxm_card(name: str):
    assert gpu_spec_for(name) is None


# Nine fast rounds and one slow one: the median (0.1 s) and the mean (0.19 s) differ.
SKEWED = [0.1] * 9 + [1.0]


def test_throughput_and_mfu_use_the_p50_and_the_mean_column_the_mean():
    row = build_report({"benchmarks": [latency_entry("torch-bf16", "bf16", 4, SKEWED)]}).latency[0]
    p50 = float(np.percentile(SKEWED, 50))
    assert row.images_per_s == pytest.approx(4 / p50)
    assert row.mfu == pytest.approx(1e12 * 4 / p50 / H100_DENSE_TENSOR)
    assert row.mean_ms == pytest.approx(1e3 * float(np.mean(SKEWED)))


def test_the_speed_ratio_is_against_the_reference_at_the_same_batch():
    report = build_report({"benchmarks": [
        latency_entry("torch-fp32", "fp32", 1, [0.05] * 3), latency_entry("torch-fp32", "fp32", 4, [0.2] * 3),
        latency_entry("ort-fp32", "fp32", 4, [0.1] * 3)]})
    speedups = {(r.backend, r.batch): r.speedup for r in report.latency}
    assert speedups[("ort-fp32", 4)] == pytest.approx(0.2 / 0.1)
    assert speedups[("torch-fp32", 4)] == pytest.approx(1.0)


def test_latency_rows_are_grouped_by_batch_then_fastest_first():
    report = build_report({"benchmarks": [
        latency_entry("a", "fp32", 1, [0.050] * 3), latency_entry("b", "fp32", 1, [0.025] * 3),
        latency_entry("c", "fp32", 4, [0.040] * 3), latency_entry("d", "fp32", 4, [0.010] * 3)]})
    assert [(r.batch, r.backend) for r in report.latency] == [(1, "b"), (1, "a"), (4, "d"), (4, "c")]


def test_kernel_rows_carry_the_p90_of_their_rounds():
    data = [i * 1e-4 for i in range(1, 101)]
    entry = {"group": "g", "name": "test_agent_attention[refine-b1-triton-fwd]", "extra_info": {},
             "stats": {"mean": float(np.mean(data)), "median": float(np.median(data)), "rounds": 100, "data": data}}
    (row,) = build_report({"benchmarks": [entry]}).kernels
    assert row.p90_ms == pytest.approx(1e3 * float(np.percentile(data, 90)))
    assert f"| {1e3 * float(np.percentile(data, 90)):.4f} |" in render_markdown(build_report({"benchmarks": [entry]}))


def test_markdown_prints_mfu_as_a_percentage_and_the_flops_in_gflops():
    # 1 image in 10 ms at 1/4 of the peak: flops = 0.25 · peak · 0.01 s.
    flops = 0.25 * H100_DENSE_TENSOR * 0.01
    text = render_markdown(build_report({"benchmarks": [latency_entry("torch-bf16", "bf16", 1, [0.01] * 3,
                                                                      flops=flops)]}))
    assert "| 25.0% |" in text
    assert f"({flops / 1e9:.2f} GFLOPs per image" in text


# ------------------------------------------------------------------------------------------------ memory


def test_cpu_peak_is_converted_from_kib_to_mib(monkeypatch):
    status = {"VmRSS": 100_000}
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    monkeypatch.setattr(memory, "_reset_rss_peak", lambda: True)
    monkeypatch.setattr(memory, "_status_kib", lambda field: status[field])

    def call() -> str:
        status["VmHWM"] = 100_000 + 64 * 1024  # 64 MiB above the resident size before the call
        return "done"

    assert memory.measure_cpu_peak(call)[:2] == ("done", 64.0)


def test_cpu_peak_runs_the_call_once_when_the_reset_peak_cannot_be_read(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    monkeypatch.setattr(memory, "_reset_rss_peak", lambda: True)
    monkeypatch.setattr(memory, "_status_kib", lambda field: 100_000 if field == "VmRSS" else None)
    result, _, method = memory.measure_cpu_peak(lambda: calls.append(1) or "done")
    assert result == "done" and calls == [1] and "upper bound" in method


class FakeCuda:
    """torch.cuda's allocator counters: an earlier call left a 500 MiB peak; 10 MiB stay allocated."""

    def __init__(self) -> None:
        self.allocated, self.peak = 10 * MIB, 500 * MIB

    def synchronize(self) -> None:
        pass

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)


def test_cuda_peak_is_what_the_call_adds_in_mib(monkeypatch):
    fake = FakeCuda()
    for name in ("synchronize", "reset_peak_memory_stats", "memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))

    def call() -> int:
        fake.alloc(3 * MIB)
        fake.alloc(2 * MIB)
        fake.alloc(-2 * MIB)  # freed again before the call returns
        return 7

    result, added, method = memory.measure_peak("cuda", call)
    assert (result, added) == (7, 5.0) and method.startswith("CUDA")
    assert memory.measure_peak("cpu", lambda: 7)[2].startswith("CPU")


# ------------------------------------------------------------------------------------------------ settings


def test_an_explicit_config_is_kept_beside_a_checkpoint_of_another(tmp_path: Path):
    ckpt = tmp_path / "best.safetensors"
    ckpt.write_bytes(b"")
    ckpt.with_suffix(".json").write_text(json.dumps({"config": {"name": "vitl16_512"}}))
    env = {"QD_BENCH_CHECKPOINT": str(ckpt)}
    assert settings_from_env(env, cuda_available=False).config == "vitl16_512"
    assert settings_from_env({**env, "QD_BENCH_CONFIG": "tiny"}, cuda_available=False).config == "tiny"


# ------------------------------------------------------------------------------------------- kernel summary

AGENT_SHAPES = [[1, 8, 1000, 32], [1, 8, 100, 32], [1, 8, 100, 32]]


def test_forward_backward_bytes_read_o_and_do_and_write_the_three_gradients():
    q, kv = 8 * 1000 * 32, 8 * 100 * 32
    fwd = q + 2 * kv + q  # q, k, v read, o written
    bwd = (q + 2 * kv + q + q) + (q + 2 * kv)  # q, k, v, o, dO read; dq, dk, dv written
    assert ks.minimum_bytes("agent", "refine-b1", "fwd+bwd", AGENT_SHAPES, "bfloat16") == 2 * (fwd + bwd)


def test_the_bandwidth_share_is_against_the_peak_given_and_memory_is_triton_then_sdpa():
    data = {"benchmarks": [kernel("triton", 1e-6, device_ms=2e-3, mib=1.0), kernel("sdpa", 2e-6, mib=5.0)]}
    rows = ks.collect(data)
    line = ks.render(rows, 2.0, "t").splitlines()[-1]
    nbytes = 2 * (2 * 8 * 1000 * 32 + 2 * 8 * 100 * 32)
    assert f"| {100 * nbytes / 1e-6 / 2e12:.1f} % (60.0 %: " in line  # wall: 1 µs at 2 TB/s
    assert f"| {100 * nbytes / 2e-6 / 2e12:.1f} % (60.0 %: " in line  # GPU-only: 2 µs
    assert line.endswith("| 1.0 / 5.0 |")


# ------------------------------------------------------------------------------------------------ roofline


def test_roofline_overrides_reach_the_count(monkeypatch, capsys):
    import bench.roofline as rl

    seen = []

    def fake(model, spec, **kwargs):
        seen.append(spec)
        return rl.Roofline(config="tiny", gpu=spec.name, dtype="bfloat16", input=[1, 3, 64, 64], modules={},
                           inside={}, ops={}, total={"flops": 0.0, "bytes": 0.0, "kernels": 0, "seconds": 1.0})

    monkeypatch.setattr(rl, "roofline", fake)
    assert rl.main(["--config", "tiny", "--gpu", "h200", "--bandwidth-tbs", "1.5", "--peak-tflops", "100",
                    "--json"]) == 0
    capsys.readouterr()
    (spec,) = seen
    assert spec.bandwidth_tbs == 1.5 and spec.peak("bf16") == pytest.approx(100e12)


def test_roofline_shares_are_of_the_whole_ideal_time():
    from bench.roofline import Roofline, render

    def cost(seconds: float) -> dict:
        return {"flops": 0.0, "bytes": 0.0, "kernels": 1, "seconds": seconds}

    r = Roofline(config="c", gpu="g", dtype="bfloat16", input=[1, 3, 64, 64], modules={"a": cost(1e-3),
                 "b": cost(3e-3)}, inside={"a": "", "b": ""}, ops={}, total=cost(4e-3))
    text = render(r)
    assert "| 1.000 | 25.0 % |" in text and "| 3.000 | 75.0 % |" in text


# ------------------------------------------------------------------------------------------------ summary


def test_eager_operation_count_tells_views_apart():
    from qd_core.summary import count_ops

    class Probe(nn.Module):
        def semantic_logits(self, x):
            return (x.view(-1, 4) * 2).transpose(0, 1).sum(0)  # view, mul, transpose, sum: two are views

    assert count_ops(Probe(), 8, 8) == (4, 2)

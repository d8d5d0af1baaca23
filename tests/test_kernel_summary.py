"""bench.kernel_summary: speed-up, minimum bytes and verdicts from a kernel benchmark JSON."""
from __future__ import annotations

import json

import pytest

from bench import kernel_summary as ks


def entry(impl: str, median: float, mode: str = "fwd", device_ms: float | None = None, mib: float = 1.0) -> dict:
    return {"name": f"test_agent_attention[refine-b1-{impl}-{mode}]",
            "stats": {"median": median},
            "extra_info": {"shapes": [[1, 8, 1000, 32], [1, 8, 100, 32], [1, 8, 100, 32]], "dtype": "bfloat16",
                           "added_mem_mib": mib, "device": "GPU X", "device_ms": device_ms}}


def test_minimum_bytes_counts_inputs_read_and_output_written_once():
    q, kv = 8 * 1000 * 32, 8 * 100 * 32
    assert ks.minimum_bytes("agent", "refine-b1", "fwd", [[1, 8, 1000, 32], [1, 8, 100, 32], [1, 8, 100, 32]],
                            "bfloat16") == 2 * (2 * q + 2 * kv)
    # masked adds the factors: 100 x 256 embeddings and 256 x L features per image
    masked = ks.minimum_bytes("masked", "decoder-b2-L64", "fwd", [[2, 8, 100, 32], [2, 8, 64, 32], [2, 8, 64, 32]],
                              "float32")
    assert masked == 4 * (2 * 2 * 8 * 100 * 32 + 2 * 2 * 8 * 64 * 32 + 2 * (100 * 256 + 256 * 64))


def test_rows_compare_triton_with_the_fastest_pytorch_path(tmp_path):
    data = {"benchmarks": [entry("triton", 1e-3, device_ms=0.5), entry("reference", 4e-3), entry("sdpa", 2e-3)]}
    (row,) = ks.collect(data)
    assert row.best_torch == ("sdpa", 2e-3)
    assert row.speedup == pytest.approx(2.0)
    assert row.bandwidth_share(1.0) == pytest.approx(row.min_bytes / 1e-3 / 1e12)
    assert row.device_speedup is None  # no PyTorch GPU-only time to compare with
    assert row.device_bandwidth_share(1.0) == pytest.approx(row.min_bytes / 5e-4 / 1e12)
    text = ks.render([row], 3.35, "t")
    assert "2.00× (1.50×: met)" in text and "0.500 / n/a / n/a" in text
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "k.md"
    assert ks.main([str(path), "--out", str(out)]) == 0
    assert out.read_text() == ks.render([row], 3.35, "Kernel microbenchmarks on GPU X")


def test_a_json_without_kernel_entries_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit):
        ks.main([str(path)])
    assert "no Triton kernel benchmark" in capsys.readouterr().err


def test_gpu_only_times_give_their_own_speed_up_and_bandwidth_verdicts():
    # wall clock: Triton 1 ms vs SDPA 0.8 ms (host-bound); GPU-only: 0.1 ms vs reference 0.4 ms and SDPA 0.3 ms
    data = {"benchmarks": [entry("triton", 1e-3, device_ms=0.1), entry("reference", 4e-3, device_ms=0.4),
                           entry("sdpa", 0.8e-3, device_ms=0.3)]}
    (row,) = ks.collect(data)
    assert row.speedup == pytest.approx(0.8) and row.best_torch_device == ("sdpa", 0.3)
    assert row.device_speedup == pytest.approx(3.0)
    assert row.device_bandwidth_share(1.0) == pytest.approx(row.min_bytes / 1e-4 / 1e12)
    line = ks.render([row], 3.35, "t").splitlines()[-1]
    assert "0.80× (1.50×: missed)" in line and "3.00× (1.50×: met)" in line
    assert "0.100 / 0.400 / 0.300" in line


def test_the_masked_kernels_two_mask_paths_get_their_own_table(tmp_path):
    """A masked case timed with its default mask path and the other one: a table row with both times; the other
    path never counts as the best PyTorch one, and a JSON with neither gives no table."""
    def masked(impl: str, median: float, mode: str = "fwd", device_ms: float | None = None) -> dict:
        return {"name": f"test_masked_attention[decoder-b8-L4096-{impl}-{mode}]", "stats": {"median": median},
                "extra_info": {"shapes": [[8, 8, 100, 32], [8, 8, 4096, 32], [8, 8, 4096, 32]], "dtype": "bfloat16",
                               "device": "GPU X", "device_ms": device_ms}}
    data = {"benchmarks": [masked("triton", 1e-3, device_ms=0.2), masked("triton-factors", 0.5e-3, device_ms=0.3),
                           masked("reference", 4e-3, device_ms=1.0), masked("sdpa", 2e-3, device_ms=0.4)]}
    (row,) = ks.collect(data)
    assert row.best_torch == ("sdpa", 2e-3) and row.device_speedup == pytest.approx(2.0)
    table = ks.render_mask_paths([row])
    assert "| decoder-b8-L4096 | fwd | bit mask | 1.000 / 0.500 | 0.200 / 0.300 (1.50×) |" in table
    path, out = tmp_path / "k.json", tmp_path / "k.md"
    path.write_text(json.dumps(data))
    assert ks.main([str(path), "--out", str(out)]) == 0
    assert "mask paths" in out.read_text()
    data["benchmarks"] = [b for b in data["benchmarks"] if "factors" not in b["name"]]
    assert ks.render_mask_paths(ks.collect(data)) == ""


def test_layout_benchmarks_get_their_own_table(tmp_path):
    def layout(op: str, impl: str, median: float, device_ms: float | None) -> dict:
        return {"name": f"test_{op}[refine-128-to-16-b1-{impl}-fwd]", "stats": {"median": median},
                "extra_info": {"device_ms": device_ms, "device": "GPU X"}}

    data = {"benchmarks": [entry("triton", 1e-3), entry("sdpa", 2e-3),
                           layout("resize", "nchw", 4e-4, 0.3), layout("resize", "channels-last", 1e-4, 0.01),
                           layout("depthwise", "nchw", 2e-3, None)]}  # no channels-last twin: no row
    text = ks.render_layouts(data)
    assert "| resize | refine-128-to-16-b1 | fwd | 0.400 / 0.100 (4.00×) | 0.300 / 0.010 (30.00×) |" in text
    assert "depthwise" not in text.split("|---|")[-1]
    assert ks.render_layouts({"benchmarks": [entry("triton", 1e-3)]}) == ""
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "k.md"
    assert ks.main([str(path), "--out", str(out)]) == 0
    assert out.read_text().endswith(text)


def test_refine_depthwise_benchmarks_get_their_own_table():
    def dw(impl: str, median: float, device_ms: float | None) -> dict:
        return {"name": f"test_refine_depthwise[refine-b8-{impl}]", "stats": {"median": median},
                "extra_info": {"device_ms": device_ms, "device": "GPU X"}}

    data = {"benchmarks": [entry("triton", 1e-3), dw("nchw", 4e-3, 3.0), dw("channels-last", 2e-3, 1.6),
                           dw("triton", 1e-3, 0.4)]}
    text = ks.render_refine_depthwise(data)
    # The ratio is the faster PyTorch layout over Triton: 2 / 1 wall, 1.6 / 0.4 GPU-only.
    assert "| refine-b8 | 4.000 / 2.000 / 1.000 (2.00×) | 3.000 / 1.600 / 0.400 (4.00×) |" in text
    only_torch = {"benchmarks": [dw("nchw", 4e-3, None), dw("channels-last", 2e-3, None)]}
    assert "| refine-b8 | 4.000 / 2.000 / n/a | n/a / n/a / n/a |" in ks.render_refine_depthwise(only_torch)
    assert ks.render_refine_depthwise({"benchmarks": [entry("triton", 1e-3)]}) == ""


def test_autotuned_configs_get_their_own_table(tmp_path):
    tuned = dict(entry("triton", 1e-3), name="test_agent_attention[refine-b1-triton-fwd+bwd]")
    tuned["extra_info"] = dict(tuned["extra_info"], autotuned={
        "agent_bwd_kernel": {"21760, 100, 32, torch.bfloat16": "BLOCK_N: 16, num_warps: 4, num_stages: 3"}})
    data = {"benchmarks": [entry("triton", 1e-3), entry("sdpa", 2e-3), tuned]}
    text = ks.render_autotuned(data)
    assert ("| agent_bwd_kernel | 21760, 100, 32, torch.bfloat16 | BLOCK_N: 16, num_warps: 4, num_stages: 3 | "
            "agent_attention[refine-b1-triton-fwd+bwd] |") in text
    assert ks.render_autotuned({"benchmarks": [entry("triton", 1e-3)]}) == ""
    path, out = tmp_path / "k.json", tmp_path / "k.md"
    path.write_text(json.dumps(data))
    assert ks.main([str(path), "--out", str(out)]) == 0
    assert out.read_text().endswith(text)

"""bench.roofline: the ideal time of one predict, counted on the meta device."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.backends import attention_backend
from bench.metrics import GPUS, GpuSpec, gpu_spec_for
from bench.roofline import WRAPPER, _Counter, _FusedAttention, main, roofline
from export.wrapper import ExportWrapper
from qd_core.config import load_config
from qd_core.summary import build_meta_student

# 1 TFLOP/s and 1 TB/s: a second is 1e12 FLOPs or 1e12 bytes, so the expected times are easy to write down.
UNIT = GpuSpec("unit", tensor_tflops=2.0, fp32_tflops=1.0, bandwidth_tbs=1.0)


def _tiny():
    cfg = load_config("tiny")
    return cfg, build_meta_student(cfg)


def test_a_matrix_product_is_bound_by_the_slower_of_its_flops_and_its_bytes():
    owners = [WRAPPER, "m"]
    x = torch.zeros(64, 32, device="meta")
    lin = nn.Linear(32, 16, device="meta")
    for dtype, size, peak in ((torch.bfloat16, 2, 2e12), (torch.float32, 4, 1e12)):
        counter = _Counter(UNIT, dtype, owners)
        with counter, torch.no_grad():
            lin(x)
        (cost,) = counter.by_owner.values()
        flops = 2 * 64 * 32 * 16
        nbytes = size * (64 * 32 + 32 * 16 + 16 + 64 * 16)  # input, weight, bias, output
        assert (cost.flops, cost.bytes, cost.kernels) == (flops, nbytes, 1)
        assert cost.seconds == pytest.approx(max(flops / peak, nbytes / 1e12))


def test_views_move_nothing_and_elementwise_work_is_memory_bound():
    counter = _Counter(UNIT, torch.float32, [WRAPPER])
    x = torch.zeros(8, 8, device="meta")
    with counter:
        y = x.view(64).reshape(8, 8).transpose(0, 1)
        (y + 1).relu()
    assert {op: c.kernels for op, c in counter.by_op.items()} == {"aten.add": 1, "aten.relu": 1}
    assert counter.by_op["aten.relu"].bytes == 2 * 64 * 4 and counter.by_op["aten.relu"].flops == 0
    assert counter.by_owner[WRAPPER].seconds == pytest.approx(4 * 64 * 4 / 1e12)


def test_a_broadcast_operand_is_read_once_not_once_per_copy():
    """An expanded (stride-0) weight, as the agent-query merger's Linear broadcast over the query slots, holds one
    value per broadcast dimension: a kernel reads it once."""
    counter = _Counter(UNIT, torch.float32, [WRAPPER])
    x = torch.zeros(100, 4, 32, device="meta")
    w = torch.zeros(32, 16, device="meta").expand(100, 32, 16)
    with counter:
        torch.bmm(x, w)
    assert counter.by_op["aten.bmm"].bytes == 4 * (100 * 4 * 32 + 32 * 16 + 100 * 4 * 16)


def test_attention_counts_as_one_fused_kernel():
    counter = _Counter(UNIT, torch.bfloat16, [WRAPPER])
    q = torch.zeros(2, 4, 100, 8, device="meta")
    kv = torch.zeros(1, 4, 30, 8, device="meta")  # shared over the batch, as the agent keys
    mask = torch.ones(2, 1, 100, 30, dtype=torch.bool, device="meta")
    with counter, _FusedAttention(counter):
        F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask)
    assert list(counter.by_op) == ["attention (fused)"]  # nothing of its decomposition leaks out
    cost = counter.by_op["attention (fused)"]
    assert cost.kernels == 1 and cost.flops == 4 * 2 * 4 * 100 * 30 * 8
    assert cost.bytes == 2 * (6400 + 2 * 960) + 6000 + 2 * 6400  # q, k, v, bool mask, output


def test_the_student_forward_is_booked_like_the_profiler_ranges_and_keeps_every_flop():
    cfg, model = _tiny()
    size = tuple(cfg.inference.window)
    r = roofline(model, GPUS["h100-sxm"], batch=2, size=size, dtype=torch.bfloat16, config=cfg.name)
    names = [n for n, _ in model.named_children()]
    assert set(r.modules) <= set(names) | {WRAPPER} and {"backbone", "decoder", WRAPPER} <= set(r.modules)
    assert r.inside["reins"] == "backbone" and r.inside["backbone"] == ""
    assert r.modules["backbone"]["flops"] > r.modules["reins"]["flops"] > 0  # inclusive, as op_profile's
    top = [m for n, m in r.modules.items() if not r.inside[n]]
    for key in ("flops", "bytes", "kernels", "seconds"):
        assert sum(m[key] for m in top) == pytest.approx(r.total[key])
    assert sum(o["kernels"] for o in r.ops.values()) == r.total["kernels"]
    # Fusing attention and the deformable sampling drops their inner operations but not their FLOPs.
    with FlopCounterMode(display=False) as fc, attention_backend("sdpa"), torch.no_grad():
        ExportWrapper(build_meta_student(cfg).requires_grad_(False))(torch.zeros(2, 3, *size, device="meta"))
    assert r.total["flops"] == pytest.approx(fc.get_total_flops(), rel=1e-9)
    # One fused kernel per call, counted once (not in the untimed warm-up forward too).
    from qd_core.head.msda import MSDeformAttn

    assert r.ops["ms_deform_attn (fused)"]["kernels"] == sum(isinstance(m, MSDeformAttn) for m in model.modules())
    assert r.ops["semantic_labels (fused)"]["kernels"] == 1 and r.ops["attention (fused)"]["kernels"] > 0
    # fp32: the same FLOPs, twice the floating-point bytes (index tensors keep their size), a slower peak.
    r32 = roofline(build_meta_student(cfg), GPUS["h100-sxm"], batch=2, size=size, dtype=torch.float32)
    assert r32.total["flops"] == r.total["flops"]
    assert 1.9 < r32.total["bytes"] / r.total["bytes"] <= 2.0
    assert r32.total["seconds"] > r.total["seconds"]
    # Twice the images: about twice the ideal time (weights are read once per forward either way).
    r4 = roofline(build_meta_student(cfg), GPUS["h100-sxm"], batch=4, size=size, dtype=torch.bfloat16)
    assert 1.5 < r4.total["seconds"] / r.total["seconds"] <= 2.0


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
                                       ("NVIDIA H100 NVL", "h100-nvl"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA H200 NVL", "h200-nvl"), ("NVIDIA GH200 480GB", None),
                                       ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"),
                                       ("NVIDIA A100-SXM4-80GB", "a100-sxm"),
                                       ("NVIDIA GeForce RTX 4090", None),
                                       ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None)])
def test_device_names_map_to_datasheets(name, key):
    assert gpu_spec_for(name) == (GPUS[key] if key else None)


def test_cli_prints_the_table_and_rejects_bad_values_in_one_line(capsys):
    assert main(["--config", "tiny", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Ideal time of one predict: tiny" in out and "| backbone |" in out and "| reins (inside backbone) |" in out
    assert main(["--config", "tiny", "--gpu", "h200", "--bandwidth-tbs", "1", "--json"]) == 0
    assert "overridden" in capsys.readouterr().out
    for argv, needle in ((["--batch", "0"], "--batch 0"), (["--size", "100", "96"], "--size 100 96"),
                         (["--config", "no-such-config"], "no-such-config"),
                         (["--peak-tflops", "-1"], "--peak-tflops -1")):
        assert main(["--config", "tiny", *argv] if argv[0] != "--config" else argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_the_bench_session_sets_gpu_latency_against_its_ideal_and_nothing_on_a_cpu():
    """What the report's "ideal ms" column and op_profile's "× ideal" read: the session's roofline at the batch and
    precision, made once per pair; None on a CPU. (A GPU session is stood in for by its device name: the count
    itself runs on the meta device.)"""
    import dataclasses

    from bench.backends import BenchSession
    from bench.settings import BenchSettings

    settings = BenchSettings(device="cpu", config="tiny", checkpoint=None, data=None, images=2, batch=2,
                             backends=("torch-fp32",), cpu_compile=False, work=None)
    session = BenchSession(settings)
    assert session.roofline(1, "bf16") is None and session.ideal_ms(1, "bf16") is None
    session.settings = dataclasses.replace(settings, device="cuda")
    session.device_name = "NVIDIA H100 80GB HBM3"
    r = session.roofline(2, "bf16")
    assert r is not None and r.gpu == GPUS["h100-sxm"].name and r.input == [2, 3, *session.size]
    assert session.roofline(2, "bf16") is r  # made once
    assert session.ideal_ms(2, "fp32") > session.ideal_ms(2, "bf16") == pytest.approx(r.total["seconds"] * 1e3)


def test_help_describes_the_tool_in_whole_sentences():
    """The description is the docstring's whole first paragraph, not its first line cut off mid-sentence."""
    from bench.roofline import build_parser

    text = " ".join(build_parser().format_help().split())
    assert ("The ideal time of one predict on a given GPU: what the op graph would cost if every kernel ran at the "
            "GPU's peak arithmetic rate or its memory bandwidth, whichever binds.") in text

"""kernels.resources: every kernel compiles for sm_90 offline (no GPU), with its register and spill figures.

This is the one check on a machine without a GPU that the kernels build in Triton's compiled mode at all: the rest
of the CPU suite runs them under the interpreter, which accepts programs the GPU compiler would reject.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_kernel_compiles_for_sm90_in_bf16_and_fp32(tmp_path: Path):
    out = tmp_path / "resources.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled mode, as on a GPU
    done = subprocess.run([sys.executable, "-m", "kernels.resources", "--dtype", "bf16", "--dtype", "fp32",
                           "--max-configs", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    kernels = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows}
    expected = {"agent_fwd", "agent_bwd", "masked_bits", "masked_fwd", "masked_combine", "masked_bwd", "sum_partials",
                "msda_fwd", "msda_bwd", "labels"}
    assert {k for k, _, _ in kernels} == expected
    # Per dtype: agent fwd/bwd at the refinement and Rein shapes and the refinement's dK/dV partial sum; the bit
    # mask, the masked forward and backward reading it and computing the mask from its factors, the combine step;
    # the deformable attention's forward and backward; the full-size labels.
    assert len(rows) == 2 * 14
    for r in rows:
        registers, programs = int(r[4]), int(r[7])
        assert 1 <= registers <= 255 and programs >= 1, r


def test_resources_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "kernels.resources", "--max-configs", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "TRITON_INTERPRET is set" in done.stderr


def test_without_autotuning_each_kernel_has_one_config_and_it_compiles_for_every_dtype(tmp_path: Path):
    """QD_TRITON_AUTOTUNE=0 (the gpu tests' fast mode) must give every kernel one config that is valid for every
    dtype and shape, since the autotuner's pruning is skipped when there is a single config."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"QD_TRITON_AUTOTUNE": "0"}
    count = ("import kernels.agent_triton as a, kernels.masked_triton as m; "
             "print(*(len(k.configs) for k in (a._agent_fwd_kernel, a._agent_bwd_kernel, m._masked_fwd_kernel, "
             "m._masked_bwd_kernel)))")
    done = subprocess.run([sys.executable, "-c", count], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["1", "1", "1", "1"], done.stderr[-2000:]
    out = tmp_path / "fixed.md"
    done = subprocess.run([sys.executable, "-m", "kernels.resources", "--dtype", "bf16", "--dtype", "fp16", "--dtype",
                           "fp32", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 * 14 and all(int(r[7]) >= 1 for r in rows)  # every one fits an SM

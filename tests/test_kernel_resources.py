"""kernels.resources: every kernel compiles for sm_90 offline (no GPU), with its register and spill figures.

This is the one check on a machine without a GPU that the kernels build in Triton's compiled mode at all: the rest
of the CPU suite runs them under the interpreter, which accepts programs the GPU compiler would reject.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
                "msda_fwd", "msda_bwd", "labels", "depthwise"}
    assert {k for k, _, _ in kernels} == expected
    # Per dtype: agent fwd/bwd at the refinement and Rein shapes and the refinement's dK/dV partial sum; the bit
    # mask, the masked forward and backward reading it and computing the mask from its factors, the combine step;
    # the deformable attention's forward and backward; the full-size labels; the refinement's depthwise kernel.
    assert len(rows) == 2 * 15
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
    count = ("import kernels.agent_triton as a, kernels.masked_triton as m, kernels.depthwise_triton as d; "
             "print(*(len(k.configs) for k in (a._agent_fwd_kernel, a._agent_bwd_kernel, m._masked_fwd_kernel, "
             "m._masked_bwd_kernel, d._depthwise_kernel)))")
    done = subprocess.run([sys.executable, "-c", count], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["1"] * 5, done.stderr[-2000:]
    out = tmp_path / "fixed.md"
    done = subprocess.run([sys.executable, "-m", "kernels.resources", "--dtype", "bf16", "--dtype", "fp16", "--dtype",
                           "fp32", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 3 * 15 and all(int(r[7]) >= 1 for r in rows)  # every one fits an SM


# The largest heads each kernel accepts (kernels.fit for the masked kernels, agent_triton.block_d's chunking for the
# agent kernels), compiled with the fixed configs of QD_TRITON_AUTOTUNE=0 (no autotuner to skip a config that does
# not fit): each must fit the 227 KiB of shared memory an sm_90 program may have.
_LIMIT_SHAPES = """
import dataclasses, json, sys
import torch
from kernels import agent_triton as at, resources as R, _triton_utils as u
from kernels.fit import masked_tiles_fit

MAX_SHARED = 232448
cases = [("masked_fwd", "fp32", 128, 64), ("masked_combine", "fp32", 128, 64), ("masked_fwd", "bf16", 256, 128),
         ("masked_combine", "bf16", 256, 128), ("masked_bwd", "fp32", 128, 32), ("masked_bwd", "bf16", 128, 128),
         ("masked_bwd", "bf16", 256, 64), ("agent_fwd", "fp32", 256, 64), ("agent_bwd", "fp32", 100, 64),
         ("agent_bwd", "fp32", 256, 32), ("agent_fwd", "bf16", 256, 128), ("agent_bwd", "bf16", 256, 128)]
sizes = {"fp32": 4, "bf16": 2}
out = []
for kernel, dtype, n, d in cases:
    if kernel.startswith("masked"):
        assert masked_tiles_fit(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]), n, d,
                                backward=kernel == "masked_bwd"), (kernel, dtype, n, d)
    for v in R.variants(dtype):
        if v.kernel != kernel or v.case.startswith("rein"):
            continue
        args = dict(v.args)
        if kernel.startswith("masked"):
            args.update(NQ=n, HEAD_DIM=d, BLOCK_Q=u.tile(n), BLOCK_D=u.tile(d))
        else:
            direction = "fwd" if kernel == "agent_fwd" else "bwd"
            args.update(M=n, HEAD_DIM=d, BLOCK_M=u.tile(n), BLOCK_D=at.block_d(d, n, sizes[dtype], direction))
        v = dataclasses.replace(v, args=args)
        for config in v.configs:
            r = R.compile_variant(v, config, dtype, 90)
            out.append([kernel, v.case, dtype, n, d, r.shared_bytes])
print(json.dumps(out))
"""


def test_the_largest_heads_the_kernels_accept_fit_an_sm90_program():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"QD_TRITON_AUTOTUNE": "0"}
    done = subprocess.run([sys.executable, "-c", _LIMIT_SHAPES], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {r[0] for r in rows} == {"masked_fwd", "masked_combine", "masked_bwd", "agent_fwd", "agent_bwd"}
    too_big = [r for r in rows if r[-1] > 232448]
    assert not too_big, too_big


def test_masked_heads_one_step_beyond_the_limit_are_refused():
    import torch

    from kernels.fit import masked_tiles_fit

    assert masked_tiles_fit(torch.float32, 100, 32, backward=True)
    assert masked_tiles_fit(torch.float32, 100, 64, backward=False)
    assert not masked_tiles_fit(torch.float32, 100, 64, backward=True)  # no backward config fits sm_90
    assert not masked_tiles_fit(torch.float32, 256, 32, backward=True)
    assert not masked_tiles_fit(torch.bfloat16, 100, 256, backward=False)  # the combine step's 512-byte rows
    assert not masked_tiles_fit(torch.bfloat16, 256, 128, backward=True)
    assert masked_tiles_fit(torch.bfloat16, 256, 128, backward=False)


def test_sass_counts_find_the_longest_loop_body():
    from kernels.resources import sass_counts

    listing = "\n".join([
        "        .text._k:",
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        "        /*0010*/                   FADD R2, R2, R3 ;",
        ".L_x_1:",
        "        /*0020*/                   MUFU.EX2 R4, R4 ;",
        "        /*0030*/              @P0 BRA `(.L_x_1) ;",       # inner loop: 2 instructions
        "        /*0040*/                   FMNMX R5, R5, R4, !PT ;",
        "        /*0050*/              @!P1 BRA `(.L_x_0) ;",      # outer loop: 5 instructions
        "        /*0060*/                   BRA `(.L_x_2) ;",      # forward branch: no loop
        ".L_x_2:",
        "        /*10000*/                  EXIT ;",               # five hex digits past 64 KiB of code
    ])
    assert sass_counts(listing) == (8, 5)


def test_an_arch_the_toolchain_does_not_know_is_one_error_line_not_an_llvm_abort(tmp_path: Path):
    """--arch 0 used to reach Triton's LLVM, which aborts the process (rc 134); a subprocess, so a regression
    cannot take the test runner down with it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "resources.md"
    done = subprocess.run([sys.executable, "-m", "kernels.resources", "--arch", "0", "--kernel", "labels", "--dtype",
                           "fp32", "--max-configs", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: --arch 0: ") and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "expected one of " in done.stderr and "90" in done.stderr.split("expected one of ")[1].split(", ")
    assert done.stdout == "" and not list(tmp_path.iterdir())


def test_supported_archs_are_what_the_bundled_tools_take():
    from kernels.resources import arch_supported, supported_archs

    archs = supported_archs()
    assert 90 in archs and 80 in archs and archs == sorted(archs)
    assert all(arch_supported(a) for a in archs)
    assert not any(arch_supported(a) for a in (0, -90, 9, 900))


def test_an_out_that_is_a_directory_is_refused_before_compiling(tmp_path: Path, monkeypatch, capsys):
    from kernels import resources

    def no_compiling(*_args: object) -> None:
        raise AssertionError("compiled before --out was checked")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # checked first; the --out check comes after it
    monkeypatch.setattr(resources, "compile_variant", no_compiling)
    assert resources.main(["--kernel", "labels", "--dtype", "fp32", "--max-configs", "1", "--out",
                           str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out '{tmp_path}': is a directory; expected the path of the Markdown file to write\n"
    assert not list(tmp_path.iterdir())


def test_the_table_is_written_atomically_and_a_failed_write_leaves_no_temp_file(tmp_path: Path):
    from kernels.resources import write_text

    write_text(tmp_path / "table.md", "| a |\n")
    assert (tmp_path / "table.md").read_text() == "| a |\n"
    (tmp_path / "taken.md").mkdir()  # the rename onto a folder fails
    with pytest.raises(OSError):
        write_text(tmp_path / "taken.md", "| b |\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.md", "taken.md"]

"""bench.host_profile: one row per case, mode and implementation, and a profile of every Triton call."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import host_profile

ROOT = Path(__file__).resolve().parents[1]


def test_host_profile_writes_its_table_and_profiles(tmp_path: Path, capsys):
    out = tmp_path / "host.md"
    assert host_profile.main(["--calls", "1", "--top", "3", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| agent") or line.startswith("| masked")]
    assert len(rows) == 2 * 2 * 2  # 2 cases x 2 modes x (triton, sdpa)
    assert all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[3:5])
    assert text.count(", triton: cProfile over 1 calls") == 4 and "ncalls" in text


def _offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_offline_profile_times_both_launch_paths_without_a_gpu(tmp_path: Path):
    """--offline: kernels compiled for sm_90, launches recorded; a row for direct launches and one for Triton's
    dispatch per case and mode (the comparison the GPU run makes, on this machine's host)."""
    out = tmp_path / "host.md"
    done = subprocess.run([sys.executable, "-m", "bench.host_profile", "--offline", "--calls", "5", "--top", "3",
                           "--out", str(out)], cwd=ROOT, env=_offline_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "launches not run" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith(("| agent", "| masked"))]
    assert sorted({r[2].strip() for r in rows}) == ["triton", "triton-dispatch"] and len(rows) == 2 * 2 * 2
    assert all(float(r[3]) > 0 for r in rows)


def test_offline_profile_refuses_the_interpreter_in_one_line():
    env = _offline_env() | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.host_profile", "--offline"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "unset TRITON_INTERPRET" in err[0]


def test_bad_arguments_are_one_line_before_any_work(tmp_path: Path, capsys):
    from bench.host_profile import main

    for argv, named in ((["--calls", "0"], "--calls 0"), (["--out", str(tmp_path)], "is a folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and named in err[0]

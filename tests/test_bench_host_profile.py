"""bench.host_profile: one row per case, mode and implementation, and a profile of every Triton call."""
from __future__ import annotations

from pathlib import Path

from bench import host_profile


def test_host_profile_writes_its_table_and_profiles(tmp_path: Path, capsys):
    out = tmp_path / "host.md"
    assert host_profile.main(["--calls", "1", "--top", "3", "--out", str(out)]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| agent") or line.startswith("| masked")]
    assert len(rows) == 2 * 2 * 2  # 2 cases x 2 modes x (triton, sdpa)
    assert all(float(cell) > 0 for row in rows for cell in row.strip("|").split("|")[3:5])
    assert text.count(", Triton: cProfile over 1 calls") == 4 and "ncalls" in text

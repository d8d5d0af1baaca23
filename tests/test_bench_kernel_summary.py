"""python -m bench.kernel_summary on input it cannot use: exit status 2, one line naming it, nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import kernel_summary as ks


def _kernel_json(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(data))
    return path


def _good_entry(impl: str) -> dict:
    return {"name": f"test_agent_attention[refine-b1-{impl}-fwd]", "stats": {"median": 1e-3},
            "extra_info": {"shapes": [[1, 8, 1000, 32], [1, 8, 100, 32], [1, 8, 100, 32]], "dtype": "bfloat16",
                           "device": "GPU X"}}


def _exit_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one stderr line of a main() that must end with exit status 2."""
    with pytest.raises(SystemExit) as stop:
        ks.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("data, needle", [
    ({"machine_info": {}}, "expected a pytest-benchmark JSON object with a 'benchmarks' list"),
    ([1, 2], "expected a pytest-benchmark JSON object"),
    ({"benchmarks": [{"stats": {}}]}, "benchmarks[0]: expected an object with a 'name'"),
    ({"benchmarks": [{**_good_entry("triton"), "stats": {}}, _good_entry("sdpa")]}, "(KeyError: 'median')"),
])
def test_a_json_not_shaped_like_the_kernel_benchmarks_is_one_line(data: object, needle: str, tmp_path: Path,
                                                                  capsys):
    path = _kernel_json(tmp_path, data)
    line = _exit_line([str(path)], capsys)
    assert str(path) in line and needle in line


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_bandwidth_that_is_not_positive_is_one_line(value: str, tmp_path: Path, capsys):
    path = _kernel_json(tmp_path, {"benchmarks": [_good_entry("triton"), _good_entry("sdpa")]})
    assert f"--bandwidth-tbs {value}: expected a positive" in _exit_line([str(path), "--bandwidth-tbs", value], capsys)


def test_an_out_path_that_is_a_folder_is_one_line_and_nothing_is_written(tmp_path: Path, capsys):
    path = _kernel_json(tmp_path, {"benchmarks": [_good_entry("triton"), _good_entry("sdpa")]})
    folder = tmp_path / "out"
    folder.mkdir()
    assert f"--out {folder}: is a folder" in _exit_line([str(path), "--out", str(folder)], capsys)
    assert list(folder.iterdir()) == []
    # The same JSON with a usable --out is summarised: the refusals above are about the arguments alone.
    assert ks.main([str(path), "--out", str(folder / "k.md")]) == 0 and "1.00×" in (folder / "k.md").read_text()


def test_the_summary_and_its_out_file_need_no_torch(tmp_path: Path):
    """The table is made where the GPU's JSON was fetched to, which may have no torch (``bench.arguments``): with
    ``import torch`` failing, the summary is still written to --out."""
    import subprocess
    import sys

    path = _kernel_json(tmp_path, {"benchmarks": [_good_entry("triton"), _good_entry("sdpa")]})
    out = tmp_path / "k.md"
    script = ("import runpy, sys; sys.modules['torch'] = None  # import torch raises ImportError\n"
              f"sys.argv = ['kernel_summary', {str(path)!r}, '--out', {str(out)!r}]\n"
              "runpy.run_module('bench.kernel_summary', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1.00×" in out.read_text()

"""bench.native's reading of what qd_infer leaves behind, against stand-in executables: a run that exits 0 but
leaves a short, malformed or missing timings file, or label maps of the wrong size, is an error, never a latency
or a prediction (qd_infer itself is tested in test_native.py); and bench.exported's reuse of the files it wrote."""
from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
import torch

from bench.native import NativeError, NativeSegmenter

# A stand-in for qd_infer: reads its arguments as qd_infer does, writes an 8-bit label PNG per image and a timings
# file, each as the scenario in QD_FAKE says.
FAKE = '''#!{python}
import json, os, sys
from pathlib import Path
import numpy as np
from PIL import Image
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
scenario = {scenario!r}
images, out = Path(args["--images"]), Path(args["--out"])
out.mkdir(parents=True, exist_ok=True)
names = sorted(p.name for p in images.iterdir())
iters = int(args["--iters"])
for name in names:
    h, w = Image.open(images / name).size[::-1]
    if scenario == "wrong_size":
        h += 1
    if scenario != "no_labels":
        Image.fromarray(np.full((h, w), 3, np.uint8)).save(out / name)
runs = [[1.5, len(names)]] * iters
text = json.dumps({{"warmup": 0, "runs": runs}})
if scenario == "malformed":
    text = text[:-3]
elif scenario == "no_runs":
    text = json.dumps({{"warmup": 0}})
elif scenario == "short":
    text = json.dumps({{"warmup": 0, "runs": runs[:-1]}})
elif scenario == "empty":
    text = json.dumps({{"warmup": 0, "runs": []}})
elif scenario == "wrong_count":
    text = json.dumps({{"warmup": 0, "runs": [[1.5, len(names) + 1]] * iters}})
if scenario != "no_timings":
    Path(args["--timings"]).write_text(text)
sys.exit(3 if scenario == "exit3" else 0)
'''


def fake_segmenter(tmp_path: Path, scenario: str) -> NativeSegmenter:
    exe = tmp_path / "qd_infer"
    exe.write_text(FAKE.format(python=sys.executable, scenario=scenario))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return NativeSegmenter(exe, tmp_path / "model.pt2")


IMAGES = torch.full((2, 3, 8, 12), 7.0)


def test_a_complete_run_gives_the_labels_and_one_time_per_pass(tmp_path: Path):
    seg = fake_segmenter(tmp_path, "ok")
    assert seg.timed_passes(IMAGES, warmup=1, iters=4) == [0.0015] * 4
    labels = seg.predict(IMAGES)
    assert labels.shape == (2, 8, 12) and bool((labels == 3).all())


@pytest.mark.parametrize("scenario, needle", [
    ("exit3", "exited with 3"),
    ("malformed", "timings file is missing or malformed"),
    ("no_timings", "timings file is missing or malformed"),
    ("no_runs", "timings file is missing or malformed"),
    ("short", "lists 3 passes"),
    ("empty", "lists 0 passes"),
    ("wrong_count", "expected 4 passes of 2 images"),
    ("no_labels", "cannot be read"),
    ("wrong_size", "shape (9, 12)"),
])
def test_an_incomplete_run_is_an_error_not_a_latency(tmp_path: Path, scenario: str, needle: str):
    with pytest.raises(NativeError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        fake_segmenter(tmp_path, scenario).timed_passes(IMAGES, warmup=1, iters=4)


def test_the_report_refuses_an_externally_timed_row_without_samples():
    from bench.report import build_report

    entry = {"group": "latency b1", "name": "test_latency[qd-infer-b1]",
             "extra_info": {"kind": "latency", "backend": "qd-infer", "precision": "fp32", "batch": 1,
                            "samples_s": []},
             "stats": {"mean": 9.9, "median": 9.9, "rounds": 1, "data": [9.9]}}
    with pytest.raises(ValueError, match="samples_s is empty"):
        build_report({"benchmarks": [entry]})


def test_exported_files_are_reused_only_for_the_model_they_were_made_from(tmp_path: Path, monkeypatch):
    """Two sessions of one process may share a work folder: the second model must get its own ONNX, not the
    first one's file."""
    import export.onnx
    from bench import exported

    calls: list[torch.nn.Module] = []
    monkeypatch.setattr(exported, "_written", {})
    monkeypatch.setattr(export.onnx, "export_onnx", lambda model, path, **kw: calls.append(model))
    first, second = torch.nn.Identity(), torch.nn.Identity()
    for model, size in ((first, (64, 64)), (first, (64, 64)), (second, (64, 64)), (second, (32, 64))):
        assert exported.onnx_fp32(model, size, tmp_path) == tmp_path / "model-fp32.onnx"
    assert calls == [first, second, second]


def test_an_up_to_date_build_is_used_without_cmake_and_a_stale_one_is_not(tmp_path: Path, monkeypatch):
    import os
    import shutil as shutil_module

    from bench.native import build_qd_infer

    monkeypatch.setattr(shutil_module, "which", lambda name: None)  # no cmake on this machine
    exe = tmp_path / "native" / "qd_infer"
    with pytest.raises(NativeError, match="cmake is not installed"):
        build_qd_infer(tmp_path)  # nothing built
    exe.parent.mkdir(parents=True)
    exe.write_text("built")
    assert build_qd_infer(tmp_path)[0] == exe
    os.utime(exe, (1, 1))  # older than the sources: a stale build is refused, not run
    with pytest.raises(NativeError, match="cmake is not installed"):
        build_qd_infer(tmp_path)


def test_a_failed_build_names_the_tools_error_line_first():
    """cmake ends its error output with boilerplate ("Specify --help for usage..."); the headline a report shows
    is the line that says what went wrong."""
    from bench.native import headline

    output = ("-- The C compiler identification is GNU 12.2.0\n"
              "CMake Error: The source directory \"/x\" does not appear to contain CMakeLists.txt.\n"
              "Specify --help for usage, or press the help button on the CMake GUI.\n")
    assert headline(output) == 'CMake Error: The source directory "/x" does not appear to contain CMakeLists.txt.'
    assert headline("make: *** [all] Stopped\nlast line\n") == "last line"  # no error line: the last one
    assert headline("") == "no output"

"""bench.op_profile: module and kernel attribution of one forward, and the CLI on the tiny student."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from torch.autograd import DeviceType

from bench.op_profile import COMPILED, UNBOOKED, WRAPPER, main, render, summarize, whole_forward
from bench.roofline import Roofline


def _event(name: str, kernels_us: tuple[float, ...] = (), children: tuple = (), cpu_us: float = 0.0):
    e = SimpleNamespace(name=name, kernels=[SimpleNamespace(name=f"k_{name}", duration=us) for us in kernels_us],
                        cpu_children=list(children), cpu_parent=None, cpu_time_total=cpu_us,
                        self_cpu_time_total=cpu_us)
    for c in children:
        c.cpu_parent = e
    return e


def _forward() -> list[SimpleNamespace]:
    """One forward: 1000 µs of GPU kernels; backbone 600 (of which reins 100), decoder 300, the wrapper 100."""
    reins = _event("qd::reins", children=(_event("aten::mm", (100.0,)),), cpu_us=50.0)
    backbone = _event("qd::backbone", children=(_event("aten::mm", (250.0, 250.0)), reins), cpu_us=400.0)
    decoder = _event("qd::decoder", children=(_event("aten::bmm", (300.0,)),), cpu_us=300.0)
    head = _event("aten::argmax", (100.0,))
    forward = _event("qd::forward", children=(backbone, decoder, head), cpu_us=900.0)
    events, stack = [], [forward]
    while stack:  # the profiler lists every event, nested ones included
        e = stack.pop()
        events.append(e)
        stack.extend(e.cpu_children)
    return events


def test_gpu_time_is_booked_to_modules_and_the_wrapper_keeps_the_rest():
    events = _forward() + _forward()  # two iterations: every figure is per forward
    modules, kernels, device_ms, host_ms = summarize(events, iters=2, top=10)
    assert device_ms == pytest.approx(1.0) and host_ms == pytest.approx(0.9)
    by_name = {m.name: m for m in modules}
    assert by_name["backbone"].device_ms == pytest.approx(0.6) and by_name["backbone"].kernels == 3
    assert by_name["reins"].device_ms == pytest.approx(0.1) and by_name["reins"].inside == "backbone"
    assert by_name["decoder"].device_ms == pytest.approx(0.3) and by_name["decoder"].inside == ""
    # The wrapper: the forward less its top-level modules (reins is inside the backbone, not subtracted twice).
    assert by_name[WRAPPER].device_ms == pytest.approx(0.1) and by_name[WRAPPER].kernels == 1
    assert by_name[WRAPPER].host_ms == pytest.approx(0.2)
    assert [m.name for m in modules] == ["backbone", "decoder", "reins", WRAPPER]
    assert [(k.name, k.total_ms, k.calls) for k in kernels[:2]] == [("k_aten::mm", pytest.approx(0.6), 3),
                                                                     ("k_aten::bmm", pytest.approx(0.3), 1)]


def _device_event(name: str, us: float) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=DeviceType.CUDA,
                           time_range=SimpleNamespace(start=10.0, end=10.0 + us), kernels=[], cpu_children=[],
                           cpu_parent=None, cpu_time_total=0.0, self_cpu_time_total=0.0)


def test_kernels_the_profiler_could_not_link_are_totalled_as_not_booked():
    """With the device's own events (a real GPU profile), the total and the kernel table come from them: a kernel
    linked to no launch (150 µs here) is counted in a "(not booked)" row instead of being lost."""
    events = _forward()
    linked = [k for e in events for k in e.kernels]
    events += [_device_event(k.name, k.duration) for k in linked] + [_device_event("triton_unlinked", 150.0)]
    events.append(_device_event("qd::forward", 1150.0))  # the range's GPU-side span: not a kernel
    modules, kernels, device_ms, _ = summarize(events, iters=1, top=10)
    assert device_ms == pytest.approx(1.15)
    by_name = {m.name: m for m in modules}
    assert by_name[UNBOOKED].device_ms == pytest.approx(0.15) and by_name[UNBOOKED].kernels == 1
    assert by_name["backbone"].device_ms == pytest.approx(0.6)
    assert modules[-1].name == UNBOOKED and modules[-2].name == WRAPPER
    assert ("triton_unlinked", pytest.approx(0.15), 1) in [(k.name, k.total_ms, k.calls) for k in kernels]


def test_gpu_tables_set_each_module_against_its_ideal_time():
    modules, kernels, device_ms, host_ms = summarize(_forward(), iters=1, top=10)
    row = {"flops": 0.0, "bytes": 0.0, "kernels": 1}
    ideal = Roofline(config="c", gpu="G", dtype="bfloat16", input=[1, 3, 64, 64],
                     modules={"backbone": {**row, "seconds": 0.2e-3}, "decoder": {**row, "seconds": 0.3e-3},
                              WRAPPER: {**row, "seconds": 0.0}},
                     inside={"backbone": "", "decoder": "", WRAPPER: ""}, ops={},
                     total={**row, "seconds": 0.5e-3})
    text = render(modules, kernels, device_ms, host_ms, title="t", gpu=True, ideal=ideal)
    assert ("Ideal (`python -m bench.roofline`, bfloat16, G datasheet peaks): 0.500 ms; the GPU time is 2.0× that."
            in text)
    assert "| backbone | 0.600 | 60.0 % | 3 | 0.400 | 0.200 | 3.0× |" in text
    assert "| decoder | 0.300 | 30.0 % | 1 | 0.300 | 0.300 | 1.0× |" in text
    assert "| reins (inside backbone) | 0.100 | 10.0 % | 1 | 0.050 | | |" in text  # not in the ideal table
    assert "× ideal" not in render(modules, kernels, device_ms, host_ms, title="t", gpu=True)


def test_cli_profiles_several_backends_on_the_same_model(tmp_path: Path, capsys):
    out, trace = tmp_path / "profile.md", tmp_path / "trace.json"
    assert main(["--device", "cpu", "--config", "tiny", "--backend", "torch-bf16-pure", "torch-fp32",
                 "--iters", "1", "--top", "3", "--out", str(out), "--trace", str(trace)]) == 0
    text = out.read_text()
    # Canonical backend order, whatever the command line's.
    assert text.index("tiny, torch-fp32, batch 1") < text.index("tiny, torch-bf16-pure, batch 1")
    assert (tmp_path / "trace-torch-fp32.json").is_file() and (tmp_path / "trace-torch-bf16-pure.json").is_file()


def test_a_profile_stopped_by_its_time_limit_keeps_the_ones_that_finished(tmp_path: Path, monkeypatch, capsys):
    # scripts/gpu_check.sh stops a step with SIGINT at its limit: the report used to be written only at the end.
    from bench import op_profile

    calls = []

    def profile(backend, session, spec, batch, args, gpu):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return f"profile of batch {batch}"

    monkeypatch.setattr(op_profile, "_profile", profile)
    out = tmp_path / "profile.md"
    assert main(["--device", "cpu", "--config", "tiny", "--backend", "torch-fp32", "--batch", "1", "2",
                 "--out", str(out)]) == 130
    assert out.read_text() == "profile of batch 1" and calls == [1, 2]
    assert "stopped: 1 profile(s) finished" in capsys.readouterr().err


def test_cli_profiles_the_tiny_student_on_cpu(tmp_path: Path, capsys):
    out, trace = tmp_path / "profile.md", tmp_path / "trace.json"
    assert main(["--device", "cpu", "--config", "tiny", "--backend", "torch-fp32", "--batch", "1", "2",
                 "--iters", "1", "--top", "5", "--out", str(out), "--trace", str(trace)]) == 0
    text = out.read_text()
    assert text.count("# Where one forward goes: tiny, torch-fp32") == 2 and "batch 2 at 128×128" in text
    for module in ("backbone", "pixel_decoder", "decoder", WRAPPER):
        assert f"| {module} |" in text
    assert (tmp_path / "trace-b1.json").stat().st_size > 0 and (tmp_path / "trace-b2.json").stat().st_size > 0


@pytest.mark.parametrize("args, message", [(["--batch", "0"], "--batch 0: expected a positive integer"),
                                           (["--backend", "torch-triton-bf16"], "--backend torch-triton-bf16: "),
                                           (["--checkpoint", "missing.safetensors"], "no such file")])
def test_cli_bad_arguments_get_one_line(args: list[str], message: str, capsys):
    assert main(["--device", "cpu", "--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_compiled_backend_is_one_row_set_against_the_whole_forwards_ideal():
    events = _forward()
    modules, kernels, device_ms, host_ms = summarize(events, iters=1, top=10)
    compiled = [whole_forward(modules, device_ms, host_ms)]  # 5 kernels: reins' one is in the backbone's 3
    ideal = Roofline(config="tiny", gpu="H100", dtype="bfloat16", input=[1, 3, 128, 128],
                     modules={"backbone": {"flops": 1.0, "bytes": 1.0, "kernels": 1, "seconds": 1e-4}},
                     inside={"backbone": ""}, ops={}, total={"flops": 1.0, "bytes": 1.0, "kernels": 9,
                                                            "seconds": 2.5e-4})
    text = render(compiled, kernels, device_ms, host_ms, title="t", gpu=True, ideal=ideal)
    assert f"| {COMPILED} | 1.000 | 100.0 % | 5 | 0.900 | 0.250 | 4.0× |" in text


def test_cli_profiles_the_compiled_tiny_student_on_cpu(tmp_path: Path):
    """torch.compile (Inductor on this CPU), no module ranges inside the compiled code: one row for the forward."""
    out = tmp_path / "profile.md"
    assert main(["--device", "cpu", "--config", "tiny", "--backend", "torch-compile", "--iters", "1", "--top", "5",
                 "--out", str(out)]) == 0
    text = out.read_text()
    assert "tiny, torch-compile, batch 1" in text and f"| {COMPILED} |" in text
    assert "| backbone |" not in text


def test_the_default_backend_follows_the_device(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    """Without --backend a CPU profiles the fp32 reference (the Triton kernels need CUDA), and --help says so."""
    import torch

    from bench import op_profile
    from bench.backends import BACKENDS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "profile.md"
    assert main(["--config", "tiny", "--iters", "1", "--top", "2", "--out", str(out)]) == 0
    assert "# Where one forward goes: tiny, torch-fp32, batch 1" in out.read_text()
    specs = {b.name: b for b in BACKENDS}
    default = op_profile.DEFAULT_BACKEND
    assert specs[default["cuda"]].cuda_only and not specs[default["cpu"]].cuda_only
    helptext = " ".join(op_profile.build_parser().format_help().split())
    assert "default: torch-triton-bf16 on CUDA, torch-fp32 on a CPU" in helptext


@pytest.mark.parametrize("kind", ["config", "checkpoint", "data", "out", "trace"])
def test_cli_unusable_inputs_get_one_line_before_any_profiling(kind: str, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch):
    from bench import op_profile

    profiled: list = []
    monkeypatch.setattr(op_profile, "_profile", lambda *a: profiled.append(a) or "")
    (tmp_path / "folder").mkdir()
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("garbage\n")
    args, needle = {
        "config": (["--config", "no-such-config"], "'no-such-config'"),
        "checkpoint": (["--checkpoint", str(garbage)], str(tmp_path / "garbage")),
        "data": (["--data", str(tmp_path / "folder")], f"{tmp_path / 'folder'}: expected a synthetic root"),
        "out": (["--out", str(tmp_path / "folder")], f"--out {tmp_path / 'folder'}: is a folder"),
        "trace": (["--trace", str(tmp_path / "folder")], f"--trace {tmp_path / 'folder'}: is a folder"),
    }[kind]
    config = [] if kind in ("config", "checkpoint") else ["--config", "tiny"]
    assert main(["--device", "cpu", "--backend", "torch-fp32", *config, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert profiled == [] and sorted(p.name for p in tmp_path.iterdir()) == ["folder", "garbage.safetensors"]

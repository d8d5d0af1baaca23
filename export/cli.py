"""``python -m export``: a student checkpoint → ONNX fp32 (+ strongly typed FP16) (+ TensorRT engine) + report.

    python -m export --out exports/tiny --random-init --config tiny --fp16
    python -m export --checkpoint runs/vitl16_512/best.safetensors --out exports/vitl --fp16 --batch 1:4:8 --engine

Writes into --out: ``model.onnx`` (``model_plugin.onnx`` with --msda plugin), ``*_fp16.onnx`` with --fp16,
``*_fp16.engine`` + ``.json`` + ``timing.cache`` with --engine (where TensorRT and a GPU exist), ``report.json``.
Exit codes: 0 done, 2 bad input (one ``error:`` line says what and how to fix it), 1 a step failed.

Timing a paper-size export on a CPU (not a CI test: ~1.3 GB of weights, minutes per step):

    /usr/bin/time -v python -m export --random-init --config vitl16_512 --fp16 --max-images 1 \
        --batch 1:1:4 --out /tmp/vitl16_512

The report's ``export_seconds``, ``bytes`` and ``parity`` entries are the numbers to quote (see ``report.json``).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

RUNS_DIR = Path("runs")
ARTIFACT_STEMS = {"gather": "model", "plugin": "model_plugin"}


class UsageError(ValueError):
    """Bad command-line input; the message is printed as one ``error:`` line and the exit code is 2."""


def log(message: str) -> None:
    print(message, flush=True)


def parse_batch(text: str) -> tuple[int, int, int]:
    """"MIN:OPT:MAX" (or a single N meaning 1:N:N) → (min, opt, max) with 1 <= min <= opt <= max."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: expected MIN:OPT:MAX integers, e.g. 1:4:8") from None
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
    return values[0], values[1], values[2]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a QueryDiff student to ONNX (fp32 and strongly typed FP16) and a TensorRT engine, "
                    "and check every artifact against the PyTorch fp32 reference.")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="student checkpoint (.safetensors with its .json beside it); default: the newest "
                        "runs/*/best.safetensors (else runs/*/last.safetensors)")
    p.add_argument("--config", default=None,
                   help="shipped config name or YAML path; must describe the same model as the checkpoint "
                        "(default: the checkpoint's own config); required with --random-init")
    p.add_argument("--out", type=Path, required=True, help="output folder for the ONNX files, engine and report")
    p.add_argument("--fp16", action="store_true",
                   help="also write a strongly typed FP16 ONNX (LayerNorm, softmax, MSDA sampling kept in fp32)")
    p.add_argument("--opset", type=int, choices=(17, 18), default=18, help="ONNX opset (default 18)")
    p.add_argument("--batch", type=parse_batch, default=(1, 1, 8), metavar="MIN:OPT:MAX",
                   help="dynamic batch range (N alone means 1:N:N) of the TensorRT optimisation profile and the "
                        "AOTInductor package; OPT is also the parity batch; the ONNX batch axis is always dynamic "
                        "(default 1:1:8)")
    p.add_argument("--height", type=int, default=None,
                   help="input height, a multiple of 32 (default: the config's inference window)")
    p.add_argument("--width", type=int, default=None,
                   help="input width, a multiple of 32 (default: the config's inference window)")
    p.add_argument("--msda", choices=("gather", "plugin"), default="gather",
                   help="deformable-attention sampling: 'gather' = plain ONNX ops, runs everywhere (default); "
                        "'plugin' = TensorRT's MultiscaleDeformableAttnPlugin_TRT node (TensorRT only)")
    p.add_argument("--engine", action="store_true",
                   help="build a TensorRT FP16 engine from the FP16 ONNX (implies --fp16; needs tensorrt and a "
                        "GPU, otherwise the equivalent trtexec command is printed)")
    p.add_argument("--aoti", action="store_true",
                   help="also compile an AOTInductor package student.pt2 (for AotiSegmenter and the C++ runner "
                        "qd_infer; minutes of C++ compilation on a CPU)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.add_argument("--random-init", action="store_true",
                   help="export randomly initialised weights of --config (for latency work; no checkpoint)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights (default 0)")
    p.add_argument("--data", type=Path, default=None,
                   help="evaluation images: a synthetic-data folder or a Cityscapes-layout folder (default: the "
                        "embedded synthetic scenes at the config's data.synthetic.root, generated once)")
    p.add_argument("--max-images", type=int, default=4,
                   help="evaluation images per domain for the parity check, 0 = skip the check (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device of the PyTorch reference and of ONNX Runtime during the parity check, and the "
                        "device the --aoti package is compiled for (it runs only there; default cpu)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def find_latest_checkpoint(runs: Path = RUNS_DIR) -> Path | None:
    """The newest ``runs/*/best.safetensors`` by modification time, else the newest ``runs/*/last.safetensors``."""
    for name in ("best.safetensors", "last.safetensors"):
        found = [p for p in runs.glob(f"*/{name}") if p.is_file()]
        if found:
            return max(found, key=lambda p: p.stat().st_mtime)
    return None


def load_model(args: argparse.Namespace) -> tuple[Any, Any, Path | None]:
    """(model in eval mode, config, checkpoint path or None for --random-init); UsageError on bad input."""
    import torch

    from qd_core import build_student, load_config
    from qd_core.checkpoint import CheckpointError, load_student, model_config_differences, read_student_meta
    from qd_core.config import ConfigError

    if args.random_init:
        if args.checkpoint is not None:
            raise UsageError("--random-init and --checkpoint exclude each other: pick one")
        if args.config is None:
            raise UsageError("--random-init needs --config (e.g. --config tiny or --config vitl16_512)")
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        cfg = copy.deepcopy(cfg)
        cfg.model.backbone.checkpoint = ""  # random weights everywhere, no DINOv2 file needed
        torch.manual_seed(args.seed)
        return build_student(cfg).eval(), cfg, None

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = find_latest_checkpoint()
        if checkpoint is None:
            raise UsageError(f"no checkpoint given and none found under {RUNS_DIR}/*/best.safetensors or "
                             f"{RUNS_DIR}/*/last.safetensors: train one with `python -m train` (or pass "
                             f"--checkpoint PATH, or --random-init --config NAME for latency work)")
        log(f"using the newest checkpoint: {checkpoint}")
    try:
        meta = read_student_meta(checkpoint)
        cfg_override = load_config(args.config) if args.config is not None else None
        if cfg_override is not None:
            diffs = model_config_differences(meta["config"], cfg_override.to_dict())
            if diffs:
                shown = "; ".join(f"{k} = {va!r} (checkpoint) vs {vb!r} (--config)" for k, va, vb in diffs[:4])
                more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
                raise UsageError(f"checkpoint '{checkpoint}' was saved with a different model than --config "
                                 f"{args.config!r}: {shown}{more}. Drop --config to use the checkpoint's own")
        model, cfg = load_student(checkpoint)
    except (CheckpointError, ConfigError) as e:
        raise UsageError(str(e)) from None
    if cfg_override is not None:
        cfg = cfg_override
    return model.eval(), cfg, Path(checkpoint)


def earlier_outputs(out: Path) -> list[Path]:
    """The files an earlier export left in ``out`` (its report and every artifact it can write, with their data and
    metadata files). The timing cache is kept: it holds kernel timings only and is checked against the GPU."""
    names = ["report.json", "student.pt2"]
    for stem in ARTIFACT_STEMS.values():
        for onnx_name in (f"{stem}.onnx", f"{stem}_fp16.onnx"):
            names += [onnx_name, onnx_name + ".data"]
        names += [f"{stem}_fp16.engine", f"{stem}_fp16.json"]
    return [out / n for n in names if (out / n).is_file()]


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out`` (or accept it, if empty or with ``overwrite``) and prove it is writable; UsageError if not.
    With ``overwrite`` an earlier export's files are removed first: an artifact this run does not make (an fp16
    ONNX of other weights, say) must not stay beside a report that does not describe it."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out '{out}' is not empty: pass --overwrite to write into it, or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for stale in earlier_outputs(out):
            stale.unlink()
    except OSError as e:
        raise UsageError(f"--out '{out}' is not writable: {e.strerror or e}") from None


# ----------------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every step; returns the report (also written to ``args.out / 'report.json'``)."""
    import onnx

    from export.fp16 import convert_to_fp16
    from export.msda_plugin import PLUGIN_OP
    from export.onnx import check_plugin_graph, export_onnx, op_counts, plugin_nodes, save_model
    from export.report import format_summary, versions, write_report
    from export.tensorrt import tensorrt_status, trtexec_command

    fp16 = args.fp16 or args.engine
    model, cfg, checkpoint = load_model(args)
    height = args.height if args.height is not None else int(cfg.inference.window[0])
    width = args.width if args.width is not None else int(cfg.inference.window[1])
    multiple = int(getattr(model, "size_multiple", 32))
    for name, v in (("--height", height), ("--width", width)):
        if v <= 0 or v % multiple:
            raise UsageError(f"{name} {v}: expected a positive multiple of {multiple}")
    if args.max_images < 0:
        raise UsageError(f"--max-images {args.max_images}: expected 0 (skip the parity check) or more")
    if args.device == "cuda":
        # Checked before any work: the device is first used by the parity step (or the AOTInductor build), after
        # every artifact has been written.
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: this machine (or this torch build) has no CUDA device; use --device cpu")
        if args.max_images > 0 and args.msda == "gather":
            from export.runtime import ort_providers

            try:
                ort_providers("cuda")
            except ValueError as e:
                raise UsageError(f"--device cuda: the parity check runs ONNX Runtime on CUDA, but {e}") from None
    samples, data_name = None, ""
    if args.max_images > 0:
        # Read before anything is written: a corrupt image must not stop the run after the artifacts exist.
        samples, data_name = parity_samples(args, cfg, height, width)
    prepare_out_dir(args.out, args.overwrite)

    steps = 2 + int(fp16) + int(args.engine) + int(args.aoti) + int(args.max_images > 0)
    step = 0

    def begin(text: str) -> float:
        nonlocal step
        step += 1
        log(f"[{step}/{steps}] {text}")
        return time.perf_counter()

    source = "random init (seed %d)" % args.seed if checkpoint is None else str(checkpoint)
    log(f"student: config {cfg.name!r}, weights: {source}, input {height}x{width}, msda {args.msda}, "
        f"opset {args.opset}")
    stem = ARTIFACT_STEMS[args.msda]
    report: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "config": cfg.name,
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,  # valid from any folder
        "random_init": checkpoint is None,
        "exporter": "torch.onnx.export, TorchScript exporter (dynamo=False)",
        "opset": args.opset,
        "msda": args.msda,
        "input": {"name": "images", "shape": ["batch", 3, height, width], "dtype": "float32",
                  "values": "RGB in [0, 255]; normalisation is inside the graph"},
        "outputs": {"logits": {"shape": ["batch", model.num_classes, height // 4, width // 4], "dtype": "float32"},
                    "labels": {"shape": ["batch", height, width], "dtype": "int32"}},
        "batch_profile": list(args.batch),
        "artifacts": [],
    }

    # 1. fp32 ONNX
    t = begin(f"exporting fp32 ONNX → {args.out / (stem + '.onnx')}")
    exported = export_onnx(model, args.out / f"{stem}.onnx", height=height, width=width, opset=args.opset,
                           msda=args.msda, extra_metadata={"config": cfg.name})
    log(f"      {exported.bytes / 2**20:.1f} MB{' + external data' if exported.external_data else ''} in "
        f"{time.perf_counter() - t:.1f} s")
    fp32_model = onnx.load(str(exported.path))
    runnable_in_ort = args.msda == "gather"
    graph_info: dict[str, Any] = {"nodes": len(fp32_model.graph.node),
                                  "grid_sample_nodes": op_counts(fp32_model)["GridSample"],
                                  "plugin_nodes": len(plugin_nodes(fp32_model))}
    if args.msda == "plugin":
        graph_info["plugin_signatures"] = check_plugin_graph(fp32_model, model)
        log(f"      {graph_info['plugin_nodes']} {PLUGIN_OP} nodes, inputs as documented (shape inference)")
    report["artifacts"].append({"name": "onnx_fp32", "path": exported.path.name, "bytes": exported.bytes,
                                "export_seconds": exported.seconds, "precision": "fp32",
                                "external_data": exported.external_data, "graph": graph_info})
    plugin_note = "plugin graph: runs only in TensorRT (structure checked by shape inference)"

    # 2. FP16 ONNX
    fp16_path = args.out / f"{stem}_fp16.onnx"
    if fp16:
        t = begin(f"converting to strongly typed FP16 → {fp16_path}")
        converted = convert_to_fp16(fp32_model)
        size = save_model(converted, fp16_path)
        seconds = time.perf_counter() - t
        log(f"      {size / 2**20:.1f} MB in {seconds:.1f} s")
        report["artifacts"].append({"name": "onnx_fp16", "path": fp16_path.name, "bytes": size,
                                    "export_seconds": seconds, "precision": "fp16 (strongly typed)",
                                    "external_data": fp16_path.with_name(fp16_path.name + ".data").exists()})
        del converted
    del fp32_model
    if not runnable_in_ort:
        for entry in report["artifacts"]:
            entry["note"] = plugin_note

    # 3. TensorRT engine
    engine_path = args.out / f"{stem}_fp16.engine"
    cache_path = args.out / "timing.cache"
    # Absolute paths: the command is meant to be run later, from wherever.
    command = trtexec_command((fp16_path if fp16 else exported.path).resolve(), engine_path.resolve(),
                              batch=args.batch, height=height, width=width, strongly_typed=fp16,
                              timing_cache=cache_path.resolve())
    report["engine"] = {"built": False, "trtexec": command}
    if not fp16:
        report["engine"]["trtexec_note"] = ("TensorRT 10 only (weakly typed, --fp16 flag): TensorRT 11 builds "
                                            "strongly typed networks; export with --fp16 for its FP16 ONNX")
    if args.engine:
        t = begin(f"building TensorRT engine → {engine_path}")
        reason = tensorrt_status()
        if reason is not None:
            log(f"      no engine built: {reason}")
            log(f"      equivalent command on a machine with TensorRT:\n        {command}")
            report["engine"]["reason"] = reason
        else:
            from export.tensorrt import build_engine

            meta = build_engine(fp16_path, engine_path, batch=args.batch, height=height, width=width,
                                strongly_typed=True, timing_cache=cache_path,
                                extra_metadata={"msda": args.msda, "config": cfg.name}, log=log)
            report["engine"] = {"built": True, "trtexec": command, "path": engine_path.name, **meta}
            report["artifacts"].append({"name": "tensorrt_fp16", "path": engine_path.name,
                                        "bytes": meta["bytes"], "export_seconds": meta["build_seconds"],
                                        "precision": "fp16 (strongly typed)"})
            log(f"      {meta['bytes'] / 2**20:.1f} MB in {time.perf_counter() - t:.1f} s")

    # 4. AOTInductor package (same wrapper as the ONNX graph: RGB in, logits and labels out, dynamic batch)
    if args.aoti:
        from export.aoti import export_aoti
        from export.wrapper import ExportWrapper

        pt2_path = args.out / "student.pt2"
        t = begin(f"compiling AOTInductor package → {pt2_path}")
        export_aoti(ExportWrapper(model), pt2_path, height=height, width=width, batch=args.batch,
                    device=args.device, overwrite=True)
        seconds = time.perf_counter() - t
        size = pt2_path.stat().st_size
        log(f"      {size / 2**20:.1f} MB in {seconds:.1f} s")
        report["artifacts"].append({"name": "aoti", "path": pt2_path.name, "bytes": size, "export_seconds": seconds,
                                    "precision": "fp32"})

    # 5. Parity
    if args.max_images > 0:
        t = begin("parity against the PyTorch fp32 reference")
        report["parity"] = _parity(args, model, samples, data_name, report, runnable_in_ort, fp16, fp16_path,
                                   exported.path, engine_path)
        log(f"      {report['parity']['images']} images in {time.perf_counter() - t:.1f} s")
        if not report["parity"]["artifacts"]:
            log("      no artifact of this export runs here (a --msda plugin graph runs only in TensorRT): only "
                "the reference ran; the plugin graph's structure was checked")

    report_path = write_report(args.out / "report.json", report)
    step += 1
    log(f"[{step}/{steps}] report → {report_path}")
    log(format_summary(report))
    if checkpoint is None:
        log("note: randomly initialised weights (--random-init): the parity numbers check the export, not a "
            "trained model")
    failed = [f"{a['name']}: {'; '.join(a['parity']['problems'])}" for a in report["artifacts"]
              if a.get("parity") and not a["parity"]["passed"]]
    if failed:
        raise ParityError(f"parity against the PyTorch fp32 reference failed for {' | '.join(failed)} (the report "
                          f"is in {report_path}; the artifacts are kept for inspection)")
    return report


class ParityError(ValueError):
    """An exported artifact's outputs strayed from the PyTorch reference beyond its precision's tolerance."""


def parity_samples(args: argparse.Namespace, cfg: Any, height: int, width: int) -> tuple[list[Any], str]:
    """The parity images (``--data``, else the config's synthetic evaluation set, made if absent) → (samples, name).
    Any unreadable image or unknown layout is a UsageError naming it."""
    from export.report import evaluation_sources, load_evaluation_set

    if args.data is not None:
        data, data_name = args.data, str(args.data)
        try:
            evaluation_sources(args.data)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(str(e)) from None
    else:
        from qd_core.data.synthetic import ensure_synthetic

        syn = cfg.data.synthetic
        if not (Path(syn.root) / "manifest.json").is_file():
            log(f"generating the synthetic evaluation scenes in {syn.root} (once)")
        data = ensure_synthetic(Path(syn.root), seed=syn.seed, num_train=syn.num_train, num_val=syn.num_val,
                                size=syn.size, progress=False)
        data_name = f"synthetic ({data})"
    try:
        samples = load_evaluation_set(data, height=height, width=width, max_per_domain=args.max_images)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--data: {e}") from None
    return samples, data_name


def _parity(args: argparse.Namespace, model: Any, samples: list[Any], data_name: str, report: dict[str, Any],
            runnable_in_ort: bool, fp16: bool, fp16_path: Path, fp32_path: Path, engine_path: Path) -> dict[str, Any]:
    from export.parity import LOGIT_TOLERANCE, TOLERANCE_POINTS, parity_problems
    from export.report import evaluate_parity
    from export.runtime import OrtSegmenter, TorchSegmenter, TrtSegmenter

    log(f"      {len(samples)} images from {data_name}")
    reference = TorchSegmenter(model, device=args.device, name="pytorch_fp32")
    ort_device = "cuda" if args.device == "cuda" else "cpu"
    artifacts: dict[str, Any] = {}
    entries = {a["name"]: a for a in report["artifacts"]}
    if runnable_in_ort:
        # No spinning: idle ONNX Runtime workers would otherwise busy-wait through every PyTorch reference run.
        artifacts["onnx_fp32"] = OrtSegmenter(fp32_path, device=ort_device, spinning=False, name="onnx_fp32")
        if fp16:
            artifacts["onnx_fp16"] = OrtSegmenter(fp16_path, device=ort_device, spinning=False, name="onnx_fp16")
        runtime = f"onnxruntime ({ort_device})"
        for name in artifacts:
            entries[name]["runtime"] = runtime
    if "aoti" in entries:
        from export.aoti import AotiSegmenter

        artifacts["aoti"] = AotiSegmenter(args.out / "student.pt2", name="aoti")
        entries["aoti"]["runtime"] = "aotinductor"
    if "tensorrt_fp16" in entries:
        artifacts["tensorrt_fp16"] = TrtSegmenter(engine_path, name="tensorrt_fp16")
        entries["tensorrt_fp16"]["runtime"] = "tensorrt"
    batch = max(1, min(args.batch[1], len(samples)))
    parity = evaluate_parity(reference, artifacts, samples, batch_size=batch, num_classes=model.num_classes)
    parity["data"] = data_name
    for name, numbers in parity["artifacts"].items():
        precision = "fp16" if entries[name]["precision"].startswith("fp16") else "fp32"
        problems = parity_problems(precision, numbers["logit_rel_error"], numbers["miou_delta"])
        numbers["tolerance"] = {"precision": precision, "logit_rel_error": LOGIT_TOLERANCE[precision],
                                "miou_points": TOLERANCE_POINTS[precision]}
        numbers["passed"] = not problems
        numbers["problems"] = problems
        entries[name]["parity"] = numbers
    return parity


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from export.tensorrt import EngineError

    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (EngineError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

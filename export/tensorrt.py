"""TensorRT engines from the exported ONNX: build, describe, check and run (TensorRT 10 and 11 Python API).

``tensorrt`` is imported only inside the functions that need it; everything about engine metadata works
without it, so the checks are testable on any machine.

Precision. TensorRT 11 builds strongly typed networks only: the FP16 ONNX written by ``export.fp16`` (fp16
weights and compute, explicit fp32 islands) is parsed with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``,
which TensorRT 10 (10.0+) honours as well. An fp32 ONNX can still be built as a weakly typed FP16 engine on
TensorRT 10 (``BuilderFlag.FP16``); TensorRT 11 no longer has that flag, and ``build_engine`` says so.

Every engine has a JSON file beside it (``<engine>.json``) recording the TensorRT version, the GPU and its
compute capability, the optimisation profile and the precision. An engine is only valid for the TensorRT
version and GPU architecture it was built with; ``check_engine_compatibility`` turns a mismatch into one clear
message instead of a deserialisation failure deep inside TensorRT.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from export.wrapper import INPUT_NAME, OUTPUT_NAMES

METADATA_FORMAT = "querydiff-trt-engine"
# Versions compatible for an engine: TensorRT refuses engines from another build (major.minor.patch).
_VERSION_PARTS = 3


class EngineError(ValueError):
    """An engine that cannot be used here: wrong GPU or TensorRT version, unreadable file or metadata."""


def tensorrt_status() -> str | None:
    """None when TensorRT can build and run engines here, else the reason it cannot (one line)."""
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'querydiff[trt]' on a CUDA machine)"
    except Exception as e:  # a broken install (missing libnvinfer) raises OSError/RuntimeError at import
        return f"the tensorrt package failed to import: {type(e).__name__}: {e}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch (TensorRT engines need an NVIDIA GPU)"
    return None


def gpu_info(device: int | str | torch.device = 0) -> dict[str, str]:
    """The name and compute capability ("major.minor") of a CUDA device."""
    device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {"name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def engine_metadata_path(engine_path: str | os.PathLike[str]) -> Path:
    """Where the metadata of ``engine_path`` lives: the same name with ``.json``."""
    return Path(engine_path).with_suffix(".json")


def profile_shapes(batch: tuple[int, int, int], height: int, width: int) -> dict[str, list[int]]:
    """The (min, opt, max) input shapes of the optimisation profile for a (min, opt, max) batch."""
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch={batch}: expected 1 <= min <= opt <= max")
    return {"min": [lo, 3, height, width], "opt": [opt, 3, height, width], "max": [hi, 3, height, width]}


def trtexec_command(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str], *,
                    batch: tuple[int, int, int], height: int, width: int, strongly_typed: bool = True,
                    timing_cache: str | os.PathLike[str] | None = None) -> str:
    """The ``trtexec`` command line that builds the same engine as ``build_engine``. ``strongly_typed=False``
    (the fp32 ONNX with ``--fp16``) is a TensorRT 10 command: TensorRT 11 removed the precision flags."""
    shapes = profile_shapes(batch, height, width)

    def dims(key: str) -> str:
        return f"{INPUT_NAME}:" + "x".join(str(d) for d in shapes[key])

    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
            f"--minShapes={dims('min')}", f"--optShapes={dims('opt')}", f"--maxShapes={dims('max')}"]
    args.append("--stronglyTyped" if strongly_typed else "--fp16")
    args.append("--noTF32")  # as build_engine: the fp32 parts stay fp32
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    return " ".join(shlex.quote(a) for a in args)


def _write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_engine_metadata(engine_path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    """Atomically write ``metadata`` (plus the format tag) beside ``engine_path``; returns the JSON path."""
    path = engine_metadata_path(engine_path)
    _write_atomic(path, (json.dumps({"format": METADATA_FORMAT, **metadata}, indent=2) + "\n").encode())
    return path


def read_engine_metadata(engine_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata beside ``engine_path``; EngineError if it is missing, unreadable or not ours."""
    path = engine_metadata_path(engine_path)
    if not path.is_file():
        raise EngineError(f"engine '{engine_path}' has no metadata file '{path}': it was not built by "
                          f"`python -m export --engine`; rebuild it so its GPU and profile can be checked")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"engine metadata '{path}' could not be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise EngineError(f"engine metadata '{path}': expected \"format\": \"{METADATA_FORMAT}\"")
    for key in ("tensorrt", "gpu", "inputs"):
        if key not in meta:
            raise EngineError(f"engine metadata '{path}': missing key \"{key}\"")
    return meta


def _same_version(a: str, b: str) -> bool:
    return a.split(".")[:_VERSION_PARTS] == b.split(".")[:_VERSION_PARTS]


def check_engine_compatibility(meta: dict[str, Any], *, tensorrt_version: str, gpu: dict[str, str],
                               engine_path: str | os.PathLike[str] = "engine") -> None:
    """Raise EngineError (one message) if the engine was built with another TensorRT version or for a GPU of
    another compute capability than ``gpu`` = {"name", "compute_capability"} here."""
    built_gpu = meta.get("gpu", {})
    built_cc, here_cc = str(built_gpu.get("compute_capability")), str(gpu.get("compute_capability"))
    built_trt = str(meta.get("tensorrt"))
    if built_cc == here_cc and _same_version(built_trt, tensorrt_version):
        return
    raise EngineError(
        f"engine '{engine_path}' was built for {built_gpu.get('name', '?')} (compute capability {built_cc}) with "
        f"TensorRT {built_trt}, but this machine has {gpu.get('name', '?')} (compute capability {here_cc}) with "
        f"TensorRT {tensorrt_version}: rebuild the engine here (python -m export ... --engine) or run the .onnx")


def check_input_shape(meta: dict[str, Any], shape: tuple[int, ...] | torch.Size,
                      engine_path: str | os.PathLike[str] = "engine") -> None:
    """Raise ValueError (one message) unless ``shape`` lies inside the engine's optimisation profile."""
    spec = meta["inputs"][INPUT_NAME]
    lo, hi = spec["min"], spec["max"]
    shape = tuple(int(d) for d in shape)
    fixed = tuple(lo[1:])
    if len(shape) != len(lo) or shape[1:] != fixed:
        raise ValueError(f"images: shape {shape} does not fit engine '{engine_path}', built for (B, "
                         f"{', '.join(map(str, fixed))}) inputs; resize the images to {fixed[1]}x{fixed[2]}")
    if not lo[0] <= shape[0] <= hi[0]:
        raise ValueError(f"images: batch {shape[0]} is outside the optimisation profile of engine '{engine_path}' "
                         f"(batch {lo[0]}..{hi[0]}); split the batch or rebuild with --batch MIN:OPT:MAX")


@functools.lru_cache(maxsize=None)
def _trt_logger(trt: Any) -> Any:
    """The process's one TensorRT logger, with TensorRT's plugin library (MultiscaleDeformableAttnPlugin_TRT & co)
    registered against it. One, made once: ``init_libnvinfer_plugins`` keeps the logger's address for the rest of
    the process (it is meant to be called once), so a logger made per build or per engine would be freed while
    the plugins still log through it."""
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    return logger


def missing_plugin_versions(creators: list[tuple[str, str]] | None, wanted: set[tuple[str, str]]) -> str | None:
    """Why the plugin nodes of a graph, ``wanted`` {(op type, plugin_version)}, cannot be built by a TensorRT whose
    registry holds ``creators`` [(name, version)]; None when all are there or the registry could not be listed.
    Said instead of the parser's own message for a missing creator, an assertion deep in its log."""
    if creators is None:
        return None
    for name, version in sorted(wanted):
        if (name, version) not in creators:
            have = sorted(v for n, v in creators if n == name)
            return (f"this TensorRT has no {name} version {version} (it has: {', '.join(have) or 'none'}); "
                    f"export with --msda gather instead")
    return None


def _registry_creators(trt: Any) -> list[tuple[str, str]] | None:
    """(name, version) of every plugin creator TensorRT registered; None where its registry cannot be listed."""
    registry = trt.get_plugin_registry()
    creators = getattr(registry, "all_creators", None)
    if creators is None:
        creators = getattr(registry, "plugin_creator_list", None)
    if creators is None:
        return None
    return [(str(c.name), str(c.plugin_version)) for c in creators
            if hasattr(c, "name") and hasattr(c, "plugin_version")]


def _graph_plugins(onnx_path: Path) -> set[tuple[str, str]]:
    """{(op type, plugin_version)} of the graph's TensorRT plugin nodes (the graph without its external data)."""
    import onnx

    from export.onnx import plugin_nodes

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {(n.op_type, next((a.s.decode() for a in n.attribute if a.name == "plugin_version"), "1"))
            for n in plugin_nodes(model)}


def build_engine(onnx_path: str | os.PathLike[str], engine_path: str | os.PathLike[str], *,
                 batch: tuple[int, int, int], height: int, width: int, strongly_typed: bool = True,
                 timing_cache: str | os.PathLike[str] | None = None, workspace_gib: float | None = None,
                 extra_metadata: dict[str, Any] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse ``onnx_path`` and write a serialized FP16 engine to ``engine_path`` plus its metadata JSON.

    Args:
        onnx_path: the FP16 ONNX (``strongly_typed=True``, TensorRT 10 and 11) or, on TensorRT 10 only, the
            fp32 ONNX built weakly typed with ``BuilderFlag.FP16`` (``strongly_typed=False``).
        batch: (min, opt, max) of the dynamic batch axis; H and W are fixed.
        timing_cache: a file reused and updated across builds (kernel timings), created if absent.
        workspace_gib: builder workspace limit; None leaves TensorRT's default (the device memory).
    Returns:
        the metadata written beside the engine.
    """
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    shapes = profile_shapes(batch, height, width)
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data beside the file as well
        # Read the graph again only now: a missing plugin creator is the likely cause, said plainly.
        problem = missing_plugin_versions(_registry_creators(trt), _graph_plugins(onnx_path))
        if problem is not None:
            raise EngineError(f"'{onnx_path}': {problem} (TensorRT {trt.__version__})")
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT {trt.__version__} could not parse '{onnx_path}': {errors}")
    config = builder.create_builder_config()
    if not strongly_typed:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise EngineError(f"TensorRT {trt.__version__} builds strongly typed networks only: build from the "
                              f"FP16 ONNX (python -m export ... --fp16) instead of '{onnx_path}'")
        config.set_flag(trt.BuilderFlag.FP16)
    # TF32 is on by default and would round the inputs of the graph's fp32 parts (the deformable attention's
    # sampling offsets and weights, the final products) to 10-bit mantissas: ONNX Runtime, which the parity
    # checks run, never does that.
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            # Made by another GPU or TensorRT version: start an empty one (it replaces the file after the build).
            log(f"  timing cache '{cache_path}' does not match this GPU / TensorRT {trt.__version__}; starting a "
                f"new one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    log(f"  building TensorRT {trt.__version__} engine ({'strongly typed' if strongly_typed else 'fp16 flag'}, "
        f"batch {batch[0]}..{batch[2]} opt {batch[1]}) — this takes minutes")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build an engine from '{onnx_path}' (see the "
                          f"TensorRT log above)")
    _write_atomic(engine_path, memoryview(serialized))  # no copy of a ViT-L engine's hundreds of MB
    if cache_path is not None:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    meta: dict[str, Any] = {
        "tensorrt": trt.__version__,
        "gpu": gpu_info(torch.cuda.current_device()),  # the device the builder ran on
        "onnx": onnx_path.name,
        "precision": "fp16",
        "strongly_typed": strongly_typed,
        "tf32": False,
        "inputs": {INPUT_NAME: {**shapes, "dtype": "float32"}},
        "outputs": list(OUTPUT_NAMES),
        "build_seconds": round(seconds, 2),
        "bytes": engine_path.stat().st_size,
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta.update(extra_metadata or {})
    write_engine_metadata(engine_path, meta)
    return meta


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
             "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool, "BF16": torch.bfloat16}
    for name, torch_dtype in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return torch_dtype
    raise EngineError(f"engine I/O type {dtype} has no torch equivalent")


class EngineRunner:
    """A deserialized engine with one execution context; torch CUDA tensors are its I/O buffers.

    ``run`` binds each tensor's ``data_ptr()`` with ``set_tensor_address`` and enqueues ``execute_async_v3`` on the
    runner's own CUDA stream, ordered after torch's current stream and before anything later queued on it (two
    stream waits, no host synchronisation, no pycuda). Not the current stream itself: that is usually the legacy
    default stream, on which TensorRT warns and adds synchronisations of its own.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device = "cuda") -> None:
        reason = tensorrt_status()
        if reason is not None:
            raise EngineError(f"cannot run engine '{path}': {reason}")
        import tensorrt as trt

        self.path = Path(path)
        if not self.path.is_file():
            raise EngineError(f"engine '{self.path}' does not exist")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device={device!r}: TensorRT engines run on a CUDA device")
        # An engine built by `trtexec` (the command `python -m export` prints) has no metadata file: its profile is
        # then read from the engine, and whether it suits this GPU and TensorRT is left to deserialisation.
        described = engine_metadata_path(self.path).is_file()
        if described:
            self.meta = read_engine_metadata(self.path)
            check_engine_compatibility(self.meta, tensorrt_version=trt.__version__, gpu=gpu_info(self.device),
                                       engine_path=self.path)
        self.trt = trt
        logger = _trt_logger(trt)
        with torch.cuda.device(self.device):
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
            if self.engine is None:
                raise EngineError(f"TensorRT {trt.__version__} could not deserialize engine '{self.path}'")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream(self.device)
        if not described:
            lo, opt, hi = (list(shape) for shape in self.engine.get_tensor_profile_shape(INPUT_NAME, 0))
            self.meta = {"inputs": {INPUT_NAME: {"min": lo, "opt": opt, "max": hi}}}
            warnings.warn(f"engine '{self.path}' has no metadata file '{engine_metadata_path(self.path)}' (built by "
                          f"trtexec?): its batch profile {lo[0]}..{hi[0]} is read from the engine", stacklevel=2)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(INPUT_NAME))
        spec = self.meta["inputs"][INPUT_NAME]
        self.input_size = (int(spec["min"][2]), int(spec["min"][3]))

    def run(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) inside the profile → {output name: tensor on the engine's device}."""
        check_input_shape(self.meta, tuple(images.shape), self.path)
        with torch.cuda.device(self.device):
            x = images.to(self.device, self.input_dtype).contiguous()
            if not self.context.set_input_shape(INPUT_NAME, tuple(x.shape)):
                raise ValueError(f"images: TensorRT rejected shape {tuple(x.shape)} for engine '{self.path}' (see the "
                                 f"TensorRT log)")
            if not self.context.set_tensor_address(INPUT_NAME, x.data_ptr()):
                raise EngineError(f"TensorRT refused the input buffer of engine '{self.path}' (see the TensorRT log)")
            results: dict[str, Tensor] = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
                results[name] = torch.empty(shape, dtype=dtype, device=self.device)
                if not self.context.set_tensor_address(name, results[name].data_ptr()):
                    raise EngineError(f"TensorRT refused the buffer of output '{name}' of engine '{self.path}' (see "
                                      f"the TensorRT log)")
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)  # x and the output buffers are made on the current stream
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT execution of engine '{self.path}' failed (see the TensorRT log)")
            current.wait_stream(self.stream)
            # x may be freed on return while the engine still reads it, and the outputs handed to anything: the
            # caching allocator gives their memory only to work queued later on the current stream, which now
            # waits for the engine.
        return results

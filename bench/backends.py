"""The backends the suites time and score, and the session state they share (model, images, exported files).

Every backend is used through the ``Segmenter`` protocol of ``export.runtime``: ``predict(images) -> (B, H, W)``
labels and ``logits(images) -> (B, K, H/4, W/4)``, images float RGB in [0, 255] (B, 3, H, W). The PyTorch
variants run ``export.wrapper.ExportWrapper`` (the very graph that is exported) and differ only in precision
(autocast, or the whole model in bf16), attention implementation and compilation; the exported ones are built
by ``export`` from the same model in ``bench.exported`` (imported only when one of them runs, with ONNX / TensorRT
imported inside).

The reference is ``torch-fp32`` with the plain PyTorch attention (``QD_ATTENTION=torch``): on CUDA the model
would otherwise pick the Triton kernels by itself, and the reference must not depend on the code under test.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import Tensor, nn

from bench.evalset import EvalSet, load_eval_set
from bench.metrics import gpu_spec_for
from bench.native import native_sources
from bench.settings import BenchSettings
from export.runtime import Segmenter
from export.wrapper import ExportWrapper
from qd_core import Config, build_student, load_config

if TYPE_CHECKING:
    from bench.roofline import Roofline


@dataclass(frozen=True)
class BackendSpec:
    """name: id in test names and reports; precision: fp32 | bf16 | fp16 (sets the parity tolerance)."""

    name: str
    precision: str
    description: str
    cuda_only: bool = False


BACKENDS = (
    BackendSpec("torch-fp32", "fp32", "PyTorch eager, fp32, PyTorch attention (the reference)"),
    BackendSpec("torch-bf16", "bf16", "PyTorch eager, bf16 autocast"),
    BackendSpec("torch-fp16", "fp16", "PyTorch eager, fp16 autocast", cuda_only=True),
    BackendSpec("torch-bf16-pure", "bf16", "PyTorch eager, the whole model in bf16 (weights and activations, no "
                "autocast)"),
    BackendSpec("torch-triton-fp32", "fp32", "PyTorch eager + Triton attention kernels, fp32", cuda_only=True),
    BackendSpec("torch-triton-bf16", "bf16", "PyTorch eager + Triton attention kernels, bf16 autocast",
                cuda_only=True),
    BackendSpec("torch-triton-bf16-graphs", "bf16", "PyTorch + Triton attention kernels, the whole model in bf16, "
                "replayed as one CUDA graph per batch size", cuda_only=True),
    BackendSpec("torch-compile", "fp32", "torch.compile (Inductor), fp32"),
    BackendSpec("torch-compile-bf16", "bf16", "torch.compile (Inductor) + CUDA graphs, the whole model in bf16",
                cuda_only=True),
    BackendSpec("torch-compile-triton-bf16", "bf16", "torch.compile (Inductor) + CUDA graphs with the Triton kernels "
                "as custom operators, the whole model in bf16", cuda_only=True),
    BackendSpec("ort-fp32", "fp32", "ONNX Runtime, fp32 graph"),
    BackendSpec("ort-fp16", "fp16", "ONNX Runtime, strongly typed fp16 graph"),
    BackendSpec("aoti", "fp32", "torch.export + AOTInductor .pt2, fp32"),
    BackendSpec("qd-infer", "fp32", "C++ qd_infer (libtorch) running the AOTInductor .pt2, fp32"),
    BackendSpec("trt-fp16", "fp16", "TensorRT FP16 engine", cuda_only=True),
)
REFERENCE = BACKENDS[0]
# Backends whose device memory is allocated outside torch's allocator: their GPU peak is not measurable here.
FOREIGN_ALLOCATOR = ("ort-fp32", "ort-fp16", "trt-fp16", "qd-infer")
# Backends replayed from CUDA graphs: the graph's private memory pool is filled at capture, not by a replay.
# GraphedForward's capture happens in the first call of a batch size (so its peak is that call's); Inductor's
# happens during compilation, whose own autotuning buffers would swamp the figure.
CAPTURED_IN_FIRST_CALL = ("torch-triton-bf16-graphs",)
CAPTURED_IN_COMPILE = ("torch-compile-bf16", "torch-compile-triton-bf16")
# Backends that run in another process and time themselves (``timed_passes``): see bench.native.
EXTERNALLY_TIMED = ("qd-infer",)
# Backends whose timed call takes host images and returns host outputs (ONNX Runtime's run() on numpy arrays;
# qd_infer, whose batches are built on the host): on a GPU their latency includes the copies, which the report
# marks.
HOST_IO = ("ort-fp32", "ort-fp16", "qd-infer")
# Compiled ahead of the run (minutes of C++ compilation on a CPU): see selected_here.
CPU_COMPILED = ("torch-compile", "aoti", "qd-infer")


def select_backends(names: tuple[str, ...] | None, source: str = "QD_BENCH_BACKENDS") -> list[BackendSpec]:
    """The specs named in ``names`` (all when None), in the canonical order; unknown names are an error that
    names ``source``, where the names came from."""
    if names is None:
        return list(BACKENDS)
    known = {b.name for b in BACKENDS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{source}: unknown backend(s) {', '.join(unknown)}; expected names from "
                         f"{', '.join(b.name for b in BACKENDS)}")
    return [b for b in BACKENDS if b.name in names]


# ------------------------------------------------------------------------------------------------ PyTorch


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Set ``QD_ATTENTION`` (read by ``qd_core.attention`` at every call) for the duration of the block."""
    old = os.environ.get("QD_ATTENTION")
    os.environ["QD_ATTENTION"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QD_ATTENTION", None)
        else:
            os.environ["QD_ATTENTION"] = old


def in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with every floating parameter and buffer in ``dtype``: the whole forward then runs in it.

    Against autocast this drops a cast kernel in front of every matrix product whose input is fp32 (autocast keeps
    LayerNorm outputs and the residual stream in fp32; it caches the casts of weights that require gradients only,
    so the frozen ones (the student's backbone; every weight here, load_model freezes them) are re-cast on every
    call, and inside a CUDA graph it runs without that cache at all) and halves the bytes of the memory-bound
    operations. What precision needs stays fp32 inside the kernels: PyTorch's norm and softmax kernels accumulate
    low-precision inputs in fp32, and the deformable attention computes its sampling locations in fp32 whatever
    its dtype.
    """
    return copy.deepcopy(model).to(dtype)


def torch_recipe(spec: BackendSpec) -> dict[str, Any] | None:
    """``TorchBackend``'s keyword arguments for a PyTorch backend; None for an exported one."""
    lowp = torch.float16 if spec.precision == "fp16" else torch.bfloat16
    recipes: dict[str, dict[str, Any]] = {
        "torch-fp32": {"attention": "torch"},
        "torch-bf16": {"autocast": lowp, "attention": "torch"},
        "torch-fp16": {"autocast": lowp, "attention": "torch"},
        "torch-bf16-pure": {"dtype": lowp, "attention": "torch"},
        "torch-triton-fp32": {"attention": "triton"},
        "torch-triton-bf16": {"autocast": lowp, "attention": "triton"},
        "torch-triton-bf16-graphs": {"dtype": lowp, "attention": "triton", "cuda_graphs": True},
        "torch-compile": {"attention": "torch", "compile": True},
        "torch-compile-bf16": {"dtype": lowp, "attention": "torch", "compile": True, "cuda_graphs": True},
        "torch-compile-triton-bf16": {"dtype": lowp, "attention": "triton", "compile": True, "cuda_graphs": True},
    }
    return recipes.get(spec.name)


def compile_options(cuda_graphs: bool) -> dict[str, Any]:
    """torch.compile options of the compiled backends.

    - ``triton.cudagraphs``: Inductor's CUDA graphs (what ``mode="reduce-overhead"`` sets; a mode and options
      cannot be given together) replay the whole forward as one launch: at batch 1 the student's few hundred small
      kernels are otherwise bound by launch latency, not by the GPU.
    - ``guard_filter_fn``: no guards on nn.Module attributes. Dynamo checks its guards on every call before
      running the graph, and the ViT-L student's module guards are most of them: a median 535 µs per call against
      87 µs without them (``pytest bench/test_compile_overhead.py``: Dynamo alone, its graph not run; the 2-core
      development CPU), time the GPU waits at batch 1. Sound here: a benchmarked model is built once and never
      changed (tensor, grad-mode and autocast guards stay). Left out by a torch without the filter.
    """
    options: dict[str, Any] = {}
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    if skip_module_guards is not None:  # it came with the guard_filter_fn option
        options["guard_filter_fn"] = skip_module_guards
    if cuda_graphs:
        options["triton.cudagraphs"] = True
    return options


class GraphedForward:
    """``fn`` captured in one CUDA graph per input shape and replayed: the host launches one graph instead of the
    student's few hundred kernels, which at batch 1 bound eager latency (launch cost, not GPU work).

    ``fn(x)`` must be capturable (no host reads of device values) and is warmed up on a side stream before capture,
    so Triton's autotuning and cuDNN's algorithm search happen outside the graph. Returns the graph's own output
    buffers, overwritten by the next replay.
    """

    def __init__(self, fn: Callable[[Tensor], tuple[Tensor, ...]], warmup: int = 3) -> None:
        self.fn = fn
        self.warmup = warmup
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, tuple[Tensor, ...]]] = {}

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out


class TorchBackend:
    """``export.wrapper.ExportWrapper`` (the deployed graph: normalisation, student, logits and full-size labels)
    run in PyTorch, with an optional autocast dtype or an optional dtype for the whole model (``in_dtype``), an
    attention implementation, optional torch.compile and optional CUDA graphs (Inductor's with compile, else
    ``GraphedForward``)."""

    def __init__(self, model: nn.Module, *, name: str, autocast: torch.dtype | None = None,
                 dtype: torch.dtype | None = None, attention: str = "torch", compile: bool = False,
                 cuda_graphs: bool = False) -> None:
        if autocast is not None and dtype is not None:
            raise ValueError(f"{name}: autocast={autocast} and dtype={dtype}: pick one (dtype converts the model)")
        self.name = name
        self.input_size: tuple[int, int] | None = None
        if dtype is not None:
            model = in_dtype(model, dtype)
        self.wrapper = ExportWrapper(model.eval()).eval()
        self.autocast = autocast
        self.attention = attention
        self.device_type = next(model.parameters()).device.type
        self.cuda_graphs = cuda_graphs and self.device_type == "cuda"
        # One graph per batch size (dynamic=False): the timed batches are fixed, and static shapes let Inductor
        # specialise every kernel as an exported engine would.
        self._forward: Callable[[Tensor], tuple[Tensor, Tensor]] = (
            torch.compile(self.wrapper, dynamic=False, options=compile_options(self.cuda_graphs)) if compile else
            GraphedForward(self.wrapper) if self.cuda_graphs else self.wrapper)

    def run(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images: (B, 3, H, W) RGB in [0, 255] → (logits (B, K, H/4, W/4) float32, labels (B, H, W) int32)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            stack.enter_context(attention_backend(self.attention))
            if self.autocast is not None:
                # No cast cache under CUDA graphs: a cached cast made outside capture would be baked in as a stale
                # buffer (PyTorch's CUDA-graph notes ask for cache_enabled=False).
                stack.enter_context(torch.autocast(self.device_type, dtype=self.autocast,
                                                   cache_enabled=not self.cuda_graphs))
            out = self._forward(images.float())
            if self.cuda_graphs:
                # A replayed graph writes its next outputs into the same buffers: hand out copies.
                out = tuple(t.clone() for t in out)
            return out

    def logits(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) RGB in [0, 255] → semantic logits (B, K, H/4, W/4) float32."""
        return self.run(images)[0]

    def predict(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) RGB in [0, 255] → labels (B, H, W) int32."""
        return self.run(images)[1]


# ------------------------------------------------------------------------------------------------ session


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3'-style GPU name, or the CPU model and thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def load_model(settings: BenchSettings) -> tuple[nn.Module, Config]:
    """The student of ``settings``: from its checkpoint, or randomly initialised (seed 0) from its config."""
    if settings.checkpoint is not None:
        from qd_core.checkpoint import load_student

        model, cfg = load_student(settings.checkpoint)
        if Path(settings.config).stem != cfg.name:
            # Named for both ways in: python -m bench / op_profile's --config, plain pytest's variable.
            raise ValueError(f"config {settings.config!r} (--config, QD_BENCH_CONFIG): the checkpoint "
                             f"{settings.checkpoint} was trained with config {cfg.name!r}; expected that config")
    else:
        cfg = load_config(settings.config)
        # Random weights: a DINOv2 file named by the config is neither needed nor loaded.
        cfg = copy.deepcopy(cfg)
        cfg.model.backbone.checkpoint = ""
        torch.manual_seed(0)
        # Initialised where it runs: a ViT-L's random init takes tens of seconds on the host, a moment on a GPU.
        with torch.device(settings.device):
            model = build_student(cfg)
    return model.to(settings.device).eval().requires_grad_(False), cfg


def selected_here(spec: BackendSpec, settings: BenchSettings) -> bool:
    """Whether ``spec`` is part of this run at all.

    torch.compile, AOTInductor and qd_infer (which runs the AOTInductor package) spend minutes in C++ compilation on
    a CPU, so a plain CPU pytest run (the CI correctness pass) leaves them out; ``python -m bench`` includes them
    (QD_BENCH_CPU_COMPILE=1), CUDA always does, and tests/test_aoti.py and tests/test_native.py check the package
    and the C++ runner on every run.
    """
    return not (spec.name in CPU_COMPILED and settings.device == "cpu" and not settings.cpu_compile)


def unavailable_reason(spec: BackendSpec, settings: BenchSettings) -> str | None:
    """Why ``spec`` cannot run in this session (a skip reason), or None."""
    if spec.cuda_only and settings.device != "cuda":
        if spec.name.startswith("torch-triton"):
            return "Triton kernels need CUDA"
        if spec.name == "torch-compile-bf16":
            return "CUDA graphs need CUDA (torch.compile on CPU is timed in fp32)"
        if spec.name == "torch-compile-triton-bf16":
            return "CUDA graphs and the Triton kernels need CUDA (torch.compile on CPU is timed in fp32)"
        if spec.name == "trt-fp16":
            return "TensorRT needs CUDA"
        return f"{spec.name} needs CUDA (autocast on CPU is timed in bf16)"
    if spec.name == "qd-infer" and not native_sources():
        return "qd-infer is built from the source checkout (CMakeLists.txt, native/); this is an installed copy"
    if spec.name == "trt-fp16" and importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (the tensorrt package)"
    if spec.name.startswith("ort-") and importlib.util.find_spec("onnxruntime") is None:
        return "ONNX Runtime is not installed (the onnxruntime package)"
    if spec.name.startswith("ort-") and settings.device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)"
    return None


class BenchSession:
    """Model, evaluation images, FLOP count and built backends, shared by every test of one pytest session."""

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        if settings.device == "cuda":
            # fp32 means fp32: cuDNN would otherwise run convolutions in TF32 (10-bit mantissa) by default, which
            # would blur the fp32 reference and the fp32 MFU peak alike.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            # Every timed shape is fixed, so cuDNN may time its algorithms once per convolution shape (in the
            # warm-up calls) instead of taking its heuristic's pick, as a deployment at a fixed size would: its
            # heuristics are least sure of themselves for the dilated, grouped and channels-last bf16
            # convolutions this head has.
            torch.backends.cudnn.benchmark = True
        self.model, self.cfg = load_model(settings)
        self.size = (int(self.cfg.inference.window[0]), int(self.cfg.inference.window[1]))
        self.eval_set: EvalSet = load_eval_set(settings.data, settings.images, self.size)
        self.device_name = device_name(settings.device)
        self._segmenters: dict[str, Segmenter] = {}
        self._reference: Tensor | None = None
        self._reference_logits: Tensor | None = None
        self._flops: float | None = None
        self._rooflines: dict[tuple[int, str], Roofline] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def work(self) -> Path:
        """Folder for exported models: QD_BENCH_WORK, else a temporary folder removed with the session."""
        if self.settings.work is not None:
            self.settings.work.mkdir(parents=True, exist_ok=True)
            return self.settings.work
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="qd-bench-")
        return Path(self._tmp.name)

    @property
    def flops_per_image(self) -> float:
        """FLOPs of one image at the crop size (``qd_core.summary``: matmuls, convs, attention; 2 per MAC)."""
        if self._flops is None:
            from qd_core.summary import summarize

            self._flops = float(summarize(self.cfg, *self.size)["gflops"]) * 1e9
        return self._flops

    def roofline(self, batch: int, precision: str) -> Roofline | None:
        """``bench.roofline`` of one predict at ``batch`` and ``precision`` on this GPU's datasheet peaks (made once
        per pair); None on a CPU or a GPU not in ``bench.metrics.GPUS``."""
        spec = gpu_spec_for(self.device_name) if self.settings.device == "cuda" else None
        if spec is None:
            return None
        if (batch, precision) not in self._rooflines:
            from bench.roofline import DTYPES, roofline
            from qd_core.summary import build_meta_student

            self._rooflines[(batch, precision)] = roofline(build_meta_student(self.cfg), spec, batch=batch,
                                                           size=self.size, dtype=DTYPES[precision],
                                                           config=self.cfg.name)
        return self._rooflines[(batch, precision)]

    def ideal_ms(self, batch: int, precision: str) -> float | None:
        """The ideal time of ``roofline(batch, precision)`` in ms, or None."""
        r = self.roofline(batch, precision)
        return None if r is None else r.total["seconds"] * 1e3

    def info(self) -> dict[str, Any]:
        """What every benchmark entry records about the session."""
        return {"device": self.settings.device, "device_name": self.device_name, "config": self.cfg.name,
                "model": self.settings.model_label, "eval_set": self.eval_set.description,
                "height": self.size[0], "width": self.size[1], "flops_per_image": self.flops_per_image,
                "torch": torch.__version__, "backend_settings": self.backend_settings}

    @property
    def backend_settings(self) -> str | None:
        """The library settings every PyTorch backend of this session runs under (set in ``__init__``)."""
        if self.settings.device != "cuda":
            return None
        return "TF32 off (matmuls and cuDNN), cuDNN autotuning on (torch.backends.cudnn.benchmark)"

    def inputs(self, batch: int) -> Tensor:
        """The first ``batch`` evaluation images (B, 3, H, W) on the session's device."""
        return self.eval_set.images[:batch].to(self.settings.device)

    def segmenter(self, spec: BackendSpec) -> Segmenter:
        """The backend of ``spec``, built on first use."""
        if spec.name not in self._segmenters:
            self._segmenters[spec.name] = self._build(spec)
        return self._segmenters[spec.name]

    def _build(self, spec: BackendSpec) -> Segmenter:
        recipe = torch_recipe(spec)
        if recipe is not None:
            return TorchBackend(self.model, name=spec.name, **recipe)
        from bench import exported

        return exported.build(spec.name, self.model, self.size, self.settings.batch, self.settings.device, self.work)

    def _over_eval_set(self, run: Callable[[Tensor], Any], dtype: torch.dtype) -> Tensor:
        """``run`` over every evaluation image in batches of the larger timed batch, outputs concatenated on the
        CPU in ``dtype``.

        The last batch is filled up with repeated images (their outputs dropped) so every call has a timed shape:
        compiled graphs and engine profiles are built for exactly those.
        """
        images, batch = self.eval_set.images, self.settings.batch
        out = []
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            n = chunk.shape[0]
            if n < batch:
                chunk = torch.cat([chunk, chunk[:1].expand(batch - n, -1, -1, -1)])
            out.append(as_tensor(run(chunk.to(self.settings.device)))[:n].to("cpu", dtype))
        return torch.cat(out)

    def predict_all(self, spec: BackendSpec) -> Tensor:
        """Labels (N, H, W) int64 on the CPU for every evaluation image (see ``_over_eval_set``)."""
        return self._over_eval_set(self.segmenter(spec).predict, torch.int64)

    def reference_predictions(self) -> Tensor:
        """``predict_all`` of the reference backend, computed once."""
        if self._reference is None:
            self._reference = self.predict_all(REFERENCE)
        return self._reference

    def logits_all(self, spec: BackendSpec) -> Tensor | None:
        """Semantic logits (N, K, H/4, W/4) float32 on the CPU for every evaluation image, batched as
        ``predict_all``; None for a backend that returns labels only (qd-infer writes label PNGs)."""
        seg = self.segmenter(spec)
        if not hasattr(seg, "logits"):
            return None
        return self._over_eval_set(seg.logits, torch.float32)

    def reference_logits(self) -> Tensor:
        """``logits_all`` of the reference backend, computed once."""
        if self._reference_logits is None:
            self._reference_logits = self.logits_all(REFERENCE)
        return self._reference_logits


def as_tensor(x: Any) -> Tensor:
    """A torch tensor view of a backend's output (ONNX Runtime returns numpy arrays)."""
    return x if isinstance(x, Tensor) else torch.from_numpy(x)


_SESSIONS: dict[BenchSettings, BenchSession] = {}


def get_session(settings: BenchSettings) -> BenchSession:
    """One ``BenchSession`` per settings per process (the suites share it across test files)."""
    if settings not in _SESSIONS:
        _SESSIONS[settings] = BenchSession(settings)
    return _SESSIONS[settings]

"""Export the wrapped student to one fp32 ONNX file with a dynamic batch axis.

Exporter choice: the TorchScript exporter (``torch.onnx.export(dynamo=False)``). Both exporters were tried on
the tiny config at 128×128: the torch.export-based one (``dynamo=True``) gives a smaller graph (~1.2 k nodes
against ~4.7 k, most of the difference being Shape/Gather/Concat chains for the symbolic batch and position
encodings it folds away) but takes ~6× longer (30 s against 5 s) and cannot emit opset 17 (its version converter
fails on the Reduce ops). The TorchScript exporter emits opset 17 and 18 natively, runs the custom plugin node
through ``torch.autograd.Function.symbolic``, and its shape chains cost nothing once ONNX Runtime or TensorRT
fold them. It is deprecated upstream, which is the price of that choice.

The file is self-contained below 2 GB (protobuf's limit); above, weights go to one ``<name>.data`` file beside
it. Node names keep the module scopes (``/model/pixel_decoder/encoder/layers.0/attn/...``); the FP16 pass uses
them to find the deformable-attention sampling it keeps in fp32. Those scopes, the input size and the MSDA mode
are written into the model's ``metadata_props`` so every later step can work from the file alone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
import torch
from torch import nn

from export.msda_plugin import PLUGIN_DOMAIN, PLUGIN_OP, plugin_msda
from export.wrapper import INPUT_NAME, LABEL_DTYPE, OUTPUT_NAMES, ExportWrapper

MSDA_MODES = ("gather", "plugin")
OPSETS = (17, 18)
# protobuf refuses to serialise a message of 2 GiB or more; leave room for the graph itself.
SINGLE_FILE_LIMIT = 2**31 - 64 * 2**20
META_PREFIX = "querydiff."
# The batch used while tracing. Not 1: a size-1 axis can be traced as a broadcast and baked into the graph.
TRACE_BATCH = 2


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote."""

    path: Path
    seconds: float
    bytes: int  # the .onnx plus its external data file, if any
    external_data: bool
    opset: int
    msda: str
    height: int
    width: int


def module_scope_pattern(module_path: str) -> str:
    """Regex matching ONNX node names inside the module at dotted ``module_path`` of the exported wrapper.

    The TorchScript exporter joins scope names with '/', but keeps the '.' of container children
    ("layers.0"), so each separator may be either; a module called more than once gets "_1", "_2" … on its
    later calls.
    """
    parts = [re.escape(p) for p in module_path.split(".") if p]
    return "^/" + "[./]".join(parts) + r"(?:_\d+)?/"


def fp32_scopes(wrapper: ExportWrapper) -> list[str]:
    """Node-name regexes of the computations the FP16 graph keeps in float32.

    * Deformable-attention sampling: the location and weight math and the bilinear gather of every
      ``MSDeformAttn``, but not its ``value_proj`` / ``output_proj`` matrices. A normalised location in fp16 is
      off by up to 1/2048 of the map, a visible fraction of a pixel at stride 8.
    * The wrapper's own nodes: normalisation, the class × mask combination, the full-size upsampling and the
      argmax. They are cheap, and fp16 rounding of the per-class sums would turn near-ties into label flips.
    """
    from qd_core.head.msda import MSDeformAttn

    patterns = [r"^/[^/]+$"]  # nodes directly in the wrapper's scope
    for name, module in wrapper.named_modules():
        if isinstance(module, MSDeformAttn):
            scope = module_scope_pattern(name)
            patterns.append(scope + "(?!value_proj/|output_proj/)")
    return patterns


@contextlib.contextmanager
def _gather_sampling(model: nn.Module) -> Iterator[None]:
    """Switch every MSDeformAttn to the gather core for the block, then restore the previous modes."""
    from qd_core.head.msda import MSDeformAttn

    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    previous = [m.sampling for m in modules]
    for m in modules:
        m.sampling = "gather"
    try:
        yield
    finally:
        for m, mode in zip(modules, previous):
            m.sampling = mode


def _check_args(height: int, width: int, opset: int, msda: str, multiple: int) -> None:
    if msda not in MSDA_MODES:
        raise ValueError(f"msda={msda!r}: expected one of {', '.join(MSDA_MODES)}")
    if opset not in OPSETS:
        raise ValueError(f"opset={opset}: expected one of {', '.join(map(str, OPSETS))}")
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % multiple:
            raise ValueError(f"{name}={v}: expected a positive multiple of {multiple}")


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by the graph's initializers (raw or typed fields), without serialising the whole model."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += next((int(e.value) for e in t.external_data if e.key == "length"), 0)
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= d
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write ``model`` to ``path`` (temp file + rename); external data in ``<name>.data`` when it would not fit
    one protobuf. Returns the bytes written."""
    path = Path(path)
    data_path = path.with_name(path.name + ".data")
    external = initializer_bytes(model) >= SINGLE_FILE_LIMIT
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_path.name, size_threshold=1024)
            os.replace(tmp_dir / data_path.name, data_path)
        else:
            onnx.save_model(model, tmp)
            data_path.unlink(missing_ok=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path.stat().st_size + (data_path.stat().st_size if external else 0)


def read_metadata(model: onnx.ModelProto) -> dict[str, object]:
    """The ``querydiff.*`` metadata written by ``export_onnx`` (JSON-decoded values), without the prefix."""
    out: dict[str, object] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            out[prop.key[len(META_PREFIX):]] = json.loads(prop.value)
    return out


def write_metadata(model: onnx.ModelProto, values: dict[str, object]) -> None:
    """Set ``querydiff.<key>`` metadata entries (JSON-encoded), replacing existing ones with the same key."""
    keep = [p for p in model.metadata_props if p.key[len(META_PREFIX):] not in values
            or not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in values.items():
        model.metadata_props.add(key=META_PREFIX + key, value=json.dumps(value))


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, height: int, width: int, opset: int = 18,
                msda: str = "gather", extra_metadata: dict[str, object] | None = None) -> OnnxExport:
    """Trace ``ExportWrapper(model)`` on the model's device at (``TRACE_BATCH``, 3, height, width) and write fp32
    ONNX.

    Args:
        model: the student (``qd_core.model.QueryDiffStudent``); put in eval mode, weights unchanged.
        path: the ``.onnx`` file to write (its folder must exist).
        height, width: the fixed input size, multiples of the model's size multiple (32).
        opset: 17 or 18 (LayerNormalization needs 17).
        msda: ``gather`` (plain ONNX ops) or ``plugin`` (one MultiscaleDeformableAttnPlugin_TRT node per layer;
            such a graph runs only in TensorRT).
        extra_metadata: more JSON-serialisable ``querydiff.*`` metadata entries.
    Returns:
        an ``OnnxExport`` record.
    """
    multiple = int(getattr(model, "size_multiple", 32))
    _check_args(height, width, opset, msda, multiple)
    path = Path(path)
    wrapper = ExportWrapper(model).eval()
    device = next(model.parameters()).device
    dummy = torch.rand(TRACE_BATCH, 3, height, width, device=device) * 255.0
    dynamic = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
    start = time.perf_counter()
    traced_shapes: dict[str, tuple[int, ...]] = {}

    def record_shapes(_module: nn.Module, _args: object, outputs: tuple[torch.Tensor, ...]) -> None:
        traced_shapes.update({name: tuple(int(n) for n in t.shape) for name, t in zip(OUTPUT_NAMES, outputs)})

    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / "model.onnx"
        with contextlib.ExitStack() as stack:
            stack.enter_context(_gather_sampling(model))
            if msda == "plugin":
                stack.enter_context(plugin_msda())
            stack.enter_context(torch.no_grad())
            hook = wrapper.register_forward_hook(record_shapes)
            stack.callback(hook.remove)
            stack.enter_context(warnings.catch_warnings())
            # Shape checks in the model read traced sizes as Python values (TracerWarning); they only ever
            # involve the static H, W and the batch compared with itself. The exporter's own deprecation
            # notice is the known cost of the TorchScript exporter (see the module docstring).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                wrapper, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False,
                custom_opsets={PLUGIN_DOMAIN: 1} if msda == "plugin" else None)
        proto = onnx.load(str(tmp))  # also pulls in any per-tensor external files of a > 2 GB export
    _declare_output_sizes(proto, traced_shapes)
    metadata: dict[str, object] = {
        "height": height, "width": width, "msda": msda, "opset": opset, "num_classes": wrapper.num_classes,
        "labels_dtype": str(LABEL_DTYPE).replace("torch.", ""), "fp32_scopes": fp32_scopes(wrapper),
        "precision": "fp32",
    }
    metadata.update(extra_metadata or {})
    write_metadata(proto, metadata)
    proto.producer_name = "querydiff.export"
    size = save_model(proto, path)
    seconds = time.perf_counter() - start
    external = path.with_name(path.name + ".data").exists()
    return OnnxExport(path=path, seconds=seconds, bytes=size, external_data=external, opset=opset, msda=msda,
                      height=height, width=width)


def _declare_output_sizes(model: onnx.ModelProto, traced: dict[str, tuple[int, ...]]) -> None:
    """Write the traced non-batch sizes into the graph outputs' declared shapes.

    The exporter leaves the outputs' H and W symbolic (it cannot follow them through the upsampling), although
    they are fixed by the input size like every other non-batch axis; declaring them lets a runtime allocate
    outputs from the file alone and makes the graph say what ``export.wrapper`` documents.
    """
    for output in model.graph.output:
        shape = traced.get(output.name)
        dims = output.type.tensor_type.shape.dim
        if shape is None or len(shape) != len(dims):
            raise RuntimeError(f"export: output '{output.name}' was traced with shape {shape}, but the graph "
                               f"declares {len(dims)} axes")
        for dim, size in list(zip(dims, shape))[1:]:  # axis 0 is the dynamic batch
            dim.Clear()
            dim.dim_value = size


def op_counts(model: onnx.ModelProto) -> Counter[str]:
    """How many nodes of each op type the main graph has (custom ops as ``domain::op``)."""
    return Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                   for n in model.graph.node)


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MultiscaleDeformableAttnPlugin_TRT nodes of the main graph."""
    return [n for n in model.graph.node if n.op_type == PLUGIN_OP]


def plugin_signatures(model: onnx.ModelProto) -> list[list[tuple[int, list[int | None]]]]:
    """For each plugin node: (element type, dims) of its five inputs and its output after ONNX shape inference
    (None for a symbolic dimension). Weights are left out of the inference, so any model size works."""
    from export.fp16 import without_weights

    inferred = onnx.shape_inference.infer_shapes(without_weights(model), data_prop=True)
    known: dict[str, tuple[int, list[int | None]]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        known[vi.name] = (t.elem_type, [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim])
    for init in model.graph.initializer:
        known[init.name] = (init.data_type, list(init.dims))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            known[node.output[0]] = (node.attribute[0].t.data_type, list(node.attribute[0].t.dims))
    return [[known.get(name, (0, [])) for name in list(node.input) + list(node.output)]
            for node in plugin_nodes(model)]


def check_plugin_graph(model: onnx.ModelProto, student: nn.Module) -> list[dict[str, object]]:
    """Verify a ``--msda plugin`` graph against the student: one plugin node per MSDeformAttn layer, each with the
    five documented inputs (value (B, S, H, dh), spatial_shapes (L, 2) int32, level_start_index (L,) int32,
    sampling_locations (B, Nq, H, L, P, 2), attention_weights (B, Nq, H, L, P)) and output (B, Nq, H, dh) as ONNX
    shape inference sees them. Returns the signatures (JSON-ready); raises ValueError naming the first mismatch.
    """
    from qd_core.head.msda import MSDeformAttn

    layers = [m for m in student.modules() if isinstance(m, MSDeformAttn)]
    signatures = plugin_signatures(model)
    if len(signatures) != len(layers):
        raise ValueError(f"plugin graph has {len(signatures)} {PLUGIN_OP} nodes, expected one per deformable-"
                         f"attention layer ({len(layers)})")
    f32, i32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    out: list[dict[str, object]] = []
    for i, (sig, layer) in enumerate(zip(signatures, layers)):
        (tv, value), (ts, shapes), (tl, starts), (tp, points), (tw, weights), (to, output) = sig
        h, dh, lv, p = layer.num_heads, layer.dim // layer.num_heads, layer.num_levels, layer.num_points
        nq = points[1] if len(points) == 6 else None
        expected = {
            "value": (f32, [None, value[1] if len(value) == 4 else None, h, dh]),
            "spatial_shapes": (i32, [lv, 2]), "level_start_index": (i32, [lv]),
            "sampling_locations": (f32, [None, nq, h, lv, p, 2]), "attention_weights": (f32, [None, nq, h, lv, p]),
            "output": (f32, [None, nq, h, dh]),
        }
        found = dict(zip(expected, [(tv, value), (ts, shapes), (tl, starts), (tp, points), (tw, weights),
                                    (to, output)]))
        for name, (etype, dims) in expected.items():
            got_type, got_dims = found[name]
            if got_type != etype or len(got_dims) != len(dims) or any(
                    e is not None and g != e for g, e in zip(got_dims, dims)):
                raise ValueError(f"plugin node {i}: {name} is {onnx.TensorProto.DataType.Name(got_type)} "
                                 f"{got_dims}, expected {onnx.TensorProto.DataType.Name(etype)} {dims}")
        out.append({name: [onnx.TensorProto.DataType.Name(t), d] for name, (t, d) in found.items()})
    return out

"""A strongly typed FP16 variant of an fp32 ONNX graph: fp16 weights and compute, explicit fp32 islands.

TensorRT 11 builds only strongly typed networks (the weak ``BuilderFlag.FP16`` is gone): every tensor's type is
the one the ONNX graph gives it, so the precision plan has to be written into the graph as Cast nodes. This pass
writes it:

* Each node is either **fp16** or **fp32**. A node stays fp32 when it
  - is a normalisation or softmax (``KEEP_FP32_OPS``): mean/variance and exp-sums of hundreds of terms lose
    too many bits in fp16, and LayerNorm over 1024 channels can overflow its sum of squares;
  - lies in one of ``keep_scopes`` (node-name regexes; ``export.onnx.fp32_scopes`` supplies the
    deformable-attention sampling and the wrapper's post-processing, stored in the model metadata);
  - is a custom-domain node (the MSDA plugin: all its float inputs must share one type, and the sampling
    locations are to stay fp32);
  - does not depend on the image (position encodings, reference points, level shapes): those are constants of
    the graph that TensorRT folds, and computing them in fp32 costs nothing at run time.
* Inputs are converted to the node's precision where the op's schema ties them to its output type (or to each
  other): weights and other constants get an fp16 copy (so the file holds fp16 weights), computed tensors get a
  Cast node (one per tensor and type, shared by all consumers). Inputs whose schema type is fixed (Resize's
  ``scales`` is always float32) and shape/index inputs are left alone.
* ``Cast(to=float)`` inside an fp16 region becomes ``Cast(to=float16)``; ``ConstantOfShape`` follows its node.
* Constants converted to fp16 saturate at ±65504 (finite stays finite); ±inf and NaN are kept.
* Graph inputs and outputs keep their types (images float32 in, logits float32 and labels int32 out).

The result type-checks under ONNX shape inference and runs in ONNX Runtime's CPU provider, which falls back to
float32 (inserting its own casts) for the few ops it has no fp16 CPU kernel for.
"""
from __future__ import annotations

import copy
import re
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx import read_metadata, write_metadata

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
KEEP_FP32_OPS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "InstanceNormalization", "GroupNormalization",
    "BatchNormalization", "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
})
# Ops whose outputs describe their input's shape, not its values: image dependence stops there.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
_DEFAULT_DOMAINS = ("", "ai.onnx")


FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def as_fp16(array: np.ndarray) -> np.ndarray:
    """``array`` in float16, finite values beyond ±65504 saturated to ±65504 instead of becoming ±inf.

    A large finite constant (a "minus a lot" fill, a big scale) must stay finite: as inf it turns ``inf · 0`` and
    ``inf - inf`` into NaN downstream. Infinities and NaN are kept as they are (the intended -inf masks).
    """
    array = np.asarray(array)
    finite = np.isfinite(array)
    return np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS)


def _check_no_subgraphs(graph: onnx.GraphProto) -> None:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise ValueError(f"model: node '{node.name}' ({node.op_type}) has a subgraph; the FP16 pass "
                                 f"handles flat graphs only")


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every weight of 64 KiB or more turned into a typed graph input.

    Element types never depend on weight values, and a model above 2 GiB cannot be serialised for ONNX's
    shape inference or checker; the skeleton is small whatever the weights weigh.
    """
    graph = model.graph
    big = [t for t in graph.initializer if len(t.raw_data) >= 2**16]
    big_names = {t.name for t in big}
    skeleton = onnx.ModelProto()
    if not big:
        skeleton.CopyFrom(model)
    else:
        skeleton.ir_version = model.ir_version
        skeleton.opset_import.extend(model.opset_import)
        skeleton.metadata_props.extend(model.metadata_props)
        g = skeleton.graph
        g.name = graph.name
        g.node.extend(graph.node)
        g.input.extend(graph.input)
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big)
        g.output.extend(graph.output)
        g.value_info.extend(graph.value_info)
        g.initializer.extend(t for t in graph.initializer if t.name not in big_names)
    return skeleton


def _known_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference (plus the graph's declarations) knows."""
    inferred = onnx.shape_inference.infer_shapes(without_weights(model))
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                types[node.output[0]] = attr.t.data_type
            elif attr.name in ("value_float", "value_floats"):
                types[node.output[0]] = FLOAT
            elif attr.name in ("value_int", "value_ints"):
                types[node.output[0]] = TensorProto.INT64
    return types


def _image_dependent(graph: onnx.GraphProto) -> set[str]:
    """Names of the tensors whose values depend on a graph input (not on weights and shapes alone)."""
    initializers = {i.name for i in graph.initializer}
    tainted = {i.name for i in graph.input if i.name not in initializers}
    for node in graph.node:
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if any(name in tainted for name in node.input):
            tainted.update(o for o in node.output if o)
    return tainted


class _TypeSlots:
    """Which actual inputs/outputs of a node share which schema type parameter."""

    def __init__(self, node: onnx.NodeProto, opset: int) -> None:
        self.schema = None
        if node.domain in _DEFAULT_DOMAINS:
            try:
                self.schema = onnx.defs.get_schema(node.op_type, opset, "")
            except onnx.defs.SchemaError:
                self.schema = None
        self.node = node

    def _formal(self, params: Sequence[object], index: int) -> str | None:
        if not params:
            return None
        if index < len(params):
            return params[index].type_str
        last = params[-1]
        return last.type_str if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic else None

    def input_param(self, index: int) -> str | None:
        return self._formal(self.schema.inputs, index) if self.schema else None

    def output_param(self, index: int) -> str | None:
        return self._formal(self.schema.outputs, index) if self.schema else None

    def allowed(self, param: str) -> set[str]:
        """The type strings a parameter may take; a concrete type string stands for itself."""
        for c in self.schema.type_constraints:
            if c.type_param_str == param:
                return set(c.allowed_type_strs)
        return {param}


def _cast_node(src: str, dst: str, to: int) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], to=to, name=f"{dst}/Cast")


def _scope_matcher(patterns: Iterable[str]):
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(p.search(name) for p in compiled)


def convert_to_fp16(model: onnx.ModelProto, keep_scopes: Sequence[str] | None = None) -> onnx.ModelProto:
    """Return the strongly typed FP16 variant of fp32 ``model`` (the input is not modified).

    Args:
        model: an fp32 ONNX model without subgraphs (what ``export.onnx.export_onnx`` writes).
        keep_scopes: node-name regexes of regions to keep in fp32; default: the ``querydiff.fp32_scopes``
            metadata written by ``export_onnx`` (none if absent).
    Returns:
        the converted model; its ``querydiff.precision`` metadata is ``"fp16"``.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ValueError(f"model: expected an onnx.ModelProto, got {type(model).__name__}")
    _check_no_subgraphs(model.graph)
    meta = read_metadata(model)
    if meta.get("precision") == "fp16":
        raise ValueError("model: already converted to fp16 (metadata querydiff.precision = 'fp16')")
    if keep_scopes is None:
        keep_scopes = list(meta.get("fp32_scopes", []))  # type: ignore[arg-type]
    in_keep_scope = _scope_matcher(keep_scopes)
    opset = _opset(model)
    types = _known_types(model)
    out = copy.deepcopy(model)
    graph = out.graph
    tainted = _image_dependent(graph)

    initializers = {i.name: i for i in graph.initializer}
    constant_values: dict[str, TensorProto] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constant_values[node.output[0]] = node.attribute[0].t
    for name, init in initializers.items():
        constant_values[name] = init
    # Identity of a constant is the exporter's way of sharing one weight under several names (a module called
    # once per layer): all the names share one converted copy.
    alias_of: dict[str, str] = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in constant_values:
            constant_values[node.output[0]] = constant_values[node.input[0]]
            alias_of[node.output[0]] = alias_of.get(node.input[0], node.input[0])

    current = dict(types)  # tensor name -> element type in the converted graph
    new_initializers: list[TensorProto] = []
    converted_constants: dict[tuple[str, int], str] = {}
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def as_type(name: str, to: int) -> str:
        """``name`` in element type ``to``: itself, a converted constant, or the output of a (shared) Cast."""
        if current.get(name) == to:
            return name
        key = (alias_of.get(name, name), to)
        if name in constant_values:
            if key not in converted_constants:
                array = numpy_helper.to_array(constant_values[name])
                new_name = f"{key[0]}__{'fp16' if to == FLOAT16 else 'fp32'}"
                value = as_fp16(array) if to == FLOAT16 else array.astype(np.float32)
                new_initializers.append(numpy_helper.from_array(value, new_name))
                converted_constants[key] = new_name
                current[new_name] = to
            return converted_constants[key]
        if key not in casts:
            new_name = f"{name}__{'fp16' if to == FLOAT16 else 'fp32'}"
            new_nodes.append(_cast_node(name, new_name, to))
            casts[key] = new_name
            current[new_name] = to
        return casts[key]

    for node in graph.node:
        keep = (node.domain not in _DEFAULT_DOMAINS or node.op_type in KEEP_FP32_OPS
                or in_keep_scope(node.name) or not any(o in tainted for o in node.output))
        target = FLOAT if keep else FLOAT16
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in constant_values):
            # Weights stay as they are; consumers that want fp16 get a converted copy from as_type.
            new_nodes.append(node)
            continue
        if node.op_type == "Cast":
            to_attr = next(a for a in node.attribute if a.name == "to")
            if to_attr.i == FLOAT and not keep:
                to_attr.i = FLOAT16
            current[node.output[0]] = to_attr.i
            new_nodes.append(node)
            continue
        slots = _TypeSlots(node, opset)
        if slots.schema is None:
            # Custom op (the MSDA plugin): float inputs in fp32, outputs as declared.
            for i, name in enumerate(node.input):
                if name and current.get(name) == FLOAT16:
                    node.input[i] = as_type(name, FLOAT)
            new_nodes.append(node)
            continue

        has_float_output = any(types.get(o) == FLOAT for o in node.output if o)
        param_uses: dict[str, int] = {}
        for i, name in enumerate(node.input):
            p = slots.input_param(i)
            if name and p is not None and types.get(name) == FLOAT:
                param_uses[p] = param_uses.get(p, 0) + 1
        converted_params: set[str] = set()
        for i, name in enumerate(node.input):
            p = slots.input_param(i)
            if not name or p is None or types.get(name) not in (FLOAT, FLOAT16):
                continue
            allowed = slots.allowed(p)
            if allowed == {"tensor(float)"}:  # a fixed float32 input such as Resize's scales
                node.input[i] = as_type(name, FLOAT)
                continue
            if "tensor(float16)" not in allowed or not (has_float_output or param_uses.get(p, 0) > 1):
                continue
            node.input[i] = as_type(name, target)
            converted_params.add(p)
        for j, name in enumerate(node.output):
            if not name:
                continue
            p = slots.output_param(j)
            if p in converted_params and types.get(name) in (FLOAT, FLOAT16):
                current[name] = target
            elif node.op_type == "ConstantOfShape" and types.get(name) == FLOAT and target == FLOAT16:
                attr = next((a for a in node.attribute if a.name == "value"), None)
                value = numpy_helper.to_array(attr.t) if attr is not None else np.zeros(1, np.float32)
                if attr is None:  # the default fill is a float32 zero
                    attr = node.attribute.add(name="value", type=onnx.AttributeProto.TENSOR)
                attr.t.CopyFrom(numpy_helper.from_array(as_fp16(value)))
                current[name] = FLOAT16
            else:
                current[name] = types.get(name, 0)
        new_nodes.append(node)

    # Graph outputs keep their declared types.
    declared = {o.name: o.type.tensor_type.elem_type for o in graph.output}
    for name, elem in declared.items():
        if current.get(name) not in (None, elem) and elem in (FLOAT, FLOAT16):
            inner = f"{name}__{'fp16' if current[name] == FLOAT16 else 'fp32'}_out"
            for node in new_nodes:
                node.output[:] = [inner if o == name else o for o in node.output]
                node.input[:] = [inner if i == name else i for i in node.input]
            new_nodes.append(_cast_node(inner, name, elem))

    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_initializers)
    _prune(graph)
    # Intermediate types are re-derived below, except a custom op's declared output (no schema to derive it
    # from; the plugin stays fp32, so the declaration still holds).
    custom_outputs = {o for n in graph.node if n.domain not in _DEFAULT_DOMAINS for o in n.output}
    declared_custom = [vi for vi in graph.value_info if vi.name in custom_outputs]
    del graph.value_info[:]
    graph.value_info.extend(declared_custom)
    write_metadata(out, {"precision": "fp16"})
    # Re-derive every intermediate type from the rewritten graph: check_type fails on any mismatch.
    skeleton = onnx.shape_inference.infer_shapes(without_weights(out), check_type=True)
    onnx.checker.check_model(skeleton)
    return out


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody uses (unused Constants after conversion) and unused initializers."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor of ``model`` after shape inference (inputs, outputs, intermediates)."""
    return _known_types(model)

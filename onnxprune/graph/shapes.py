"""Static shapes for analysis: ONNX shape inference on a weight-free copy,
with the dynamic input dims pinned, shape arithmetic folded at those dims,
and (last resort) shapes measured in one onnxruntime run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import UnsupportedModel, first_line
from ..model.dynamic import DimChoice
from ..model.inputs import is_mask, name_negative_dims, resolve_with_choices
from ..model.proto import light_copy, needs_external_data
from . import fold


@dataclass
class Shapes:
    """Static shapes of every tensor, as inferred with the pinned input dims.

    ``static[name]`` is a tuple of ints (or None for dims inference could not
    resolve); ``dynamic[name]`` holds the axes that are symbolic in the model
    as given, before pinning (they must stay dynamic, and index mappings that
    depend on them are unsafe).
    """

    static: dict[str, tuple] = field(default_factory=dict)
    dynamic: dict[str, set[int]] = field(default_factory=dict)
    pinned_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    chosen: list[DimChoice] = field(default_factory=list)  # sizes picked for the dims left dynamic


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple]:
    """Shapes of all tensors; with ``input_shapes`` the graph inputs are pinned first.

    The model itself is left as it was.
    """
    light = light_copy(model)
    name_negative_dims(light)  # a model given in memory may still declare paddle2onnx's -1
    if input_shapes:
        for vi in light.graph.input:
            if vi.name in input_shapes:
                dims = vi.type.tensor_type.shape.dim
                for d, v in zip(dims, input_shapes[vi.name]):
                    d.Clear()
                    d.dim_value = v
    shapes = _run_inference(light)
    # Pinned: shape arithmetic has values now. Where inference left dims open,
    # fold it into constants and infer again, while that resolves more.
    for _ in range(3 if input_shapes else 0):
        if not _unresolved(light, shapes) or not _freeze(light, fold_shape_arithmetic(light, shapes)):
            break
        shapes = _run_inference(light)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _run_inference(light: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
        if _add_runtime_value_info(light, inferred):
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise UnsupportedModel(f"ONNX shape inference failed: {first_line(exc)}") from exc
    shapes: dict[str, tuple] = {}
    graph = inferred.graph
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for sub in list(graphs(graph))[1:]:  # subgraphs too: channels can flow into If/Loop/Scan bodies
        for vi in list(sub.value_info) + list(sub.input) + list(sub.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                shapes.setdefault(vi.name, tuple(d.dim_value if d.HasField("dim_value") else None
                                                 for d in t.shape.dim))
        for init in sub.initializer:
            shapes.setdefault(init.name, tuple(init.dims))
    return shapes


def graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph in it, outer first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                yield from graphs(sub)


def fold_shape_arithmetic(light: onnx.ModelProto, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Values of shape-computing tensors at the pinned input shapes.

    Starts from Shape of tensors with known static shapes and small constants,
    and evaluates the foldable ops that follow (onnx's reference evaluator).
    """
    from onnx import numpy_helper

    values: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in light.graph.initializer
        if t.HasField("raw_data") or t.int64_data or t.int32_data or t.float_data
    }
    folded: dict[str, np.ndarray] = {}
    for node in light.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
            continue
        if not fold.foldable(node.op_type, node.domain):
            continue
        if node.op_type == "Shape":
            dims = shapes.get(node.input[0])
            if dims is None or None in dims:
                continue
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            folded[node.output[0]] = values[node.output[0]] = np.array(dims[start:end], np.int64)
            continue
        inputs = {n: values.get(n) for n in node.input if n}
        if any(v is None or v.size > fold.LIMIT for v in inputs.values()):
            continue
        outs = fold.evaluate_node(node, inputs, light.opset_import)
        for name, value in zip(node.output, outs or ()):
            folded[name] = values[name] = value
    return folded


def _freeze(light: onnx.ModelProto, folded: dict[str, np.ndarray]) -> int:
    """Turn folded tensors into initializers and drop the nodes that computed them.

    Returns how many tensors became constants (0: folding found nothing new).
    """
    from onnx import numpy_helper

    present = {t.name for t in light.graph.initializer}
    outputs = {o.name for o in light.graph.output}
    new = {k: v for k, v in folded.items() if k not in present and k not in outputs}
    light.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in new.items())
    keep = [n for n in light.graph.node if not (n.output and all(o in new or not o for o in n.output))]
    del light.graph.node[:]
    light.graph.node.extend(keep)
    return len(new)


def _unresolved(model: onnx.ModelProto, shapes: dict[str, tuple]) -> list[str]:
    return [
        name for node in model.graph.node for name in node.output
        if name and (shapes.get(name) is None or None in shapes[name])
    ]


def measure_shapes(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, tuple]:
    """Shapes of ``names`` observed in one onnxruntime run at the pinned input shapes.

    ONNX shape inference gives up on shape arithmetic (Shape -> Div -> Slice,
    as torch exports ``chunk``); at fixed input shapes the run is exact.
    """
    from ..errors import MissingDependency
    from ..runtime.session import log_severity, require_onnxruntime

    try:
        ort = require_onnxruntime()
    except MissingDependency:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.log_severity_level = log_severity()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            shape = inputs.get(i.name, ())
            if "int" in i.type:  # a mask of ones: GroupQueryAttention refuses the lengths a zero mask gives
                fill = np.ones if is_mask(i.name) else np.zeros
                feeds[i.name] = fill(shape, dtype=np.int64 if "64" in i.type else np.int32)
            elif "bool" in i.type:
                feeds[i.name] = np.zeros(shape, dtype=bool)
            else:
                feeds[i.name] = np.zeros(shape, dtype=np.float16 if "16" in i.type else np.float32)
        wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]
        values = sess.run(wanted, feeds)
    except Exception:
        return {}
    return {n: tuple(np.shape(v)) for n, v in zip(wanted, values)}


def static_shapes(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Every tensor's shape at the given input shapes: inferred, else measured."""
    shapes = infer_shapes(model, inputs)
    unresolved = _unresolved(model, shapes)
    if unresolved and not needs_external_data(model):
        shapes.update(measure_shapes(model, inputs, unresolved))
    return shapes


def analyse_shapes(model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None) -> Shapes:
    """Pinned static shapes plus the axes that are dynamic in the model as given."""
    inputs, chosen = resolve_with_choices(model, pinned)
    static = static_shapes(model, inputs)
    free = infer_shapes(model, None)
    dynamic = {name: {a for a, d in enumerate(dims) if d is None} for name, dims in free.items()}
    for name, dims in static.items():
        if name not in free:
            dynamic[name] = set(range(len(dims)))  # unknown without pinning: treat as dynamic
    return Shapes(static=static, dynamic=dynamic, pinned_inputs=inputs, chosen=chosen)


def refresh_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop all intermediate value_info and infer it again (never leave stale shapes)."""
    del model.graph.value_info[:]
    light = light_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
        if _add_runtime_value_info(light, inferred):
            inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
    except Exception:
        return model  # the checker's full check reports the real problem
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in io)
    return model




def _add_runtime_value_info(light: onnx.ModelProto, inferred: onnx.ModelProto) -> int:
    """Add to ``light`` the shapes of the outputs of onnxruntime's own ops (its contrib ops, which
    ONNX inference has no schema for and leaves unshaped, and everything after them with them),
    as onnxruntime's symbolic shape inference gives them; how many it added (0 without such ops,
    or when that inference is not installed or fails). ONNX infers the rest again from them."""
    known = {vi.name for vi in (*inferred.graph.value_info, *inferred.graph.output)
             if vi.type.tensor_type.HasField("shape")}
    wanted = {o for n in _runtime_nodes(light) for o in n.output if o and o not in known}
    if not wanted:
        return 0
    try:
        symbolic = _symbolic_inference(light)
    except Exception:
        return 0
    found = [vi for vi in symbolic.graph.value_info if vi.name in wanted and vi.type.tensor_type.HasField("shape")]
    light.graph.value_info.extend(found)
    return len(found)


def _symbolic_inference(light: onnx.ModelProto) -> onnx.ModelProto:
    """``light`` with the shapes onnxruntime's symbolic shape inference finds. Its loop is run
    here rather than through ``SymbolicShapeInference.infer_shapes``, which writes the model to
    sym_shape_infer_temp.onnx in the current directory when some shape stays unknown (and then
    raises): onnxprune leaves no files behind, and the shapes it did find are still of use."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    named = onnx.ModelProto()
    named.CopyFrom(light)
    # It fails on an optional output left unnamed before one that is named (a Skip*Normalization's
    # outputs "", "", sum): such outputs get names of their own in this copy.
    for i, node in enumerate(named.graph.node):
        for j, out in enumerate(node.output):
            if not out:
                node.output[j] = f"onnxprune_unused_{i}_{j}"
    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess rank, verbose
    inference._preprocess(named)
    while inference.run_:
        inference._infer_impl()
    return inference.out_mp_


def _runtime_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of onnxruntime's contrib ops: in its domains, and the few in the default domain
    (a custom op of another runtime stays unshaped: no guess at what it outputs)."""
    from ..model.runtime_ops import DEFAULT_DOMAINS, runtime_only_nodes, runtime_schema

    versions = {o.domain: o.version for o in model.opset_import}
    return [n for n in model.graph.node if n.domain not in DEFAULT_DOMAINS
            and runtime_schema(n.domain, n.op_type, versions.get(n.domain, 1)) is not None] + runtime_only_nodes(model)

"""The cut graph as a model: the original's opset, metadata and graph IO, weights copied once.

Intermediate shapes are dropped and inferred again (never stale); graph
inputs and outputs keep their declared types, except for the dims a cut
reshaped under --allow-io-change; weights that were stored in float16 behind
a Cast are stored that way again; nodes keep their metadata_props."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from ..graph.shapes import refresh_value_info
from ..graph.view import GraphView
from .iochange import apply_to_type


def export(view: GraphView, original: onnx.ModelProto, io_changes=()) -> onnx.ModelProto:
    """The edited graph as a model with the original's opset, metadata and docs.

    Graph inputs and outputs keep their declared types, except for the dims in
    ``io_changes`` (iochange.IOChange: heads cut under --allow-io-change).
    """
    graph = view.graph
    io = {id(t) for t in (*graph.inputs, *graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in io:
            tensor.shape = None  # stale after the cut: re-inferred below
            tensor.dtype = None
    _forget_subgraph_shapes(graph, io)
    graph.cleanup(remove_unused_graph_inputs=False)
    _store_cast_weights_as_before(graph, view.cast_weights or {})
    graph.toposort()
    model = _export_weights_once(graph)
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.ir_version = original.ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(original, name))
    model.graph.doc_string = original.graph.doc_string
    model.graph.name = original.graph.name
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    _restore_io(model, original, io_changes)
    _restore_node_metadata(model, original)
    return refresh_value_info(model)


def _forget_subgraph_shapes(graph: gs.Graph, io: set[int]) -> None:
    """Shapes inside If branches and Loop/Scan bodies are stale after a cut there too: they are
    dropped (inference finds them again). A subgraph's own inputs and outputs keep their dtype
    only (channels cross them, rules/control.py); the outer graph's interface keeps its type."""
    for node in graph.nodes:
        for value in node.attrs.values():
            for body in value if isinstance(value, list) else [value]:
                if not isinstance(body, gs.Graph):
                    continue
                ends = {id(t) for t in (*body.inputs, *body.outputs)}  # channels may cross them
                kept = io
                for tensor in body.tensors().values():
                    if isinstance(tensor, gs.Variable) and id(tensor) not in kept:
                        if id(tensor) in ends and tensor.shape is not None and len(tensor.shape) == 0:
                            continue  # a scalar (a Loop's iteration number, its condition) carries no channels
                        tensor.shape = None
                        if id(tensor) not in ends:  # a subgraph's inputs and outputs need their dtype
                            tensor.dtype = None
                _forget_subgraph_shapes(body, kept)


def _restore_node_metadata(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Each node's metadata_props as the original had them (onnx-graphsurgeon drops them): the
    module paths the torch exporter records there name the nodes in later rounds' reports and
    let ``ignore`` match them there, and tools reading the written model find them too."""
    props = {n.name: n.metadata_props for n in original.graph.node if n.name and n.metadata_props}
    for node in model.graph.node if props else ():
        if node.name in props:
            node.metadata_props.extend(props[node.name])


_LARGE_BYTES = 1 << 20


def _export_weights_once(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx``, with each large weight copied once, straight into the model.

    onnx-graphsurgeon makes every initializer, copies them into a GraphProto
    and that into the ModelProto: on a large model, two or three copies of the
    weights at once. Here large constants are exported as empty stand-ins and
    filled in afterwards, one at a time. The graph keeps its values, but the
    cut weights now read them from the exported tensors (as gs reads a model
    it imports): the view and the model do not hold two copies.
    """
    aside = {t.name: t for t in graph.tensors().values() if _large_plain_constant(t)}
    saved = {name: t._values for name, t in aside.items()}  # private, as gs's own exporter reads it
    try:
        for t in aside.values():  # a lazy weight's stand-in is replaced whole: any dtype does
            t.values = np.empty(0, np.uint8 if isinstance(t._values, LazyValues) else t.dtype)
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        for name, t in aside.items():
            t.values = saved[name]
    for proto in model.graph.initializer:
        if proto.name in saved:
            _fill(proto, saved.pop(proto.name))
            aside[proto.name].values = LazyValues(proto)
    return model


def _large_plain_constant(t: gs.Tensor) -> bool:
    """A constant worth filling in by hand: large, and exported with its own dtype (no conversion)."""
    if not isinstance(t, gs.Constant) or isinstance(t._values, SparseValues) or t._values.nbytes <= _LARGE_BYTES:
        return False
    if isinstance(t._values, LazyValues):
        return True
    return t.export_dtype == t.dtype and t.values.dtype.isnative and t.values.dtype.kind in "fiub"


def _fill(proto: onnx.TensorProto, values) -> None:
    """Give an exported stand-in its values, as onnx-graphsurgeon would have written them."""
    name = proto.name
    if isinstance(values, LazyValues):
        proto.CopyFrom(values.tensor)
        proto.name = name
    else:
        del proto.dims[:]
        proto.dims.extend(values.shape)
        proto.raw_data = np.ascontiguousarray(values).tobytes()


def _store_cast_weights_as_before(graph: gs.Graph, folds: dict) -> None:
    """Weights that were Cast(stored weight): stored in their dtype again, behind a Cast."""
    if not folds:
        return
    casts: dict[int, gs.Variable] = {}
    for node in list(graph.nodes):
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant):
                continue
            base = next((n for n in folds if t.name == n or t.name.startswith(f"{n}_pruned_")), None)
            if base is None:
                continue
            if id(t) not in casts:
                values = np.asarray(t.values)
                stored = gs.Constant(f"{t.name}_stored", values.astype(folds[base]))
                out = gs.Variable(f"{t.name}_cast", dtype=values.dtype)
                to = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
                graph.nodes.append(gs.Node("Cast", f"{t.name}_Cast", {"to": to}, [stored], [out]))
                casts[id(t)] = out
            node.inputs[i] = casts[id(t)]


def _restore_io(model: onnx.ModelProto, original: onnx.ModelProto, io_changes=()) -> None:
    """Graph inputs and outputs exactly as given (names, shapes, dtypes, doc strings), but for ``io_changes``."""
    for field in ("input", "output"):
        ours = getattr(model.graph, field)
        theirs = {v.name: v for v in getattr(original.graph, field)}
        for i, vi in enumerate(ours):
            if vi.name in theirs:
                ours[i].CopyFrom(theirs[vi.name])
                apply_to_type(ours[i], io_changes)
    # Old exporters also list initializers as inputs (overridable defaults): keep
    # those entries for the initializers that the cut left as they were.
    listed = {v.name for v in model.graph.input}
    kept = {t.name: t for t in model.graph.initializer}
    for vi in original.graph.input:
        if vi.name not in listed and vi.name in kept and list(kept[vi.name].dims) == _dims(vi):
            model.graph.input.append(vi)


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]

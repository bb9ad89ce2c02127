"""Apply a plan to the graph: slice constants, rewrite attributes and shape
constants, drop stale shapes, remove dead nodes.

Constants are never sliced in place: each consumer gets its own sliced copy
(identical slices of one source are shared again), so a constant shared with
another node (deduplicated biases, tied weights) stays intact for it.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from .graph import GraphView
from .iochange import apply_to_type
from .shapes import refresh_value_info
from .plan import Plan
from .rules import lookup


class Cut:
    """What the plan removes, by position, from every slot; handed to rule rewrites."""

    def __init__(self, view: GraphView, groups, plan: Plan):
        self.view = view
        self.dims: dict[tuple[str, int], np.ndarray] = {}
        self.params: dict[tuple[int, int], dict[int, np.ndarray]] = defaultdict(dict)
        self.param_nodes: dict[tuple[int, int], gs.Node] = {}
        self._copies: dict[tuple, gs.Constant] = {}
        dims = defaultdict(list)
        for group in groups:
            if group.id not in plan.keep:
                continue
            removed = plan.removed(group.id)
            for key, slot in group.dims.items():
                dims[key].append(_positions(slot.owner, removed))
            for slot in group.params.values():
                key = (id(slot.node), slot.input)
                self.param_nodes[key] = slot.node
                before = self.params[key].get(slot.axis, np.empty(0, int))
                self.params[key][slot.axis] = np.union1d(before, _positions(slot.owner, removed))
        self.dims = {k: np.unique(np.concatenate(v)) for k, v in dims.items()}

    # --- queries for rules ---------------------------------------------------------
    def removed(self, tensor: gs.Tensor, axis: int) -> np.ndarray:
        return self.dims.get((tensor.name, axis), np.empty(0, int))

    def new_dim(self, tensor: gs.Tensor, axis: int) -> int:
        return int(self.view.dim(tensor, axis)) - len(self.removed(tensor, axis))

    def touches(self, node: gs.Node) -> bool:
        tensors = [t for t in (*node.inputs, *node.outputs) if t is not None]
        return any((t.name, a) in self.dims for t in tensors for a in range(self.view.rank(t) or 0))

    # --- edits -----------------------------------------------------------------------
    def replace_constant(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Point input ``index`` of ``node`` at a new constant (appending if absent)."""
        base = node.inputs[index].name if index < len(node.inputs) and node.inputs[index].name else node.name
        const = self._constant(f"{base}_pruned", values)
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = const

    def _constant(self, base: str, values: np.ndarray) -> gs.Constant:
        values = np.ascontiguousarray(values)
        # Plain numeric buffers are hashed in place (no copy of a large weight).
        digest = hashlib.sha1(values if values.dtype.kind in "biuf" else values.tobytes()).hexdigest()
        key = (base, values.dtype.str, values.shape, digest)
        if key not in self._copies:
            self._copies[key] = gs.Constant(f"{base}_{len(self._copies)}", values)
        return self._copies[key]

    def slice_params(self) -> None:
        for key, axes in self.params.items():
            node = self.param_nodes[key]
            source = node.inputs[key[1]]
            values = self.view.value(source)  # not cached in ``source``: only the slice is kept
            node.inputs[key[1]] = self._constant(f"{source.name}_pruned", _without(values, axes))


def _without(values: np.ndarray, removed: dict[int, np.ndarray]) -> np.ndarray:
    """``values`` without the ``removed[axis]`` positions of each axis, in one copy."""
    keep = [np.setdiff1d(np.arange(n), removed[axis]) if axis in removed else np.arange(n)
            for axis, n in enumerate(values.shape)]
    if len(removed) == 1:
        (axis,) = removed
        return np.take(values, keep[axis], axis=axis)
    return values[np.ix_(*keep)]


def _positions(owner: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Positions of a slot whose channel is removed."""
    owned = owner >= 0
    hit = np.zeros(len(owner), bool)
    hit[owned] = removed[owner[owned]]
    return np.nonzero(hit)[0]


def apply_plan(view: GraphView, groups, plan: Plan) -> Cut:
    """Edit ``view.graph`` in place according to ``plan``."""
    cut = Cut(view, groups, plan)
    for node in list(view.nodes):  # rewrites read the original constants: before slicing
        rule = lookup(node)
        if rule is not None and rule.rewrite is not None and cut.touches(node):
            rule.rewrite(node, view, cut)
    cut.slice_params()
    return cut


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
    return refresh_value_info(model)


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

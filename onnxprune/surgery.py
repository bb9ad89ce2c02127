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

from .graph import GraphView
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
        key = (base, values.dtype.str, values.shape, hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest())
        if key not in self._copies:
            self._copies[key] = gs.Constant(f"{base}_{len(self._copies)}", np.ascontiguousarray(values))
        return self._copies[key]

    def slice_params(self) -> None:
        for key, axes in self.params.items():
            node = self.param_nodes[key]
            source = node.inputs[key[1]]
            values = np.asarray(source.values)
            for axis, positions in sorted(axes.items()):
                values = np.delete(values, positions, axis=axis)
            node.inputs[key[1]] = self._constant(f"{source.name}_pruned", values)


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


def export(view: GraphView, original: onnx.ModelProto) -> onnx.ModelProto:
    """The edited graph as a model with the original's opset, metadata and docs."""
    graph = view.graph
    io = {id(t) for t in (*graph.inputs, *graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in io:
            tensor.shape = None  # stale after the cut: re-inferred below
            tensor.dtype = None
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.ir_version = original.ir_version
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(original, name))
    model.graph.doc_string = original.graph.doc_string
    model.graph.name = original.graph.name
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    _restore_io(model, original)
    return refresh_value_info(model)


def _restore_io(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Graph inputs and outputs exactly as given (names, shapes, dtypes, doc strings)."""
    for field in ("input", "output"):
        ours = getattr(model.graph, field)
        theirs = {v.name: v for v in getattr(original.graph, field)}
        for i, vi in enumerate(ours):
            if vi.name in theirs:
                ours[i].CopyFrom(theirs[vi.name])
    # Old exporters also list initializers as inputs (overridable defaults): keep
    # those entries for the initializers that the cut left as they were.
    listed = {v.name for v in model.graph.input}
    kept = {t.name: t for t in model.graph.initializer}
    for vi in original.graph.input:
        if vi.name not in listed and vi.name in kept and list(kept[vi.name].dims) == _dims(vi):
            model.graph.input.append(vi)


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value for d in vi.type.tensor_type.shape.dim]

"""How exporters spell things, normalised so that rules see one form.

``import_graph`` imports a model into onnx-graphsurgeon and rewrites it:
Constant nodes become constant tensors, Identity nodes that merely route a
constant (the torch exporter does this for some biases) are bypassed,
Cast(weight) becomes the weight, constant arithmetic is folded, and two
multi-op spellings of one op become that op: a transpose done as
flatten -> Transpose -> unflatten (one Transpose) and a channel shuffle
(one Gather). A recurrent layer's zero initial state (the torch exporter
expands zeros to the batch size) becomes the absent input, which means zeros.
These rewrites reach the pruned model, which computes the same.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import fold
from .shape_math import evaluate
from .shapes import Shapes


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes stable names, so reports and --ignore can refer to them."""
    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _constants_as_tensors(graph: gs.Graph) -> None:
    """Constant nodes -> constant tensors (unless they are graph outputs)."""
    for node in list(graph.nodes):
        if node.op != "Constant" or node.domain not in (None, "", "ai.onnx") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if any(t is out for t in graph.outputs):
            continue
        value = _constant_node_value(node)
        if value is None:
            continue
        _redirect(out, gs.Constant(out.name, value))
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in node.attrs:
            v = node.attrs[key]
            if isinstance(v, gs.Constant):
                return np.asarray(v.values)
            if key == "value_float" or key == "value_floats":
                return np.asarray(v, dtype=np.float32)
            return np.asarray(v, dtype=np.int64)
    return None  # sparse_value / string values: leave the node alone


def _own_tensor_attributes(graph: gs.Graph) -> None:
    """Tensor attributes (ConstantOfShape's value) load their values now: onnx-graphsurgeon exports
    a lazily loaded one by writing its name into the TensorProto it came from, i.e. into the input
    model, which must stay untouched."""
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant):
                value.values = np.asarray(value.values)
            elif isinstance(value, gs.Graph):
                _own_tensor_attributes(value)


def _bypass_constant_identities(graph: gs.Graph) -> None:
    """Consumers of Identity(constant) read the constant directly."""
    for node in list(graph.nodes):
        if node.op != "Identity" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        out = node.outputs[0]
        if any(t is out for t in graph.outputs):
            continue
        _redirect(out, node.inputs[0])
        node.outputs.clear()
    graph.cleanup(remove_unused_graph_inputs=False)


def _fold_constant_arithmetic(graph: gs.Graph, opset_import) -> None:
    """Nodes of shape arithmetic whose inputs are all (small) constants become constants (fold.py)."""
    folded = 0
    for node in list(graph.toposort().nodes):
        if not fold.foldable(node.op, node.domain) or len(node.outputs) != 1:
            continue
        inputs = [t for t in node.inputs if t is not None and t.name]
        if not inputs or not all(isinstance(t, gs.Constant) and fold.small(t.shape) for t in inputs):
            continue
        out = node.outputs[0]
        if any(t is out for t in graph.outputs):
            continue
        attrs = {k: onnx.numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v
                 for k, v in node.attrs.items()}  # a tensor attribute (ConstantOfShape's value)
        try:
            proto = onnx.helper.make_node(node.op, [t.name if t is not None else "" for t in node.inputs],
                                          [out.name], **attrs)
        except (TypeError, ValueError):  # an attribute onnx cannot take back as it is: leave the node
            continue
        value = fold.evaluate_node(proto, {t.name: np.asarray(t.values) for t in inputs}, opset_import)
        if value is None:
            continue
        _redirect(out, gs.Constant(out.name, value[0]))
        node.outputs.clear()
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)


_FLOATS = (np.float16, np.float32, np.float64)


def _fold_cast_weights(graph: gs.Graph) -> dict:
    """Cast(float constant) -> a constant of the cast type, so rules see the weight itself.

    Mixed-precision exports store weights in float16 behind a Cast to float32.
    Returns {constant name: stored dtype}; export casts the pruned weight back.
    """
    folds = {}
    for node in list(graph.nodes):
        if node.op != "Cast" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        stored = np.asarray(node.inputs[0].values)
        target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs.get("to", 0))) \
            if node.attrs.get("to") else None
        out = node.outputs[0]
        if target is None or stored.dtype.type not in _FLOATS or np.dtype(target).type not in _FLOATS \
                or any(t is out for t in graph.outputs):
            continue
        _redirect(out, gs.Constant(out.name, stored.astype(target)))
        node.outputs.clear()
        folds[out.name] = stored.dtype
    if folds:
        graph.cleanup(remove_unused_graph_inputs=False)
    return folds


def _fold_flattened_transposes(graph: gs.Graph, shapes: Shapes) -> None:
    """Reshape(x, [-1, trailing dims of x]) -> Transpose (axis 0 kept) -> Reshape(back to x's leading
    dims, computed from Shape(x)) is one Transpose of x's trailing axes: the dynamo exporter's
    scaled_dot_product_attention writes k.transpose(-2, -1) this way with dynamic shapes. As one
    Transpose, the heads in x's leading dims stay visible to the rules (and the graph is shorter)."""
    folded = 0
    for transpose in list(graph.nodes):
        found = _flattened_transpose(transpose, shapes)
        if found is None:
            continue
        x, perm, unflatten = found
        out = unflatten.outputs[0]
        unflatten.outputs.clear()
        graph.nodes.append(gs.Node("Transpose", f"{transpose.name}_folded", {"perm": perm}, [x], [out]))
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _flattened_transpose(transpose: gs.Node, shapes: Shapes):
    """(x, perm on x, the unflattening Reshape) when ``transpose`` sits in that sandwich, else None."""
    if transpose.op != "Transpose" or len(transpose.outputs[0].outputs) != 1:
        return None
    flatten, unflatten = transpose.inputs[0].inputs[:1], transpose.outputs[0].outputs[0]
    if not flatten or flatten[0].op != "Reshape" or unflatten.op != "Reshape" \
            or unflatten.inputs[0] is not transpose.outputs[0] or len(flatten[0].outputs[0].outputs) != 1:
        return None
    x = flatten[0].inputs[0]
    rank = len(shapes.static.get(x.name) or ()) if not isinstance(x, gs.Constant) else 0
    inner = transpose.attrs.get("perm")
    if rank < 3 or inner is None or inner[0] != 0 or len(inner) > rank:
        return None
    lead = rank - len(inner) + 1  # x's leading axes, flattened into one
    perm = list(range(lead)) + [lead + p - 1 for p in inner[1:]]
    for dims in ([2, 3, 5, 7, 11, 13, 17, 19][:rank], [23, 29, 31, 37, 41, 43, 47, 53][:rank]):
        flat = evaluate(flatten[0].inputs[1], x, dims)
        back = evaluate(unflatten.inputs[1], x, dims)
        if flat is None or back is None or list(flat[1:]) != dims[lead:] \
                or int(flat[0]) not in (-1, int(np.prod(dims[:lead]))) or list(back) != [dims[p] for p in perm]:
            return None
    return x, perm, unflatten


def _fold_channel_shuffles(graph: gs.Graph, shapes: Shapes) -> None:
    """Reshape(x, C -> (g, C/g)) -> Transpose swapping the two -> Reshape(back to x's shape), the
    channel shuffle of ShuffleNet, is Gather(x, a constant permutation) along that axis: a
    reordering the rules can follow across the groups it interleaves (a Gather rule renumbers it
    after the cut). The permutation is checked against the three ops' shapes."""
    folded = 0
    for transpose in list(graph.nodes):
        found = _channel_shuffle(transpose, shapes)
        if found is None:
            continue
        x, axis, order, unsplit = found
        out = unsplit.outputs[0]
        unsplit.outputs.clear()
        graph.nodes.append(gs.Node("Gather", f"{transpose.name}_shuffle", {"axis": axis},
                                   [x, gs.Constant(f"{transpose.name}_shuffle_order", order)], [out]))
        folded += 1
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _channel_shuffle(transpose: gs.Node, shapes: Shapes):
    """(x, axis, permutation, the last Reshape) when ``transpose`` is the middle of a channel shuffle."""
    if transpose.op != "Transpose" or len(transpose.outputs[0].outputs) != 1 or not transpose.inputs[0].inputs:
        return None
    split, unsplit = transpose.inputs[0].inputs[0], transpose.outputs[0].outputs[0]
    if split.op != "Reshape" or unsplit.op != "Reshape" or len(split.outputs[0].outputs) != 1:
        return None
    x = split.inputs[0]
    before, grid, after = (shapes.static.get(t.name) for t in (x, split.outputs[0], unsplit.outputs[0]))
    perm = transpose.attrs.get("perm")
    if not before or not grid or before != after or None in before or None in grid or perm is None \
            or len(grid) != len(before) + 1:
        return None
    axis = next((a for a in range(len(before)) if grid[a] != before[a]), None)
    swapped = list(range(len(grid)))
    if axis is None or axis + 1 >= len(grid):
        return None
    swapped[axis], swapped[axis + 1] = axis + 1, axis
    if list(perm) != swapped or grid[axis] * grid[axis + 1] != before[axis] or grid[axis] == 1 \
            or grid[axis + 1] == 1 or list(grid[:axis]) + [before[axis]] + list(grid[axis + 2:]) != list(before):
        return None
    groups, per_group = grid[axis], grid[axis + 1]
    position = np.arange(before[axis])  # output channel o = i * groups + a reads input a * per_group + i
    order = (position % groups) * per_group + position // groups
    return x, axis, order.astype(np.int64), unsplit


_INITIAL_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}  # initial_h[, initial_c]


def _is_zero_constant(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and not np.any(np.asarray(t.values))


def _drop_zero_initial_states(graph: gs.Graph) -> None:
    """An LSTM/GRU/RNN initial state of zeros, a constant or an Expand of one (the torch exporter's
    default h0: zeros expanded to [directions, batch, hidden] read from the input's shape), is the
    absent input, which the op reads as zeros. Absent, it carries no hidden size the rules would
    have to cut or recompute, and the shape arithmetic for the batch goes with it."""
    dropped = 0
    for node in graph.nodes:
        if node.domain not in (None, "", "ai.onnx"):
            continue
        for i in _INITIAL_STATES.get(node.op, ()):
            state = node.inputs[i] if i < len(node.inputs) else None
            if state is None or state.name == "":
                continue
            producer = state.inputs[0] if not isinstance(state, gs.Constant) and state.inputs else None
            if _is_zero_constant(state) or (producer is not None and producer.op == "Expand"
                                            and _is_zero_constant(producer.inputs[0])):
                node.inputs[i] = gs.Variable.empty()
                dropped += 1
    if dropped:
        graph.cleanup(remove_unused_graph_inputs=False)


def _redirect(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every consumer of ``old`` reads ``new`` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _subgraph_references(graph: gs.Graph) -> set[str]:
    """Names of outer-scope tensors that If/Loop/Scan bodies read."""
    refs: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            bodies = value if isinstance(value, list) else [value]
            for body in bodies:
                if isinstance(body, gs.Graph):
                    for inner in body.nodes:
                        refs.update(t.name for t in inner.inputs if t is not None)
                    refs.update(_subgraph_references(body))
    return refs


def import_graph(model: onnx.ModelProto, shapes: Shapes) -> tuple[gs.Graph, dict, frozenset[str]]:
    """The model as a normalised onnx-graphsurgeon graph, the Cast weights folded into
    constants (name -> stored dtype) and the outer names its subgraphs read."""
    graph = gs.import_onnx(model)
    _name_nodes(graph)
    _constants_as_tensors(graph)
    _own_tensor_attributes(graph)
    _bypass_constant_identities(graph)
    cast_weights = _fold_cast_weights(graph)  # before the arithmetic: a Cast weight is a weight, not arithmetic
    _fold_constant_arithmetic(graph, model.opset_import)
    _fold_flattened_transposes(graph, shapes)
    _fold_channel_shuffles(graph, shapes)
    _drop_zero_initial_states(graph)
    return graph, cast_weights, frozenset(_subgraph_references(graph))

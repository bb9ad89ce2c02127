"""Parameter and MAC counts of a model, from static shapes.

MACs count the multiply-accumulates of the ops the weight table gives a MAC count
(rules/weights.py: Conv, ConvTranspose, Gemm and MatMul, activation x activation
MatMuls included); elementwise work is not counted.
The tools/ benchmarks use this one function for every tool they compare.
Per node, the same counts give the MACs each barrier holds: those of the nodes of the
groups it blocks, which no cut can reduce while it stands.
"""

from __future__ import annotations

import math

import onnx

from ..graph.shapes import graphs, static_shapes
from ..model.inputs import resolve_input_shapes
from ..rules.quant import STORED_VALUES, quantization_inputs
from ..rules.registry import op_key
from ..rules.weights import WEIGHTS, proto_attrs
from .groups import MORE_REASONS, barrier_of


def table_key(node: onnx.NodeProto) -> str:
    """How the op tables name a node's op: ``Conv``, or ``com.microsoft.QGemm`` in another domain."""
    return op_key(node.domain, node.op_type)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all float initializers and float Constant-node tensors, subgraphs' included (the
    cut moves a sliced weight of a branch or loop body into that subgraph), and of the integer
    weights and biases of a quantized model (the inputs of ``STORED_VALUES``); the scales and zero
    points of its quantization are not parameters."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for graph in graphs(model.graph):
        stored = {n.input[i] for n in graph.node for i in STORED_VALUES.get(table_key(n), ()) if i < len(n.input)}
        scales = {name for n in graph.node for name in quantization_inputs(table_key(n), list(n.input))}
        total += sum(math.prod(t.dims) for t in graph.initializer
                     if (t.data_type in floats and t.name not in scales) or t.name in stored)
        for node in graph.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value" and a.t.data_type in floats:
                        total += math.prod(a.t.dims)
    return int(total)


def layer_macs(model: onnx.ModelProto, input_shapes: dict | None = None, shapes: dict | None = None):
    """(node, dims of its inputs and output, MACs or None when a dim is unknown) per counted node."""
    if shapes is None:
        shapes = static_shapes(model, resolve_input_shapes(model, input_shapes))
    for node in model.graph.node:
        entry = WEIGHTS.get(table_key(node))
        if entry is None or entry.macs is None:
            continue
        dims = [shapes.get(name) if name else None for name in node.input] + [shapes.get(node.output[0])]
        yield node, dims, entry.macs(proto_attrs(node), dims)


def count_macs(model: onnx.ModelProto, input_shapes: dict | None = None, shapes: dict | None = None) -> int | None:
    """Multiply-accumulates for one run at the given (or static, else 1) input shapes.

    None when a counted op has a dim that shape inference could not resolve.
    """
    total = 0
    for _, _, macs in layer_macs(model, input_shapes, shapes):
        if macs is None:
            return None
        total += macs
    return int(total)


def macs_by_output(model: onnx.ModelProto, input_shapes: dict | None = None,
                   shapes: dict | None = None) -> dict[str, int | None]:
    """Each counted node's MACs (None where a dim is unknown), keyed by its first output: node
    names may be empty in a model (the graph view names those nodes), output names are unique."""
    return {node.output[0]: macs for node, _, macs in layer_macs(model, input_shapes, shapes)}


def total_macs(per_output: dict[str, int | None]) -> int | None:
    """``count_macs`` from ``macs_by_output``: None when one count is unknown."""
    values = list(per_output.values())
    return None if None in values else int(sum(values))


def held_macs(nodes, output_of: dict[str, str], per_output: dict[str, int | None]) -> int | None:
    """MACs of the nodes named ``nodes`` (``output_of``: node name -> its first output's name);
    None when one of them has an unknown count."""
    counts = [per_output.get(output_of.get(name, ""), 0) for name in nodes]
    return None if None in counts else int(sum(counts))


def barrier_macs(blocked, output_of: dict[str, str], per_output: dict[str, int | None]) -> list[dict]:
    """The barriers of the ``blocked`` groups, most MACs held first: per barrier (``barrier_of``),
    the nodes it was met at, the groups it blocked and the MACs of their nodes (each node once)."""
    found: dict[str, dict] = {}
    for group in blocked:
        for reason in group.blocked:
            if reason.startswith(MORE_REASONS):
                continue
            barrier, at = barrier_of(reason, group.nodes)
            entry = found.setdefault(barrier, {"barrier": barrier, "nodes": [], "groups": [], "held": {}})
            if at is not None and at not in entry["nodes"]:
                entry["nodes"].append(at)
            if group.id not in entry["groups"]:  # a group may meet one barrier at several nodes
                entry["groups"].append(group.id)
            entry["held"].update(dict.fromkeys(group.nodes))
    ranked = []
    for entry in found.values():
        held = held_macs(entry.pop("held"), output_of, per_output)
        ranked.append({**entry, "macs": held})
    return sorted(ranked, key=lambda e: -(e["macs"] or 0))


def format_count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


"""Parameter and MAC counts of a model, from static shapes.

MACs count the multiply-accumulates of the ops the weight table gives a MAC count
(rules/weights.py: Conv, ConvTranspose, Gemm and MatMul, activation x activation
MatMuls included); elementwise work is not counted.
The tools/ benchmarks use this one function for every tool they compare.
"""

from __future__ import annotations

import math

import onnx

from ..graph.shapes import static_shapes
from ..model.inputs import resolve_input_shapes
from ..rules.weights import WEIGHTS, proto_attrs


def count_params(model: onnx.ModelProto) -> int:
    """Elements of all float initializers and float Constant-node tensors."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = sum(math.prod(t.dims) for t in model.graph.initializer if t.data_type in floats)
    for node in model.graph.node:
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
        entry = WEIGHTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
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


def format_count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


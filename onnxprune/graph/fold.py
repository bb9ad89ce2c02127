"""Constant folding: one node evaluated on known values with onnx's reference evaluator.

Two places fold: the graph view, whose constant arithmetic exporters leave
behind (a Slice bound computed as Reshape(Mod(2, 3))) becomes plain
constants the rules can read, and shape inference, which evaluates shape
arithmetic (Shape -> Gather -> Concat) at the pinned input dims. Both fold
the same ops, and only small values: shape-sized tensors, never activations.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

# Ops that shape arithmetic is made of; cheap to evaluate on small tensors.
FOLDABLE = frozenset(
    "Shape Size Gather Slice Concat Unsqueeze Squeeze Add Sub Mul Div Cast Floor Ceil Neg Abs Sqrt Reshape "
    "Expand ConstantOfShape Range Equal Where Min Max Mod ReduceProd Identity Not Less Greater Transpose".split())
LIMIT = 4096  # elements, of every input and output


def foldable(op_type: str, domain: str | None) -> bool:
    return op_type in FOLDABLE and domain in (None, "", "ai.onnx")


def small(shape) -> bool:
    """Within LIMIT; checked on the shape, so that a lazily loaded weight is not read to find out."""
    return math.prod(int(d) for d in shape) <= LIMIT


def evaluate_node(node: onnx.NodeProto, values: dict[str, np.ndarray], opset_import) -> list[np.ndarray] | None:
    """The outputs of ``node`` given the values of its inputs (by name); None when the
    evaluator cannot run it or an output exceeds LIMIT."""
    from onnx.reference import ReferenceEvaluator

    names = [n for n in node.input if n]
    try:
        single = onnx.helper.make_model(
            onnx.helper.make_graph(
                [node], "fold",
                [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(values[n].dtype),
                                                    values[n].shape) for n in names],
                [onnx.helper.make_empty_tensor_value_info(o) for o in node.output]),
            opset_imports=opset_import)
        outputs = [np.asarray(v) for v in ReferenceEvaluator(single).run(None, {n: values[n] for n in names})]
    except Exception:  # an op or a case the evaluator cannot run: leave it
        return None
    return outputs if all(v.size <= LIMIT for v in outputs) else None

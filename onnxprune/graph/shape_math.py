"""Shape arithmetic as a function of one tensor's dims.

Exporters compute Reshape targets and Slice bounds at run time from
``Shape(x)``: ``x.view(-1, x.size(-1))``, ``x.chunk(2, 1)``, a transpose of the
last two axes done as flatten -> Transpose -> unflatten. Whether such a
computation stays right after a cut, or what it amounts to, is found by
evaluating it with ``x`` given made-up dims: ``evaluate(t, x, dims)`` is the
value ``t`` would have if ``x`` had shape ``dims``, for a small integer
expression of constants and ``Shape(x)``; None for anything else.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}
_MAX_DEPTH = 24


def evaluate(tensor: gs.Tensor, data: gs.Tensor, dims, memo: dict | None = None, depth: int = _MAX_DEPTH):
    """The value of ``tensor`` if ``data`` had shape ``dims``; None unless it is computed from
    constants and ``Shape(data)`` only."""
    memo = {} if memo is None else memo
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values) if math.prod(tensor.shape) <= 64 else None
    if tensor.name in memo:
        return memo[tensor.name]
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0 or len(node.outputs) != 1 or node.domain not in (None, "", "ai.onnx"):
        return None
    if node.op == "Shape":
        result = _shape(node, data, np.asarray(dims, dtype=np.int64))
    else:
        args = [evaluate(t, data, dims, memo, depth - 1) if t is not None and t.name else None
                for t in node.inputs]
        result = _apply(node, args)
    memo[tensor.name] = result
    return result


def _shape(node: gs.Node, data: gs.Tensor, dims: np.ndarray):
    if node.inputs[0] is not data:
        return None
    rank = len(dims)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    return dims[start + rank if start < 0 else start:end + rank if end < 0 else end]


def _apply(node: gs.Node, args: list):
    op, first = node.op, args[0] if args else None
    if first is None:
        return None
    if op in _ARITHMETIC and args[1] is not None:
        return _ARITHMETIC[op](first, args[1])
    if op == "Div" and args[1] is not None:
        return first // args[1] if first.dtype.kind in "iu" else first / args[1]
    if op in ("Cast", "Identity"):
        return first
    if op == "Gather" and node.attrs.get("axis", 0) == 0 and args[1] is not None:
        return np.take(first, args[1], axis=0)
    if op == "Slice" and first.ndim == 1 and len(args) >= 3 and args[1] is not None and args[2] is not None:
        if any(a is not None and list(np.atleast_1d(a)) != [v] for a, v in zip(args[3:5], (0, 1))):
            return None  # other axes or steps: not shape arithmetic exporters write
        start, stop = int(np.atleast_1d(args[1])[0]), int(np.atleast_1d(args[2])[0])
        return first[slice(*slice(start, stop).indices(len(first)))]
    if op in ("Unsqueeze", "Squeeze"):
        axes = node.attrs.get("axes")
        if axes is None and len(args) > 1 and args[1] is not None:
            axes = np.atleast_1d(args[1]).tolist()
        if op == "Unsqueeze":
            return None if axes is None else np.expand_dims(first, tuple(axes))
        return np.squeeze(first, axis=None if axes is None else tuple(axes))
    if op == "Concat" and all(a is not None for a in args):
        return np.concatenate([np.atleast_1d(a) for a in args])
    return None

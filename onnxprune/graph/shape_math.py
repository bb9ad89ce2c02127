"""Shape arithmetic as a function of tensors' dims.

Exporters compute Reshape targets, Slice bounds and Pad widths at run time
from ``Shape(x)``: ``x.view(-1, x.size(-1))``, ``x.chunk(2, 1)``, a transpose
of the last two axes done as flatten -> Transpose -> unflatten, TensorFlow's
'same' padding computed from the input's H and W. Whether such a computation
stays right after a cut, or what it amounts to, is found by evaluating it
with the tensors it reads given made-up dims: ``evaluate(t, x, dims)`` is the
value ``t`` would have if ``x`` had shape ``dims``, ``evaluate_at(t, dims_of)``
the value if every tensor ``u`` whose shape it reads had shape
``dims_of(u)``; both for small expressions of constants and shapes only,
None for anything else. The ops follow ONNX's semantics exactly (integer Div
truncates, Slice clamps as ONNX does), since the value predicts what the
runtime computes.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# Nodes between an expression and the shapes it reads: 'same' padding as torch.onnx writes it is ~30
# deep (ceil, clamp, halves, then F.pad's reordering of the pads); the cap bounds the recursion.
_MAX_DEPTH = 64
_LIMIT = 4096  # elements of a value computed: shape arithmetic is tiny; anything larger is data
_CONSTANT_LIMIT = 64  # elements of a constant read: shape-sized, never a weight


def evaluate(tensor: gs.Tensor, data: gs.Tensor, dims, memo: dict | None = None, depth: int = _MAX_DEPTH):
    """The value of ``tensor`` if ``data`` had shape ``dims``; None unless it is computed from
    constants and ``Shape(data)`` only."""
    return evaluate_at(tensor, lambda t: dims if t is data else None, memo, depth)


def evaluate_at(tensor: gs.Tensor, dims_of, memo: dict | None = None, depth: int = _MAX_DEPTH):
    """The value of ``tensor`` if each tensor ``u`` whose shape it reads had shape ``dims_of(u)``
    (None: unknown). A read tensor that is itself shape arithmetic has the shape of its value;
    ``dims_of`` is asked only about the others (activations). One ``memo`` per ``dims_of``."""
    memo = {} if memo is None else memo
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values) if math.prod(tensor.shape) <= _CONSTANT_LIMIT else None
    if tensor.name in memo:
        return memo[tensor.name]
    node = tensor.inputs[0] if tensor.inputs else None
    result = None
    # The op is checked before its inputs are evaluated: an activation's producer (a Conv) ends
    # the walk at once instead of evaluating the network behind it.
    if node is not None and depth > 0 and len(node.outputs) == 1 and node.domain in (None, "", "ai.onnx") \
            and (node.op == "Shape" or node.op in _OPS):
        if node.op == "Shape":
            result = _shape(node, dims_of, memo, depth)
        else:
            args = [evaluate_at(t, dims_of, memo, depth - 1) if t is not None and t.name else None
                    for t in node.inputs]
            try:  # made-up dims may be ones the expression rejects, or overflows, as the runtime would
                with np.errstate(all="ignore"):
                    result = _OPS[node.op](node, args) if args and args[0] is not None else None
            except (ValueError, IndexError, TypeError, OverflowError):
                result = None
            if result is not None:  # numpy gives 0-d results as scalars
                result = np.asarray(result)
                result = result if result.size <= _LIMIT else None
    memo[tensor.name] = result
    return result


def _shape(node: gs.Node, dims_of, memo: dict, depth: int):
    data = node.inputs[0]
    if isinstance(data, gs.Constant):
        dims = tuple(data.shape)  # a weight's shape is known, however large the weight
    else:
        value = evaluate_at(data, dims_of, memo, depth - 1)
        dims = value.shape if value is not None else dims_of(data)
    if dims is None:
        return None
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return np.asarray(dims, dtype=np.int64)[start:end]  # ONNX's start/end clamp as Python's slices do


# --- the ops ------------------------------------------------------------------------------------

def _given(args, *indices) -> bool:
    return all(i < len(args) and args[i] is not None for i in indices)


def _binary(fn):
    return lambda node, args: fn(args[0], args[1]) if _given(args, 1) else None


def _unary(fn):
    return lambda node, args: fn(args[0])


def _div(node, args):
    a, b = args[0], args[1] if _given(args, 1) else None
    if b is None:
        return None
    if a.dtype.kind in "iu" and np.asarray(b).dtype.kind in "iu":
        if np.any(b == 0):
            return None
        q = np.abs(a) // np.abs(b)  # ONNX's integer Div truncates toward zero, numpy's // floors
        return (q * np.sign(a) * np.sign(b)).astype(np.result_type(a, b))
    return a / b


def _variadic(fn):
    def apply(node, args):
        if not all(a is not None for a in args):
            return None
        out = args[0]
        for a in args[1:]:
            out = fn(out, a)
        return out
    return apply


def _clip(node, args):
    lo = args[1] if _given(args, 1) else node.attrs.get("min")
    hi = args[2] if _given(args, 2) else node.attrs.get("max")
    if (len(args) > 1 and node.inputs[1].name and lo is None) or (len(args) > 2 and node.inputs[2].name and hi is None):
        return None  # a bound that is computed but not known
    out = args[0]
    out = out if lo is None else np.maximum(out, np.asarray(lo, out.dtype))
    return out if hi is None else np.minimum(out, np.asarray(hi, out.dtype))


def _cast(node, args):
    return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))


def _axes(node, args, index: int):
    """An op's axes: its attribute (older opsets) or its input ``index``; None when absent."""
    axes = node.attrs.get("axes")
    if axes is None and _given(args, index):
        axes = np.atleast_1d(args[index]).tolist()
    return None if axes is None else [int(a) for a in axes]


def _unsqueeze(node, args):
    axes = _axes(node, args, 1)
    return None if axes is None else np.expand_dims(args[0], tuple(axes))


def _squeeze(node, args):
    axes = _axes(node, args, 1)
    return np.squeeze(args[0], axis=None if axes is None else tuple(axes))


def _gather(node, args):
    if not _given(args, 1):
        return None
    return np.take(args[0], np.asarray(args[1], dtype=np.int64), axis=int(node.attrs.get("axis", 0)))


def _slice_positions(size: int, start: int, end: int, step: int) -> np.ndarray:
    """The positions ONNX's Slice takes on an axis of ``size``: negative bounds count from the end,
    then start is clamped to [0, size] ([0, size - 1] stepping back), end to [0, size] ([-1, size - 1])."""
    start, end = (v + size if v < 0 else v for v in (start, end))
    if step > 0:
        start, end = min(max(start, 0), size), min(max(end, 0), size)
    else:
        start, end = min(max(start, 0), size - 1), min(max(end, -1), size - 1)
    return np.arange(start, end, step, dtype=np.int64)


def _slice(node, args):
    data = args[0]
    if "starts" in node.attrs:  # opset < 10: bounds as attributes, step 1
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes, steps = node.attrs.get("axes", range(len(starts))), [1] * len(starts)
    else:
        if not _given(args, 1, 2) or any(len(args) > i and node.inputs[i].name and args[i] is None for i in (3, 4)):
            return None
        starts, ends = np.atleast_1d(args[1]).tolist(), np.atleast_1d(args[2]).tolist()
        axes = np.atleast_1d(args[3]).tolist() if _given(args, 3) else range(len(starts))
        steps = np.atleast_1d(args[4]).tolist() if _given(args, 4) else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            return None
        axis = int(axis) + data.ndim if int(axis) < 0 else int(axis)
        data = np.take(data, _slice_positions(data.shape[axis], int(start), int(end), int(step)), axis=axis)
    return data


def _concat(node, args):
    if not all(a is not None for a in args):
        return None
    return np.concatenate([np.atleast_1d(a) for a in args], axis=int(node.attrs.get("axis", 0)))


def _reshape(node, args):
    if not _given(args, 1):
        return None
    target = [int(v) for v in np.atleast_1d(args[1])]
    if not int(node.attrs.get("allowzero", 0)):  # 0 copies the input's dim
        target = [args[0].shape[i] if v == 0 else v for i, v in enumerate(target)]
    return args[0].reshape(target)


def _constant_of_shape(node, args):
    shape = [int(v) for v in np.atleast_1d(args[0])]
    if min(shape, default=0) < 0 or math.prod(shape) > _LIMIT:
        return None
    value = node.attrs.get("value")
    fill = np.asarray(value.values).reshape(-1)[:1] if isinstance(value, gs.Constant) else np.zeros(1, np.float32)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _transpose(node, args):
    perm = node.attrs.get("perm")
    return np.transpose(args[0], None if perm is None else [int(p) for p in perm])


_OPS = {
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply), "Div": _div,
    "Neg": _unary(np.negative), "Abs": _unary(np.abs), "Ceil": _unary(np.ceil), "Floor": _unary(np.floor),
    "Max": _variadic(np.maximum), "Min": _variadic(np.minimum), "Clip": _clip,
    "Cast": _cast, "Identity": _unary(lambda a: a),
    "Gather": _gather, "Slice": _slice, "Concat": _concat,
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Reshape": _reshape, "Transpose": _transpose,
    "ConstantOfShape": _constant_of_shape,
}

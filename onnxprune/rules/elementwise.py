"""Elementwise ops, unary and n-ary with numpy broadcasting.

One rule covers them all: the channel axis maps to the same output axis
(right-aligned broadcasting); every other input that has the full channel
extent on that axis carries the same channels. A constant there (a
per-channel bias, PRelu slope, layer scale) is sliced; an activation there is
coupled into the group (residual Add, squeeze-excite Mul, x * Sigmoid(x)).
Inputs with extent 1 on the axis broadcast and are left alone.
"""

from __future__ import annotations

from .registry import Link, Reached, Relation, barrier, rule

UNARY = (
    "Relu LeakyRelu PRelu Sigmoid Tanh HardSigmoid HardSwish Clip Gelu Erf Softplus Softsign "
    "Elu Selu Celu Mish ThresholdedRelu Exp Log Sqrt Neg Abs Reciprocal Floor Ceil Round Sign "
    "Sin Cos Tan Asin Acos Atan Sinh Cosh Asinh Acosh Atanh Not IsNaN IsInf Identity Cast "
    "CastLike Dropout Shrink BitwiseNot"
).split()
NARY = (
    "Add Sub Mul Div Pow Mod Max Min Sum Mean Where Equal Greater Less GreaterOrEqual "
    "LessOrEqual And Or Xor BitwiseAnd BitwiseOr BitwiseXor"
).split()


def _present(t) -> bool:
    return t is not None and t.name != ""


@rule(*UNARY, *NARY)
def elementwise(node, view, r: Reached):
    out_rank = view.rank(node.outputs[0])
    if out_rank is None:
        return barrier("output shape unknown")
    size = len(r.owner)
    if r.side == "in":
        rank_in = view.rank(node.inputs[r.index])
        if rank_in is None:
            return barrier("input shape unknown")
        out_axis = r.axis + out_rank - rank_in
    else:
        out_axis = r.axis
    links = []
    for i, t in enumerate(node.inputs):
        if not _present(t) or (r.side == "in" and i == r.index):
            continue
        rank = view.rank(t)
        if rank is None:
            return barrier(f"shape of input {i} unknown")
        axis = out_axis - (out_rank - rank)
        if axis < 0:
            continue
        extent = view.dim(t, axis)
        if extent == 1:
            continue  # broadcast along the channels: unaffected
        if extent != size:
            return barrier(f"input {i} has extent {extent} on the channel axis, expected {size}")
        role = "scale" if node.op in ("Mul", "PRelu") else "elementwise"
        links.append(Link("in", i, axis, r.owner, role))
    for j, t in enumerate(node.outputs):
        if (r.side == "out" and j == r.index) or view.rank(t) != out_rank:
            continue
        links.append(Link("out", j, out_axis, r.owner))
    return Relation(links)

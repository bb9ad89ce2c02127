"""Gemm and MatMul.

A constant right-hand matrix creates channels (the output features) and
consumes them (its reduction axis). Between two activations, MatMul couples
the reduction axes of both operands (zeroing channel k of one operand removes
the k-th term of the sum, so the other's k-th row can go too).
"""

from __future__ import annotations

from ..graph.view import attr
from .quant import is_weight
from .registry import Link, Reached, Relation, barrier, related, rule


def _present(t) -> bool:
    return t is not None and t.name != ""


# --- Gemm: Y = alpha * A' B' + beta * C, A' = A or A^T, B' = B or B^T -------------

def gemm_source(node, view):
    return [(0, 1)] if is_weight(view, node.inputs[1]) and not is_weight(view, node.inputs[0]) else []


def _gemm_bias(node, view, out_axis: int, owner) -> list[Link]:
    """C broadcasts to (M, N) unidirectionally: link it where it spans ``out_axis``."""
    if len(node.inputs) < 3 or not _present(node.inputs[2]):
        return []
    c = node.inputs[2]
    rank = view.rank(c)
    if rank is None:
        return []
    axis = out_axis - (2 - rank)
    if axis < 0 or view.dim(c, axis) in (1, None):
        return []
    return [Link("in", 2, axis, owner, "bias")]


@rule("Gemm", source=gemm_source)
def gemm(node, view, r: Reached):
    trans_a, trans_b = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    a_k = 0 if trans_a else 1  # the reduction axis of A
    b_k = 1 if trans_b else 0  # the reduction axis of B
    if r.side == "out":
        if r.axis == 1:
            return related(Link("in", 1, 1 - b_k, r.owner, "weight"), *_gemm_bias(node, view, 1, r.owner))
        return related(Link("in", 0, 1 - a_k, r.owner), *_gemm_bias(node, view, 0, r.owner))
    if r.index == 0:
        if r.axis == a_k:
            return related(Link("in", 1, b_k, r.owner, "weight"))
        return related(Link("out", 0, 0, r.owner), *_gemm_bias(node, view, 0, r.owner))
    if r.index == 2:
        rank = view.rank(node.inputs[2])
        out_axis = r.axis + 2 - rank
        return related(Link("out", 0, out_axis, r.owner))
    return barrier("channels reach Gemm's B operand as an activation")


# --- MatMul: numpy semantics, (..., M, K) @ (..., K, N) ---------------------------

def matmul_source(node, view):
    a, b = node.inputs
    if is_weight(view, b) and not is_weight(view, a) and view.rank(b) == 2:
        # The output's shape can be unknown where inference gave up upstream (a Reshape with -1
        # of an empty tensor, when a dynamic length was sized too small): its rank is A's then.
        rank = view.rank(node.outputs[0]) or view.rank(a)
        return [(0, rank - 1)] if rank else []
    return []


@rule("MatMul", source=matmul_source)
def matmul(node, view, r: Reached):
    ranks = [view.rank(t) for t in (*node.inputs, node.outputs[0])]
    if None in ranks:
        return barrier("operand shapes unknown")
    ra, rb, ro = ranks
    if ra < 2 or rb < 2:
        return barrier("vector operand")

    def operand(i, axis, owner, role="weight"):
        return Link("in", i, axis, owner, role if is_weight(view, node.inputs[i]) else "data")

    def batch_links(out_axis, owner, skip=None) -> Relation:
        links = [Link("out", 0, out_axis, owner)] if skip != "out" else []
        for i, rank in ((0, ra), (1, rb)):
            axis = out_axis - (ro - rank)
            if i != skip and axis >= 0 and view.dim(node.inputs[i], axis) not in (1, None):
                links.append(operand(i, axis, owner))
        between_activations = not any(is_weight(view, t) for t in node.inputs)
        return Relation(links, kind="heads" if between_activations else None)

    if r.side == "out":
        if r.axis == ro - 1:
            return related(operand(1, rb - 1, r.owner))
        if r.axis == ro - 2:
            return related(operand(0, ra - 2, r.owner))
        return batch_links(r.axis, r.owner, skip="out")
    if r.index == 0:
        if r.axis == ra - 1:
            return related(operand(1, rb - 2, r.owner))
        if r.axis == ra - 2:
            return related(Link("out", 0, ro - 2, r.owner))
        return batch_links(r.axis + ro - ra, r.owner, skip=0)
    if r.axis == rb - 2:
        return related(operand(0, ra - 1, r.owner))
    if r.axis == rb - 1:
        return related(Link("out", 0, ro - 1, r.owner))
    return batch_links(r.axis + ro - rb, r.owner, skip=1)

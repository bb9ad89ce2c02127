"""Pooling, reductions, Resize and Pad: channels pass through on axes they leave alone."""

from __future__ import annotations

import numpy as np

from ..graph.view import attr
from .registry import (
    Link,
    Reached,
    Relation,
    barrier,
    normalise_axis,
    passthrough,
    related,
    rule,
)

POOLS = "MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool GlobalLpPool".split()
REDUCES = (
    "ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
    "ReduceLogSumExp ReduceSumSquare"
).split()


@rule(*POOLS)
def pool(node, view, r: Reached):
    if r.index != 0 or len(node.outputs) > 1 and node.outputs[1].outputs:
        return barrier("pooling indices output is used")
    if r.axis > 1:
        return barrier("channels reach a pooled (spatial) axis")
    return passthrough(r)


def _reduced_axes(node, view, rank: int) -> list[int] | None:
    """Reduced axes; [] means all. None when they are computed at run time."""
    if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].name:
        axes = view.int_values(node.inputs[1])
        if axes is None:
            return None
    else:
        axes = list(attr(node, "axes", []) or [])
    return sorted(normalise_axis(a, rank) for a in axes)


@rule(*REDUCES)
def reduce(node, view, r: Reached):
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    axes = _reduced_axes(node, view, rank)
    if axes is None:
        return barrier("reduced axes are computed at run time")
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):
            return passthrough(r)
        return barrier("reduces over all axes")
    keep = int(attr(node, "keepdims", 1))
    if r.side == "in":
        if r.axis in axes:
            if view.prune_hidden and node.op in ("ReduceMean", "ReduceL2", "ReduceSumSquare") and keep:
                return Relation(kind="hidden")  # decomposed LayerNorm/RMSNorm statistics (--prune-hidden)
            return barrier(f"{node.op} reduces over the channel axis")
        out_axis = r.axis if keep else r.axis - sum(a < r.axis for a in axes)
        return related(Link("out", 0, out_axis, r.owner))
    if keep:
        return related(Link("in", 0, r.axis, r.owner))
    kept = [a for a in range(rank) if a not in axes]
    return related(Link("in", 0, kept[r.axis], r.owner))


def _resize_axes(node, rank: int) -> list[int]:
    return [normalise_axis(a, rank) for a in attr(node, "axes", None) or range(rank)]


def _resize_sizes(node):
    return node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None


def resize_rewrite(node, view, cut):
    sizes = _resize_sizes(node)
    if sizes is None:
        return
    rank = view.rank(node.inputs[0])
    values = np.array(view.value(sizes), copy=True)
    for k, axis in enumerate(_resize_axes(node, rank)):
        values[k] = cut.new_dim(node.outputs[0], axis)
    cut.replace_constant(node, 3, values)


@rule("Resize", "Upsample", rewrite=resize_rewrite)
def resize(node, view, r: Reached):
    if r.index != 0:
        return barrier("channels reach a Resize parameter")
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    scales_input = 1 if node.op == "Upsample" else 2
    axes = _resize_axes(node, rank)
    if r.axis in axes:
        k = axes.index(r.axis)
        if len(node.inputs) > scales_input and node.inputs[scales_input].name:
            scales = view.value(node.inputs[scales_input])
            if scales is None:
                return barrier("scales are computed at run time")
            if scales.size and float(scales[k]) != 1.0:
                return barrier("resizes along the channel axis")
        sizes = _resize_sizes(node)
        if sizes is not None and view.value(sizes) is None:
            return barrier("sizes are computed at run time")
    return passthrough(r)


@rule("Pad")
def pad(node, view, r: Reached):
    if r.index != 0:
        return barrier("channels reach a Pad parameter")
    rank = view.rank(node.inputs[0])
    if len(node.inputs) > 1 and node.inputs[1].name:
        pads = view.int_values(node.inputs[1])
        if pads is None:
            return barrier("pads are computed at run time")
        axes_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        axes = view.int_values(axes_t) if axes_t is not None else list(range(rank))
        if axes is None:
            return barrier("pad axes are computed at run time")
    else:
        pads, axes = list(attr(node, "pads", [])), list(range(rank))
    axes = [normalise_axis(a, rank) for a in axes]
    if r.axis in axes:
        k = axes.index(r.axis)
        if pads[k] or pads[k + len(axes)]:
            return barrier("pads the channel axis")
    return passthrough(r)

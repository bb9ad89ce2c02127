"""Pooling, reductions, Resize and Pad: channels pass through on axes they leave alone (also when
Pad's pads, or Resize's sizes or scales, are computed at run time from shapes and leave the channel
axis as it is: pads 0, scale 1, size the input's own channel count)."""

from __future__ import annotations

import numpy as np

from ..graph.shape_math import evaluate_at
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

# The reductions that compute a normalisation's statistics over the channels (a LayerNorm or
# RMSNorm written out op by op, ConvNeXt V2's global response normalisation): `prune_hidden`
# lets the channels through them.
NORM_STATISTICS = ("ReduceMean", "ReduceL2", "ReduceSumSquare")
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
            statistic = node.op in NORM_STATISTICS and keep
            if view.prune_hidden and statistic:
                return Relation(kind="hidden")  # decomposed LayerNorm/RMSNorm/GRN statistics (--prune-hidden)
            if statistic:  # name the option that lifts it: the summary and the weak-cut warning show it
                return barrier(f"{node.op} reduces over the channel axis, as a hand-written LayerNorm, RMSNorm "
                               "or GRN does (the hidden size is pruned only with `prune_hidden`)")
            return barrier(f"{node.op} reduces over the channel axis")
        out_axis = r.axis if keep else r.axis - sum(a < r.axis for a in axes)
        return related(Link("out", 0, out_axis, r.owner))
    if keep:
        return related(Link("in", 0, r.axis, r.owner))
    kept = [a for a in range(rank) if a not in axes]
    return related(Link("in", 0, kept[r.axis], r.owner))


def _resize_axes(node, rank: int) -> list[int]:
    return [normalise_axis(a, rank) for a in attr(node, "axes", None) or range(rank)]


def _resize_input(node, name: str):
    """Input ``name`` ("scales" or "sizes") of a Resize or Upsample; None when absent."""
    index = {"scales": 1 if node.op == "Upsample" else 2, "sizes": None if node.op == "Upsample" else 3}[name]
    return node.inputs[index] if index is not None and len(node.inputs) > index and node.inputs[index].name else None


def resize_rewrite(node, view, cut):
    sizes = _resize_input(node, "sizes")
    if sizes is None or view.value(sizes) is None:
        return  # scales, or sizes computed at run time from the input's own shape: right by themselves
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
    axes = _resize_axes(node, rank)
    if r.axis not in axes:
        return passthrough(r)
    k = axes.index(r.axis)
    scales, sizes = _resize_input(node, "scales"), _resize_input(node, "sizes")
    if scales is not None and view.value(scales) is not None:
        values = view.value(scales)
        if values.size and float(values[k]) != 1.0:
            return barrier("resizes along the channel axis")
    if sizes is not None and view.value(sizes) is not None:
        if int(np.atleast_1d(view.value(sizes))[k]) != view.dim(node.inputs[0], r.axis):
            return barrier("resizes along the channel axis")
    if sizes is not None and view.value(sizes) is None or scales is not None and view.value(scales) is None:
        key = ("resize", node.name, r.axis)
        if key not in view.memo:
            view.memo[key] = _computed_resize_problem(node, view, r.axis, k, len(axes))
        return barrier(view.memo[key]) if view.memo[key] else passthrough(r)
    return passthrough(r)


# Made-up dims at which pads computed at run time are evaluated (for the tensors whose shapes they
# read, truncated to each one's rank): odd and even, small and large, distinct within a row, so
# that an entry reading a dim shows it; the tensors' own (pinned) shapes are evaluated first. Each
# is evaluated at two channel counts.
_MADE_UP = ((2, 5, 7, 11, 13, 17, 19, 23), (3, 8, 30, 33, 41, 47, 53, 59), (1, 12, 16, 64, 29, 31, 37, 43),
            (4, 96, 225, 512, 97, 129, 65, 33))
_OTHER_CHANNELS = 10  # added to the channel count for the second evaluation


def _shapes_at(view, dims, axis: int, more: int, only=None):
    """``dims_of`` for evaluate_at: each tensor read has the first entries of ``dims`` (its own shape
    where ``dims`` is None), with ``more`` channels on ``axis`` (only tensor ``only``'s, if given)."""
    def dims_of(tensor):
        rank = view.rank(tensor)
        if dims is None:
            shape = view.shape(tensor)
        else:
            shape = dims[:rank] if rank is not None and rank <= len(dims) else None
        if shape is None or None in shape:
            return None
        grown = more if only is None or tensor is only else 0
        return [d + grown if a == axis else d for a, d in enumerate(shape)]
    return dims_of


def made_up_evaluations(view, tensor, axis: int, data=None):
    """``(dims, more, value, shape)`` for ``tensor``, computed at run time from shapes: evaluated at
    the tensors' own shapes (skipped where one of them is unknown), then at each made-up row of
    ``_MADE_UP``, each time with 0 and ``_OTHER_CHANNELS`` more channels on ``axis`` (on ``data``'s
    axis only, when given; else on every tensor's). ``shape`` is ``data``'s shape there (() without
    ``data``); ``value`` is None where the tensor cannot be evaluated. What the computed Pad, Resize
    and Expand rules check their values on."""
    for dims in (None, *_MADE_UP):
        for more in (0, _OTHER_CHANNELS):
            dims_of = _shapes_at(view, dims, axis, more, only=data)
            value, shape = evaluate_at(tensor, dims_of), dims_of(data) if data is not None else ()
            if (value is None or shape is None) and dims is None:
                break  # a shape read is unknown: the made-up ones decide
            yield dims, more, value, shape


def _computed_pads_problem(node, view, axis: int, k: int, n: int) -> str | None:
    """Why pads computed at run time (TensorFlow's 'same' padding from the input's H and W) do not
    let channels through on ``axis``, entry ``k`` of the ``n`` padded axes; None when they do: at
    the shapes of the tensors they read and at made-up ones (graph/shape_math.py), they are 0 on
    ``axis`` and the same at two channel counts. The pruned model keeps them computed, and right:
    they read nothing the cut changes. (Reading another tensor's channel count is the Shape rule's
    barrier.) Sampled, like every shape_math check: pads 0 here yet not at some other H would
    need an exporter that pads channels by H."""
    seen: dict = {}  # made-up row -> the pads seen at its two channel counts
    for dims, _, pads, _ in made_up_evaluations(view, node.inputs[1], axis):
        if pads is None or pads.shape != (2 * n,) or pads.dtype.kind not in "iu":
            return "pads are computed at run time and cannot be evaluated from shapes"
        if pads[k] or pads[k + n]:
            return "pads the channel axis (pads computed at run time)"
        seen.setdefault(dims, set()).add(tuple(pads.tolist()))
        if len(seen[dims]) > 1:
            return "pads are computed from the channel count"
    return None


def _computed_resize_problem(node, view, axis: int, k: int, n: int) -> str | None:
    """Why sizes or scales computed at run time (a Resize to a skip connection's size: sizes =
    Concat(Shape(x)[0:2], Shape(skip)[2:4]); scales = the ratio of two shapes' H and W) change
    channel ``axis``, entry ``k`` of the ``n`` resized axes; None when they leave it as it is: at the
    shapes of the tensors they read and at made-up ones, the scale there is 1, or the size is the
    input's own channel count, at two channel counts of the input. The pruned model keeps them
    computed, and right. Only the input's channel count varies: a size read from another tensor's
    channel count (equal today) would stay at that tensor's count when the input's group is cut,
    unless both were cut alike, which one rule cannot see, so it is a barrier (and the Shape rule
    blocks the other tensor's group)."""
    data = node.inputs[0]
    scales = _resize_input(node, "scales")
    name, tensor = ("scales", scales) if scales is not None and view.value(scales) is None \
        else ("sizes", _resize_input(node, "sizes"))
    kinds = "f" if name == "scales" else "iu"
    for _, more, value, shape in made_up_evaluations(view, tensor, axis, data):
        if value is None or shape is None or value.shape != (n,) or value.dtype.kind not in kinds:
            return f"{name} are computed at run time and cannot be evaluated from shapes"
        channels = shape[axis]
        if name == "scales" and float(value[k]) != 1.0:
            return "resizes along the channel axis (scales computed at run time)"
        if name == "sizes" and int(value[k]) != channels:
            if more and channels - more == int(value[k]):
                return "sizes read a channel count other than the input's own"
            return "resizes along the channel axis (sizes computed at run time)"
    return None


@rule("Pad")
def pad(node, view, r: Reached):
    if r.index != 0:
        return barrier("channels reach a Pad parameter")
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    if len(node.inputs) > 1 and node.inputs[1].name:
        pads = view.int_values(node.inputs[1])
        axes_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        axes = view.int_values(axes_t) if axes_t is not None else list(range(rank))
        if axes is None:
            return barrier("pad axes are computed at run time")
    else:
        pads, axes = list(attr(node, "pads", [])), list(range(rank))
    axes = [normalise_axis(a, rank) for a in axes]
    if r.axis not in axes:
        return passthrough(r)
    k = axes.index(r.axis)
    if pads is None:
        key = ("pads", node.name, r.axis)
        if key not in view.memo:
            view.memo[key] = _computed_pads_problem(node, view, r.axis, k, len(axes))
        return barrier(view.memo[key]) if view.memo[key] else passthrough(r)
    if pads[k] or pads[k + len(axes)]:
        return barrier("pads the channel axis")
    return passthrough(r)

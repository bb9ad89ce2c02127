"""Ops that repeat a tensor's values along axes: Expand, Tile; and ConstantOfShape, which fills one.

Expand broadcasts: an axis the input has at full size passes its channels
through; an axis it expands from size 1 repeats one slice, so positions
removed there are copies of it and the input is left as it is (grouped-query
attention's ``repeat_kv``: key/value heads (B, kv, 1, T, d) expanded to
(B, kv, n_rep, T, d), then reshaped to the n_heads = kv * n_rep query heads;
reshape.py decides whether the query heads are cut within each key/value
group or whole groups go, ``prune_kv_groups``). The target shape's entry for
a cut axis is rewritten where it is a constant (or a constant piece of a
Concat); one computed at run time passes only where it is 1 or the input's
own channel count at any width (checked by evaluating it, as Resize's
sizes), so it stays right after the cut by itself. Tile repeats from size 1
as Expand does (its count rewritten); a whole axis tiled n times carries each
channel n times, position i of every copy tied (with ``prune_kv_groups``). ConstantOfShape's output
carries channels where its shape is a constant entry, rewritten likewise.
"""

from __future__ import annotations

import numpy as np

from .pool import made_up_evaluations
from .registry import Link, Reached, Relation, barrier, other_side, related, rule, strided
from .reshape import _concat_piece, _shape_entry


def _entry_index(view, node, out_axis: int) -> int | None:
    """The entry of a shape input (Expand's input 1, ConstantOfShape's input 0) that sizes ``out_axis``
    of the output (right-aligned: Expand broadcasts numpy-style); None where the shape is shorter."""
    shape_input = node.inputs[1] if node.op == "Expand" else node.inputs[0]
    length = view.dim(shape_input, 0) if view.rank(shape_input) == 1 else None
    rank = view.rank(node.outputs[0])
    if length is None or rank is None:
        return None
    entry = out_axis - (rank - length)
    return entry if entry >= 0 else None


def _rewrite_shape(node, view, cut, index: int) -> None:
    """Write the new width of each cut output axis into shape input ``index``: the constant, or the
    constant piece of a Concat that sizes it; an entry of 1 (Expand keeps the input's size there) or
    one computed at run time (the input's own width, checked by the rule) is right by itself."""
    out = node.outputs[0]
    shape_input = node.inputs[index]
    constant = view.value(shape_input)
    values = None if constant is None else np.array(np.atleast_1d(constant), dtype=np.int64, copy=True)
    for axis in range(view.rank(out) or 0):
        new = cut.new_dim(out, axis)
        entry = _entry_index(view, node, axis)
        if new == view.dim(out, axis) or entry is None:
            continue
        current = _shape_entry(view, shape_input, entry)
        if current in (None, 1):
            continue
        if values is not None:
            values[entry] = new
            continue
        concat, i, at = _concat_piece(view, shape_input, entry)
        piece = np.array(np.atleast_1d(view.value(concat.inputs[i])), dtype=np.int64, copy=True)
        piece[at] = new
        cut.replace_constant(concat, i, piece.reshape(np.shape(view.value(concat.inputs[i]))))
    if values is not None and not np.array_equal(values, np.atleast_1d(constant)):
        cut.replace_constant(node, index, values.reshape(np.shape(constant)))


def expand_rewrite(node, view, cut):
    _rewrite_shape(node, view, cut, 1)


def _computed_entry_problem(node, view, in_axis: int, entry: int) -> str | None:
    """Why an Expand shape entry computed at run time does not follow the input's width on ``in_axis``;
    None when, at the input's shape and at made-up ones, at two widths, it is 1 or that width."""
    for _, _, value, shape in made_up_evaluations(view, node.inputs[1], in_axis, node.inputs[0]):
        if value is None or shape is None or value.ndim != 1 or len(value) <= entry:
            return "expanded shape is computed at run time and cannot be evaluated from shapes"
        if int(value[entry]) not in (1, shape[in_axis]):
            return "expanded shape reads a channel count other than the input's own"
    return None


def _entry_follows_input(node, view, out_axis: int, in_axis: int) -> str | None:
    """None when the target's entry for ``out_axis`` stays right as the input's ``in_axis`` is cut."""
    entry = _entry_index(view, node, out_axis)
    if entry is None or _shape_entry(view, node.inputs[1], entry) is not None:
        return None  # the input's own size, or a constant (rewritten)
    key = ("expand", node.name, in_axis)
    if key not in view.memo:
        view.memo[key] = _computed_entry_problem(node, view, in_axis, entry)
    return view.memo[key]


@rule("Expand", rewrite=expand_rewrite)
def expand(node, view, r: Reached):
    if r.side == "in" and r.index != 0:
        return barrier("channels reach the expanded shape")
    data, out = node.inputs[0], node.outputs[0]
    in_rank, out_rank = view.rank(data), view.rank(out)
    if in_rank is None or out_rank is None:
        return barrier("shape unknown")
    in_axis = r.axis if r.side == "in" else r.axis - (out_rank - in_rank)
    out_axis = r.axis + (out_rank - in_rank) if r.side == "in" else r.axis
    if r.side == "in" and view.dim(out, out_axis) != view.dim(data, in_axis):
        return barrier("repeats the channel axis")
    if in_axis < 0 or view.dim(data, in_axis) == 1:  # a repeat: the positions are copies of one slice
        entry = _entry_index(view, node, out_axis)
        if entry is None or _shape_entry(view, node.inputs[1], entry) is None:
            return barrier("repeats along the channel axis to a size computed at run time")
        return Relation()
    if view.dim(data, in_axis) != view.dim(out, out_axis):
        return barrier("shape unknown")
    problem = _entry_follows_input(node, view, out_axis, in_axis)
    if problem:
        return barrier(problem)
    return related(Link("out", 0, out_axis, r.owner) if r.side == "in" else Link("in", 0, in_axis, r.owner))


def constant_of_shape_rewrite(node, view, cut):
    _rewrite_shape(node, view, cut, 0)


@rule("ConstantOfShape", rewrite=constant_of_shape_rewrite)
def constant_of_shape(node, view, r: Reached):
    """One value everywhere: positions cut on an axis its shape sizes with a constant need nothing else."""
    if r.side == "in":
        return barrier("channels reach the filled shape")
    entry = _entry_index(view, node, r.axis)
    if entry is None or _shape_entry(view, node.inputs[0], entry) is None:
        return barrier("fills a shape computed at run time")
    return Relation()


def tile_rewrite(node, view, cut):
    """A cut axis that Tile repeats from size 1 is repeated fewer times; elsewhere the count stays."""
    repeats = np.array(view.int_values(node.inputs[1]), dtype=np.int64)
    data, out = node.inputs[0], node.outputs[0]
    new = repeats.copy()
    for axis in range(len(repeats)):
        if view.dim(data, axis) == 1 and cut.new_dim(out, axis) != view.dim(out, axis):
            new[axis] = cut.new_dim(out, axis)
    if not np.array_equal(new, repeats):
        cut.replace_constant(node, 1, new)


@rule("Tile", rewrite=tile_rewrite)
def tile(node, view, r: Reached):
    """A repeat from size 1 (``repeat_kv`` written as Unsqueeze -> Tile -> Reshape) as Expand's; the
    whole axis repeated n times: each channel appears n times, so it goes with all its copies (position
    i of every copy together), with ``prune_kv_groups`` only."""
    if r.side == "in" and r.index != 0:
        return barrier("channels reach the repeat counts")
    repeats = view.int_values(node.inputs[1])
    size = view.dim(node.inputs[0], r.axis)
    if repeats is None or size is None or len(repeats) <= r.axis:
        return barrier("repeat counts computed at run time")
    n = repeats[r.axis]
    if n == 1:
        return related(Link(other_side(r), 0, r.axis, r.owner))
    if size == 1 and r.side == "out":
        return Relation()
    if not view.prune_kv_groups:  # a copy can only lose what every copy loses: the channel itself
        return barrier("repeats the whole channel axis (key/value heads as k.repeat(1, n, 1, 1)): they stay "
                       "whole (`prune_kv_groups` cuts each with all its copies)")
    if r.side == "in":
        return related(Link("out", 0, r.axis, np.tile(r.owner, n)))
    return related(Link("in", 0, r.axis, r.owner[:size].copy()), ties=strided(size * n, size))

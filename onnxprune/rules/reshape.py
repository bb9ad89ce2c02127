"""Ops that reinterpret axes: Reshape, Flatten, Squeeze, Unsqueeze; and Shape (shape arithmetic).

Flatten and Reshape repeat each channel over the axes it is merged with, and
a Reshape that splits the channel axis (C -> (G, C/G), heads) ties each block
of C/G positions into one unit. Targets are recomputed where they are
constants or constant pieces of a Concat, left alone where they read the
tensor's own width at run time; other targets are barriers. Shape is safe
when what reads the channel count stays right after the cut.
"""

from __future__ import annotations

import numpy as np

from ..graph.view import attr
from .registry import (
    Link,
    Reached,
    Relation,
    barrier,
    blocks_of,
    normalise_axis,
    related,
    rule,
    strided,
)
from .shape import _axis, _chunk_of, _slice_spec

# --- Reshape, Flatten, Squeeze, Unsqueeze: one index mapping ------------------------

def _prefix_products(shape) -> list[int]:
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def map_reshape(src, dst, axis: int, owner: np.ndarray, dynamic: set[int], picked_apart=lambda j: False,
                fixed: frozenset[int] = frozenset()):
    """Map channel ``axis`` of a tensor of shape ``src`` onto the same data in shape ``dst``.

    An axis split in two, C -> (G, C/G), is tracked on G with each block of C/G
    tied (heads) unless ``picked_apart(G's axis)``: a fused projection split into
    (3, E) whose q, k, v are then taken apart along the 3, or query heads split
    into (key/value heads, repeats) whose repeats are cut within each group;
    then it is tracked on E with the positions equal modulo E tied (q_e, k_e, v_e
    go together; the r-th query head of every group). Source axes merged into a
    destination axis in ``fixed`` (the target spells its size as a constant) are
    not dynamic, whatever inference said of them.
    Returns (dst axis, owner on it, ties on the source axis) or a barrier reason.
    """
    if None in src or None in dst or 0 in src or 0 in dst:
        return "reshape with unknown or empty dims"
    ps, pd = _prefix_products(src), _prefix_products(dst)
    before, after, size = ps[axis], ps[axis + 1], src[axis]
    if size > 1 and before in pd and after in pd:  # the axis survives whole, maybe split
        j = max(i for i, p in enumerate(pd) if p == before)
        k = min(i for i, p in enumerate(pd) if p == after)
        if k - j == 1:
            return j, owner, []
        grid = owner.reshape(dst[j:k])
        for t in range(k - j):
            if dst[j + t] == 1:
                continue
            line = np.moveaxis(grid, t, 0).reshape(dst[j + t], -1)[:, 0]
            shape = [1] * (k - j)
            shape[t] = dst[j + t]
            if np.array_equal(grid, np.broadcast_to(line.reshape(shape), grid.shape)):
                return j + t, line, []
        if k - j == 2 and picked_apart(j):
            inner = dst[j + 1]
            return j + 1, owner[:inner].copy(), strided(size, inner)
        if k - j == 3 and picked_apart(j):  # (3, heads, head_dim): q, k, v taken apart, each split in heads
            part, heads = size // dst[j], dst[j + 1]
            block = part // heads
            ties = [np.concatenate([np.arange(p * part + h * block, p * part + (h + 1) * block)
                                    for p in range(dst[j])]) for h in range(heads)]
            reps = np.array([next((int(o) for o in owner[t] if o >= 0), -1) for t in ties])
            return j + 1, reps, ties
        block = size // dst[j]  # whole blocks (e.g. heads) become units
        ties = blocks_of(size, block)
        reps = np.array([next((int(o) for o in owner[b] if o >= 0), -1) for b in ties])
        return j, reps, ties
    # merged with neighbouring axes into one destination axis: the one whose
    # extent starts at or before the channel axis and ends after it
    cover = [j for j in range(len(dst)) if pd[j] <= before < pd[j + 1] and pd[j + 1] >= after]
    if not cover or pd[cover[0]] not in ps or pd[cover[0] + 1] not in ps:
        return "reshape mixes the channel axis with other axes"
    j = cover[0]
    a0 = max(i for i, p in enumerate(ps) if p == pd[j] and i <= axis)
    a1 = min(i for i, p in enumerate(ps) if p == pd[j + 1] and i > axis)
    merged = [a for a in range(a0, a1) if a != axis]
    varies = any(a in dynamic and src[a] != 1 for a in merged) or any(a in dynamic for a in merged if a < axis)
    if varies and j not in fixed:
        return "reshape merges the channel axis with a dynamic axis"
    outer, inner = before // pd[j], pd[j + 1] // after
    return j, np.tile(np.repeat(owner, inner), outer), []


_AXIS_MOVERS = {"Transpose", "Unsqueeze", "Squeeze", "Identity"}


def _picked_apart(view, tensor, axis: int, depth: int = 6) -> bool:
    """Whether ``axis`` of ``tensor`` is, a few axis moves later, indexed by a scalar Gather,
    or cut by a Split/Slice along it (q, k, v taken out of a fused projection)."""
    for node, _ in view.consumers(tensor):
        if node.op == "Gather" and _axis(node, view, tensor) == axis and view.rank(node.inputs[1]) == 0:
            return True
        if node.op in ("Split", "Slice") and _split_or_slice_axis(node, view, tensor) == axis:
            return True
        if node.op in _AXIS_MOVERS and depth > 0:
            moved = _moved_axis(node, view, axis)
            if moved is not None and _picked_apart(view, node.outputs[0], moved, depth - 1):
                return True
    return False


def _split_or_slice_axis(node, view, tensor) -> int | None:
    if node.op == "Split":
        return _axis(node, view, tensor)
    spec = _slice_spec(node, view)
    return next(iter(spec)) if spec is not None and len(spec) == 1 else None


def _moved_axis(node, view, axis: int) -> int | None:
    """Where ``axis`` of the input is in the output of a Transpose/Unsqueeze/Squeeze/Identity."""
    rank_in, rank_out = view.rank(node.inputs[0]), view.rank(node.outputs[0])
    if rank_in is None or rank_out is None:
        return None
    if node.op == "Identity":
        return axis
    if node.op == "Transpose":
        perm = list(attr(node, "perm", None) or reversed(range(rank_in)))
        return perm.index(axis)
    axes = attr(node, "axes", None)
    if axes is None and len(node.inputs) > 1:
        axes = view.int_values(node.inputs[1])
    if axes is None:
        return None
    if node.op == "Unsqueeze":
        inserted = sorted(normalise_axis(a, rank_out) for a in axes)
        position = axis
        for a in inserted:
            if a <= position:
                position += 1
        return position
    removed = {normalise_axis(a, rank_in) for a in axes}
    return None if axis in removed else axis - sum(1 for a in removed if a < axis)


def _reshape_target_ok(node, view, out_axis: int, in_axis: int) -> str | None:
    """A Reshape target entry we can rewrite (a constant, -1, a constant piece of a Concat),
    or one that stays right by itself: the data's own channel count, read at run time."""
    if node.op != "Reshape" or view.is_constant(node.inputs[1]):
        return None
    if _shape_entry(view, node.inputs[1], out_axis) is not None:
        return None
    if _reads_own_dim(view, node, out_axis) == in_axis or _static_piece(view, node, out_axis):
        return None
    return "Reshape target is computed at run time"


def _static_piece(view, node, out_axis: int) -> bool:
    """Whether entry ``out_axis`` of a Concat-built Reshape target is a one-element piece computed at
    run time for a dim that is static in the model (``reshape(b, n, c)`` with ``c = x.size(2)`` of
    another tensor): its value never changes, so the cut may write the new width there as a constant."""
    found = _concat_piece(view, node.inputs[1], out_axis)
    if found is None or view.is_dynamic(node.outputs[0], out_axis) or view.dim(node.outputs[0], out_axis) is None:
        return False
    concat, i, _ = found
    only_here = len(view.consumers(concat.outputs[0])) == 1  # a shared target is rewritten for all its readers
    return only_here and view.shape(concat.inputs[i]) in ((1,), ())


_ONE_ELEMENT_OPS = {"Squeeze", "Unsqueeze", "Cast", "Identity"}


def _reads_own_dim(view, node, out_axis: int) -> int | None:
    """The axis of a Reshape's data whose size entry ``out_axis`` of the target is, at run time:
    Shape(data) -> Gather/Slice of one entry -> Squeeze/Unsqueeze/Cast -> a Concat piece
    (torch's ``x.view(-1, x.size(-1))``). None for any other entry."""
    found = _concat_piece(view, node.inputs[1], out_axis)
    if found is None:
        return None
    concat, i, _ = found
    t = concat.inputs[i]
    while view.producer(t) is not None and view.producer(t).op in _ONE_ELEMENT_OPS:
        t = view.producer(t).inputs[0]
    picker = view.producer(t)
    if picker is None or picker.op not in ("Gather", "Slice") or int(np.prod(view.shape(t) or [0])) != 1:
        return None
    source = view.producer(picker.inputs[0])
    if source is None or source.op != "Shape" or source.inputs[0] is not node.inputs[0]:
        return None
    entry = _picked_entry(view, picker)
    rank = view.rank(node.inputs[0])
    if entry is None or rank is None:
        return None
    start = normalise_axis(int(attr(source, "start", 0)), rank)
    end = attr(source, "end", None)
    end = rank if end is None else min(normalise_axis(int(end), rank), rank)
    return start + normalise_axis(entry, end - start)


def _picked_entry(view, picker) -> int | None:
    """The one entry of a 1-D shape tensor that a Gather (axis 0) or a Slice takes."""
    if picker.op == "Gather":
        picked = view.int_values(picker.inputs[1])
        return picked[0] if picked is not None and len(picked) == 1 and int(attr(picker, "axis", 0)) == 0 else None
    spec = _slice_spec(picker, view)
    return spec[0][0] if spec is not None and list(spec) == [0] and spec[0][2] == 1 else None


_SHAPE_STEPS = _ONE_ELEMENT_OPS | {"Gather", "Slice", "Concat", "Add", "Sub", "Mul", "Div"}
# (op, input) that may size the op's output from its own data's shape (torch's F.interpolate(x,
# size=skip.shape[2:]) reads x's N and C): the op's rule, reached on the same channel axis of that
# data, checks that the entry keeps the channel count (rules/pool.py's Resize, rules/repeat.py's Expand).
_SIZED_BY_OWN_SHAPE = {("Resize", 2), ("Resize", 3), ("Upsample", 1), ("Expand", 1)}


def _width_read_stays_right(view, shape_node, reader, axis: int) -> bool:
    """Whether what ``reader`` computes from the Shape's output (the channel count) reaches nothing
    but shape arithmetic that stays right after the cut: the target of a Reshape of the same tensor
    at the entry that carries ``axis``, the bounds of a chunk of it (see _chunk_of), or the sizes,
    scales of a Resize or Upsample of it, the shape of an Expand of it (see _SIZED_BY_OWN_SHAPE)."""
    data = shape_node.inputs[0]
    queue, seen = list(reader.outputs), set()
    while queue:
        t = queue.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if view.is_graph_output(t):
            return False
        for consumer, index in view.consumers(t):
            if consumer.op == "Reshape" and index == 1:
                rank = view.rank(consumer.outputs[0]) or 0
                if consumer.inputs[0] is not data or axis not in [_reads_own_dim(view, consumer, j)
                                                                   for j in range(rank)]:
                    return False
            elif consumer.op == "Slice" and index in (1, 2):
                if consumer.inputs[0] is not data or _chunk_of(consumer, view, axis) is None:
                    return False
            elif (consumer.op, index) in _SIZED_BY_OWN_SHAPE:
                if consumer.inputs[0] is not data:
                    return False  # another tensor's width: it would not follow this one's cut
            elif consumer.op in _SHAPE_STEPS and (index == 0 or consumer.op != "Slice"):
                queue.extend(consumer.outputs)
            else:
                return False
    return True


def _concat_piece(view, tensor, index: int):
    """(Concat node, input index, position in that input) of entry ``index`` of a Concat-built shape."""
    node = view.producer(tensor)
    if node is None or node.op != "Concat":
        return None
    offset = 0
    for i, piece in enumerate(node.inputs):
        n = view.dim(piece, 0) if view.rank(piece) == 1 else 1
        if n is None:
            return None
        if index < offset + n:
            return node, i, index - offset
        offset += n
    return None


def _shape_entry(view, tensor, index: int):
    """Entry ``index`` of a 1-D shape tensor: a constant, or a constant piece of a Concat."""
    value = view.value(tensor)
    if value is not None:
        return int(np.atleast_1d(value)[index])
    found = _concat_piece(view, tensor, index)
    if found is None:
        return None
    node, i, at = found
    v = view.value(node.inputs[i])
    return None if v is None else int(np.atleast_1d(v)[at])


def reshape_rewrite(node, view, cut):
    if node.op != "Reshape":
        return
    out = node.outputs[0]
    if view.is_constant(node.inputs[1]):
        target = np.array(view.value(node.inputs[1]), dtype=np.int64, copy=True)
        changed = False
        for j in range(len(target)):
            new = cut.new_dim(out, j)
            if new != view.dim(out, j) and target[j] != -1:
                target[j] = new
                changed = True
        if changed:
            cut.replace_constant(node, 1, target)
        return
    for j in range(view.rank(out) or 0):  # a Concat-built target: rewrite its constant pieces
        new = cut.new_dim(out, j)
        if new == view.dim(out, j):
            continue
        entry = _shape_entry(view, node.inputs[1], j)
        if entry is None and _reads_own_dim(view, node, j) is None and _static_piece(view, node, j):
            concat, i, _ = _concat_piece(view, node.inputs[1], j)
            cut.replace_constant(concat, i, np.array([new], dtype=np.int64))  # a static dim: now a constant
            continue
        if entry in (None, -1):
            continue
        concat, i, at = _concat_piece(view, node.inputs[1], j)
        piece = np.array(np.atleast_1d(view.value(concat.inputs[i])), dtype=np.int64, copy=True)
        piece[at] = new
        cut.replace_constant(concat, i, piece.reshape(np.shape(view.value(concat.inputs[i]))))


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze", rewrite=reshape_rewrite)
def reshape(node, view, r: Reached):
    if r.side == "in" and r.index != 0:
        return barrier("channels reach the target shape")
    src_t, dst_t = (node.inputs[0], node.outputs[0]) if r.side == "in" else (node.outputs[0], node.inputs[0])
    src, dst = view.shape(src_t), view.shape(dst_t)
    if src is None or dst is None:
        return barrier("shape unknown")
    dynamic = {a for a in range(len(src)) if view.is_dynamic(src_t, a)}
    spelled = {a for a in range(len(view.shape(node.outputs[0])))
               if node.op == "Reshape" and (_shape_entry(view, node.inputs[1], a) or 0) > 0}
    if r.side == "out":  # dims the target spells as constants are fixed
        dynamic -= spelled
    mapped = map_reshape(src, dst, r.axis, r.owner, dynamic,
                         lambda j: _picked_apart(view, node.outputs[0], j) if r.side == "in"
                         else not view.prune_kv_groups and _repeated(view, node.inputs[0], j + 1),
                         frozenset(spelled) if r.side == "in" else frozenset())
    if isinstance(mapped, str):
        return barrier(mapped)
    axis, owner, ties = mapped
    if r.side == "in" and dst[axis] != src[r.axis] and not view.prune_kv_groups \
            and _repeated(view, node.inputs[0], r.axis + 1):
        return barrier("key/value heads merged with their repeats for the query heads (grouped-query attention): "
                       "they stay whole, the query heads are cut within each group (`prune_kv_groups` cuts "
                       "whole groups)")
    problem = _reshape_target_ok(node, view, *((axis, r.axis) if r.side == "in" else (r.axis, axis)))
    if problem:
        return barrier(problem)
    return related(Link("out" if r.side == "in" else "in", 0, axis, owner), ties=ties)


def _repeated(view, tensor, axis: int) -> bool:
    """Whether ``axis`` of ``tensor`` repeats one slice: an Expand's (or Tile's) output where its input
    has size 1 (or no axis), as ``repeat_kv`` repeats each key/value head for its group of query heads."""
    node = view.producer(tensor)
    if node is None or node.op not in ("Expand", "Tile") or (view.dim(tensor, axis) or 0) <= 1:
        return False
    in_axis = axis - ((view.rank(tensor) or 0) - (view.rank(node.inputs[0]) or 0))
    return in_axis < 0 or view.dim(node.inputs[0], in_axis) == 1


# --- Shape: reading a tensor's dims ---------------------------------------------------

@rule("Shape")
def shape(node, view, r: Reached):
    """Safe when no consumer reads the channel count: Gather/Slice of other entries."""
    rank = view.rank(node.inputs[0])
    start = normalise_axis(int(attr(node, "start", 0)), rank)
    end = attr(node, "end", None)
    end = rank if end is None else min(normalise_axis(int(end), rank), rank)
    if not start <= r.axis < end:
        return Relation()
    entry = r.axis - start
    if view.is_graph_output(node.outputs[0]):
        return barrier("the model outputs this shape")
    for consumer, _ in view.consumers(node.outputs[0]):
        if consumer.op == "Gather" and int(attr(consumer, "axis", 0)) == 0:
            picked = view.int_values(consumer.inputs[1])
            if picked is not None and entry not in [normalise_axis(p, end - start) for p in picked]:
                continue
        if consumer.op == "Slice":
            spec = _slice_spec(consumer, view)
            if spec is not None and 0 in spec:
                lo, hi, step = slice(*spec[0]).indices(end - start)
                if entry not in range(lo, hi, step):
                    continue
        if consumer.op in ("Gather", "Slice") and _width_read_stays_right(view, node, consumer, r.axis):
            continue
        return barrier("shape arithmetic reads the channel count")
    return Relation()

"""Ops that move, cut or reinterpret axes: Concat, Split, Slice, Transpose,
Reshape/Flatten/Squeeze/Unsqueeze, Gather, and Shape (shape arithmetic).

Index mappings are exact: Concat and Split offset positions, Flatten and
Reshape repeat each channel over the axes it is merged with, and a Reshape
that splits the channel axis (C -> (G, C/G), heads) ties each block of C/G
positions into one unit. Targets that cannot be recomputed are barriers.
"""

from __future__ import annotations

import math

import numpy as np

from . import Link, Reached, Relation, barrier, blocks_of, normalise_axis, passthrough, related, rule, strided
from ..graph import attr
from ..shape_math import evaluate


def _present(t) -> bool:
    return t is not None and t.name != ""


def _axis(node, view, tensor, default=0) -> int:
    return normalise_axis(int(attr(node, "axis", default)), view.rank(tensor))


# --- Concat ----------------------------------------------------------------------

@rule("Concat")
def concat(node, view, r: Reached):
    rank = view.rank(node.outputs[0])
    if rank is None:
        return barrier("output shape unknown")
    axis = normalise_axis(int(attr(node, "axis")), rank)
    if r.axis != axis:  # concatenated along another axis: all operands share the channels
        links = [Link("in", i, r.axis, r.owner) for i in range(len(node.inputs))
                 if not (r.side == "in" and i == r.index)]
        if r.side == "in":
            links.append(Link("out", 0, r.axis, r.owner))
        return Relation(links)
    sizes = [view.dim(t, axis) for t in node.inputs]
    if None in sizes:
        return barrier("operand shapes unknown")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if r.side == "in":
        out = np.full(int(offsets[-1]), -1)
        out[offsets[r.index]:offsets[r.index + 1]] = r.owner
        return related(Link("out", 0, axis, out))
    parts = [r.owner[offsets[i]:offsets[i + 1]] for i in range(len(sizes))]
    return Relation([Link("in", i, axis, p) for i, p in enumerate(parts) if (p >= 0).any()])


# --- Split -----------------------------------------------------------------------

def _split_sizes(node, view, axis: int) -> list[int] | None:
    if len(node.inputs) > 1 and _present(node.inputs[1]):
        return view.int_values(node.inputs[1])
    if "split" in node.attrs:
        return list(node.attrs["split"])
    total = view.dim(node.inputs[0], axis)
    if total is None:
        return None
    n = len(node.outputs)
    chunk = math.ceil(total / n)
    return [min(chunk, total - k * chunk) for k in range(n)]


def split_rewrite(node, view, cut):
    axis = _axis(node, view, node.inputs[0])
    sizes = [cut.new_dim(o, axis) for o in node.outputs]
    node.attrs.pop("num_outputs", None)
    if view.opset >= 13:
        cut.replace_constant(node, 1, np.array(sizes, dtype=np.int64))
    else:
        node.attrs["split"] = sizes


@rule("Split", rewrite=split_rewrite)
def split(node, view, r: Reached):
    if r.side == "in" and r.index != 0:
        return barrier("channels reach the split sizes")
    axis = _axis(node, view, node.inputs[0])
    if r.axis != axis:
        links = [Link("out", j, r.axis, r.owner) for j in range(len(node.outputs))
                 if not (r.side == "out" and j == r.index)]
        if r.side == "out":
            links.append(Link("in", 0, r.axis, r.owner))
        return Relation(links)
    sizes = _split_sizes(node, view, axis)
    if sizes is None:
        return barrier("split sizes are computed at run time")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if r.side == "in":
        parts = [r.owner[offsets[j]:offsets[j + 1]] for j in range(len(sizes))]
        return Relation([Link("out", j, axis, p) for j, p in enumerate(parts) if (p >= 0).any()])
    whole = np.full(int(offsets[-1]), -1)
    whole[offsets[r.index]:offsets[r.index + 1]] = r.owner
    return related(Link("in", 0, axis, whole))


# --- Slice -----------------------------------------------------------------------

def _slice_spec(node, view) -> dict[int, tuple[int, int, int]] | None:
    """axis -> (start, stop, step) as given (not normalised); None if computed."""
    rank = view.rank(node.inputs[0])
    if view.opset < 10 or "starts" in node.attrs:
        starts, ends = list(node.attrs["starts"]), list(node.attrs["ends"])
        axes = list(node.attrs.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        values = [view.int_values(t) if _present(t) else None
                  for t in node.inputs[1:5]] + [None] * (5 - len(node.inputs))
        starts, ends, axes, steps = values[:4]
        if starts is None or ends is None or (len(node.inputs) > 3 and _present(node.inputs[3]) and axes is None) \
                or (len(node.inputs) > 4 and _present(node.inputs[4]) and steps is None):
            return None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)
    return {normalise_axis(a, rank): (s, e, st) for a, s, e, st in zip(axes, starts, ends, steps)}


def slice_rewrite(node, view, cut):
    spec = _slice_spec(node, view)
    if spec is None:  # bounds computed at run time (a chunk): they follow the new width by themselves
        return
    data = node.inputs[0]
    axes = sorted(spec)
    new = {}
    for a in axes:
        removed = cut.removed(data, a)
        if not len(removed):
            continue
        size = view.dim(data, a)
        start, stop, _ = slice(*spec[a]).indices(size)
        kept = np.setdiff1d(np.arange(size), removed)
        new_start = int(np.sum(kept < start))
        new[a] = (new_start, new_start + int(np.sum((kept >= start) & (kept < stop))))
    if not new:
        return
    starts = [new.get(a, spec[a][:2])[0] for a in axes]
    ends = [new.get(a, spec[a][:2])[1] for a in axes]
    if "starts" in node.attrs:
        node.attrs.update(starts=starts, ends=ends, axes=axes)
        return
    cut.replace_constant(node, 1, np.array(starts, dtype=np.int64))
    cut.replace_constant(node, 2, np.array(ends, dtype=np.int64))
    cut.replace_constant(node, 3, np.array(axes, dtype=np.int64))
    steps = [spec[a][2] for a in axes]
    cut.replace_constant(node, 4, np.array(steps, dtype=np.int64))


@rule("Slice", rewrite=slice_rewrite)
def slice_(node, view, r: Reached):
    if r.side == "in" and r.index != 0:
        return barrier("channels reach the slice bounds")
    spec = _slice_spec(node, view)
    if spec is None:
        axes = _sliced_axes(node, view)
        if axes is not None and r.axis not in axes:
            return passthrough(r)  # bounds computed at run time, but on other axes
        chunk = _chunk_of(node, view, r.axis)
        if chunk is None:
            return barrier("slice bounds are computed at run time")
        return _chunk_relation(r, *chunk)
    if r.axis not in spec:
        return passthrough(r)
    size = view.dim(node.inputs[0], r.axis)
    if size is None:
        return barrier("input shape unknown")
    start, stop, step = slice(*spec[r.axis]).indices(size)
    if step != 1:
        return barrier("strided slice along the channel axis")
    if r.side == "in":
        return related(Link("out", 0, r.axis, r.owner[start:stop]))
    whole = np.full(size, -1)
    whole[start:stop] = r.owner
    return related(Link("in", 0, r.axis, whole))


def _sliced_axes(node, view) -> list[int] | None:
    """The axes a Slice cuts (constant ``axes``, or all of its starts), also when its bounds are computed."""
    rank = view.rank(node.inputs[0])
    if rank is None or view.opset < 10 or "starts" in node.attrs:
        return None
    if len(node.inputs) > 3 and _present(node.inputs[3]):
        axes = view.int_values(node.inputs[3])
        return None if axes is None else [normalise_axis(a, rank) for a in axes]
    starts = view.shape(node.inputs[1])
    return list(range(starts[0])) if starts else None


def _chunk_of(node, view, axis: int) -> tuple[int, int, int] | None:
    """(start, stop, parts) when a Slice's computed bounds on ``axis`` are part ``k`` of ``parts``
    equal chunks of the width read from its own data's shape (torch's ``x.chunk(n, dim)`` in the
    legacy exporter): at every width that is a multiple of ``parts``, [k*w/parts, (k+1)*w/parts).
    Then a cut that keeps as many channels in every chunk leaves the bounds right."""
    key = ("chunk", node.name, axis)
    if key not in view.memo:
        view.memo[key] = _find_chunk(node, view, axis)
    return view.memo[key]


def _find_chunk(node, view, axis: int) -> tuple[int, int, int] | None:
    axes = _sliced_axes(node, view)
    size = view.dim(node.inputs[0], axis)
    stepped = len(node.inputs) > 4 and _present(node.inputs[4])
    if axes is None or axis not in axes or not size or \
            (stepped and view.int_values(node.inputs[4]) != [1] * len(axes)):
        return None
    at = axes.index(axis)
    bounds = lambda width: _bounds_at(view, node, axis, at, width)  # noqa: E731
    now = bounds(size)
    if now is None:
        return None
    start, stop = (min(max(b, 0), size) for b in now)
    if stop <= start or size % (stop - start):
        return None
    parts, part = size // (stop - start), start // (stop - start)
    if start % (stop - start) or parts < 2:
        return None
    for width in range(1, size // parts + 1):  # every width a cut may leave
        if bounds(width * parts) != (part * width, (part + 1) * width):
            return None
    return start, stop, parts


def _bounds_at(view, node, axis: int, at: int, width: int) -> tuple[int, int] | None:
    """(start, stop) on ``axis`` if the data were ``width`` wide; None unless the bounds depend on
    nothing but constants and the data's own shape (checked at two other values of its other dims)."""
    data = node.inputs[0]
    shape = view.shape(data)
    if shape is None or None in shape:
        return None
    results = set()
    for shift in (0, 7):
        dims = np.array([width if a == axis else d + shift for a, d in enumerate(shape)], dtype=np.int64)
        memo = {}
        values = [evaluate(node.inputs[i], data, dims, memo) for i in (1, 2)]
        if any(v is None or v.ndim != 1 or len(v) <= at for v in values):
            return None
        results.add(tuple(int(v[at]) for v in values))
    if len(results) != 1:
        return None
    start, stop = results.pop()
    return min(max(start, 0), width), min(max(stop, 0), width)


def _chunk_relation(r: Reached, start: int, stop: int, parts: int) -> Relation:
    """A chunk of the reached axis: its positions pass on, and equal positions of all chunks are
    tied (each chunk keeps as many channels)."""
    size = len(r.owner) if r.side == "in" else (stop - start) * parts
    if r.side == "in":
        return related(Link("out", 0, r.axis, r.owner[start:stop]), ties=strided(size, stop - start))
    whole = np.full(size, -1)
    whole[start:stop] = r.owner
    return related(Link("in", 0, r.axis, whole))


# --- Transpose -------------------------------------------------------------------

@rule("Transpose")
def transpose(node, view, r: Reached):
    rank = view.rank(node.inputs[0])
    perm = list(attr(node, "perm", None) or reversed(range(rank)))
    if r.side == "in":
        return related(Link("out", 0, perm.index(r.axis), r.owner))
    return related(Link("in", 0, perm[r.axis], r.owner))


# --- Reshape, Flatten, Squeeze, Unsqueeze: one index mapping ------------------------

def _prefix_products(shape) -> list[int]:
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def map_reshape(src, dst, axis: int, owner: np.ndarray, dynamic: set[int], picked_apart=lambda j: False):
    """Map channel ``axis`` of a tensor of shape ``src`` onto the same data in shape ``dst``.

    An axis split in two, C -> (G, C/G), is tracked on G with each block of C/G
    tied (heads) unless ``picked_apart(G's axis)``: a fused projection split into
    (3, E) whose q, k, v are then taken apart along the 3; then it is tracked on
    E with the positions equal modulo E tied (q_e, k_e, v_e go together).
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
    if any(a in dynamic and src[a] != 1 for a in merged) or any(a in dynamic for a in merged if a < axis):
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


def _width_read_stays_right(view, shape_node, reader, axis: int) -> bool:
    """Whether what ``reader`` computes from the Shape's output (the channel count) reaches nothing
    but shape arithmetic that stays right after the cut: the target of a Reshape of the same tensor
    at the entry that carries ``axis``, or the bounds of a chunk of it (see _chunk_of)."""
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
    if r.side == "out" and node.op == "Reshape":  # dims the target spells as constants are fixed
        dynamic = {a for a in dynamic if (_shape_entry(view, node.inputs[1], a) or 0) <= 0}
    mapped = map_reshape(src, dst, r.axis, r.owner, dynamic,
                         lambda j: r.side == "in" and _picked_apart(view, node.outputs[0], j))
    if isinstance(mapped, str):
        return barrier(mapped)
    axis, owner, ties = mapped
    problem = _reshape_target_ok(node, view, *((axis, r.axis) if r.side == "in" else (r.axis, axis)))
    if problem:
        return barrier(problem)
    return related(Link("out" if r.side == "in" else "in", 0, axis, owner), ties=ties)


# --- Gather (indexing along another axis) ------------------------------------------

def _reordering(node, view) -> np.ndarray | None:
    """A Gather's indices when they are constant, 1-D and distinct: a reordering (or a
    selection) of positions along its axis, such as a channel shuffle (see graph.py)."""
    indices = view.value(node.inputs[1])
    size = view.dim(node.inputs[0], _axis(node, view, node.inputs[0]))
    if indices is None or np.ndim(indices) != 1 or not size:
        return None
    indices = np.where(indices < 0, indices + size, indices).astype(np.int64)
    return indices if len(np.unique(indices)) == len(indices) else None


def gather_rewrite(node, view, cut):
    """A reordering keeps the order of the channels that remain, renumbered."""
    data = node.inputs[0]
    g = _axis(node, view, data)
    removed = cut.removed(data, g)
    indices = _reordering(node, view) if len(removed) else None
    if indices is None:
        return
    kept = np.setdiff1d(np.arange(view.dim(data, g)), removed)
    renumbered = np.full(view.dim(data, g), -1)
    renumbered[kept] = np.arange(len(kept))
    cut.replace_constant(node, 1, renumbered[indices][renumbered[indices] >= 0].astype(np.int64))


@rule("Gather", rewrite=gather_rewrite)
def gather(node, view, r: Reached):
    data, indices = node.inputs[:2]
    rank, idx_rank = view.rank(data), view.rank(indices)
    if rank is None or idx_rank is None:
        return barrier("shape unknown")
    g = _axis(node, view, data)
    if r.side == "in" and r.index != 0:
        return barrier("channels reach the gathered indices")
    if r.axis == g and (r.side == "in" or idx_rank == 1):  # along the gathered axis itself
        order = _reordering(node, view)
        if order is None:
            return barrier("gathers along the channel axis")
        if r.side == "in":
            return related(Link("out", 0, g, r.owner[order]))
        whole = np.full(view.dim(data, g), -1)
        whole[order] = r.owner
        return related(Link("in", 0, g, whole))
    if r.side == "in":
        return related(Link("out", 0, r.axis if r.axis < g else r.axis + idx_rank - 1, r.owner))
    if r.axis < g:
        return related(Link("in", 0, r.axis, r.owner))
    if r.axis >= g + idx_rank:
        return related(Link("in", 0, r.axis - idx_rank + 1, r.owner))
    return barrier("channels reach the gathered indices")


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

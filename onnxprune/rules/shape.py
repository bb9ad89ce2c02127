"""Ops that move or cut axes: Concat, Split, Slice, Transpose, Gather.

Index mappings are exact: Concat and Split offset positions, Slice keeps a
range (also a chunk whose bounds are computed from the width), Gather with
distinct constant indices reorders; with repeated ones (key/value heads
repeated for grouped-query attention) the positions read are cut alone, or
with ``prune_kv_groups`` each channel with all that read it. Reshape and its family, and Shape
(shape arithmetic), are in reshape.py.
"""

from __future__ import annotations

import math

import numpy as np

from ..graph.shape_math import evaluate
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
    strided,
)


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


# --- Gather (indexing along another axis) ------------------------------------------

def _indices_along(node, view) -> np.ndarray | None:
    """A Gather's indices when they are constant and 1-D, made non-negative."""
    indices = view.value(node.inputs[1])
    size = view.dim(node.inputs[0], _axis(node, view, node.inputs[0]))
    if indices is None or np.ndim(indices) != 1 or not size:
        return None
    return np.where(indices < 0, indices + size, indices).astype(np.int64)


def _reordering(node, view) -> np.ndarray | None:
    """A Gather's indices when they are constant, 1-D and distinct: a reordering (or a
    selection) of positions along its axis, such as a channel shuffle (see graph.py)."""
    indices = _indices_along(node, view)
    return indices if indices is not None and len(np.unique(indices)) == len(indices) else None


def gather_rewrite(node, view, cut):
    """The positions read keep their order, renumbered; the cut ones (read from removed channels,
    or removed from the output: a repeat of key/value heads losing query heads) go."""
    data = node.inputs[0]
    g = _axis(node, view, data)
    indices = _indices_along(node, view)
    removed, dropped = cut.removed(data, g), cut.removed(node.outputs[0], g)
    if indices is None or not len(removed) and not len(dropped):
        return
    kept = np.setdiff1d(np.arange(view.dim(data, g)), removed)
    renumbered = np.full(view.dim(data, g), -1)
    renumbered[kept] = np.arange(len(kept))
    read = np.setdiff1d(np.arange(len(indices)), dropped)
    new = renumbered[indices[read]]
    cut.replace_constant(node, 1, new[new >= 0].astype(np.int64))


def _repeat_relation(view, r: Reached, indices: np.ndarray, size: int) -> Relation:
    """Constant indices that read positions more than once (``k[:, [0, 0, 1, 1]]``, grouped-query
    attention's key/value heads repeated for their query heads). By default the positions read are
    cut, the input stays whole (a smaller selection), as many readers of every channel where each has
    as many (the r-th query head of every group goes together); with ``prune_kv_groups`` an input
    channel goes with every position that reads it."""
    read = np.unique(indices)
    readers = [np.nonzero(indices == i)[0] for i in read]
    if not view.prune_kv_groups:
        if r.side == "out":  # the r-th reader of every channel together, when each is read as often
            even = len({len(p) for p in readers}) == 1
            return Relation(ties=[np.array([p[k] for p in readers]) for k in range(len(readers[0]))] if even else [])
        return barrier("reads the channels repeatedly (key/value heads repeated for their query heads): they stay "
                       "whole, the positions read are cut (`prune_kv_groups` cuts whole groups)")
    if r.side == "in":
        return related(Link("out", 0, r.axis, r.owner[indices]))
    whole = np.full(size, -1)
    whole[read] = r.owner[[p[0] for p in readers]]  # each input position: the owner of its first reader
    return related(Link("in", 0, r.axis, whole), ties=readers)


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
        if order is None and _indices_along(node, view) is not None:
            return _repeat_relation(view, r, _indices_along(node, view), view.dim(data, g))
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

"""Joining, splitting, slicing, permuting and gathering (rules/shape.py): Concat, Split, Slice,
Transpose, Gather."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import ints, op, opt


@op("Concat")
def concat(attrs, inputs):
    return torch.cat([t for t in inputs if t is not None], attrs["axis"])


@op("Split", host=(1,))
def split(attrs, inputs):
    x = inputs[0]
    axis = attrs.get("axis", 0)
    sizes = attrs.get("split")
    if sizes is None and opt(inputs, 1) is not None:
        sizes = ints(inputs[1])
    if sizes is None:  # equal parts; with num_outputs (opset 18) the last one may be smaller
        parts = attrs.get("num_outputs", attrs["_num_outputs"])
        sizes = math.ceil(x.shape[axis] / parts)
    return tuple(torch.split(x, sizes, axis))


@op("Slice", host=(1, 2, 3, 4))
def slice_(attrs, inputs):
    x = inputs[0]
    if "starts" in attrs:  # opset < 10: attributes
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = ints(inputs[1]), ints(inputs[2])
        axes = None if opt(inputs, 3) is None else ints(inputs[3])
        steps = None if opt(inputs, 4) is None else ints(inputs[4])
    axes = list(range(len(starts))) if axes is None else axes
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.ndim
        n = x.shape[axis]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), n), min(max(end, 0), n), step)
        else:  # negative step: slice the flipped axis forwards
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
            flips.append(axis)
            index[axis] = slice(n - 1 - start, max(n - 1 - end, n - 1 - start), -step)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@op("Transpose")
def transpose(attrs, inputs):
    x = inputs[0]
    perm = attrs.get("perm")
    return x.permute(perm if perm is not None else list(reversed(range(x.ndim))))


@op("Gather")
def gather(attrs, inputs):
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.ndim
    if idx.ndim == 0 and idx.device.type == "cpu":
        return x.select(axis, int(idx))
    n = x.shape[axis]
    if axis == 0 and x.ndim == 2 and x.is_floating_point():
        return F.embedding(idx.remainder(n), x)
    out = x.index_select(axis, idx.reshape(-1).remainder(n))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])

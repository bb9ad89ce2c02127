"""Reshaping and shape reading (rules/reshape.py): Reshape, Flatten, Squeeze, Unsqueeze, Shape;
and Size, which has no channel rule."""

from __future__ import annotations

import math

import torch

from .registry import axes_of, ints, op


@op("Reshape", host=(1,))
def reshape(attrs, inputs):
    x, shape = inputs[0], ints(inputs[1])
    if not attrs.get("allowzero", 0) and 0 in shape:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input's dim
    return x.reshape(shape)


@op("Flatten")
def flatten(attrs, inputs):
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Squeeze", host=(1,))
def squeeze(attrs, inputs):
    x = inputs[0]
    axes = axes_of(attrs, inputs, 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in axes))


@op("Unsqueeze", host=(1,))
def unsqueeze(attrs, inputs):
    x = inputs[0]
    axes = axes_of(attrs, inputs, 1)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Shape")
def shape(attrs, inputs):
    # On the host: shape arithmetic stays on the CPU whatever device the data is on.
    dims = inputs[0].shape[attrs.get("start", 0): attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


@op("Size")
def size(attrs, inputs):
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)

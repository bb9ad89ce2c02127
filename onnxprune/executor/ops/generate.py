"""Ops that make tensors from shapes, counts and running sums (no channel rules):
ConstantOfShape, Range, and the mask and position-id builders Trilu and CumSum."""

from __future__ import annotations

import torch

from .registry import ints, op, opt, scalar


@op("ConstantOfShape", host=(0,))
def constant_of_shape(attrs, inputs):
    value = attrs.get("value")
    shape = ints(inputs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)


@op("Range", host=(0, 1, 2))
def range_(attrs, inputs):
    start, limit, delta = inputs
    return torch.arange(scalar(start), scalar(limit), scalar(delta), dtype=start.dtype)


@op("Trilu", host=(1,))
def trilu(attrs, inputs):
    k = 0 if opt(inputs, 1) is None else int(scalar(inputs[1]))
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


@op("CumSum", host=(1,))
def cum_sum(attrs, inputs):
    x, axis = inputs[0], int(scalar(inputs[1]))
    reverse, exclusive = attrs.get("reverse", 0), attrs.get("exclusive", 0)
    y = x.flip(axis) if reverse else x
    y = y.cumsum(axis, dtype=x.dtype)
    if exclusive:  # shift by one: exact, unlike subtracting x
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if reverse else y

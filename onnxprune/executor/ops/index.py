"""Ops that read or write elements at computed positions, or compute positions (no channel
rules): GatherElements, GatherND, ScatterND, ScatterElements/Scatter, OneHot, NonZero, TopK,
ArgMax, ArgMin. Negative indices count from the end of their axis, as ONNX allows."""

from __future__ import annotations

import math

import torch

from .registry import OPS, op, scalar


@op("GatherElements")
def gather_elements(attrs, inputs):
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.ndim
    return torch.gather(x, axis, idx.long().remainder(x.shape[axis]))


def _nd_positions(data_shape, indices, batch_dims: int):
    """GatherND/ScatterND indices -> (flattened batch, flat positions into the indexed dims)."""
    k = indices.shape[-1]
    dims = data_shape[batch_dims: batch_dims + k]
    idx = indices.long()
    flat = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    for i, n in enumerate(dims):
        flat = flat * n + idx[..., i].remainder(n)
    return flat, math.prod(dims)


@op("GatherND")
def gather_nd(attrs, inputs):
    x, indices = inputs
    b = attrs.get("batch_dims", 0)
    k = indices.shape[-1]
    flat, count = _nd_positions(x.shape, indices, b)
    batch = math.prod(x.shape[:b])
    rest = x.shape[b + k:]
    data = x.reshape(batch, count, *rest)
    pos = flat.reshape(batch, -1)
    out = data[torch.arange(batch, device=x.device).unsqueeze(1), pos]
    return out.reshape(*indices.shape[:-1], *rest)


@op("ScatterND")
def scatter_nd(attrs, inputs):
    x, indices, updates = inputs
    k = indices.shape[-1]
    flat, count = _nd_positions(x.shape, indices, 0)
    rest = x.shape[k:]
    data = x.reshape(count, *rest)
    src = updates.reshape(-1, *rest)
    flat = flat.reshape(-1)
    mode = attrs.get("reduction", "none")
    if mode == "none":
        out = data.index_copy(0, flat, src)
    elif mode == "add":
        out = data.index_add(0, flat, src)
    else:
        index = flat.reshape(-1, *[1] * len(rest)).expand_as(src)
        out = data.scatter_reduce(0, index, src, {"mul": "prod", "max": "amax", "min": "amin"}[mode])
    return out.reshape(x.shape)


@op("ScatterElements", "Scatter")
def scatter_elements(attrs, inputs):
    x, idx, updates = inputs
    axis = attrs.get("axis", 0) % x.ndim
    idx = idx.long().remainder(x.shape[axis])
    mode = attrs.get("reduction", "none")
    if mode == "none":
        return x.scatter(axis, idx, updates)
    return x.scatter_reduce(axis, idx, updates, {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[mode])


@op("OneHot", host=(1,))
def one_hot(attrs, inputs):
    idx, depth, values = inputs
    depth = int(scalar(depth))
    idx = torch.where(idx < 0, idx + depth, idx)
    rank = idx.ndim + 1
    axis = attrs.get("axis", -1) % rank
    classes = torch.arange(depth, device=idx.device).reshape(depth, *[1] * (rank - 1 - axis))
    hot = idx.unsqueeze(axis) == classes
    return torch.where(hot, values[1], values[0])


@op("NonZero")
def non_zero(attrs, inputs):
    return torch.nonzero(inputs[0]).t().contiguous()


@op("TopK", host=(1,))
def top_k(attrs, inputs):
    x, k = inputs[0], int(scalar(inputs[1]))
    values, indices = torch.topk(x, k, dim=attrs.get("axis", -1), largest=bool(attrs.get("largest", 1)),
                                 sorted=bool(attrs.get("sorted", 1)))
    return values, indices


def _arg(fn):
    def apply(attrs, inputs):
        x = inputs[0]
        axis = attrs.get("axis", 0) % x.ndim
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)
        return fn(x, axis, keepdim=keep)
    return apply


OPS["ArgMax"] = _arg(torch.argmax)
OPS["ArgMin"] = _arg(torch.argmin)

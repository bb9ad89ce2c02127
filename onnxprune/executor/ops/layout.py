"""Ops that repeat or rearrange elements across axes (no channel rules): Expand, Tile,
DepthToSpace, SpaceToDepth."""

from __future__ import annotations

import torch

from .registry import ints, op


@op("Expand", host=(1,))
def expand(attrs, inputs):
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(ints(inputs[1]))))


@op("Tile", host=(1,))
def tile(attrs, inputs):
    return inputs[0].repeat(ints(inputs[1]))


@op("DepthToSpace")
def depth_to_space(attrs, inputs):
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // bs**2, h * bs, w * bs)


@op("SpaceToDepth")
def space_to_depth(attrs, inputs):
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs**2, h // bs, w // bs)

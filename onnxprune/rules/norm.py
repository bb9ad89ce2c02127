"""Normalisation ops.

BatchNormalization and InstanceNormalization are per channel: their
parameters are sliced with the channels. GroupNormalization normalises over
groups of C/G consecutive channels, so only whole groups can go (the
positions of a group are tied) and ``num_groups`` is rewritten.
LayerNormalization over the channel axis mixes channels: a barrier, unless
`prune_hidden` lets the hidden size through (its statistics then change).
Softmax and its kin normalise along their axis and pass the others through.
"""

from __future__ import annotations

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
)


def _extra_outputs_used(node) -> bool:
    return any(t.outputs for t in node.outputs[1:])


@rule("BatchNormalization")
def batch_norm(node, view, r: Reached):
    if _extra_outputs_used(node):
        return barrier("training-mode outputs are used")
    if r.index != 0:
        return barrier("channels reach a BatchNormalization parameter as an activation")
    links = [Link("out" if r.side == "in" else "in", 0, r.axis, r.owner)]
    if r.axis == 1:
        roles = {1: "bn_scale", 2: "norm_shift", 3: "stat", 4: "stat"}
        links += [Link("in", i, 0, r.owner, roles[i]) for i in range(1, 5)]
    return related(*links)


@rule("InstanceNormalization")
def instance_norm(node, view, r: Reached):
    if r.index != 0 or r.axis != 1:
        return barrier("InstanceNormalization normalises over this axis")
    other = "out" if r.side == "in" else "in"
    return related(
        Link(other, 0, 1, r.owner),
        Link("in", 1, 0, r.owner, "norm_scale"),
        Link("in", 2, 0, r.owner, "norm_shift"),
    )


def _group_size(node, view) -> int | None:
    channels = view.dim(node.inputs[0], 1)
    groups = int(attr(node, "num_groups", 1))
    return None if channels is None else channels // groups


def group_norm_rewrite(node, view, cut):
    node.attrs["num_groups"] = cut.new_dim(node.inputs[0], 1) // _group_size(node, view)


@rule("GroupNormalization", rewrite=group_norm_rewrite)
def group_norm(node, view, r: Reached):
    if r.index != 0 or r.axis != 1:
        return barrier("GroupNormalization normalises over this axis")
    block = _group_size(node, view)
    if block is None:
        return barrier("channel count unknown")
    other = "out" if r.side == "in" else "in"
    # Opset 18 gives scale/bias one value per group; opset 21 one per channel.
    per_group = view.dim(node.inputs[1], 0) != len(r.owner)
    params = r.owner[::block] if per_group else r.owner
    return related(
        Link(other, 0, 1, r.owner),
        Link("in", 1, 0, params, "norm_scale"),
        Link("in", 2, 0, params, "norm_shift"),
        ties=blocks_of(len(r.owner), block),
    )


@rule("LayerNormalization")
def layer_norm(node, view, r: Reached):
    if _extra_outputs_used(node):
        return barrier("mean / inverse-std outputs are used")
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    first = normalise_axis(int(attr(node, "axis", -1)), rank)
    other = "out" if r.side == "in" else "in"
    if r.index == 0 and r.axis >= first and view.prune_hidden and first == rank - 1:
        # --prune-hidden: the statistics change (fewer channels), scale and bias are sliced
        params = [Link("in", i, 0, r.owner, "norm_scale" if i == 1 else "norm_shift")
                  for i in (1, 2) if i < len(node.inputs) and node.inputs[i].name]
        return Relation([Link(other, 0, r.axis, r.owner), *params], kind="hidden")
    if r.index != 0 or r.axis >= first:
        return barrier("LayerNormalization normalises over the channel axis "
                       "(the hidden size is pruned only with `prune_hidden`)")
    return related(Link(other, 0, r.axis, r.owner))


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(node, view, r: Reached):
    """Normalises along ``axis`` (opset < 13: over all axes from ``axis`` on); other axes pass through."""
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    axis = normalise_axis(int(attr(node, "axis", -1 if view.opset >= 13 else 1)), rank)
    if r.axis == axis or (view.opset < 13 and r.axis > axis):
        return barrier(f"{node.op} normalises over the channel axis")
    return related(Link("out" if r.side == "in" else "in", 0, r.axis, r.owner))

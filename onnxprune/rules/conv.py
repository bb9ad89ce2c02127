"""Conv and ConvTranspose.

Grouped convolutions keep their ``group`` count: every group loses the same
in-group positions (channels j, j + C/g, j + 2C/g, ... are tied), so the
weight stays one tensor of shape (M, C'/g, k...). Depthwise convolutions
(group == input channels) pass channels through, together with their
filters, and their ``group`` attribute is rewritten to the new width.
"""

from __future__ import annotations

import numpy as np

from ..graph.view import attr
from .quant import is_weight
from .registry import Link, Reached, barrier, related, rule, strided


def _geometry(node, view):
    """(group, input channels, weight shape) or None when the weight is computed (a weight
    stored quantized behind a DequantizeLinear is a weight: rules/quant.py)."""
    w = node.inputs[1]
    if not is_weight(view, w) or view.shape(w) is None:
        return None
    return int(attr(node, "group", 1)), view.dim(node.inputs[0], 1), view.shape(w)


def _is_depthwise(group: int, cin: int | None) -> bool:
    return cin is not None and group == cin and group > 1


def _has_bias(node) -> bool:
    return len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name != ""


def _bias(node, owner) -> list[Link]:
    return [Link("in", 2, 0, owner, "bias")] if _has_bias(node) else []


# --- Conv: X (N, C, ...), W (M, C/g, k...), B (M) -------------------------------

def _conv_depthwise(group, cin, w) -> bool:
    return _is_depthwise(group, cin)


def _filters_unless(depthwise):
    """source hook: the output channels are the node's own filters, except when depthwise."""
    def source(node, view):
        geo = _geometry(node, view)
        return [] if geo is None or depthwise(*geo) else [(0, 1)]
    return source


def _regroup_if(depthwise):
    """rewrite hook: a depthwise node's ``group`` follows its new width."""
    def rewrite(node, view, cut):
        if depthwise(*_geometry(node, view)):
            node.attrs["group"] = cut.new_dim(node.inputs[0], 1)
    return rewrite


def _unusable(geo, r: Reached):
    if geo is None:
        return barrier("weights are computed at run time")
    if geo[1] is None:
        return barrier("input channel count unknown (pin dims with `input_shapes`)")
    if r.axis != 1 or r.index != 0:
        return barrier(f"channels reach axis {r.axis} of input/output {r.index}")
    return None


@rule("Conv", source=_filters_unless(_conv_depthwise), rewrite=_regroup_if(_conv_depthwise))
def conv(node, view, r: Reached):
    geo = _geometry(node, view)
    if (stop := _unusable(geo, r)) is not None:
        return stop
    group, cin, w = geo
    m = w[0]
    if _is_depthwise(group, cin):
        mult = m // group
        if r.side == "in":
            out = np.repeat(r.owner, mult)
            return related(Link("out", 0, 1, out), Link("in", 1, 0, out, "weight"), *_bias(node, out))
        ties = [np.arange(c * mult, (c + 1) * mult) for c in range(group)] if mult > 1 else []
        return related(
            Link("in", 0, 1, r.owner[::mult]),
            Link("in", 1, 0, r.owner, "weight"),
            *_bias(node, r.owner),
            ties=ties,
        )
    if r.side == "out":  # the node's own filters
        ties = strided(m, m // group) if group > 1 else []
        return related(Link("in", 1, 0, r.owner, "weight"), *_bias(node, r.owner), ties=ties)
    per_group = cin // group
    ties = strided(cin, per_group) if group > 1 else []
    return related(Link("in", 1, 1, r.owner[:per_group], "weight"), ties=ties)


# --- ConvTranspose: X (N, C, ...), W (C, M/g, k...), B (M) ----------------------

def _deconv_depthwise(group, cin, w) -> bool:
    return _is_depthwise(group, cin) and w[1] == 1


@rule("ConvTranspose", source=_filters_unless(_deconv_depthwise), rewrite=_regroup_if(_deconv_depthwise))
def conv_transpose(node, view, r: Reached):
    geo = _geometry(node, view)
    if (stop := _unusable(geo, r)) is not None:
        return stop
    group, cin, w = geo
    if _deconv_depthwise(group, cin, w):
        return related(
            Link(("out" if r.side == "in" else "in"), 0, 1, r.owner),
            Link("in", 1, 0, r.owner, "weight"),
            *_bias(node, r.owner),
        )
    per_group_out = w[1]
    if r.side == "out":
        ties = strided(per_group_out * group, per_group_out) if group > 1 else []
        return related(
            Link("in", 1, 1, r.owner[:per_group_out], "weight"), *_bias(node, r.owner), ties=ties
        )
    ties = strided(cin, cin // group) if group > 1 else []
    return related(Link("in", 1, 0, r.owner, "weight"), ties=ties)

"""Bias compensation: what removed channels contributed on average goes into the readers' biases.

A reader (Conv, Gemm, MatMul + Add) computes y = W x + b. Removing input
position k drops W[:, k] x_k; replacing x_k by its mean over the calibration
data, m_k, and folding W[:, k] m_k into b keeps y's mean where it was
(for a Conv, W[:, k] is summed over the kernel window: exact away from the
zero-padded border). It runs before the cut, on the full-width weights; a
bias the reader did not have is added (and joins the reader's own output
group, so a later cut of those channels slices it too).

Readers handled, as the weight table (rules/weights.py) describes them:
Conv (any group count; a depthwise Conv whose output channels go with the
input needs nothing), Gemm, and MatMul with a constant 2-D weight followed by
an Add of a per-feature constant. Anything else is left as it is and counted
as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.groups import Group, ParamSlot
from ..graph.view import GraphView, attr
from ..planning.plan import Plan
from ..rules.weights import MULTIPLIED, WEIGHTS
from ..scoring.calibration import GroupStats, read_points
from .surgery import positions


@dataclass
class Compensation:
    readers: list[str] = field(default_factory=list)  # nodes whose bias absorbed removed channels
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why not
    refitted: list[str] = field(default_factory=list)  # nodes refitted from Gram matrices instead (refit.py)

    def to_json(self) -> dict:
        return {"readers": len(self.readers), "refitted": len(self.refitted), "skipped": self.skipped}


def compensate(view: GraphView, groups: list[Group], plan: Plan, stats: dict[str, GroupStats],
               skip: frozenset[str] = frozenset()) -> Compensation:
    """Fold the removed channels' mean contributions into the readers' biases (edits ``view``);
    readers named in ``skip`` (refitted already: refit.py) are left alone."""
    done = Compensation()
    by_dim = {key: (g, slot) for g in groups for key, slot in g.dims.items()}
    for group in groups:
        if group.id not in plan.keep or group.id not in stats:
            continue
        removed = plan.removed(group.id)
        for point in read_points(group, view):
            node = _node(view, point.reader)
            means = stats[group.id].mean.get(point.name)
            if node is None or means is None or node.name in skip:
                continue
            gone = positions(point.owner, removed)
            if not len(gone):
                continue
            if any(key[0] == node.outputs[0].name for key in group.dims):
                continue  # depthwise: the channel's output goes too
            delta, why = _bias_delta(node, view, point, gone, means[gone])
            if delta is None:
                done.skipped[node.name] = why
                continue
            why = _add_to_bias(node, view, delta, by_dim)
            if why:
                done.skipped[node.name] = why
            elif node.name not in done.readers:
                done.readers.append(node.name)
    return done


def _node(view: GraphView, name: str) -> gs.Node | None:
    return next((n for n in view.nodes if n.name == name), None) if name else None


def _bias_delta(node, view, point, positions, means) -> tuple[np.ndarray | None, str]:
    """Change of the reader's bias (one value per output feature) for the removed positions.

    The weight table (rules/weights.py) says which input of the reader is the
    weight, which of its axes meets the read channels and which carries the
    output features; the kernel window of a convolution is summed.
    """
    entry = WEIGHTS.get(node.op) if node.domain in (None, "", "ai.onnx") else None
    reads = next((i for i, t in enumerate(node.inputs) if t.name == point.name), None)
    data = entry.operands.get(reads) if entry is not None else None
    attrs = node.attrs
    if data is None or data.reduces is None or data.reduces(attrs, view.rank(node.inputs[reads]) or 0) != point.axis:
        return None, f"{node.op} reading axis {point.axis}: no bias to fold into"
    index = next((i for i, o in entry.operands.items() if o.role in MULTIPLIED and i != reads), None)
    weight = view.value(node.inputs[index]) if index is not None and index < len(node.inputs) else None
    if weight is None:
        return None, "weight is not a constant"
    slot = entry.operands[index]
    reduced, features = slot.reduces(attrs, weight.ndim), slot.features(attrs, weight.ndim)
    if features is None or (entry.grouped and features != 0) or (not entry.grouped and weight.ndim != 2):
        return None, f"{node.op} reading axis {point.axis}: no bias to fold into"
    # (features, reduced positions of one group): the kernel window summed
    rows = np.moveaxis(weight.astype(np.float64), (features, reduced), (0, 1))
    rows = rows.reshape(rows.shape[0], rows.shape[1], -1).sum(-1)
    groups = max(int(attr(node, "group", 1)), 1) if entry.grouped else 1
    per_group, span = rows.shape[0] // groups, rows.shape[1]
    delta = np.zeros(rows.shape[0])
    for k, m in zip(positions, means):
        g = k // span
        band = slice(g * per_group, (g + 1) * per_group)
        delta[band] += rows[band, k - g * span] * m
    return float(attr(node, slot.gain, 1.0)) * delta if slot.gain else delta, ""


def _add_to_bias(node, view, delta: np.ndarray, by_dim) -> str:
    """Add ``delta`` to the reader's bias, creating it if absent; '' on success, else why not."""
    entry = WEIGHTS[node.op]
    index = next((i for i, o in entry.operands.items() if o.role == "bias"), None)
    if index is None:  # MatMul: the bias is the Add that follows
        return _add_to_following_add(node, view, delta)
    bias = entry.operands[index]
    scale = float(attr(node, bias.gain, 1.0)) if bias.gain else 1.0
    if scale == 0:
        return f"{node.op} with {bias.gain} = 0"
    current = view.value(node.inputs[index]) if len(node.inputs) > index and node.inputs[index].name else None
    if current is not None and current.shape != (len(delta),):
        return f"bias of shape {current.shape} is not one value per output feature"
    weight = next(t for i, t in enumerate(node.inputs) if entry.operands.get(i, bias).role in MULTIPLIED
                  and view.is_constant(t))
    dtype = view.value(weight).dtype
    base = np.zeros(len(delta), dtype) if current is None else current
    values = (base.astype(np.float64) + delta / scale).astype(dtype)
    new = gs.Constant(f"{node.name}_compensated_bias", values)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = new
    if current is None:
        axis = bias.features({}, view.rank(node.outputs[0]) or 0)
        join_output_group(node, index, axis, by_dim)
    return ""


def join_output_group(node, index: int, axis: int, by_dim) -> None:
    """A new bias is sliced with the reader's output channels (on ``axis``) when those are pruned."""
    found = by_dim.get((node.outputs[0].name, axis))
    if found is not None:
        group, slot = found
        group.params[(id(node), index, 0)] = ParamSlot(node, index, 0, slot.owner.copy(), "bias")


def _add_to_following_add(node, view, delta) -> str:
    uses = view.consumers(node.outputs[0])
    if len(uses) != 1 or uses[0][0].op != "Add":
        return "MatMul not followed by a bias Add"
    add, i = uses[0]
    const = add.inputs[1 - i]
    values = view.value(const)
    if values is None or values.shape[-1:] != (len(delta),) or values.size != len(delta):
        return "the Add after the MatMul is not a per-feature constant"
    new = (values.astype(np.float64) + delta.reshape(values.shape)).astype(values.dtype)
    add.inputs[1 - i] = gs.Constant(f"{add.name}_compensated_bias", new)
    return ""

"""Bias compensation: what removed channels contributed on average goes into the readers' biases.

A reader (Conv, Gemm, MatMul + Add) computes y = W x + b. Removing input
position k drops W[:, k] x_k; replacing x_k by its mean over the calibration
data, m_k, and folding W[:, k] m_k into b keeps y's mean where it was
(for a Conv, W[:, k] is summed over the kernel window: exact away from the
zero-padded border). It runs before the cut, on the full-width weights; a
bias the reader did not have is added (and joins the reader's own output
group, so a later cut of those channels slices it too).

Readers handled: Conv (any group count; a depthwise Conv whose output
channels go with the input needs nothing), Gemm (transA = 0), MatMul with a
constant right operand followed by an Add of a per-feature constant.
Anything else is left as it is and counted as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from . import iochange
from .calibration import GroupStats, model_batches, read_points
from .graph import GraphView, attr
from .groups import Group, ParamSlot
from .plan import Plan
from .surgery import _positions


@dataclass
class Compensation:
    readers: list[str] = field(default_factory=list)  # nodes whose bias absorbed removed channels
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why not

    def to_json(self) -> dict:
        return {"readers": len(self.readers), "skipped": self.skipped}


def compensate(view: GraphView, groups: list[Group], plan: Plan, stats: dict[str, GroupStats]) -> Compensation:
    """Fold the removed channels' mean contributions into the readers' biases (edits ``view``)."""
    done = Compensation()
    by_dim = {key: (g, slot) for g in groups for key, slot in g.dims.items()}
    for group in groups:
        if group.id not in plan.keep or group.id not in stats:
            continue
        removed = plan.removed(group.id)
        for point in read_points(group, view):
            node = _node(view, point.reader)
            means = stats[group.id].mean.get(point.name)
            if node is None or means is None:
                continue
            positions = _positions(point.owner, removed)
            if not len(positions):
                continue
            if node.op == "Conv" and (node.outputs[0].name, 1) in group.dims:
                continue  # depthwise: the channel's output goes too
            delta, why = _bias_delta(node, view, point.axis, positions, means[positions])
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


def _bias_delta(node, view, axis, positions, means) -> tuple[np.ndarray | None, str]:
    """Change of the reader's bias (one value per output feature) for the removed positions."""
    weight = view.value(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return None, "weight is not a constant"
    weight = weight.astype(np.float64)
    if node.op == "Conv" and axis == 1:
        return _conv_delta(weight, int(attr(node, "group", 1)), positions, means), ""
    if node.op == "Gemm" and axis == 1 and not attr(node, "transA", 0):
        w = weight.T if attr(node, "transB", 0) else weight  # (K, N)
        return float(attr(node, "alpha", 1.0)) * (means @ w[positions]), ""
    if node.op == "MatMul" and weight.ndim == 2 and view.rank(node.inputs[0]) and \
            axis == view.rank(node.inputs[0]) - 1:
        return means @ weight[positions], ""
    return None, f"{node.op} reading axis {axis}: no bias to fold into"


def _conv_delta(weight, groups, positions, means) -> np.ndarray:
    cout, cin_g = weight.shape[:2]
    cout_g = cout // groups
    delta = np.zeros(cout)
    per_filter = weight.reshape(cout, cin_g, -1).sum(-1)  # (cout, cin/g): kernel window summed
    for k, m in zip(positions, means):
        g = k // cin_g
        rows = slice(g * cout_g, (g + 1) * cout_g)
        delta[rows] += per_filter[rows, k - g * cin_g] * m
    return delta


def _add_to_bias(node, view, delta: np.ndarray, by_dim) -> str:
    """Add ``delta`` to the reader's bias, creating it if absent; '' on success, else why not."""
    if node.op == "MatMul":
        return _add_to_following_add(node, view, delta)
    index = 2
    scale = float(attr(node, "beta", 1.0)) if node.op == "Gemm" else 1.0
    if scale == 0:
        return "Gemm with beta = 0"
    current = view.value(node.inputs[index]) if len(node.inputs) > index and node.inputs[index].name else None
    if current is not None and current.shape != (len(delta),):
        return f"bias of shape {current.shape} is not one value per output feature"
    dtype = view.value(node.inputs[1]).dtype
    base = np.zeros(len(delta), dtype) if current is None else current
    values = (base.astype(np.float64) + delta / scale).astype(dtype)
    new = gs.Constant(f"{node.name}_compensated_bias", values)
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = new
    if current is None:
        _join_output_group(node, index, by_dim)
    return ""


def _join_output_group(node, index: int, by_dim) -> None:
    """A new bias is sliced with the reader's output channels when those are pruned."""
    found = by_dim.get((node.outputs[0].name, 1))
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


def output_errors(original, candidates: dict, data, batch_size: int) -> dict[str, float]:
    """Relative RMS output error, ||y - y'|| / ||y|| over all of ``data``, of each candidate model.

    RMS rather than the worst element: compensation shifts means, so it is
    judged on the error over all samples, not on the single worst value.
    """
    from .verify import session

    sessions = {name: session(m.SerializeToString()) for name, m in candidates.items()}
    changes = {name: iochange.read(m) for name, m in candidates.items()}  # --allow-io-change: reshaped caches
    reference = session(original.SerializeToString())
    output_names = [o.name for o in reference.get_outputs()]
    squared, scale = dict.fromkeys(candidates, 0.0), dict.fromkeys(candidates, 0.0)
    for feeds, _ in model_batches(data, original, batch_size)[0]:
        expected = dict(zip(output_names, (np.asarray(e, np.float64) for e in reference.run(None, feeds))))
        for name, sess in sessions.items():
            got = sess.run(None, iochange.candidate_feeds(feeds, changes[name]))
            kept = iochange.comparable_outputs(expected, changes[name])
            squared[name] += sum(float(((kept[n] - g) ** 2).sum()) for n, g in zip(output_names, got))
            scale[name] += sum(float((e ** 2).sum()) for e in kept.values())
    return {name: float(np.sqrt(v / scale[name])) if scale[name] > 0 else float(np.sqrt(v))
            for name, v in squared.items()}

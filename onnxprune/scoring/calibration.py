"""Channel statistics measured on calibration data, per channel group.

Each group is measured where its channels are *read*: the inputs of the
nodes that hold weights for them (the next Conv/Gemm/MatMul, or a depthwise
Conv the channels pass through). Removing a channel means those readers stop
seeing it, so that is where its effect shows. A group without such a reader
(channels that only meet other activations) is measured where it is created.

Two measurements (``measure`` makes what a run needs in one pass over the data):

- ``activation_stats``: onnxruntime runs a copy of the model whose outputs
  include the read tensors; per channel, streamed over batches, it keeps
  mean |a|, mean a (what compensation folds into biases) and the fraction of
  exact zeros (APoZ).
- ``gradient_stats``: the PyTorch executor runs the model, the loss is
  cross-entropy against the labels or, without labels, against the original
  model's own argmax predictions (a distance to the model's own outputs has
  zero gradient at the start, so it would say nothing). For each sample n
  and channel c, s[n, c] = sum over positions of a * dL_n/da, which equals
  sum of w * dL_n/dw over the reader weights of the channel (for a linear
  reader). Taylor keeps |mean_n s|, Fisher keeps mean_n s^2 / 2 (OBD).
  Both are estimates of the loss change when the channel is removed, so they
  compare across groups as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..analysis.groups import Group
from ..data import Dataset, model_batches
from ..errors import require
from ..graph.view import GraphView
from ..metrics import class_labels
from ..progress import progress
from .capture import run_captured

RELU_LIKE = {"Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Softplus", "Mish"}


@dataclass
class ReadPoint:
    """Channels of one group on ``axis`` of tensor ``name``, mapped by ``owner``."""

    name: str
    axis: int
    owner: np.ndarray
    reader: str  # the node that reads it (for compensation and messages)


@dataclass
class GroupStats:
    size: int
    abs_mean: np.ndarray | None = None
    mean: dict[str, np.ndarray] = field(default_factory=dict)  # read tensor -> mean per position on axis
    zeros: np.ndarray | None = None  # fraction of exact zeros per channel (APoZ)
    relu_seen: bool = False
    taylor: np.ndarray | None = None
    fisher: np.ndarray | None = None
    obs: np.ndarray | None = None  # obs.py
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # reader input -> [x 1] Gram matrix (obs.py)


def read_points(group: Group, view: GraphView) -> list[ReadPoint]:
    """Where the group's channels are read by a node with weights (else where they are made)."""
    points, seen = [], set()
    weight_nodes = {id(s.node): s.node for s in group.params.values() if s.role == "weight"}
    for node in weight_nodes.values():
        for t in node.inputs:
            if view.is_constant(t):
                continue
            for (name, axis), slot in group.dims.items():
                if name == t.name and (name, axis) not in seen:
                    seen.add((name, axis))
                    points.append(ReadPoint(name, axis, slot.owner, node.name))
    if points:
        return points
    made = [s for s in group.dims.values() if view.producer(s.tensor) is not None
            and view.producer(s.tensor).name in group.sources]
    return [ReadPoint(s.tensor.name, s.axis, s.owner, "") for s in made[:1]]


def relu_points(group: Group, view: GraphView) -> list[ReadPoint]:
    """Group tensors produced by a ReLU-like op (where APoZ is meaningful)."""
    return [ReadPoint(s.tensor.name, s.axis, s.owner, "") for s in group.dims.values()
            if view.producer(s.tensor) is not None and view.producer(s.tensor).op in RELU_LIKE]


# --- activations, with onnxruntime ------------------------------------------
def _other_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != axis)


def _position_sums(values: np.ndarray, axis: int) -> np.ndarray:
    """Sum over every axis but ``axis`` (float64), one value per position on it. Reduced in
    place, not moved into rows first: the copy took longer than the sum (ResNet-50: 2.5x)."""
    return values.sum(axis=_other_axes(values.ndim, axis), dtype=np.float64)


def _gathered(per_pos: np.ndarray, point: ReadPoint, size: int) -> np.ndarray:
    """Per position values gathered into the group's channels."""
    owned = point.owner >= 0
    return np.bincount(point.owner[owned], per_pos[owned], minlength=size)


def _per_channel(values: np.ndarray, point: ReadPoint, size: int) -> np.ndarray:
    """Sum over samples and every other axis, gathered into the group's channels."""
    return _gathered(_position_sums(values, point.axis), point, size)


def _positions_per_channel(shape, point: ReadPoint, size: int) -> np.ndarray:
    owned = point.owner >= 0
    per_pos = np.prod(shape) / shape[point.axis]
    return np.bincount(point.owner[owned], minlength=size) * per_pos


class Activations:
    """Mean |a|, mean a per read position and APoZ per channel, accumulated over batches.

    ``means_only``: only mean a (what compensation folds into biases), when no activation
    criterion scores the channels: |a| and the zero counts are two more passes over every read
    tensor (ResNet-50 under Taylor: about 1 s of the 1.6 s this step took)."""

    def __init__(self, groups: list[Group], view: GraphView, means_only: bool = False):
        self.groups = groups
        self.means_only = means_only
        self.points = {g.id: read_points(g, view) for g in groups}
        self.relus = {g.id: [] if means_only else relu_points(g, view) for g in groups}
        self.names = sorted({p.name for ps in self.points.values() for p in ps}
                            | {p.name for ps in self.relus.values() for p in ps})
        self.sums = {g.id: np.zeros(g.size) for g in groups}
        self.counts = {g.id: np.zeros(g.size) for g in groups}
        self.zero_sums = {g.id: np.zeros(g.size) for g in groups}
        self.zero_counts = {g.id: np.zeros(g.size) for g in groups}
        self.mean_sums: dict[tuple[str, str], np.ndarray] = {}
        self.seen = 0

    def add(self, values: dict[str, np.ndarray], samples: int) -> None:
        """One batch of ``samples`` samples: ``values`` holds (at least) every name of ``names``."""
        self.seen += samples
        for g in self.groups:
            for p in self.points[g.id]:
                a = values[p.name]
                if not self.means_only:
                    self.sums[g.id] += _per_channel(np.abs(a), p, g.size)
                    self.counts[g.id] += _positions_per_channel(a.shape, p, g.size)
                per_pos = _position_sums(a, p.axis)
                key = (g.id, p.name)
                per_pos /= np.prod(a.shape) / a.shape[p.axis]
                # weighted by the batch's samples, not len(a): a time-first tensor (T, B, ...), as
                # recurrent layers read and write, has the batch on axis 1
                self.mean_sums[key] = self.mean_sums.get(key, 0) + per_pos * samples
            if self.means_only:
                continue
            for p in self.relus[g.id] or self.points[g.id]:
                a = values[p.name]
                zeros = np.count_nonzero(a == 0, axis=_other_axes(a.ndim, p.axis))
                self.zero_sums[g.id] += _gathered(zeros.astype(np.float64), p, g.size)
                self.zero_counts[g.id] += _positions_per_channel(a.shape, p, g.size)

    def result(self) -> dict[str, GroupStats]:
        stats = {g.id: GroupStats(g.size, relu_seen=bool(self.relus[g.id])) for g in self.groups}
        for g in self.groups:
            s = stats[g.id]
            if not self.means_only:
                s.abs_mean = self.sums[g.id] / np.maximum(self.counts[g.id], 1)
                s.zeros = self.zero_sums[g.id] / np.maximum(self.zero_counts[g.id], 1)
            s.mean = {name: v / max(self.seen, 1) for (gid, name), v in self.mean_sums.items() if gid == g.id}
        return stats


def activation_stats(model: onnx.ModelProto, groups: list[Group], view: GraphView, data: Dataset,
                     batch_size: int | None = None, quiet: bool = True) -> dict[str, GroupStats]:
    """Mean |a|, mean a per read position, and APoZ per channel, for every prunable group."""
    activations = Activations(groups, view)
    run_captured(model, data, [activations], batch_size, quiet, "activations")
    return activations.result()


# --- gradients, with the PyTorch executor -------------------------------------
def _loss_axis(rank: int) -> int:
    """Class axis: 1 for (N, C) and (N, C, H, W) outputs, the last for (N, T, V)-style sequences."""
    return 1 if rank in (2, 4) else rank - 1


def _cross_entropy(torch, logits, targets):
    axis = _loss_axis(logits.dim())
    logits = logits.float()
    if axis != 1:
        logits = logits.movedim(axis, 1)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def _per_sample_sums(prod, axis: int, samples: int) -> np.ndarray:
    """(samples, channels): ``prod`` summed over every axis but the batch and ``axis``.

    The batch axis is the first when it has ``samples`` entries, else the one other axis that
    has. Some readers see a tensor with the batch merged into another axis (the legacy export of
    nn.MultiheadAttention reads its output projection's input as (sequence x batch, hidden)); no
    sample's positions can be told apart there, so the batch is summed into one row: the signed
    sum (Taylor) is exact, Fisher then squares the batch's sum instead of each sample's."""
    if axis == 1 and prod.dim() > 2 and prod.shape[0] == samples:  # NCHW-like: reduced where it lies
        return prod.sum(dim=tuple(range(2, prod.dim()))).numpy()
    moved = prod.movedim(axis, 0)  # channels first: the original first axis is now axis 1
    dims = [d for d in range(1, moved.dim()) if moved.shape[d] == samples]
    batch = 1 if axis > 0 and 1 in dims else (dims[0] if len(dims) == 1 else None)
    if samples == 1 or batch is None:
        return moved.reshape(moved.shape[0], -1).sum(-1).numpy()[None, :]
    return moved.movedim(batch, 1).reshape(moved.shape[0], samples, -1).sum(-1).numpy().T


def gradient_stats(model: onnx.ModelProto, groups: list[Group], view: GraphView, data: Dataset,
                   batch_size: int | None = None, quiet: bool = True, takers: tuple = ()) -> dict[str, GroupStats]:
    """Taylor and Fisher scores per channel from activation x gradient at the read points.

    ``takers`` (Activations, obs.Grams) are handed the tensors they name from the same forward
    pass, so that scoring by gradients and compensation run the model once, not once each."""
    torch = require("torch", "a gradient criterion (taylor, fisher)", "'onnxprune[torch]'")
    from ..executor.module import TorchGraph

    graph = TorchGraph(model)
    graph.eval()
    points = {g.id: read_points(g, view) for g in groups}
    names = sorted({p.name for ps in points.values() for p in ps})
    wanted = {n for taker in takers for n in taker.names}
    captured = sorted(wanted - set(names))
    output = graph.output_names[0]
    signed = {g.id: np.zeros(g.size) for g in groups}
    squared = {g.id: np.zeros(g.size) for g in groups}
    total = 0
    labels_fit = class_labels(data.labels)
    batches, steps = model_batches(data, model, batch_size)
    for feeds, labels in progress(batches, steps, "gradients", quiet):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
        values = graph.run(tensors, names + captured + [output])
        logits = values[output]
        targets = (torch.from_numpy(labels.astype(np.int64)) if labels_fit and labels is not None
                   else logits.detach().argmax(_loss_axis(logits.dim())))
        loss = _cross_entropy(torch, logits, targets)
        acts = [values[n] for n in names]
        grads = dict(zip(names, torch.autograd.grad(loss, acts, allow_unused=True)))
        total += len(targets)
        if takers:
            arrays = {n: values[n].detach().numpy() for n in wanted}
            for taker in takers:
                taker.add(arrays, len(next(iter(feeds.values()))))
        for g in groups:
            per_sample = np.zeros((len(targets), g.size))
            for p in points[g.id]:
                grad = grads[p.name]
                if grad is None:
                    continue
                # products and sums in float32 (one sum per sample and channel, pairwise in torch),
                # then float64 across samples: a float64 copy of every product cost more than the sum
                prod = values[p.name].detach() * grad
                if prod.dtype != torch.float64:  # half precision summed in float32; float64 kept
                    prod = prod.float()
                per_pos = _per_sample_sums(prod, p.axis, len(targets)).astype(np.float64)
                owned = p.owner >= 0
                rows = per_sample if len(per_pos) == len(targets) else per_sample[:1]
                np.add.at(rows.T, p.owner[owned], per_pos[:, owned].T)
            signed[g.id] += per_sample.sum(0)
            squared[g.id] += (per_sample ** 2).sum(0)
    return {g.id: GroupStats(g.size, taylor=np.abs(signed[g.id]) / max(total, 1),
                             fisher=squared[g.id] / (2 * max(total, 1))) for g in groups}


def measure(model: onnx.ModelProto, groups: list[Group], view: GraphView, data: Dataset, *,
            gradients: bool, activations: bool, grams: bool = False, obs: bool = False,
            batch_size: int | None = None, quiet: bool = True, means_only: bool = False,
            also: tuple = ()) -> dict[str, GroupStats]:
    """The statistics the chosen criterion and compensation need, merged per group: ``grams`` the
    readers' Gram matrices (for a refit, cut/refit.py), ``obs`` the obs scores they give. One
    pass over the data: the gradients' (PyTorch) when a gradient criterion is asked for, else
    one onnxruntime pass for the activations and the Gram matrices together. ``means_only``: of
    the activations, only the means (compensation's; no activation criterion asks for more).
    ``also``: more takers fed by that pass (metrics.OutputCapture keeps the model's outputs)."""
    from .obs import Grams, obs_scores

    stats = {g.id: GroupStats(g.size) for g in groups}
    # Groups with channels on tensors inside a subgraph cannot be measured (onnxruntime hands out
    # outer tensors only): they keep empty statistics, so their criterion falls back to l2
    # (criteria.score_groups says so) and compensation leaves them alone.
    groups = [g for g in groups if not any(name in view.inner_tensors for name, _ in g.dims)]
    if not groups:
        return stats
    takers = {}
    if activations:
        takers["activations"] = Activations(groups, view, means_only)
    if grams or obs:
        takers["grams"] = Grams(groups, view)
    fed = (*takers.values(), *also)
    scored = gradient_stats(model, groups, view, data, batch_size, quiet, fed) if gradients else {}
    if not gradients and takers:
        run_captured(model, data, list(fed), batch_size, quiet, "calibration")
    if activations:
        stats.update(takers["activations"].result())
    for gid, found in scored.items():
        stats[gid].taylor, stats[gid].fisher = found.taylor, found.fisher
    if grams or obs:
        readers, measured = takers["grams"].result()
        for gid, found in readers.items():
            stats[gid].grams = {name: measured[name] for _, name, _ in found if name in measured}
        if obs:
            for gid, found in obs_scores(groups, view, readers, measured).items():
                stats[gid].obs = found
    return stats


def weight_scores(model: onnx.ModelProto, data: Dataset, criterion: str, names: list[str] | None = None,
                  batch_size: int | None = None, quiet: bool = True) -> dict[str, np.ndarray]:
    """Per-weight scores for unstructured sparsity, keyed by initializer name.

    ``taylor``: |sum over batches of w * dL/dw|; ``fisher``: sum over batches
    of (w * dL/dw)^2 / 2 (batch-level, not per-sample: per-sample gradients of
    every weight would cost one backward pass per sample). L as in
    ``gradient_stats``.
    """
    torch = require("torch", "a gradient criterion (taylor, fisher)", "'onnxprune[torch]'")
    from ..executor.module import TorchGraph

    graph = TorchGraph(model)
    graph.eval()
    wanted = [n for n in (names or graph.param_names.values()) if n in set(graph.param_names.values())]
    params = {n: graph.parameter(n) for n in wanted}
    totals = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    labels_fit = class_labels(data.labels)
    batches, steps = model_batches(data, model, batch_size)
    for feeds, labels in progress(batches, steps, "gradients", quiet):
        logits = graph(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})[0]
        targets = (torch.from_numpy(labels.astype(np.int64)) if labels_fit and labels is not None
                   else logits.detach().argmax(_loss_axis(logits.dim())))
        grads = torch.autograd.grad(_cross_entropy(torch, logits, targets), list(params.values()), allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            if g is not None:
                wg = (p.detach() * g).double()
                totals[name] += wg if criterion == "taylor" else wg.pow(2) / 2
    return {n: (t.abs() if criterion == "taylor" else t).numpy() for n, t in totals.items()}

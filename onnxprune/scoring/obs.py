"""The ``obs`` criterion: what a channel's removal costs after the best linear refit of its readers.

For a reader R (a node that sums over the channel: the next Conv, Gemm or
MatMul) with weights W and input Gram matrix H = E[x x^T] over the input
channels, removing input channel j and refitting the other columns of W by
least squares raises R's squared output error by

    damage_j = sum over R's outputs (and kernel offsets) of W[:, j]^2 / (H^-1)_jj

(Optimal Brain Surgeon applied to a whole column, as in channel pruning with
reconstruction: He et al. 2017, SlimGPT). It counts a channel that others
can stand in for (a correlated one) as cheap, and one that nothing else
carries as dear. A channel's score is the sum over its readers of damage_j
divided by the reader's output energy tr(W H W^T): the fraction of each
reader's output that reconstruction (recovery/reconstruct.py) cannot bring
back. For kernels wider than 1 the Gram matrix is over channels only (the
correlation between kernel offsets is left out), an approximation.

H is measured with onnxruntime on the calibration data at each reader's
input (rows: samples x positions, subsampled to MAX_ROWS per sample).
"""

from __future__ import annotations

import numpy as np
import onnx

from ..analysis.groups import Group
from ..data import Dataset
from ..graph.view import GraphView
from ..rules.weights import MULTIPLIED, WEIGHTS
from .capture import run_captured

MAX_ROWS = 2048  # positions per sample in the Gram matrix (a uniform subsample; it estimates an average)
# Of the mean diagonal, before H is inverted. Small: it only keeps the inverse finite, and a
# larger one makes a channel the others reproduce exactly look as costly as the damping (on
# the pretrained EfficientNet-Lite1, 1e-2 and 1e-3 gave the same held-out top-1)
DAMPING = 1e-3
HOLDOUT = 4  # every 4th sample's Gram matrix is kept apart, to check a refit on
MAX_INPUTS = 8192  # wider reader inputs (a Flatten into a classifier) keep the Gram matrix's diagonal only
GREEDY_FLOPS = 2e10  # above this (channels x reader weights), channels are ranked in one shot, not greedily


def reader_slots(group: Group, view: GraphView) -> list[tuple]:
    """(weight slot, data tensor name, data axis) of each node that sums over the group's channels."""
    found = []
    for slot in group.params.values():
        node = slot.node
        entry = WEIGHTS.get(node.op) if node.domain in (None, "", "ai.onnx") else None
        weight = entry.operands.get(slot.input) if entry is not None else None
        if weight is None or weight.role not in MULTIPLIED or weight.reduces is None:
            continue
        if slot.axis != weight.reduces(node.attrs, len(slot.tensor.shape)):
            continue  # the node's own output channels, not an input it sums over
        for index, tensor in enumerate(node.inputs):
            data = entry.operands.get(index)
            if index == slot.input or data is None or view.is_constant(tensor) or data.reduces is None:
                continue
            axis = data.reduces(node.attrs, view.rank(tensor) or 0)
            if (tensor.name, axis) in group.dims:
                found.append((slot, tensor.name, axis))
    return found


class Grams:
    """Per reader input, its Gram matrix accumulated over batches (what ``measure_grams`` returns),
    fed the captured tensors of each batch by whichever pass runs the model."""

    def __init__(self, groups: list[Group], view: GraphView):
        self.readers = {g.id: reader_slots(g, view) for g in groups}
        self.names = sorted({name for found in self.readers.values() for _, name, _ in found})
        self.axes = {name: axis for found in self.readers.values() for _, name, axis in found}
        self.sums: dict[str, list] = {}
        self.rng = np.random.default_rng(0)
        self.seen = 0

    def add(self, values: dict[str, np.ndarray], count: int) -> None:
        """One batch of ``count`` samples: ``values`` holds (at least) every name of ``names``."""
        batch_held = (self.seen + np.arange(count)) % HOLDOUT == HOLDOUT - 1
        self.seen += count
        for name in self.names:
            value = np.asarray(values[name])
            # samples along axis 0 (anything else, say a weight-like operand, is all fitted on)
            axis = self.axes[name]
            by_sample = value.ndim > 1 and len(value) == count and axis != 0  # axis 0 holds channels
            held = batch_held if by_sample else np.zeros(len(value), bool)
            # the samples are picked inside _rows's gather, not copied out of the tensor first
            parts = [_gram(_rows(value, axis, self.rng, np.nonzero(~held)[0] if by_sample else None))
                     if (~held).any() else 0,
                     _gram(_rows(value, axis, self.rng, np.nonzero(held)[0])) if held.any() else 0]
            before = self.sums.get(name, [0, 0])
            self.sums[name] = [before[0] + parts[0], before[1] + parts[1]]

    def result(self) -> tuple[dict, dict[str, np.ndarray]]:
        return self.readers, {name: np.stack([np.asarray(fit, np.float64), np.broadcast_to(check, np.shape(fit))])
                              for name, (fit, check) in self.sums.items()}


def measure_grams(model: onnx.ModelProto, groups: list[Group], view: GraphView, data: Dataset,
                  batch_size: int | None = None, quiet: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """The readers of each group (``reader_slots``) and, per reader input, its Gram matrix over
    the channel axis with a column of ones appended (the bias: E[[x 1][x 1]^T], summed over
    rows); only the diagonal (without the ones) for inputs wider than MAX_INPUTS. Each is two,
    stacked: of the samples a refit is fitted on, and of every HOLDOUT-th sample, held out to
    check it (cut/refit.py)."""
    grams = Grams(groups, view)
    run_captured(model, data, [grams], batch_size, quiet, "obs")
    return grams.result()


GRAM_CHUNK = 8192  # rows multiplied in float32 at a time before the sum moves to float64


def _gram(rows: np.ndarray) -> np.ndarray:
    """[x 1]^T [x 1] summed over ``rows`` (float64). The products are taken in the rows' own
    float32, GRAM_CHUNK rows at a time, and added in float64: each chunk's sums are as exact as
    float32's 24 bits over 8,192 terms allow (a relative error near 1e-5, under the refit's
    weakest damping, 1e-3), half the time of float64 products (ResNet-50's Gram matrices, 3.7 ->
    2.5 s under cProfile, the refit's output error the same to 3 digits); 8,192 rows a chunk,
    not 2,048: 30% faster again (a 512-channel tensor, 32k rows: 0.113 -> 0.080 s)."""
    if rows.shape[1] > MAX_INPUTS:
        return np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
    gram = np.zeros((rows.shape[1] + 1,) * 2)
    for start in range(0, len(rows), GRAM_CHUNK):
        chunk = rows[start:start + GRAM_CHUNK]
        gram[:-1, :-1] += chunk.T @ chunk
    gram[-1, :-1] = gram[:-1, -1] = rows.sum(0, dtype=np.float64)
    gram[-1, -1] = len(rows)
    return gram


def obs_scores(groups: list[Group], view: GraphView, readers: dict, grams: dict) -> dict[str, np.ndarray | None]:
    """Group id -> the obs score of each channel (None for a group without a reader to measure at)."""
    return {g.id: _scores(g, readers[g.id], view, grams) if readers[g.id] else None for g in groups}


def _rows(value: np.ndarray, axis: int, rng, samples: np.ndarray | None = None) -> np.ndarray:
    """The tensor as rows over its channel ``axis`` (float32, float64 kept), at most MAX_ROWS per
    sample; ``samples``: only these indices of axis 0 (the batch; ``axis`` is not 0)."""
    channels = value.shape[axis]
    moved = np.moveaxis(value, axis, -1)  # a view: only the rows kept are copied out of it
    shape = moved.shape[:-1] if samples is None else (len(samples), *moved.shape[1:-1])
    count = int(np.prod(shape)) if channels else 0
    limit = MAX_ROWS * (shape[0] if value.ndim > 2 else 1)
    if count > limit:
        index = np.unravel_index(np.sort(rng.choice(count, limit, replace=False)), shape)
        if samples is not None:
            index = (samples[index[0]], *index[1:])
        rows = moved[index]
    elif samples is None:
        rows = moved.reshape(-1, channels)
    else:
        rows = moved[samples].reshape(-1, channels)
    return rows.astype(np.float64 if rows.dtype == np.float64 else np.float32, copy=False)


def _inverse(gram: np.ndarray) -> np.ndarray:
    diagonal = np.diag(gram)
    unit = float(diagonal.mean()) if diagonal.size else 0.0
    damped = gram + np.eye(len(gram)) * DAMPING * max(unit, 1e-30)
    try:  # positive definite once damped: an LU inverse, several times faster than pinv's SVD
        inverse = np.linalg.inv(damped)
        if np.isfinite(inverse).all():
            return inverse
    except np.linalg.LinAlgError:
        pass
    return np.linalg.pinv(damped)


_GONE = -2  # the owner of a position already removed (-1: the ones column, never removed)
# A reader's matrices are compacted once this share of their positions (and at least
# COMPACT_MIN) is gone: often enough to keep them near their live size, rarely enough that
# the copies cost little beside the updates
COMPACT_SHARE, COMPACT_MIN = 4, 16


class _Reader:
    """One reader's least-squares problem over its input positions, as channels leave it."""

    def __init__(self, slot, owner: np.ndarray, view: GraphView, gram: np.ndarray):
        self.owner = owner
        weight = np.asarray(view.value(slot.tensor), np.float64)
        if gram.ndim == 1:  # too wide for the whole Gram matrix: its diagonal, and no refit updates
            columns = np.moveaxis(weight, slot.axis, 0).reshape(weight.shape[slot.axis], -1)
            self.fixed = (columns * columns).sum(1) * gram
            self.energy = float(self.fixed.sum())
            self.w = self.inverse = None
            return
        self.fixed, self.gone = None, 0
        self.owner = np.concatenate([owner, [-1]])  # the last input is the ones column: never removed
        columns = np.moveaxis(weight, slot.axis, -1)  # (outputs, kernel..., inputs of one group)
        grouped = WEIGHTS[slot.node.op].grouped
        groups = int(slot.node.attrs.get("group", 1)) if grouped else 1
        per_group, inputs = columns.shape[-1], len(gram)
        # All inputs as columns: a group's filters read only its block (zeros elsewhere), so the
        # Gram matrix is kept block-diagonal (but for the ones column every group shares) and its
        # inverse stays within the blocks. The ones column's weights start at zero: they take
        # what the refit moves into the bias.
        w = np.zeros((columns.shape[0] * int(np.prod(columns.shape[1:-1])), inputs))
        rows = columns.reshape(columns.shape[0], -1, per_group)
        features = columns.shape[0] // groups
        mask = np.zeros((inputs, inputs), bool)
        for g in range(groups):
            block = slice(g * per_group, (g + 1) * per_group)
            w[g * features * rows.shape[1]:(g + 1) * features * rows.shape[1], block] = \
                rows[g * features:(g + 1) * features].reshape(-1, per_group)
            mask[block, block] = True
        mask[-1, :] = mask[:, -1] = True
        gram = np.where(mask, gram, 0.0)
        self.w, self.inverse = w, _inverse(gram)
        # tr(W H W^T) as one matrix product: a three-operand einsum runs its loops unblocked
        # (EfficientNet-Lite1's 43 readers: 8 s)
        self.energy = float(((w @ gram) * w).sum())

    def damage(self, size: int) -> np.ndarray:
        """Per channel: the output energy lost (after the best refit) if it went now, as a fraction."""
        if self.fixed is not None:
            per_position = self.fixed
        else:
            diagonal = np.diag(self.inverse)
            live = diagonal > 1e-30
            per_position = np.where(live, np.einsum("ij,ij->j", self.w, self.w) / np.where(live, diagonal, 1.0), 0.0)
        mine = self.owner >= 0
        return np.bincount(self.owner[mine], per_position[mine], minlength=size) / self.energy

    def remove(self, channel: int) -> None:
        """Remove the channel's positions, updating the other columns as the refit would (OBS)."""
        if self.fixed is not None:
            self.fixed = np.where(self.owner == channel, 0.0, self.fixed)
            return
        gone = np.nonzero(self.owner == channel)[0]
        for j in gone:
            pivot = self.inverse[j, j]
            if pivot <= 1e-30:
                continue
            row = self.inverse[j] / pivot  # scaled once: one temporary per update, not two
            self.w -= np.outer(self.w[:, j], row)
            self.inverse -= np.outer(self.inverse[:, j], row)
        self.owner[gone] = _GONE
        self.gone += len(gone)
        if self.gone > max(COMPACT_MIN, len(self.owner) // COMPACT_SHARE):
            self._compact()

    def _compact(self) -> None:
        """Drop the removed positions' rows and columns: the update has zeroed them (to rounding),
        and the greedy removal's cost is the matrices' size at each step (n^3/3 instead of n^3 over
        a whole group: EfficientNet-Lite1's 29 groups, 76 -> 46 s, the same order)."""
        kept = np.nonzero(self.owner != _GONE)[0]
        self.owner, self.w = self.owner[kept], self.w[:, kept]
        self.inverse = self.inverse[np.ix_(kept, kept)]
        self.gone = 0


def _scores(group: Group, found: list, view: GraphView, grams: dict) -> np.ndarray:
    """Each channel's rank in the order a greedy removal takes them (cheapest first), 0 first.

    At each step the channel whose removal costs the group's readers the least output energy
    (summed over readers, each relative to its own output) goes, and every reader's remaining
    columns are updated as a least-squares refit would change them: channels that stand in for
    one another are not all counted as cheap at once.
    """
    readers = [_Reader(slot, group.dims[(name, axis)].owner, view, grams[name].sum(0)) for slot, name, axis in found]
    readers = [r for r in readers if r.energy > 0]
    flops = group.size * sum(r.w.size + r.inverse.size for r in readers if r.w is not None)
    if flops > GREEDY_FLOPS:  # one shot: each channel's cost with all the others kept
        return sum(r.damage(group.size) for r in readers)
    order = np.zeros(group.size)
    alive = np.ones(group.size, bool)
    for step in range(group.size):
        cost = sum(r.damage(group.size) for r in readers) if readers else np.zeros(group.size)
        cost = np.where(alive, cost, np.inf)
        channel = int(np.argmin(cost))
        order[channel], alive[channel] = step, False
        for r in readers:
            r.remove(channel)
    return order

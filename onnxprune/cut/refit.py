"""Refit from Gram matrices: a cut's readers re-solved in closed form, before the graph is cut.

When channels leave a reader's input (the Conv, Gemm or MatMul after a
pruned group), the columns it keeps and its bias are re-solved so that its
output stays as close as least squares allows to the original's:

    [W_K b] = (H[K1, K1] + D)^-1 (H[K1, :] [W b0] + D [W_K b0])

where H = E[[x 1][x 1]^T] is the Gram matrix of the reader's input measured
on the original model (scoring/obs.py), K1 the kept positions plus the ones
column, and D the damping (on the weights, not the bias), chosen on the
samples held out of H. No model runs: the Gram matrices are all it takes. It is exact
when only this reader's input moved (one group cut alone, as sensitivity
cuts them) and a first approximation otherwise (recovery/reconstruct.py then
refits on the pruned model's own activations). For a kernel wider than one
the Gram matrix is over channels only, each kernel offset solved alike.
Bias compensation (compensate.py) is the special case that refits the bias
alone from the means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis.groups import Group, ParamSlot
from ..graph.view import GraphView
from ..planning.plan import Plan
from ..rules.weights import WEIGHTS
from ..scoring.obs import reader_slots
from .compensate import join_output_group
from .surgery import positions

DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # of the mean diagonal, tried on the held-out Gram matrix
DAMPING = 1e-2  # without held-out samples to choose one
# Output rows (outputs x kernel offsets) the damping is chosen on: a wide reader has thousands,
# and each damping tried costs a solve over all of them; the held-out error of a sample of the
# rows ranks the dampings (a factor of 10 apart) as all rows do (a seeded sample, not a stride,
# which would pick one kernel offset), and the chosen one is then
# solved for every row once (ResNet-50's 53 refits, with the early stop below: 13.7 -> 6.5 s
# under cProfile)
CHOICE_ROWS = 512


@dataclass
class Refit:
    readers: list[str] = field(default_factory=list)  # nodes whose weights were re-solved
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why not

    def to_json(self) -> dict:
        return {"readers": len(self.readers), "skipped": self.skipped}


def refit(view: GraphView, groups: list[Group], plan: Plan, stats: dict) -> Refit:
    """Re-solve the weights of every reader of a cut group that has a Gram matrix (edits ``view``)."""
    done = Refit()
    by_dim = {key: (g, slot) for g in groups for key, slot in g.dims.items()}
    gone: dict[tuple[int, str], tuple] = {}  # (reader node, input) -> (slot, axis, positions removed)
    for group in groups:
        if group.id not in plan.keep or group.id not in stats or not stats[group.id].grams:
            continue
        removed = plan.removed(group.id)
        for slot, name, axis in reader_slots(group, view):
            cut = positions(group.dims[(name, axis)].owner, removed)
            if len(cut) and name in stats[group.id].grams:
                key = (id(slot.node), name)
                before = gone.get(key, (slot, stats[group.id].grams[name], np.empty(0, int)))
                gone[key] = (slot, before[1], np.union1d(before[2], cut))  # several groups may share an input
    for slot, gram, cut in gone.values():
        why = _refit_reader(view, slot, gram, cut, by_dim)
        if why:
            done.skipped[slot.node.name] = why
        elif slot.node.name not in done.readers:
            done.readers.append(slot.node.name)
    return done


def _solve(fit: np.ndarray, check: np.ndarray, block: np.ndarray, k1: np.ndarray, targets: np.ndarray):
    """The refit of ``targets`` (rows over ``block``) on the inputs ``k1``: the damping (of
    DAMPINGS) that reproduces the held-out Gram's outputs best, then solved on all samples; None
    when the cut weights alone do better held out (too few samples for this reader's inputs)."""
    cut_weights = np.zeros((len(targets), len(k1)))
    cut_weights[:, :-1] = targets[:, np.searchsorted(block, k1[:-1])]
    # What every damping shares, computed once: the kept inputs' Gram block and the original
    # outputs' products with it (the products are the costly part: rows x block x kept).
    fit_kk, fit_rhs = fit[np.ix_(k1, k1)], fit[np.ix_(k1, block)] @ targets.T

    def solve(a: np.ndarray, rhs: np.ndarray, factor: float, start: np.ndarray = cut_weights):
        """Damped towards the cut weights (``start``, rows as ``rhs``'s columns): a direction the
        data barely excites keeps them."""
        reg = np.full(len(k1), factor * max(float(np.diag(a)[:-1].mean()) if len(k1) > 1 else 1.0, 1e-30))
        reg[-1] = 0.0  # the bias is not pulled anywhere
        damped = a.copy()
        damped[np.diag_indices_from(damped)] += reg
        try:  # the damping is diagonal: scaling rows, not a (kept x kept) @ (kept x rows) product
            return np.linalg.solve(damped, rhs + reg[:, None] * start.T).T
        except np.linalg.LinAlgError:
            return None

    if not check.any():  # nothing held out: the default damping
        return solve(fit_kk, fit_rhs, DAMPING)
    check_kk, cross = check[np.ix_(k1, k1)], targets @ check[np.ix_(block, k1)]
    rows = (np.sort(np.random.default_rng(0).choice(len(targets), CHOICE_ROWS, replace=False))
            if len(targets) > CHOICE_ROWS else slice(None))

    def error(s: np.ndarray) -> float:
        """||s x_K1 - targets x||^2 over the chosen rows, summed over the held-out samples, from
        their Gram matrix, less ||targets x||^2: the same for every candidate, so it is left out
        (on ResNet-50's 2,048-wide readers, a rows x block x block product for no decision)."""
        return float((s * (s @ check_kk)).sum() - 2 * (s * cross[rows]).sum())

    tried, previous = {None: error(cut_weights[rows])}, None
    for factor in DAMPINGS:  # weakest first; the held-out error is unimodal in the damping (less
        # fitting, then more bias), so the first rise ends the search: on ResNet-50 every reader's
        # best was the weakest, and one solve past it saved three
        s = solve(fit_kk, fit_rhs[:, rows], factor, cut_weights[rows])
        if s is None or not np.isfinite(s).all():
            continue
        tried[factor] = error(s)
        if previous is not None and tried[factor] > previous:
            break
        previous = tried[factor]
    best = min(tried, key=lambda k: tried[k])
    # on all samples: the Gram matrices add, and check[K1, block] @ targets^T is cross^T (symmetric)
    return None if best is None else solve(fit_kk + check_kk, fit_rhs + cross.T, best)


def _refit_reader(view: GraphView, slot: ParamSlot, gram: np.ndarray, cut: np.ndarray, by_dim) -> str:
    """Re-solve one reader's kept columns and bias; '' on success, else why not."""
    node = slot.node
    if gram.ndim != 3:
        return "input too wide for its Gram matrix"
    entry = WEIGHTS[node.op]
    weight = np.asarray(view.value(slot.tensor), np.float64)
    bias_index = next((i for i, o in entry.operands.items() if o.role == "bias"), None)
    if bias_index is None:
        return f"{node.op} has no bias input to refit"
    attrs = node.attrs
    scale = float(attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    bias_scale = float(attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    if scale == 0 or bias_scale == 0:
        return f"{node.op} with alpha or beta = 0"
    bias_tensor = node.inputs[bias_index] if len(node.inputs) > bias_index and node.inputs[bias_index].name else None
    bias = view.value(bias_tensor) if bias_tensor is not None else None
    outputs = weight.shape[0] if node.op == "Conv" else weight.shape[1 - slot.axis]
    if bias is not None and bias.shape != (outputs,):
        return f"bias of shape {bias.shape} is not one value per output feature"
    columns = np.moveaxis(weight, slot.axis, -1)  # (outputs..., inputs of one group)
    shape = columns.shape
    rows = columns.reshape(shape[0], -1, shape[-1]) * scale  # (outputs, offsets, inputs of a group)
    groups = int(attrs.get("group", 1)) if entry.grouped else 1
    per_group, per_out = shape[-1], shape[0] // groups
    new_bias = (np.zeros(outputs) if bias is None else bias.astype(np.float64) * bias_scale)
    fit, check = gram
    for g in range(groups):
        block = np.arange(g * per_group, (g + 1) * per_group)
        kept = np.setdiff1d(block, cut)
        if len(kept) == len(block):
            continue
        w = rows[g * per_out:(g + 1) * per_out]  # (outputs of the group, offsets, per_group)
        targets = w.reshape(-1, per_group)  # each (output, offset) a row over the block's inputs
        solved = _solve(fit, check, block, np.concatenate([kept, [len(fit) - 1]]), targets)
        if solved is None:
            return "refitting does not reproduce held-out samples better than the cut weights"
        new = np.zeros_like(targets)
        new[:, kept - g * per_group] = solved[:, :-1]
        rows[g * per_out:(g + 1) * per_out] = new.reshape(w.shape)
        new_bias[g * per_out:(g + 1) * per_out] += solved[:, -1].reshape(per_out, -1).sum(1)
    refitted = np.moveaxis((rows / scale).reshape(shape), -1, slot.axis).astype(view.value(slot.tensor).dtype)
    node.inputs[slot.input] = gs.Constant(f"{slot.tensor.name}_refit_{node.name}", refitted)  # slots follow
    dtype = refitted.dtype
    values = (new_bias / bias_scale).astype(dtype)
    while len(node.inputs) <= bias_index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[bias_index] = gs.Constant(f"{node.name}_refit_bias", values)
    if bias is None:
        axis = entry.operands[bias_index].features({}, view.rank(node.outputs[0]) or 0)
        join_output_group(node, bias_index, axis, by_dim)
    return ""

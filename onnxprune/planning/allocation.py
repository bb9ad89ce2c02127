"""Per-group ratios allocated from measured sensitivity (``--allocate sensitivity``).

Starting from every group whole, repeatedly raise the ratio of the group
whose next step adds the least measured squared error per channel removed
(looking ahead over the whole grid, so a flat stretch after a costly step is
seen), until the removed fraction of all prunable channels (channels, not
MACs) reaches the target. Squared errors of separate groups are treated as
additive, as they are for uncorrelated perturbations of the output: an
approximation, but it ranks groups by how much they matter, and it spreads
the cut where a plain sum of errors would pile it onto a few groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import UsageError
from ..report.sensitivity import Sensitivity

_GRID_STEP = 0.1


UNITS = ("channels", "macs", "params")
# What a step costs: "error", the squared relative RMS output error, or "divergence", the mean KL
# of a classifier's logits (where every group measured one). The KL weighs each logit by how much
# it moves the prediction, but on EfficientNet-Lite1 at --target-macs 0.7 it chose a plan with
# 1.2 points less held-out top-1 (77.6% against 78.8%, docs/budgets.md): the error stays.
DAMAGE = "error"


def damages(sensitivity: Sensitivity) -> list[list[float]]:
    """Each group's additive damage at each ratio: the squared output error, or the KL of the
    logits under DAMAGE = "divergence" when every group has one."""
    groups = sensitivity.groups
    if DAMAGE == "divergence" and groups and all(g.divergence for g in groups):
        return [list(g.divergence) for g in groups]
    return [[e * e for e in g.error] for g in groups]


@dataclass
class Allocation:
    target: float  # fraction of ``unit`` to remove
    ratios: dict[str, float]  # group id -> chosen ratio (0: left whole)
    removed: int  # of ``unit``, as the separate measurements add up
    channels: int  # the total of ``unit``
    sensitivity: Sensitivity
    chosen_error: dict[str, float] = field(default_factory=dict)  # group id -> measured error at its ratio
    unit: str = "channels"  # what the target counts: prunable channels, or the model's MACs or params

    def to_json(self) -> dict:
        by_id = {g.id: g for g in self.sensitivity.groups}
        return {
            "method": "sensitivity",
            "unit": self.unit,
            "target": self.target,
            "removed_fraction": self.removed / self.channels if self.channels else 0.0,
            "grid": self.sensitivity.ratios,
            "samples": self.sensitivity.samples,
            "seconds": self.sensitivity.seconds,
            "groups": [{"id": gid, "sources": by_id[gid].sources, "modules": by_id[gid].modules,
                        "channels": by_id[gid].channels,
                        "ratio": r, "error": self.chosen_error[gid]} for gid, r in self.ratios.items()],
        }


def allocation_grid(target: float, unit: str = "channels") -> list[float]:
    """Steps of 0.1 up to twice the target (at most 0.9), and the target itself; for MACs and params
    every step to 0.9 (a budget over the whole model may take most of a few wide groups)."""
    top = (min(0.9, 2 * target) if unit == "channels" else 0.9) + 1e-9
    steps = [round(_GRID_STEP * k, 10) for k in range(1, 10) if _GRID_STEP * k <= top]
    return sorted(set(steps) | {float(target)})


def choose_allocation(sensitivity: Sensitivity, target: float, unit: str = "channels") -> Allocation:
    """Per-group ratios removing at least ``target`` of ``unit`` (all prunable channels, or the
    model's MACs or params), cheapest squared error per unit removed first.

    MACs and params removed by separate groups are added up; where two cut groups meet (a
    convolution between them) the real saving is a little smaller, which the caller checks on
    the cut model (pipeline/prune.py).
    """
    groups = sensitivity.groups
    amounts = {"channels": [g.removed for g in groups], "macs": [g.macs for g in groups],
               "params": [g.params for g in groups]}[unit]
    total = {"channels": sum(g.channels for g in groups), "macs": sensitivity.macs or 0,
             "params": sensitivity.params or 0}[unit]
    goal = target * total
    # A curve per group: (amount removed, squared error, ratio), starting whole. Squared: the
    # output perturbations of separate groups are roughly uncorrelated, so their energies add.
    curves = [[(0, 0.0, 0.0)] + [(n, d, r) for n, d, r in zip(amount, damage, sensitivity.ratios)]
              for amount, damage in zip(amounts, damages(sensitivity))]
    at = [0] * len(groups)
    removed = 0
    while removed < goal - 1e-9:
        step = _cheapest_step(curves, at)
        if step is None:
            most = sum(max(n for n, _, _ in c) for c in curves)
            what = "prunable channels" if unit == "channels" else unit.upper() if unit == "macs" else unit
            raise UsageError(f"`allocate`: the measured ratios (up to {max(sensitivity.ratios):g}) remove at most "
                             f"{most} of {total} {what}, short of {target:g}")
        index, to = step
        removed += curves[index][to][0] - curves[index][at[index]][0]
        at[index] = to
    ratios = {g.id: curves[i][at[i]][2] for i, g in enumerate(groups)}
    errors = {g.id: _error_at(g, sensitivity.ratios, curves[i][at[i]][2]) for i, g in enumerate(groups)}
    return Allocation(target, ratios, removed, total, sensitivity, errors, unit)


def _error_at(group, ratios, ratio: float) -> float:
    return group.error[list(ratios).index(ratio)] if ratio else 0.0


def _cheapest_step(curves, at) -> tuple[int, int] | None:
    """(group index, grid index) of the move that adds the least (squared) error per unit removed."""
    best, best_cost = None, math.inf
    for i, curve in enumerate(curves):
        here_removed, here_error, _ = curve[at[i]]
        for j in range(at[i] + 1, len(curve)):
            extra = curve[j][0] - here_removed
            if extra <= 0:
                continue
            cost = (curve[j][1] - here_error) / extra
            if best is None or cost < best_cost:
                best, best_cost = (i, j), cost
    return best

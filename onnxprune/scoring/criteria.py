"""Importance criteria: one scorer per criterion.

Weight criteria, ``score(group, view, seed) -> np.ndarray`` of one score per
channel of the group (higher = more important): per-weight means, so that
groups of different fan-in compare fairly when ranked together (--global).

Data criteria (``taylor``, ``fisher``, ``activation``, ``apoz``) need
calibration data: ``calibration.py`` measures every group once, and
``data.py`` turns the measurements into scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

from ..errors import UsageError
from . import from_data as data_criteria
from .magnitude import bn_scale, l1, l2
from .random import random_scores

SCORERS: dict[str, Callable] = {"l1": l1, "l2": l2, "bn": bn_scale, "random": random_scores}
DATA_SCORERS: dict[str, Callable] = {**data_criteria.GRADIENT, **data_criteria.ACTIVATION, **data_criteria.GRAM}
CRITERIA = [*SCORERS, *DATA_SCORERS]


class ImportanceWarning(UserWarning):
    """A criterion could not be applied as asked (e.g. bn without BatchNormalization)."""


def needs_data(criterion: str) -> bool:
    return criterion in DATA_SCORERS


def needs_gradients(criterion: str) -> bool:
    """Measured from activation x gradient (calibration.gradient_stats)."""
    return criterion in data_criteria.GRADIENT


def needs_grams(criterion: str) -> bool:
    """Measured from input Gram matrices at the readers (obs.py)."""
    return criterion in data_criteria.GRAM


def needs_activations(criterion: str) -> bool:
    """Measured from activations alone (calibration.activation_stats)."""
    return criterion in data_criteria.ACTIVATION


def check_criterion(criterion: str, has_data: bool) -> None:
    if criterion not in SCORERS and criterion not in DATA_SCORERS:
        raise UsageError(f"unknown `importance` {criterion!r}; choose from {', '.join(CRITERIA)}")
    if needs_data(criterion) and not has_data:
        raise UsageError(f"`importance` {criterion!r} is measured on data: give `data` FILE")


def score_groups(groups, view, criterion: str, seed: int = 0, stats=None) -> dict[str, np.ndarray]:
    """Scores per prunable group; ``stats`` (group id -> GroupStats) for the data criteria."""
    check_criterion(criterion, stats is not None)
    scores, fallbacks = {}, []
    for group in groups:
        if not group.prunable:
            continue
        if needs_data(criterion):
            values = DATA_SCORERS[criterion](stats[group.id])
        else:
            values = SCORERS[criterion](group, view, seed)
        if values is None:  # criterion does not apply to this group
            fallbacks.append(group.id)
            values = l2(group, view, seed)
        scores[group.id] = np.asarray(values, dtype=np.float64)
    if fallbacks:
        what = {"bn": "have no BatchNormalization (exporters fold it into Conv)",
                "apoz": "pass no ReLU-like op",
                "obs": "have no node that sums over their channels"}.get(criterion, "cannot be measured this way")
        warnings.warn(
            f"importance {criterion!r}: {len(fallbacks)} group(s) {what}; used l2 for them, e.g. {fallbacks[0]}",
            ImportanceWarning,
            stacklevel=2,
        )
    return scores

"""Importance criteria: one scorer per criterion, all with the same signature.

``score(group, view, seed) -> np.ndarray`` of one score per channel of the
group (higher = more important). Scores are per-weight means, so that groups
of different fan-in compare fairly when ranked together (--global).
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from ..errors import UsageError
from .magnitude import bn_scale, l1, l2
from .random import random_scores

SCORERS: dict[str, Callable] = {"l1": l1, "l2": l2, "bn": bn_scale, "random": random_scores}


class ImportanceWarning(UserWarning):
    """A criterion could not be applied as asked (e.g. bn without BatchNormalization)."""


def score_groups(groups, view, criterion: str, seed: int = 0) -> dict[str, np.ndarray]:
    if criterion not in SCORERS:
        raise UsageError(f"unknown importance {criterion!r}; choose from {', '.join(SCORERS)}")
    scorer = SCORERS[criterion]
    scores, fallbacks = {}, []
    for group in groups:
        if not group.prunable:
            continue
        values = scorer(group, view, seed)
        if values is None:  # criterion does not apply to this group
            fallbacks.append(group.id)
            values = l2(group, view, seed)
        scores[group.id] = values
    if fallbacks:
        warnings.warn(
            f"importance {criterion!r}: {len(fallbacks)} group(s) have no BatchNormalization "
            f"(exporters fold it into Conv); used l2 for them, e.g. {fallbacks[0]}",
            ImportanceWarning,
            stacklevel=2,
        )
    return scores

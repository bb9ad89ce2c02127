"""Magnitude criteria: L1 / L2 of every weight coupled to a channel, and BN |gamma|."""

from __future__ import annotations

import numpy as np

from ..rules.quant import stored_values

WEIGHT_ROLES = ("weight",)


def _per_channel(group, view, roles, reduce) -> tuple[np.ndarray, np.ndarray] | None:
    """Sum of ``reduce(w)`` and element count per channel over the slots with ``roles``."""
    slots = [s for s in group.params.values() if s.role in roles]
    if not slots:
        return None
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    for slot in slots:
        w = stored_values(slot.node, slot.input, view)  # a quantized weight: its float values
        rows = np.moveaxis(w, slot.axis, 0).reshape(w.shape[slot.axis], -1)
        per_pos = reduce(rows)
        owned = slot.owner >= 0
        total += np.bincount(slot.owner[owned], per_pos[owned], minlength=group.size)
        count += np.bincount(slot.owner[owned], minlength=group.size) * (w.size / w.shape[slot.axis])
    return total, np.maximum(count, 1)


def _abs_sum(rows: np.ndarray) -> np.ndarray:
    return np.abs(rows).sum(axis=1, dtype=np.float64)


def _square_sum(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32, copy=False)
    return np.einsum("ij,ij->i", rows, rows, dtype=np.float64)  # no temporary of w's size


def l1(group, view, seed=0):
    """Mean |w| over all weights (conv filters, matrices, on both sides) of each channel."""
    total, count = _per_channel(group, view, WEIGHT_ROLES, _abs_sum)
    return total / count


def l2(group, view, seed=0):
    """Root-mean-square of all weights of each channel."""
    total, count = _per_channel(group, view, WEIGHT_ROLES, _square_sum)
    return np.sqrt(total / count)


def bn_scale(group, view, seed=0):
    """Mean |gamma| of the group's BatchNormalization nodes; None when it has none."""
    found = _per_channel(group, view, ("bn_scale",), _abs_sum)
    if found is None:
        return None
    total, count = found
    return total / count

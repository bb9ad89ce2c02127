"""Checks of single values that options, files and flags share: a ratio, a ratio mapping (a
--ratios file), a grid of ratios to try, an N:M pattern. They need nothing but the errors, so
options.py, the planning readers and the command line can all use them without import cycles."""

from __future__ import annotations

import math

from .errors import UsageError, quoted


def check_ratio(value, option: str = "`ratio`") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or math.isnan(value) or not 0 <= value < 1):
        raise UsageError(f"{option} must be in [0, 1), got {value}")


def parse_nm(text) -> tuple[int, int]:
    """``"2:4"`` (or ``(2, 4)``) -> (2, 4); 0 < N < M, else UsageError."""
    parts = [str(p) for p in text] if isinstance(text, (tuple, list)) and len(text) == 2 else str(text).split(":")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"`nm` sparsity must look like 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise UsageError(f"`nm` sparsity needs 0 < N < M, got {n}:{m}")
    return n, m


def check_ratio_mapping(mapping, what: str = "`ratios`") -> dict[str, float]:
    """A mapping of group id or source glob -> ratio in [0, 1), as floats."""
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"{what}: expected a non-empty mapping from group id or node-name glob to a ratio")
    checked = {}
    for key, ratio in mapping.items():
        if not isinstance(key, str):
            raise UsageError(f"{what}: key {quoted(key)} is not a group id or a glob")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise UsageError(f"{what}: ratio for {quoted(key)} must be a number in [0, 1), got {quoted(ratio)}")
        checked[key] = float(ratio)
    return checked


def check_grid(ratios, what: str = "`ratios`") -> list[float]:
    """A list of ratios to try, each in [0, 1): sorted, without repeats."""
    values = list(ratios)
    if not values:
        raise UsageError(f"{what}: give at least one ratio")
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:  # also rejects NaN
            raise UsageError(f"{what}: every ratio must be in [0, 1), got {r}")
    return sorted(set(float(r) for r in values))

"""What a structured prune removed, against what was asked of it: a warning when it lowered the
MACs by less than WEAK_REDUCTION, naming the barriers that held the most of them, and the
`min_reduction` requirement (ReductionTooSmall, exit 7, nothing written).

A run whose channels were mostly blocked otherwise looks like a success: it writes a model
that is barely smaller, and the summary lists its barriers without saying what they cost.
"""

from __future__ import annotations

import math

from ..analysis.stats import format_count
from ..errors import ReductionTooSmall, UsageError
from ..options import PruneOptions
from ..report.records import Report
from ..report.text import held_by, node_labels

WEAK_REDUCTION = 1.05  # original MACs / pruned MACs below which a structured prune warns


def weak_reduction_warning(report: Report, options: PruneOptions) -> str | None:
    """The warning for a prune that lowered MACs by less than WEAK_REDUCTION, unless it was asked
    to remove nothing; None otherwise (also when the MACs cannot be counted)."""
    ratio = report.macs_ratio
    if ratio is None or ratio >= WEAK_REDUCTION or not _asks_for_channels(options):
        return None
    return (f"structured pruning lowered MACs only {_times(ratio)} (less than {WEAK_REDUCTION:g}x); "
            f"{held_by(report.barriers, labels=node_labels(report.modules))}")


def require_reduction(macs_before: int | None, macs_after: int | None, minimum: float | None,
                      barriers: list[dict], modules: dict[str, str] | None = None) -> None:
    """ReductionTooSmall unless ``macs_before / macs_after`` is at least ``minimum`` (None: no
    requirement); ``barriers`` (``Report.barriers``) say what held the MACs, naming nodes by their
    ``modules`` (``Report.modules``) where they have one."""
    if minimum is None:
        return
    if not macs_before or not macs_after:
        raise UsageError("`min_reduction` compares MACs, and this model's cannot be counted (no Conv, Gemm or "
                         "MatMul, or a dim shape inference leaves unknown: pin it with `input_shapes`)")
    ratio = macs_before / macs_after
    if ratio < minimum:
        raise ReductionTooSmall(
            f"MACs fell {_times(ratio)} ({format_count(macs_before)} -> {format_count(macs_after)}), less than "
            f"`min_reduction` {minimum:g}; nothing written ({held_by(barriers, labels=node_labels(modules or {}))})")


def _asks_for_channels(options: PruneOptions) -> bool:
    """Does the run ask for any channel to go? (`ratio` 0 alone keeps every channel on purpose.)"""
    widths = options.widths
    return bool(widths.ratio or widths.head_ratio or widths.plan is not None or options.target is not None
                or any((widths.ratios or {}).values()))


def _times(ratio: float) -> str:
    """A ratio rounded down to 2 decimals: 1.4999 shows as 1.49x, not as a 1.50x that would meet 1.5."""
    return f"{math.floor(ratio * 100) / 100:.2f}x"

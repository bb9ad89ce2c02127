"""A speedup budget met by an allocation: with data, `--target-speedup S` puts the channels where
the measured damage per MAC is smallest, as a MACs budget does (planning/allocation.py).

A uniform ratio (pipeline/target.py) cuts the residual stream and the stem of a pretrained net as
much as the rest: on the ImageNet-pretrained EfficientNet-Lite1, the uniform ratio that runs as fast
as removing 7 blocks kept 0% top-1 (docs/depth.md). Here every group is cut alone on the
allocation's grid once (pipeline/sensitivity.py), and the search bisects the fraction of the MACs
the allocation removes: each candidate is that allocation's cut, written and timed against the
input interleaved, as the uniform search times its ratios. The plan kept is the smallest
fraction whose candidate met the speedup.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx

from ..analysis.analyse import Analysis
from ..data import Dataset
from ..options import PruneOptions
from ..planning.allocation import Allocation, allocation_grid, choose_allocation
from ..report.sensitivity import Sensitivity
from . import steps
from .search import CandidateTimer, Evaluation, TargetResult, bisect, write_candidate
from .sensitivity import Prepared, sensitivity_for_allocation

RESOLUTION = 0.01  # of the MACs removed: finer than the timings resolve
# The goal never asks for all the MACs the grid can remove, nor for more than 0.9 of the model's:
# beyond, the candidates are nearly empty models (pipeline/target.py: MAX_SPEEDUP_RATIO). The
# groups' separate savings add up to more than the model has where cut groups meet (EfficientNet-
# Lite1: 1.64 of its MACs), so the sum alone would waste the first timings on such models.
HIGHEST_SHARE = 0.95
HIGHEST_GOAL = 0.9


def allocate_for_speedup(model: onnx.ModelProto, calib: Dataset, options: PruneOptions,
                         prepared: Prepared) -> tuple[Allocation, TargetResult]:
    """The allocation removing the smallest fraction of ``model``'s MACs whose cut meets
    ``options.target`` (a speedup) when timed against ``model``; and the search's record."""
    started = time.perf_counter()
    target = options.target
    sensitivity = sensitivity_for_allocation(model, calib, allocation_grid(0.5, "macs"), options, prepared)
    with tempfile.TemporaryDirectory(prefix="onnxprune-target-") as tmp:
        probe = _AllocationProbe(model, prepared.analysis, prepared.scores, sensitivity, options, Path(tmp))
        result = bisect(target, probe, min(HIGHEST_GOAL, HIGHEST_SHARE * _removable(sensitivity)), RESOLUTION,
                        target.max_evaluations, knob="MACs removed")
    result.provider, result.batch = probe.provider, probe.batch
    result.seconds = time.perf_counter() - started
    return probe.allocation_at(result.ratio), result


def _removable(sensitivity: Sensitivity) -> float:
    """The fraction of the model's MACs the measured grid can remove, every group at its highest ratio."""
    if not sensitivity.macs:
        return 0.0
    return sum(max(g.macs, default=0) for g in sensitivity.groups) / sensitivity.macs


class _AllocationProbe:
    """Measured speedup of the allocation removing a fraction of the MACs: cut, write, time."""

    def __init__(self, model, analysis: Analysis, scores: dict, sensitivity: Sensitivity,
                 options: PruneOptions, folder: Path):
        self.model, self.analysis, self.scores, self.options = model, analysis, scores, options
        self.sensitivity = sensitivity
        base_path = folder / "base.onnx"  # the input as given: what a speedup is measured against
        write_candidate(model, base_path)
        self.timer = CandidateTimer(options.target.latency, base_path, folder, options.analysis.input_shapes)
        self.provider, self.batch = self.timer.provider, self.timer.batch

    @property
    def runs(self) -> int:
        return self.timer.runs

    def allocation_at(self, share: float) -> Allocation:
        return choose_allocation(self.sensitivity, share, "macs")

    def __call__(self, share: float) -> Evaluation:
        plan = steps.choose(self.analysis, self.scores, self.options.widths, self.allocation_at(share).ratios)
        return self.timer.evaluate(share, plan.keep, lambda: steps.cut(
            self.model, steps.reanalyse(self.analysis, self.options.analysis), plan).model)

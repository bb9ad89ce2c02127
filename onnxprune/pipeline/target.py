"""Budget-targeted pruning: the uniform ratio that meets a MACs, params or latency budget.

    --target-macs 0.5        keep at most half of the MACs
    --target-params 0.3      keep at most 30% of the parameters
    --target-speedup 1.5     run at least 1.5x faster on --provider (measured)

The search is a bisection on the ratio of one prune (prune.py) with every other
option as given (round-to, global ranking, importance, ...). It keeps one
invariant: at ``low`` the model misses the budget, at ``high`` it meets it.
The unpruned model (ratio 0) misses any budget below 1, and the search first
checks that ``high`` = MAX_RATIO meets it (else the budget cannot be met:
blocked groups, `min_channels` and `round_to` put a floor under the model).
The answer is ``high``: within budget, while ``low``, at most ``resolution``
smaller, is not; MACs and params fall step-wise with the ratio (whole
channels, multiples of --round-to), so no ratio in between does better.

Latency is not monotone to the last percent (timings are noisy), so the
speedup search measures at most ``max_evaluations`` candidates; candidates
with the same channel widths as one already timed are not timed again.

A speedup is always the input model's latency over the candidate's. After a
depth cut (pipeline/depth.py) the model searched is not that input (``base``):
its ratio 0 is timed first, and where the removed blocks alone meet the
target, no channel is cut.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnx

from ..errors import UsageError
from ..options import PruneOptions, Target
from .prune import prune_model
from .search import CandidateTimer, Evaluation, TargetResult, bisect, write_candidate

MAX_RATIO = 0.99  # a prune takes ratios in [0, 1)
MAX_SPEEDUP_RATIO = 0.9  # beyond this, the latency search would time nearly empty models
RESOLUTION = 1 / 1024  # MACs/params: about 11 prunes for the whole search
SPEEDUP_RESOLUTION = 0.01


def find_ratio(model: onnx.ModelProto, target: Target, base_path: str | Path | None = None,
               options: PruneOptions | None = None, base: onnx.ModelProto | None = None) -> TargetResult:
    """The smallest uniform ratio whose pruned model meets ``target``, with ``options`` (validated,
    their data loaded) as for any prune; their own target and ratio are not used.

    ``base_path`` (the file of the model the speedup is measured against) is what a speedup target
    times against; without it that model is written to a temporary folder first. It is ``model``
    itself, or ``base`` where ``model`` is already a cut of it (the blocks a depth step removed).
    """
    target.check()
    started = time.perf_counter()
    options = options or PruneOptions()
    # compensation and reconstruction change no width, MAC or latency
    options = replace(options, target=None, data=replace(options.data, compensate=False, reconstruct=False))
    with tempfile.TemporaryDirectory(prefix="onnxprune-target-") as tmp:
        if target.metric == "speedup":
            probe = _SpeedupProbe(model, target, Path(tmp), base_path, options, base)
            at_zero = probe(0.0) if base is not None else None  # what the depth cut alone achieved
            result = bisect(target, probe, MAX_SPEEDUP_RATIO, SPEEDUP_RESOLUTION, target.max_evaluations, at_zero)
            result.provider, result.batch = probe.provider, probe.batch
        else:
            result = bisect(target, _CountProbe(model, target, options), MAX_RATIO, RESOLUTION, None)
    result.seconds = time.perf_counter() - started
    return result


def _at(options: PruneOptions, ratio: float) -> PruneOptions:
    return replace(options, widths=replace(options.widths, ratio=ratio))


class _CountProbe:
    """MACs or params kept at a ratio: one in-memory prune."""

    def __init__(self, model, target: Target, options: PruneOptions):
        self.model, self.target, self.options = model, target, options
        self.measured = None  # scores and statistics: measured by the first prune, reused by the rest
        self.runs = 0  # evaluations that did the work (cached ones excluded)

    def __call__(self, ratio: float) -> Evaluation:
        result = prune_model(self.model, _at(self.options, ratio), self.measured)
        self.measured, report = result.measured, result.report
        before, after = ((report.macs_before, report.macs_after) if self.target.metric == "macs"
                         else (report.params_before, report.params_after))
        if not before or after is None:
            raise UsageError(f"{self.target.option}: the model's {self.target.metric.upper()} cannot be counted "
                             "(unresolved dims: pin them with `input_shapes`)")
        self.runs += 1
        return Evaluation(ratio, after / before)


class _SpeedupProbe:
    """Measured speedup at a ratio: prune in memory, write, time base vs candidate interleaved."""

    def __init__(self, model, target: Target, folder: Path, base_path, options: PruneOptions, base=None):
        self.model, self.folder, self.options = model, folder, options
        self.latency = target.latency
        self.provider = self.latency.check()
        self.batch = self.latency.batches[0]
        if base_path is None:
            base_path = folder / "base.onnx"
            write_candidate(model if base is None else base, base_path)
        self.timer = CandidateTimer(self.latency, base_path, folder, options.analysis.input_shapes)
        self.measured = None  # scores and statistics: measured by the first prune, reused by the rest

    @property
    def runs(self) -> int:
        return self.timer.runs

    def __call__(self, ratio: float) -> Evaluation:
        result = prune_model(self.model, _at(self.options, ratio), self.measured)
        self.measured = result.measured
        return self.timer.evaluate(ratio, result.plan.keep, lambda: result.model)

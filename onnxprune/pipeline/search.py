"""The bisection every budget search shares: a probe measures a candidate, the search keeps the
invariant that ``low`` misses the budget and ``high`` meets it.

A probe is called with one number (a uniform ratio in pipeline/target.py, a MACs goal of an
allocation in pipeline/speedup_allocation.py) and returns an Evaluation: what that candidate
achieves (fraction of MACs/params kept, or measured speedup). ``probe.runs`` counts the
evaluations that did the work, so a latency search can stop after ``max_evaluations``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from ..errors import BudgetUnreachable
from ..model.save import AtomicModelWriter
from ..options import Target


@dataclass
class Evaluation:
    ratio: float  # what the probe was called with: a uniform ratio, or the MACs an allocation removes
    achieved: float  # fraction of MACs/params kept, or measured speedup
    cached: bool = False  # speedup: a candidate with the same channel widths was timed before


@dataclass
class TargetResult:
    metric: str
    value: float
    ratio: float  # the ratio chosen (an allocation's: the fraction of MACs it removes)
    achieved: float  # at that ratio: fraction kept, or measured speedup
    resolution: float  # the ratio ``resolution`` below ``ratio`` misses the budget
    evaluations: list[Evaluation] = field(default_factory=list)
    provider: str | None = None  # speedup only
    batch: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def meets(target: Target, achieved: float) -> bool:
    return achieved >= target.value if target.metric == "speedup" else achieved <= target.value


def bisect(target: Target, probe, high: float, resolution: float, budget: int | None,
           at_zero: Evaluation | None = None, knob: str = "ratio") -> TargetResult:
    """``at_zero``: ratio 0 measured (a model already cut), else it achieves 1.0 (the input itself).
    ``knob`` names what the probe is called with, for the error when ``high`` misses the budget."""
    result = TargetResult(target.metric, target.value, 0.0, 1.0 if at_zero is None else at_zero.achieved, resolution)
    if at_zero is not None:
        result.evaluations.append(at_zero)
    if meets(target, result.achieved):  # the model as it is already meets it
        return result
    at_high = probe(high)
    result.evaluations.append(at_high)
    if not meets(target, at_high.achieved):
        raise BudgetUnreachable(unreachable(target, at_high, knob))
    low, best = 0.0, at_high
    while high - low > resolution and (budget is None or probe.runs < budget):
        mid = (low + high) / 2
        at_mid = probe(mid)
        result.evaluations.append(at_mid)
        if meets(target, at_mid.achieved):
            high, best = mid, at_mid
        else:
            low = mid
    result.ratio, result.achieved = best.ratio, best.achieved
    result.resolution = high - low
    return result


def unreachable(target: Target, at: Evaluation, knob: str = "ratio") -> str:
    if target.metric == "speedup":
        return (f"{target.option} {target.value:g} cannot be met: {knob} {at.ratio:g} measured {at.achieved:.2f}x; "
                "ask for less, or pin the dims and batch that matter (`input_shapes`, `batches`)")
    what = "MACs" if target.metric == "macs" else "params"
    return (f"{target.option} {target.value:g} cannot be met: at ratio {at.ratio:g} the model still keeps "
            f"{at.achieved:.3f} of its {what} (blocked groups, `min_channels`, `round_to`, `ignore`)")


def write_candidate(model: onnx.ModelProto, path: Path) -> None:
    with AtomicModelWriter(path) as writer:
        writer.write(model)


class CandidateTimer:
    """Times candidates against ``base_path`` interleaved at one batch, once per set of channel widths:
    the part the speedup searches share (a probe holds one)."""

    def __init__(self, latency, base_path: Path, folder: Path, input_shapes):
        self.latency, self.base_path, self.folder, self.input_shapes = latency, Path(base_path), folder, input_shapes
        self.provider, self.batch = latency.check(), latency.batches[0]
        self.runs = 0  # evaluations that did the work (cached ones excluded)
        self.seen: dict[tuple, float] = {}  # channel widths -> speedup measured

    def evaluate(self, value: float, keep: dict, build) -> Evaluation:
        """The speedup of the candidate with kept channels ``keep`` (group id -> kept), ``build()`` its model,
        called only when no candidate with the same widths was timed."""
        widths = tuple(sorted((gid, len(kept)) for gid, kept in keep.items()))
        if widths in self.seen:  # another value, the same widths (whole channels, rounding)
            return Evaluation(value, self.seen[widths], cached=True)
        path = self.folder / f"candidate{self.runs}.onnx"
        write_candidate(build(), path)
        timing = self.latency.time([self.base_path, path], self.input_shapes, [self.batch])
        path.unlink()
        self.runs += 1
        self.seen[widths] = timing.timings[1].speedup
        return Evaluation(value, self.seen[widths])

"""Budget-targeted pruning: the uniform ratio that meets a MACs, params or latency budget.

    --target-macs 0.5        keep at most half of the MACs
    --target-params 0.3      keep at most 30% of the parameters
    --target-speedup 1.5     run at least 1.5x faster on --provider (measured)

The search is a bisection on the ratio of ``api.prune`` with every other
option as given (round-to, global ranking, importance, ...). It keeps one
invariant: at ``low`` the model misses the budget, at ``high`` it meets it.
The unpruned model (ratio 0) misses any budget below 1, and the search first
checks that ``high`` = MAX_RATIO meets it (else the budget cannot be met:
blocked groups, --min-channels and --round-to put a floor under the model).
The answer is ``high``: within budget, while ``low``, at most ``resolution``
smaller, is not; MACs and params fall step-wise with the ratio (whole
channels, multiples of --round-to), so no ratio in between does better.

Latency is not monotone to the last percent (timings are noisy), so the
speedup search measures at most ``max_evaluations`` candidates; candidates
with the same channel widths as one already timed are not timed again.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from .errors import UsageError

MAX_RATIO = 0.99  # api.prune takes ratios in [0, 1)
MAX_SPEEDUP_RATIO = 0.9  # beyond this, the latency search would time nearly empty models
RESOLUTION = 1 / 1024  # MACs/params: about 11 prunes for the whole search
SPEEDUP_RESOLUTION = 0.01
METRICS = ("macs", "params", "speedup")
FLAGS = {"macs": "--target-macs", "params": "--target-params", "speedup": "--target-speedup"}


@dataclass
class Latency:
    """How to time base vs pruned with ``onnxprune.bench`` (for --bench and --target-speedup)."""

    provider: str = "cpu"
    batches: tuple[int, ...] = (1,)
    threads: int | None = None
    warmup: int = 10
    iters: int = 100

    def check(self) -> str:
        """The full provider name; a one-line UsageError when it is not available here."""
        from .bench import resolve_provider

        if not self.batches or min(self.batches) < 1:
            raise UsageError(f"batch sizes must be at least 1, got {list(self.batches)}")
        if self.iters < 1 or self.warmup < 0:
            raise UsageError(f"iters must be at least 1 and warm-up at least 0, got {self.iters}, {self.warmup}")
        return resolve_provider(self.provider)

    def time(self, paths: list[str | Path], input_shapes: dict | None = None, batches=None):
        """``onnxprune.bench.bench`` of ``paths`` (the first is the speedup reference)."""
        from .bench import bench

        return bench([str(p) for p in paths], list(batches or self.batches), provider=self.provider,
                     threads=self.threads, warmup=self.warmup, iters=self.iters, input_shapes=input_shapes)


@dataclass
class Target:
    """A budget: ``value`` is the fraction of MACs/params kept, or the latency speedup to reach."""

    metric: str
    value: float
    latency: Latency | None = None  # speedup only: how to time (its first batch size is used)
    max_evaluations: int = 8  # speedup only: benchmark runs at most

    def check(self) -> None:
        if self.metric not in METRICS:
            raise UsageError(f"unknown target metric {self.metric!r}; choose from {', '.join(METRICS)}")
        flag = FLAGS[self.metric]
        value = self.value
        if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        if self.metric != "speedup" and not 0 < value <= 1:
            raise UsageError(f"{flag} is the fraction kept, in (0, 1], got {value}")
        if self.metric == "speedup":
            if value <= 0:
                raise UsageError(f"{flag} must be positive, got {value}")
            if self.latency is None:
                raise UsageError(f"{flag} measures latency: name the runtime with --provider cpu|cuda")
            if self.max_evaluations < 2:
                raise UsageError(f"the speedup search needs at least 2 evaluations, got {self.max_evaluations}")
            self.latency.check()


@dataclass
class Evaluation:
    ratio: float
    achieved: float  # fraction of MACs/params kept, or measured speedup
    cached: bool = False  # speedup: a candidate with the same channel widths was timed before


@dataclass
class TargetResult:
    metric: str
    value: float
    ratio: float  # the ratio chosen
    achieved: float  # at that ratio: fraction kept, or measured speedup
    resolution: float  # the ratio ``resolution`` below ``ratio`` misses the budget
    evaluations: list[Evaluation] = field(default_factory=list)
    provider: str | None = None  # speedup only
    batch: int | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def summary_line(target: dict) -> str:
    """One line for the printed summary, from ``TargetResult.to_json()``."""
    n = len(target["evaluations"])
    if target["metric"] == "speedup":
        timed = sum(1 for e in target["evaluations"] if not e["cached"])
        return (f"target  speedup >= {target['value']:g}x on {target['provider']} batch {target['batch']}: "
                f"ratio {target['ratio']:.4f} chosen, {target['achieved']:.2f}x measured "
                f"({timed} benchmark run(s), {target['seconds']:.1f} s)")
    what = "MACs" if target["metric"] == "macs" else "params"
    return (f"target  {what} <= {target['value']:g} of the original: ratio {target['ratio']:.4f} chosen, "
            f"{target['achieved']:.4f} kept ({n} prune(s), {target['seconds']:.1f} s)")


def check_combination(target: Target, ratio, plan, steps: int, allocate) -> None:
    """A target replaces --structured; the options that fix the ratio otherwise cannot go with it."""
    flag = FLAGS.get(target.metric, "--target-*")
    if ratio is not None:
        raise UsageError(f"{flag} and --structured are exclusive: the target chooses the ratio")
    if plan is not None:
        raise UsageError(f"{flag} and --plan-in are exclusive: a plan already says what to cut")
    if steps > 1:
        raise UsageError(f"{flag} chooses one ratio; it does not combine with --steps")
    if allocate is not None:
        raise UsageError(f"{flag} and --allocate are exclusive: --allocate needs --structured R")


def find_ratio(model: onnx.ModelProto, target: Target, base_path: str | Path | None = None,
               **options) -> TargetResult:
    """The smallest uniform ratio whose pruned model meets ``target`` (``options`` as for ``api.prune``).

    ``base_path`` (the model's file) is what --target-speedup times against;
    without it the model is written to a temporary folder first.
    """
    target.check()
    started = time.perf_counter()
    options = {**options, "compensate": False}  # bias compensation changes no width, MAC or latency
    with tempfile.TemporaryDirectory(prefix="onnxprune-target-") as tmp:
        if target.metric == "speedup":
            probe = _SpeedupProbe(model, target, Path(tmp), base_path, options)
            result = _bisect(target, probe, MAX_SPEEDUP_RATIO, SPEEDUP_RESOLUTION, target.max_evaluations)
            result.provider, result.batch = probe.provider, probe.batch
        else:
            result = _bisect(target, _CountProbe(model, target.metric, options), MAX_RATIO, RESOLUTION, None)
    result.seconds = time.perf_counter() - started
    return result


def _meets(target: Target, achieved: float) -> bool:
    return achieved >= target.value if target.metric == "speedup" else achieved <= target.value


def _bisect(target: Target, probe, high: float, resolution: float, budget: int | None) -> TargetResult:
    result = TargetResult(target.metric, target.value, 0.0, 1.0, resolution)
    if _meets(target, 1.0):  # the unpruned model already meets it
        return result
    at_high = probe(high)
    result.evaluations.append(at_high)
    if not _meets(target, at_high.achieved):
        raise UsageError(_unreachable(target, at_high))
    low, best = 0.0, at_high
    while high - low > resolution and (budget is None or probe.runs < budget):
        mid = (low + high) / 2
        at_mid = probe(mid)
        result.evaluations.append(at_mid)
        if _meets(target, at_mid.achieved):
            high, best = mid, at_mid
        else:
            low = mid
    result.ratio, result.achieved = best.ratio, best.achieved
    result.resolution = high - low
    return result


def _unreachable(target: Target, at: Evaluation) -> str:
    flag = FLAGS[target.metric]
    if target.metric == "speedup":
        return (f"{flag} {target.value:g} cannot be met: ratio {at.ratio:g} measured {at.achieved:.2f}x; "
                "ask for less, or pin the dims and batch that matter (--input-shape, --bench-batch)")
    what = "MACs" if target.metric == "macs" else "params"
    return (f"{flag} {target.value:g} cannot be met: at ratio {at.ratio:g} the model still keeps "
            f"{at.achieved:.3f} of its {what} (blocked groups, --min-channels, --round-to, --ignore)")


class _CountProbe:
    """MACs or params kept at a ratio: one in-memory prune."""

    def __init__(self, model, metric: str, options: dict):
        self.model, self.metric, self.options = model, metric, options
        self.runs = 0  # evaluations that did the work (cached ones excluded)

    def __call__(self, ratio: float) -> Evaluation:
        from .api import prune

        report = prune(self.model, ratio, **self.options).report
        before, after = ((report.macs_before, report.macs_after) if self.metric == "macs"
                         else (report.params_before, report.params_after))
        if not before or after is None:
            raise UsageError(f"{FLAGS[self.metric]}: the model's {self.metric.upper()} cannot be counted "
                             "(unresolved dims: pin them with --input-shape)")
        self.runs += 1
        return Evaluation(ratio, after / before)


class _SpeedupProbe:
    """Measured speedup at a ratio: prune in memory, write, time base vs candidate interleaved."""

    def __init__(self, model, target: Target, folder: Path, base_path, options: dict):
        self.model, self.folder, self.options = model, folder, options
        self.latency = target.latency
        self.provider = self.latency.check()
        self.batch = self.latency.batches[0]
        if base_path is None:
            base_path = folder / "base.onnx"
            _write(model, base_path)
        self.base_path = Path(base_path)
        self.runs = 0  # evaluations that did the work (cached ones excluded)
        self.seen: dict[tuple, float] = {}  # channel widths -> speedup measured

    def __call__(self, ratio: float) -> Evaluation:
        from .api import prune

        result = prune(self.model, ratio, **self.options)
        widths = tuple(sorted((gid, len(keep)) for gid, keep in result.plan.keep.items()))
        if widths in self.seen:
            return Evaluation(ratio, self.seen[widths], cached=True)
        path = self.folder / f"candidate{self.runs}.onnx"
        _write(result.model, path)
        timing = self.latency.time([self.base_path, path], self.options.get("input_shapes"), [self.batch])
        path.unlink()
        self.runs += 1
        self.seen[widths] = timing.timings[1].speedup
        return Evaluation(ratio, self.seen[widths])


def _write(model: onnx.ModelProto, path: Path) -> None:
    from .model import AtomicModelWriter

    with AtomicModelWriter(path) as writer:
        writer.write(model)

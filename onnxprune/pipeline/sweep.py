"""``onnxprune sweep``: the prune command at several ratios, each result measured the same way.

For every ratio the whole file job runs (pipeline/run.py: prune, recover,
verify, and the side-by-side benchmark when asked) into a private temporary
folder, so each point of the sweep is exactly what ``onnxprune MODEL
--structured R`` with the same options would write. Each pruned model is
then measured on the evaluation data against the original (output error,
top-1 and agreement, metrics.py). A ratio that fails (verification, a
quality gate) is recorded with its reason and the sweep goes on: a sweep is
for finding where a model breaks.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from ..data import Dataset
from ..errors import OnnxPruneError, UsageError
from ..metrics import evaluate
from ..model.load import read_model
from ..options import PruneOptions
from .run import run_file

SWEEP_SCHEMA = 1


@dataclass
class SweepPoint:
    ratio: float
    params: int | None = None
    macs: int | None = None
    output_error: float | None = None  # relative RMS on the evaluation data (metrics.py)
    accuracy: float | None = None  # top-1, with class labels
    agreement: float | None = None  # top-1 equal to the original's
    latency_ms: float | None = None  # median, at the first benchmark batch
    speedup: float | None = None  # the input's median / this one's, timed side by side
    input_ms: float | None = None  # the input's median in the same benchmark
    seconds: float = 0.0  # the prune run's own time
    failed: str | None = None  # why this ratio wrote no model (exit code and message)


@dataclass
class Sweep:
    model: str
    params: int
    macs: int | None
    points: list[SweepPoint]
    evaluated_on: str | None = None  # what the error/accuracy columns were measured on
    samples: int = 0
    accuracy: float | None = None  # the original's top-1 on the same samples
    latency_ms: float | None = None  # the original's median latency: the median over the ratios' benchmarks
    bench: dict | None = None  # provider, batch, threads, iters of the latency columns
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return {"schema_version": SWEEP_SCHEMA, **asdict(self)}


def sweep_file(input_path: str | Path, ratios: list[float], options: PruneOptions,
               evaluation: Dataset | None = None, evaluated_on: str | None = None) -> Sweep:
    """Prune ``input_path`` at each of ``ratios`` with ``options`` (their ratio replaced) and
    measure each result; ``evaluation`` is the data the error and accuracy are measured on."""
    started = time.perf_counter()
    if not ratios:
        raise UsageError("`ratios` is empty: give at least one ratio to try")
    original = read_model(input_path).model
    from ..analysis.stats import count_macs, count_params

    result = Sweep(str(input_path), count_params(original), count_macs(original, options.analysis.input_shapes),
                   [], evaluated_on)
    if evaluation is not None:
        result.samples = len(evaluation)
        result.accuracy = evaluate(original, original, evaluation).get("original_accuracy")
    failures = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-sweep-") as folder:
        for ratio in ratios:
            point, failure = _prune_at(input_path, ratio, options, Path(folder) / f"ratio-{ratio:g}.onnx", result)
            failures += [failure] if failure else []
            if point.failed is None and evaluation is not None:
                measured = evaluate(onnx.load(str(Path(folder) / f"ratio-{ratio:g}.onnx")), original, evaluation)
                point.output_error = measured["output_error"]
                point.accuracy = measured.get("accuracy")
                point.agreement = measured.get("agreement")
            result.points.append(point)
    timed = sorted(p.input_ms for p in result.points if p.input_ms is not None)
    if timed:
        result.latency_ms = timed[len(timed) // 2]
    if len(failures) == len(ratios):  # nothing to compare: the run fails as its first ratio did
        raise failures[0]
    result.seconds = time.perf_counter() - started
    return result


def _prune_at(input_path, ratio: float, options: PruneOptions, output: Path,
              sweep: Sweep) -> tuple[SweepPoint, OnnxPruneError | None]:
    """One point: the file job at ``ratio`` into ``output``; a failure of the run is recorded in
    the point and returned."""
    options = replace(options, widths=replace(options.widths, ratio=ratio),
                      output=replace(options.output, force=True, report_path=None, plan_out=None))
    point = SweepPoint(ratio)
    try:
        report = run_file(input_path, output, options)
    except UsageError:
        raise  # the options themselves are wrong: every ratio would fail alike
    except OnnxPruneError as exc:
        point.failed = f"exit {exc.exit_code}: {exc}"
        return point, exc
    point.params, point.macs, point.seconds = report.params_after, report.macs_after, report.seconds
    for message in report.warnings:
        if message not in sweep.warnings:
            sweep.warnings.append(message)
    if report.bench is not None and report.bench.timings:
        first = report.bench.timings[0]
        base, pruned = [t for t in report.bench.timings if t.batch == first.batch][:2]
        point.latency_ms, point.speedup, point.input_ms = pruned.median_ms, pruned.speedup, base.median_ms
        if sweep.bench is None:
            sweep.bench = {"provider": report.bench.provider, "batch": first.batch,
                           "threads": report.bench.threads, "iters": report.bench.iters}
    return point, None

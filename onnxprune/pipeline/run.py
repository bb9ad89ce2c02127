"""The whole job on a file: what ``onnxprune MODEL ...`` and ``prune_file`` run.

    load -> [search the ratio for a budget] -> prune (in rounds, recovering) -> [sparsify] -> [quantize]
         -> [quality gate] -> write + verify atomically -> [benchmark] -> report

Options are validated first, and every output path is checked before any
work; nothing is written unless the run succeeds, and the input is never
modified.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from ..analysis.stats import count_params
from ..cut import iochange
from ..cut.sparsity import sparsify, weight_names
from ..errors import QualityGateFailed, UsageError, VerificationFailed
from ..metrics import evaluate
from ..model.inputs import resolve_with_choices
from ..model.load import read_model
from ..model.save import (
    AtomicModelWriter,
    check_output_path,
    check_side_files,
    default_output_path,
)
from ..options import PruneOptions, TrainOptions, validate
from ..planning.plan import Plan
from ..report.records import Report
from ..runtime.verify import index_bounds, run_original, verify_file
from ..scoring.calibration import weight_scores
from ..scoring.criteria import needs_gradients
from . import steps
from .prune import PruneResult, unpruned
from .quantize import CALIBRATION_SAMPLES, quantize, refuse_quantized
from .rounds import prune_rounds
from .target import find_ratio


def run_file(input_path: str | Path, output_path: str | Path | None, options: PruneOptions) -> Report:
    """Prune the file ``input_path`` as ``options`` say and write the verified result to
    ``output_path`` (default: MODEL.pruned.onnx beside it) atomically, unless a dry run."""
    started = time.perf_counter()
    options = validate(options)
    out = options.output
    input_path = Path(input_path)
    output = Path(output_path) if output_path else default_output_path(input_path)
    if not out.dry_run:
        check_output_path(input_path, output, out.force)
    plan_file = options.widths.plan if isinstance(options.widths.plan, (str, Path)) else None
    keep_float = options.quantize.keep_float if options.quantize is not None else None
    check_side_files(input_path, None if out.dry_run else output,
                     {"`report_path`": out.report_path, "`plan_out`": out.plan_out, "`keep_float`": keep_float},
                     {"`plan`": plan_file})
    if plan_file is not None:
        options = replace(options, widths=replace(options.widths, plan=Plan.load(plan_file)))
    loaded = read_model(input_path)
    model, conversion = loaded.model, loaded.conversion
    del loaded  # `model` must be the input's only reference: it is freed before verification
    if options.quantize is not None:
        refuse_quantized(model)
    options = replace(options, data=replace(options.data, data=steps.data_of(model, options.data)))
    searched = None
    if options.target is not None and options.widths.allocate != "sensitivity":
        searched = find_ratio(model, options.target, input_path, options)
        options = replace(options, widths=replace(options.widths, ratio=searched.ratio))
    widths = options.widths
    if options.sparsity is not None and widths.ratio is None and widths.plan is None and not widths.ratios:
        result = unpruned(model, options.analysis.input_shapes)
    else:
        result = prune_rounds(model, options)
    if options.sparsity is not None:
        result = _sparsified(result, options)
    float_model = None
    if options.quantize is not None:  # after recovery and sparsity; the gate and verification judge the result
        float_model = result.model if options.quantize.keep_float or options.bench is not None else None
        result = _quantized(result, options)
    if options.gate is not None and (options.gate.max_accuracy_drop is not None
                                     or options.gate.max_output_error is not None):
        _quality_gate(result, model, options)
    report = result.report
    report.input = str(input_path)
    report.conversion = conversion and conversion.to_json()
    report.target = searched and searched.to_json()
    if options.target is not None and searched is None:  # allocated to the budget (pipeline/prune.py)
        report.target = _allocated(options.target, report)
    if out.plan_out:
        result.plan.save(out.plan_out)
    if not out.dry_run:
        report.output = str(output)
        if result.model is model:  # nothing prunable: an unchanged copy
            _copy_model(input_path, model, output)
        else:
            pruned = result.model
            result = model = None  # free the input model and its analysis before verification loads it again
            _write_verified(pruned, output, input_path, report, out.verify, options.seed,
                            options.analysis.input_shapes)
        if keep_float:
            with AtomicModelWriter(Path(keep_float)) as writer:
                writer.write(float_model)
        report.written = True
    report.seconds = time.perf_counter() - started
    if options.bench is not None:  # after the pruning time is taken: the benchmark is not part of it
        report.bench = _bench(input_path, output, float_model, keep_float, options)
    if out.report_path:
        report.save(out.report_path)
    return report


def _allocated(target, report: Report) -> dict:
    """The budget an allocation met, in the form of a search's result (report.target)."""
    before, after = ((report.macs_before, report.macs_after) if target.metric == "macs"
                     else (report.params_before, report.params_after))
    achieved = after / before if before and after is not None else None
    return {"metric": target.metric, "value": target.value, "ratio": None, "achieved": achieved, "resolution": 0.0,
            "evaluations": [], "provider": None, "batch": None, "seconds": 0.0, "allocated": True}


def _sparsified(result: PruneResult, options: PruneOptions) -> PruneResult:
    """Sparsity on the (structurally pruned) model; the result is verified with it.

    With a gradient criterion (taylor, fisher) and data, single weights are
    ranked by their gradient scores (|w * dL/dw|) instead of their magnitude.
    """
    sparsity, widths = options.sparsity, options.widths
    scores = None
    if widths.importance is not None and needs_gradients(widths.importance):
        data = iochange.candidate_data(options.data.data, iochange.read(result.model))
        data = data.sample(options.data.calib_samples, options.seed)
        scores = weight_scores(result.model, data, widths.importance, weight_names(result.model),
                               batch_size=options.data.batch_size, quiet=options.quiet)
    with warnings.catch_warnings(record=True) as caught:  # an `ignore` glob that matches nothing
        warnings.simplefilter("always")
        sparse = sparsify(result.model, sparsity.unstructured, sparsity.nm, min_elements=sparsity.min_elements,
                          ignore=options.analysis.ignore,
                          global_ranking=sparsity.unstructured is not None and widths.global_ranking, scores=scores)
    result.report.add_warnings(caught)
    result.report.sparsity = sparse.report
    return PruneResult(sparse.model, result.plan, result.report)


def _bench(input_path: Path, output: Path, float_model, keep_float, options: PruneOptions):
    """The input and the output side by side; with `quantize`, the float pruned model between them
    (written to a temporary file where `keep_float` does not keep it)."""
    shapes = options.analysis.input_shapes
    if float_model is None:
        return options.bench.time([input_path, output], shapes)
    if keep_float:
        return options.bench.time([input_path, keep_float, output], shapes)
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        path = Path(tmp) / "pruned.float.onnx"
        with AtomicModelWriter(path) as writer:
            writer.write(float_model)
        labels = [str(input_path), "pruned (float, not kept)", str(output)]
        return options.bench.time([input_path, path, output], shapes, labels=labels)


def _quantized(result: PruneResult, options: PruneOptions) -> PruneResult:
    """The pruned model quantized (pipeline/quantize.py): static on the calibration data, dynamic without."""
    data = options.data.data
    if data is not None:
        count = min(options.data.calib_samples or CALIBRATION_SAMPLES, CALIBRATION_SAMPLES)
        data = iochange.candidate_data(data, iochange.read(result.model)).sample(count, options.seed)
    model, record = quantize(result.model, options.quantize, data)
    result.report.quantization = record
    result.report.params_after = count_params(model)
    return PruneResult(model, result.plan, result.report)


def _quality_gate(result: PruneResult, model: onnx.ModelProto, options: PruneOptions) -> None:
    """Measured on the validation split (the one training held out); exceeding a limit writes nothing."""
    train, gate = options.training, options.gate
    fraction = train.val_fraction if train is not None else TrainOptions.val_fraction
    _, val = options.data.data.split(fraction, train.seed if train is not None else options.seed)
    measured = evaluate(result.model, model, val)
    result.report.gate = measured
    max_drop, max_error = gate.max_accuracy_drop, gate.max_output_error
    if max_drop is not None:
        if "accuracy_drop_points" not in measured:
            raise UsageError("`max_accuracy_drop` needs integer labels in `data` and a (batch, classes) output")
        if measured["accuracy_drop_points"] > max_drop:
            raise QualityGateFailed(
                f"accuracy dropped {measured['accuracy_drop_points']:.2f} points "
                f"({100 * measured['original_accuracy']:.2f}% -> {100 * measured['accuracy']:.2f}%) "
                f"on {measured['samples']} validation samples, more than `max_accuracy_drop` {max_drop}; "
                "nothing written")
    if max_error is not None and measured["output_error"] > max_error:
        raise QualityGateFailed(
            f"output error {measured['output_error']:.4g} on {measured['samples']} validation samples "
            f"exceeds `max_output_error` {max_error}; nothing written")


def _write_verified(pruned, output: Path, input_path: Path, report: Report, verify: bool, seed, input_shapes):
    feeds = reference = None
    with warnings.catch_warnings(record=True) as caught:  # e.g. bfloat16: no onnxruntime run to compare
        warnings.simplefilter("always")
        changes = iochange.read(pruned)
        if verify:  # the original's inputs and outputs, as the pruned model takes and gives them
            shapes, chosen = resolve_with_choices(pruned, iochange.shrink_shapes(input_shapes or {}, changes))
            feeds, reference = run_original(input_path, iochange.grow_shapes(shapes, changes),
                                            index_bounds(pruned), seed, chosen)
            if reference is not None:
                feeds = iochange.candidate_feeds(feeds, changes)
                reference = iochange.comparable_outputs(reference, changes)
        with AtomicModelWriter(output) as writer:
            tmp = writer.write(pruned)
            if verify:
                result = verify_file(tmp, feeds, reference)
                bad = [n for n, e in result.output_error.items() if not np.isfinite(e)]
                if bad:
                    raise VerificationFailed(f"pruned model produces non-finite values in output {bad[0]}")
                report.output_error = result.output_error
    report.add_warnings(caught)


def _copy_model(input_path: Path, model: onnx.ModelProto, output: Path) -> None:
    if output.exists() and output.samefile(input_path):
        return  # --force onto itself with nothing to cut: leave the input untouched
    with AtomicModelWriter(output) as writer:
        writer.write(model)

"""The whole job on a file: what ``onnxprune MODEL ...`` and ``prune_file`` run.

    load -> [search the ratio for a budget] -> prune (in rounds, recovering) -> [sparsify] -> [quantize]
         -> [quality gate] -> write + verify atomically -> [benchmark] -> report

Options are validated first, and every output path is checked before any
work; nothing is written unless the run succeeds, and the input is never
modified.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from ..analysis.stats import count_params
from ..cut import iochange
from ..cut.renumber import new_cache_names, renumber_cache
from ..cut.sparsity import sparsify, weight_names
from ..errors import QualityGateFailed, UsageError, VerificationFailed
from ..memory import release_freed_memory
from ..metrics import evaluate
from ..model.configs import updated_configs
from ..model.inputs import resolve_with_choices
from ..model.load import read_model
from ..model.publish import Staging
from ..model.save import AtomicModelWriter, check_outputs, default_output_path, model_files
from ..options import PruneOptions, TrainOptions, validate
from ..planning.plan import Plan
from ..progress import muted_stages, restart_stage_clock, stage_done, stage_times
from ..recovery.train import train
from ..report.markdown import markdown_summary
from ..report.records import Report, run_environment
from ..runtime.verify import check_beside_original, index_bounds, verify_file
from ..scoring.calibration import weight_scores
from ..scoring.criteria import needs_gradients
from . import steps
from .budget_depth import depth_for_budget
from .depth import DepthResult, prune_depth, record_depth, rest_of_budget
from .prune import PruneResult, declared_shapes, reconstruct_depth, unpruned
from .quantize import CALIBRATION_SAMPLES, quantize, refuse_quantized
from .reduction import require_reduction
from .rounds import prune_rounds
from .target import find_ratio


def run_file(input_path: str | Path, output_path: str | Path | None, options: PruneOptions) -> Report:
    """Prune the file ``input_path`` as ``options`` say and write the verified result to
    ``output_path`` (default: MODEL.pruned.onnx beside it) atomically, unless a dry run."""
    started = time.perf_counter()
    restart_stage_clock()
    options = validate(options)
    out = options.output
    input_path = Path(input_path)
    output = Path(output_path) if output_path else default_output_path(input_path)
    plan_file = options.widths.plan if isinstance(options.widths.plan, (str, Path)) else None
    data_path = options.data.data if isinstance(options.data.data, (str, Path)) else None
    keep_float = options.quantize.keep_float if options.quantize is not None else None
    check_outputs({"`output`": None if out.dry_run else output, "`report_path`": out.report_path,
                   "`plan_out`": out.plan_out, "`summary_md`": out.summary_md, "`keep_float`": keep_float},
                  {"the input model": model_files(input_path), "`plan`": plan_file, "`data`": data_path,
                   "a file it reads": list(out.reads)},
                  out.force, stdout_ok=("`report_path`", "`plan_out`", "`summary_md`"))
    if plan_file is not None:
        options = replace(options, widths=replace(options.widths, plan=Plan.load(plan_file)))
    loaded = read_model(input_path)
    stage_done("load")
    model, conversion = loaded.model, loaded.conversion
    del loaded  # `model` must be the input's only reference: it is freed before verification
    # what this run records (onnxprune.io_changes) is relative to its input: a record the input carries
    # from an earlier run is not, and cuts that extend the record (depth, renumbering) must not extend it
    iochange.record(model, [])
    if options.quantize is not None:
        refuse_quantized(model)
    if options.output.renumber_cache:  # a cache it cannot renumber fails now, not after the pruning
        new_cache_names(model)
    options = replace(options, data=replace(options.data, data=steps.data_of(model, options.data)))
    searched, budget = None, options.target
    depth = prune_depth(model, options) if options.depth is not None or _planned_blocks(options) else None
    if depth is not None:
        stage_done("depth")
    if depth is not None and budget is not None:  # the channels meet what the removed blocks leave of it
        depth, searched, options = _budget_with_depth(model, input_path, depth, budget, options)
    if options.target is not None and options.widths.allocate != "sensitivity":
        with muted_stages():  # its candidates' stages: one line for the whole search
            searched = find_ratio(depth.model if depth is not None else model, options.target,
                                  input_path if depth is None else None, options)
        stage_done("search")
        options = replace(options, widths=replace(options.widths, ratio=searched.ratio))
    result = _prune(model, depth, options)
    if options.output.renumber_cache:  # before sparsity and quantization: every later step sees the final names
        result = _renumbered(result, model)
    if options.sparsity is not None:
        result = _sparsified(result, options)
        stage_done("sparsity")
    float_model = None
    if options.quantize is not None:  # after recovery and sparsity; the gate and verification judge the result
        float_model = result.model if options.quantize.keep_float or options.bench is not None else None
        result = _quantized(result, options)
        stage_done("quantize")
    if options.gate is not None and (options.gate.max_accuracy_drop is not None
                                     or options.gate.max_output_error is not None):
        _quality_gate(result, model, options)
        stage_done("gate")
    report = result.report
    report.input = str(input_path)
    report.conversion = conversion and conversion.to_json()
    report.recipe, report.command = out.recipe, out.command
    if searched is not None:
        report.target = searched.to_json()
    elif budget is not None and report.target is None:  # allocated to the budget (pipeline/prune.py), or met by depth
        report.target = _allocated(budget, report)
    plan, pruned, unchanged = result.plan, result.model, result.model is model
    result = model = None  # free the input model and its analysis before verification loads it again
    release_freed_memory()  # now, not at verification: the pruned model's writing would add to them
    if out.recipe is not None and not unchanged:
        _record_recipe(pruned, out.recipe)
    # the configs beside the input, updated: checked before anything is staged, so a pruned model
    # they cannot describe fails with no output
    configs, report.configs = updated_configs(input_path, output, pruned) if not out.dry_run else ([], None)
    with Staging(out.force) as stage:  # every output appears together, once all are written
        if not out.dry_run:
            models, pruned = [pruned], None  # handed over whole: verification frees it once written
            _stage_model(stage, models, unchanged, input_path, output, report, options)
            for path, data in configs:
                stage.bytes(path, data)
            if keep_float:
                stage.model(Path(keep_float), float_model)
        report.seconds = time.perf_counter() - started  # the benchmark is not part of it
        if not out.dry_run and options.bench is not None:
            staged_float = stage.staged(Path(keep_float)) if keep_float else None
            report.bench = _bench(input_path, stage.staged(output), output, float_model, staged_float, keep_float,
                                  options)
            stage_done("bench")
        if out.plan_out:
            stage.text(out.plan_out, _json(plan.to_json()))
        report.stages, report.environment = stage_times(), run_environment()
        if out.report_path:
            stage.text(out.report_path, _json(report.to_json()))
        if out.summary_md:
            stage.text(out.summary_md, markdown_summary(report))
    return report


def _stage_model(stage: Staging, models: list, unchanged: bool, input_path: Path, output: Path, report: Report,
                 options: PruneOptions) -> None:
    """The pruned model (or, ``unchanged``, a copy of the input), popped from ``models``, staged and
    verified there."""
    report.output = str(output)
    if unchanged:  # nothing prunable
        stage.model(output, models.pop())
    else:
        _write_verified(stage, models, output, input_path, report, options.output.verify, options.seed,
                        options.analysis.input_shapes)
    report.written = True  # as it will be once the stage is published


def _json(data) -> str:
    return json.dumps(data, indent=1) + "\n"


def _prune(model: onnx.ModelProto, depth: DepthResult | None, options: PruneOptions) -> PruneResult:
    """The channels pruned (in rounds, recovering) on what the depth step left; after a depth cut
    alone, recovery on it. Recovery's teacher is the input model either way."""
    source = depth.model if depth is not None else model
    widths = options.widths
    # a budget allocated by sensitivity (pipeline/prune.py) sets no ratio here
    channels = widths.ratio is not None or widths.plan is not None or bool(widths.ratios) or options.target is not None
    if depth is not None and options.gate is not None:  # the whole run's reduction is checked, below
        options = replace(options, gate=replace(options.gate, min_reduction=None))
    removed_io = depth.changes if depth is not None else []
    refitted = None  # the depth cut's reconstruction
    if depth is not None and depth.removed and not removed_io and options.data.data is not None \
            and options.data.reconstruct is not False:  # the layers after the removed blocks, refitted
        source, refitted = reconstruct_depth(model, source, frozenset(b.input for b in depth.removed), options)
        stage_done("reconstruct")
    if channels:
        if removed_io and options.data.data is not None:  # the data as the model without the cache takes it
            options = replace(options, data=replace(options.data,
                                                    data=iochange.candidate_data(options.data.data, removed_io)))
        result = prune_rounds(source, options, teacher=model)
        if removed_io and result.model is not source:  # the channel cut recorded its changes relative to source
            iochange.record(result.model, iochange.compose(removed_io, iochange.read(result.model)))
        if refitted is not None:  # the channel cut's own reconstruction is the report's
            depth.record = {**depth.record, "reconstruction": refitted}
    else:
        # the shapes pinned for a removed layer's cache go with it (the model no longer takes it)
        pinned = options.analysis.input_shapes
        result = unpruned(source, iochange.shrink_shapes(pinned, removed_io) if pinned and removed_io else pinned)
        result.report.reconstruction = refitted
        if depth is not None and options.training is not None and depth.removed:
            result.model, trained = train(result.model, model, options.data.data, options.training)
            result.report.training = trained.to_json()
    if depth is not None:
        record_depth(result.report, result.plan, depth)
        if removed_io:
            result.report.io_changes = iochange.describe(iochange.read(result.model), declared_shapes(model))
        report = result.report
        gate = options.gate
        require_reduction(report.macs_before, report.macs_after, gate and gate.min_reduction,
                          report.barriers, report.modules)
    return result


def _renumbered(result: PruneResult, model: onnx.ModelProto) -> PruneResult:
    """The cut's remaining cache numbered 0..n-1 (cut/renumber.py), the renaming in the report."""
    renamed = renumber_cache(result.model, copy=result.model is model)  # a cut's result is this run's own
    if any(c.is_rename for c in iochange.read(renamed)):  # the run's record starts empty: these are its own
        result.report.io_changes = iochange.describe(iochange.read(renamed), declared_shapes(model))
    return PruneResult(renamed, result.plan, result.report)


def _budget_with_depth(model: onnx.ModelProto, input_path: Path, depth: DepthResult, budget, options: PruneOptions):
    """The depth step's share of ``budget`` and what the channels are left to meet: (depth, the speedup
    search already done or None, options). With `depth` R, data or a speedup budget, how many of the
    blocks go is chosen by what each share measures (pipeline/budget_depth.py); else all of them go.
    A MACs or params budget leaves its rest as the target (searched or allocated as any); a speedup
    is measured against the input, so its search sets the ratio (0: the blocks alone met it)."""
    searched = None
    shares = depth.removed and options.depth is not None and options.depth.depth \
        and (options.data.data is not None or budget.metric == "speedup")
    if shares:
        with muted_stages():  # every share's prunes and timings: one line
            depth, searched = depth_for_budget(model, options, budget, depth, input_path)
        stage_done("search")
    if budget.metric != "speedup":
        return depth, None, replace(options, target=rest_of_budget(budget, depth))
    if searched is None:  # the blocks named (or none removable): the channels meet the speedup on what is left
        with muted_stages():
            searched = find_ratio(depth.model, budget, input_path, options, base=model if depth.removed else None)
        stage_done("search")
    ratio = searched.ratio or None  # 0: no channel is cut
    return depth, searched, replace(options, target=None, widths=replace(options.widths, ratio=ratio))


def _planned_blocks(options: PruneOptions) -> bool:
    plan = options.widths.plan
    return isinstance(plan, Plan) and bool(plan.blocks)


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


def _bench(input_path: Path, staged: Path, output: Path, float_model, staged_float: Path | None, keep_float,
           options: PruneOptions):
    """The input and the output side by side (the output timed where it is staged, named as it will
    be published); with `quantize`, the float pruned model between them (written to a temporary
    file where `keep_float` does not keep it)."""
    shapes = options.analysis.input_shapes
    if float_model is None:
        return options.bench.time([input_path, staged], shapes, labels=[str(input_path), str(output)])
    if staged_float is not None:
        return options.bench.time([input_path, staged_float, staged], shapes,
                                  labels=[str(input_path), str(keep_float), str(output)])
    with tempfile.TemporaryDirectory(prefix="onnxprune-bench-") as tmp:
        path = Path(tmp) / "pruned.float.onnx"
        with AtomicModelWriter(path) as writer:
            writer.write(float_model)
        labels = [str(input_path), "pruned (float, not kept)", str(output)]
        return options.bench.time([input_path, path, staged], shapes, labels=labels)


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


def _write_verified(stage: Staging, models: list, output: Path, input_path: Path, report: Report, verify: bool, seed,
                    input_shapes) -> Path:
    """The pruned model (popped from ``models``, so that it can be freed once written) staged as
    ``output`` and run there against the original; its staged path."""
    feeds = reference = None
    with warnings.catch_warnings(record=True) as caught:  # e.g. bfloat16: no onnxruntime run to compare
        warnings.simplefilter("always")
        pruned = models.pop()  # this frame's reference is then the only one (see run_file)
        changes = iochange.read(pruned)
        if verify:  # what the original's run needs to know of the pruned model, taken before it goes
            shapes, chosen = resolve_with_choices(pruned, iochange.shrink_shapes(input_shapes or {}, changes))
            bounds = index_bounds(pruned)
        staged = stage.model(output, pruned)
        stage_done("write")
        # written: the pruned model leaves memory before onnxruntime builds the original's session, so
        # that the run's peak holds one model, not two (issue 20: resnet50's peak was that session)
        del pruned
        if verify:  # the original's inputs and outputs (run_original collects and trims the freed memory first)
            feeds, reference = check_beside_original(staged, input_path, iochange.grow_shapes(shapes, changes),
                                                     bounds, seed, chosen)
            if reference is not None:
                feeds = iochange.candidate_feeds(feeds, changes)
                reference = iochange.comparable_outputs(reference, changes)
            stage_done("reference")  # and the full check
            result = verify_file(staged, feeds, reference, checked=True)
            stage_done("verify")
            bad = [n for n, e in result.output_error.items() if not np.isfinite(e)]
            if bad:
                raise VerificationFailed(f"pruned model produces non-finite values in output {bad[0]}")
            report.output_error = result.output_error
    report.add_warnings(caught)
    return staged


def _record_recipe(model: onnx.ModelProto, recipe: dict) -> None:
    """The run's effective options in the written model's metadata, so the file says how it was made."""
    from ..cli.recipe import METADATA_KEY

    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(recipe, sort_keys=True)

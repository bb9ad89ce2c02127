"""The pipeline as functions: load -> analyse -> score -> plan -> cut -> verify -> save.

    import onnxprune
    report = onnxprune.prune_file("model.onnx", "small.onnx", ratio=0.4, round_to=8)
    result = onnxprune.prune(onnx_model, ratio=0.4)      # in memory, nothing written
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import QualityGateFailed, UnsupportedModel, UsageError, VerificationFailed
from .graph import GraphView
from . import iochange
from .groups import Group, find_groups
from .iochange import find_io_changes
from .calibration import batch_size_for, measure
from .compensate import compensate as compensate_biases, output_errors
from .data import Dataset, ImageOptions, load_data
from .importance import check_criterion, needs_data, score_groups
from .recover import FeaturePoint, TrainOptions, evaluate, train as recover_train
from .model import (
    AtomicModelWriter,
    check_output_path,
    check_side_files,
    default_output_path,
    load_model,
    resolve_input_shapes,
)
from .shapes import Shapes, analyse_shapes
from .plan import Plan, check_plan, make_plan
from .report import NO_STRUCTURED, BlockedGroup, GroupReport, Report
from .sparsity import MIN_ELEMENTS, sparsify, weight_names
from .sparsity import check_options as check_sparsity_options
from .stats import count_macs, count_params
from .surgery import apply_plan, export
from .target import Latency, Target, check_combination, find_ratio
from .verify import index_bounds, run_original, verify_file


@dataclass
class Analysis:
    model: onnx.ModelProto
    shapes: Shapes
    view: GraphView
    groups: list[Group]

    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]


@dataclass
class PruneResult:
    model: onnx.ModelProto  # the pruned model (the input itself when nothing was cut)
    plan: Plan
    report: Report
    analysis: "Analysis | None" = None  # of the input model (its view holds the cut graph)


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul", "DynamicQuantizeMatMul",
                 "MatMulNBits", "QAttention"}
_INT_WEIGHTS = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def refuse_quantized(model: onnx.ModelProto) -> None:
    """Quantized models are refused: their scales and zero points would have to be cut too."""
    found = next((n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS), None)
    if found is None:
        small = 16
        int_weights = {t.name for t in model.graph.initializer
                       if t.data_type in _INT_WEIGHTS and np.prod(t.dims) > small}
        cast = next((n for n in model.graph.node if n.op_type == "Cast" and n.input and n.input[0] in int_weights),
                    None)
        found = cast and f"int8 weights behind Cast ({cast.input[0]})"
    if found:
        raise UnsupportedModel(f"quantized model ({found}): prune the float model, then quantize the result")


def analyse(model: onnx.ModelProto, input_shapes: dict | None = None, ignore=(), prune_hidden: bool = False,
            allow_io_change: bool = False) -> Analysis:
    """Channel groups of ``model`` (which is not modified)."""
    refuse_quantized(model)
    shapes = analyse_shapes(model, input_shapes)
    view = GraphView.from_model(model, shapes)
    view.prune_hidden = prune_hidden
    return Analysis(model, shapes, view, find_groups(view, tuple(ignore), allow_io_change))


def validate_options(ratio, round_to: int, min_channels: int, max_group_ratio: float) -> None:
    if ratio is not None and (not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0 <= ratio < 1):
        raise UsageError(f"ratio must be in [0, 1), got {ratio}")
    if round_to < 1:
        raise UsageError(f"round-to must be a positive integer, got {round_to}")
    if min_channels < 1:
        raise UsageError(f"min-channels must be at least 1, got {min_channels}")
    if not 0 < max_group_ratio < 1:
        raise UsageError(f"max-group-ratio must be in (0, 1), got {max_group_ratio}")


def prune(
    model: onnx.ModelProto | str | Path,
    ratio: float | None = None,
    *,
    importance: str = "l1",
    global_ranking: bool = False,
    round_to: int = 1,
    min_channels: int = 1,
    max_group_ratio: float = 0.9,
    ignore=(),
    input_shapes: dict | None = None,
    seed: int = 0,
    plan: Plan | None = None,
    data: Dataset | str | Path | None = None,
    calib_samples: int | None = None,
    compensate: bool | None = None,
    batch_size: int | None = None,
    images: ImageOptions | None = None,
    head_ratio: float | None = None,
    prune_hidden: bool = False,
    allow_io_change: bool = False,
    ratios: dict[str, float] | None = None,
    allocate: str | None = None,
    quiet: bool = True,
) -> PruneResult:
    """Prune ``model`` in memory: remove ``ratio`` of each group's channels, or apply ``plan``.

    With ``data`` (a Dataset or a --data path), the data criteria can be used
    and the removed channels' mean contributions are folded into the readers'
    biases (``compensate``, on by default when data is given). ``head_ratio``
    applies to groups whose units are attention heads (default: ``ratio``).
    ``ratios`` maps group ids or source-node globs to their own ratios;
    ``allocate="sensitivity"`` chooses them from measured output error (see sensitivity.py).
    ``allow_io_change`` lets attention heads that reach graph inputs and outputs
    (a KV cache) be pruned: those tensors' head axis shrinks (see iochange.py).
    """
    started = time.perf_counter()
    validate_options(ratio, round_to, min_channels, max_group_ratio)
    if head_ratio is not None:
        validate_options(head_ratio, round_to, min_channels, max_group_ratio)
    from .sensitivity import check_ratio_options, group_ratios

    check_ratio_options(ratios, allocate, ratio, plan, data, global_ranking)
    if ratio is None and plan is None and not ratios:
        raise UsageError("give a ratio (--structured) or a plan (--plan-in)")
    if compensate and data is None:
        raise UsageError("--compensate measures mean activations: give --data FILE")
    if calib_samples is not None and calib_samples < 1:
        raise UsageError(f"calib-samples must be at least 1, got {calib_samples}")
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    check_criterion(importance if plan is None else "l1", data is not None)
    if data is not None and not isinstance(data, Dataset):
        data = load_data(data, model, images)
    calib = data.sample(calib_samples, seed) if data is not None else None
    compensate = calib is not None and compensate is not False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = analyse(model, input_shapes, ignore, prune_hidden, allow_io_change)
        stats = None
        data_criterion = plan is None and needs_data(importance)
        if calib is not None and (data_criterion or compensate):
            stats = measure(model, analysis.prunable, analysis.view, calib,
                            gradients=data_criterion and importance in ("taylor", "fisher"),
                            activations=compensate or importance in ("activation", "apoz"),
                            batch_size=batch_size, quiet=quiet)
        if plan is None:
            scores = score_groups(analysis.groups, analysis.view, importance, seed,
                                  stats if data_criterion else None)
            per_group = {g.id: head_ratio for g in analysis.prunable if g.kind == "heads"} if head_ratio is not None else {}
            chosen, allocation = group_ratios(ratios, allocate, ratio, model, analysis, scores, stats, calib,
                                              importance=importance, seed=seed, round_to=round_to,
                                              min_channels=min_channels, compensate=compensate,
                                              batch_size=batch_size, input_shapes=input_shapes, ignore=ignore,
                                              prune_hidden=prune_hidden, allow_io_change=allow_io_change,
                                              quiet=quiet)
            per_group.update(chosen)
            plan = make_plan(analysis.groups, scores, ratio or 0.0, round_to, global_ranking, min_channels,
                             max_group_ratio, per_group)
        else:
            check_plan(plan, analysis.groups)
            scores, allocation = {}, None
    report = _report(analysis, plan, scores, ratio, importance if ratio is not None or ratios else "plan")
    report.allocation = allocation and allocation.to_json()
    report.add_warnings(caught)
    hidden = [g for g in analysis.prunable if g.kind == "hidden" and len(plan.keep.get(g.id, ())) < g.size]
    if hidden:
        report.warnings.append(
            f"--prune-hidden cut the hidden size of {len(hidden)} group(s): LayerNorm statistics change, "
            "so accuracy needs recovery training (--distill or --finetune)")
    if calib is not None:
        report.data = {"source": calib.source, "samples": len(calib), "notes": calib.notes}
    if plan.keep:
        folded = compensate_biases(analysis.view, analysis.groups, plan, stats) if compensate else None
        cut = apply_plan(analysis.view, analysis.groups, plan)
        changes = find_io_changes(analysis.view, cut)
        pruned = export(analysis.view, model, changes)
        iochange.record(pruned, changes)  # relative to this input (replaces the record of an earlier run)
        if changes:
            report.io_changes = iochange.describe(changes, _declared_shapes(model))
        report.params_after = count_params(pruned)
        report.macs_after = count_macs(pruned, iochange.shrink_shapes(analysis.shapes.pinned_inputs, changes))
        if folded is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report.compensation = _compensation_effect(model, pruned, plan, folded, calib, batch_size,
                                                           input_shapes=input_shapes, ignore=ignore,
                                                           prune_hidden=prune_hidden,
                                                           allow_io_change=allow_io_change)
            report.add_warnings(caught)
    else:
        pruned = model
    report.seconds = time.perf_counter() - started
    return PruneResult(pruned, plan, report, analysis)


def _declared_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Graph inputs' and outputs' shapes as declared: sizes, or names of dynamic dims."""
    return {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in vi.type.tensor_type.shape.dim]
            for vi in (*model.graph.input, *model.graph.output)}


def _compensation_effect(model, pruned, plan, folded, calib, batch_size, **analysis_options) -> dict:
    """How much output error compensation removed, on (up to 256 of) the calibration samples."""
    plain = prune(model, plan=plan, **analysis_options).model
    sample = calib.sample(256, seed=0)
    errors = output_errors(model, {"without": plain, "with": pruned}, sample, batch_size_for(model, batch_size))
    return {**folded.to_json(), "output_error": errors}


def _report(analysis: Analysis, plan: Plan, scores, ratio, importance: str) -> Report:
    model = analysis.model
    groups, blocked = [], []
    for g in analysis.groups:
        if g.blocked:
            blocked.append(BlockedGroup(g.id, g.sources, g.size, "; ".join(g.blocked)))
            continue
        if not g.prunable:
            continue
        kept = plan.keep.get(g.id, list(range(g.size)))
        info = {}
        if g.id in scores:
            removed = np.setdiff1d(np.arange(g.size), kept)
            info = {"criterion": importance, "kept_mean": float(scores[g.id][kept].mean())}
            if removed.size:
                info["removed_mean"] = float(scores[g.id][removed].mean())
        report = GroupReport(g.id, g.sources, g.nodes, g.size, len(kept), info, g.kind)
        if g.kind == "heads":
            kept_set = set(kept)
            report.units_before = len(g.unit_members())
            report.units_after = sum(1 for m in g.unit_members() if int(m[0]) in kept_set)
        groups.append(report)
    params = count_params(model)
    macs = count_macs(model, shapes=analysis.shapes.static)
    return Report(
        input="", output=None, ratio=ratio, importance=importance,
        params_before=params, params_after=params, macs_before=macs, macs_after=macs,
        groups=groups, blocked=blocked,
    )


def prune_file(
    input_path: str | Path,
    output_path: str | Path | None = None,
    ratio: float | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    plan_in: str | Path | None = None,
    plan_out: str | Path | None = None,
    report_path: str | Path | None = None,
    verify: bool = True,
    seed: int = 0,
    unstructured: float | None = None,
    nm: str | tuple[int, int] | None = None,
    min_elements: int = MIN_ELEMENTS,
    train: TrainOptions | None = None,
    steps: int = 1,
    max_accuracy_drop: float | None = None,
    max_output_error: float | None = None,
    target: Target | None = None,
    bench: Latency | None = None,
    **options,
) -> Report:
    """Prune a file and write the verified result atomically (unless ``dry_run``).

    ``unstructured`` (a ratio) or ``nm`` (``"2:4"``) zero single weights after
    the structured step, or alone when neither ``ratio`` nor ``plan_in`` is given
    (see onnxprune/sparsity.py; ``global_ranking`` and ``ignore`` apply too).
    ``target`` (onnxprune.target.Target) searches for the ratio that meets a
    MACs, params or latency budget instead of taking ``ratio``; ``bench``
    (onnxprune.target.Latency) times the input and the written output side by
    side afterwards (``report.bench``).
    """
    started = time.perf_counter()
    sparse = unstructured is not None or nm is not None
    if sparse:
        check_sparsity_options(unstructured, nm, min_elements)
    input_path = Path(input_path)
    output = Path(output_path) if output_path else default_output_path(input_path)
    if not dry_run:
        check_output_path(input_path, output, force)
    check_side_files(input_path, None if dry_run else output, {"--report": report_path, "--plan-out": plan_out},
                     {"--plan-in": plan_in})
    plan = Plan.load(plan_in) if plan_in else None
    if target is not None:  # before any work: a target replaces the ratio
        check_combination(target, ratio, plan, steps, options.get("allocate"))
        target.check()
    if bench is not None:
        if dry_run:
            raise UsageError("--bench times the written model: drop --dry-run")
        bench.check()
    gated = max_accuracy_drop is not None or max_output_error is not None
    _check_recovery_options(train, steps, gated, ratio, plan, options)
    model = load_model(input_path)
    if options.get("data") is not None and not isinstance(options["data"], Dataset):
        options["data"] = load_data(options["data"], model, options.get("images"))
    searched = None
    if target is not None:
        searched = find_ratio(model, target, input_path, seed=seed, **options)
        ratio = searched.ratio
    if sparse and ratio is None and plan is None:
        result = _unpruned(model, options.get("input_shapes"))
    else:
        result = prune_rounds(model, ratio, plan=plan, seed=seed, train=train, steps=steps, **options)
    if sparse:
        result = _sparsified(result, unstructured, nm, min_elements, options)
    if gated:
        _quality_gate(result, model, options["data"], train, seed, max_accuracy_drop, max_output_error)
    report = result.report
    report.input = str(input_path)
    report.target = searched and searched.to_json()
    if plan_out:
        result.plan.save(plan_out)
    if not dry_run:
        report.output = str(output)
        if result.model is model:  # nothing prunable: an unchanged copy
            _copy_model(input_path, model, output)
        else:
            pruned = result.model
            result = model = None  # free the input model and its analysis before verification loads it again
            _write_verified(pruned, output, input_path, report, verify, seed, options.get("input_shapes"))
        report.written = True
    report.seconds = time.perf_counter() - started
    if bench is not None:  # after the pruning time is taken: the benchmark is not part of it
        report.bench = bench.time([input_path, output], options.get("input_shapes"))
    if report_path:
        report.save(report_path)
    return report


def _check_recovery_options(train, steps, gated, ratio, plan, options) -> None:
    if (train is not None or gated) and options.get("data") is None:
        what = "--distill/--finetune train" if train is not None else "the quality gate measures"
        raise UsageError(f"{what} on data: give --data FILE")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if steps > 1 and (ratio is None or plan is not None):
        raise UsageError("--steps K prunes --structured R in K rounds: give --structured (not --plan-in)")
    if train is not None:
        train.check()


def prune_rounds(model: onnx.ModelProto, ratio: float | None, *, train: TrainOptions | None = None,
                 steps: int = 1, **options) -> PruneResult:
    """Prune (in ``steps`` rounds, re-scoring each time) and recover after each round when ``train`` is given.

    Each round removes 1 - (1 - ratio)^(1/steps) of the channels left, so that
    the rounds together keep (1 - ratio) of each group; the teacher is always
    the original model.
    """
    per_round = ratio if steps == 1 or ratio is None else 1 - (1 - ratio) ** (1 / steps)
    if options.get("head_ratio") is not None and steps > 1:
        options["head_ratio"] = 1 - (1 - options["head_ratio"]) ** (1 / steps)
    current, rounds, first, changes = model, [], None, []
    data = options.get("data")
    for step in range(steps):
        if data is not None:  # a cache reshaped by an earlier round: data as this round's input takes it
            options["data"] = iochange.candidate_data(data, changes)
        result = prune(current, per_round, **options)
        if result.model is not current:  # recorded relative to the input model, for verification and training
            changes = iochange.compose(changes, iochange.read(result.model))
            iochange.record(result.model, changes)
        first = first or result
        if train is not None and result.model is not current:
            features = _feature_points(result) if steps == 1 and train.feature_weight > 0 else ()
            result.model, training = recover_train(result.model, model, data, train,
                                                   groups=None, features=features)
            result.report.training = training.to_json()
        rounds.append({"round": step + 1, "ratio": per_round, "params_after": result.report.params_after,
                       "macs_after": result.report.macs_after, "training": result.report.training})
        current = result.model
    if steps > 1:
        result.report.params_before, result.report.macs_before = first.report.params_before, first.report.macs_before
        result.report.ratio = ratio
        result.report.rounds = rounds
    return result


def _feature_points(result: PruneResult) -> list[FeaturePoint]:
    """Where student and teacher features are matched: the read points of every cut group."""
    from .calibration import read_points
    from .surgery import _positions

    points, student_tensors = [], {n for node in result.model.graph.node for n in node.input}
    for group in result.analysis.prunable:
        if group.id not in result.plan.keep:
            continue
        removed = result.plan.removed(group.id)
        for p in read_points(group, result.analysis.view):
            if p.name in student_tensors and p.axis > 0:
                gone = _positions(p.owner, removed)
                points.append(FeaturePoint(p.name, p.axis, np.setdiff1d(np.arange(len(p.owner)), gone)))
    return points


def _quality_gate(result: PruneResult, model, data: Dataset, train, seed, max_drop, max_error) -> None:
    """Measured on the validation split (the one training held out); exceeding a limit writes nothing."""
    fraction = train.val_fraction if train is not None else TrainOptions.val_fraction
    _, val = data.split(fraction, train.seed if train is not None else seed)
    measured = evaluate(result.model, model, val, batch_size_for(model, None))
    result.report.gate = measured
    if max_drop is not None:
        if "accuracy_drop_points" not in measured:
            raise UsageError("--max-accuracy-drop needs integer labels in --data and a (batch, classes) output")
        if measured["accuracy_drop_points"] > max_drop:
            raise QualityGateFailed(
                f"accuracy dropped {measured['accuracy_drop_points']:.2f} points "
                f"({100 * measured['original_accuracy']:.2f}% -> {100 * measured['accuracy']:.2f}%) "
                f"on {measured['samples']} validation samples, more than --max-accuracy-drop {max_drop}; "
                "nothing written")
    if max_error is not None and measured["output_error"] > max_error:
        raise QualityGateFailed(
            f"output error {measured['output_error']:.4g} on {measured['samples']} validation samples "
            f"exceeds --max-output-error {max_error}; nothing written")


def _unpruned(model: onnx.ModelProto, input_shapes) -> PruneResult:
    """Sparsity alone: no channel is planned; the report keeps the model's counts."""
    params, macs = count_params(model), count_macs(model, input_shapes)
    report = Report(input="", output=None, ratio=None, importance=NO_STRUCTURED, params_before=params,
                    params_after=params, macs_before=macs, macs_after=macs, groups=[], blocked=[])
    return PruneResult(model, Plan(), report)


def _sparsified(result: PruneResult, unstructured, nm, min_elements: int, options) -> PruneResult:
    """Sparsity on the (structurally pruned) model; the result is verified with it.

    With --importance taylor/fisher and --data, single weights are ranked by
    their gradient scores (|w * dL/dw|) instead of their magnitude.
    """
    scores = None
    if options.get("importance") in ("taylor", "fisher"):
        if options.get("data") is None:
            raise UsageError(f"importance {options['importance']!r} is measured on data: give --data FILE")
        from .calibration import weight_scores

        data = iochange.candidate_data(options["data"], iochange.read(result.model))
        data = data.sample(options.get("calib_samples"), options.get("seed", 0))
        scores = weight_scores(result.model, data, options["importance"], weight_names(result.model),
                               batch_size=options.get("batch_size"), quiet=options.get("quiet", True))
    sparse = sparsify(result.model, unstructured, nm, min_elements=min_elements, ignore=options.get("ignore", ()),
                      global_ranking=unstructured is not None and options.get("global_ranking", False),
                      scores=scores)
    result.report.sparsity = sparse.report
    return PruneResult(sparse.model, result.plan, result.report)


def _write_verified(pruned, output: Path, input_path: Path, report: Report, verify: bool, seed, input_shapes):
    feeds = reference = None
    with warnings.catch_warnings(record=True) as caught:  # e.g. bfloat16: no onnxruntime run to compare
        warnings.simplefilter("always")
        changes = iochange.read(pruned)
        if verify:  # the original's inputs and outputs, as the pruned model takes and gives them
            shapes = resolve_input_shapes(pruned, iochange.shrink_shapes(input_shapes or {}, changes))
            feeds, reference = run_original(input_path, iochange.grow_shapes(shapes, changes),
                                            index_bounds(pruned), seed)
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

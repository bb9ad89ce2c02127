"""One prune in memory: analyse -> [measure] -> score -> plan -> cut -> report.

``prune_model`` takes validated options (options.validate) with their data
loaded; nothing is written and the input model is not modified. With data,
the data criteria can be used and the removed channels' mean contributions
are folded into the readers' biases (compensation, on by default with data).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnx

from ..analysis.analyse import Analysis
from ..analysis.groups import named_modules
from ..analysis.stats import barrier_macs, count_macs, count_params, held_macs, macs_by_output, total_macs
from ..cut import iochange
from ..data import Dataset
from ..errors import UsageError
from ..graph.shapes import refresh_value_info
from ..metrics import OutputCapture, Reference
from ..model.inputs import declared_dim, resolve_with_choices
from ..options import PruneOptions
from ..planning.allocation import choose_allocation
from ..planning.plan import Plan, check_plan
from ..planning.ratios import resolve_ratios
from ..progress import stage_done
from ..recovery.reconstruct import reconstruct
from ..report.records import NO_STRUCTURED, BlockedGroup, GroupReport, Report
from . import steps
from .sensitivity import Prepared, allocate_ratios
from .speedup_allocation import allocate_for_speedup

MEASURED_SAMPLES = 256  # calibration samples the report's output errors are measured on
# Reconstruction holds every sample's live activations at once (executor/walk.py): a bounded sample.
RECONSTRUCTED_SAMPLES = 128
# Reconstruction is kept only if the whole model's output error on calibration samples it did
# not fit on goes down. Each layer's fit improves that layer, yet the model as a whole can get
# worse (EfficientNet-Lite1 at 0.7 of the MACs: held-out top-1 76.8% without the walk, 75.2%
# with it; with only its expand convolutions cut at 0.3, agreement 55% -> 18%), so the check
# is on the outputs, not the layers.
CHECKED_FRACTION = 0.25  # of the calibration samples, held out of the fit when there are no others
BUDGET_TRIES = 6  # allocations tried to meet a MACs or params budget


@dataclass
class Measured:
    """What a prune measured and scored: it depends on the model, the data and the criterion, not the ratio."""

    scores: dict
    stats: dict | None


@dataclass
class PruneResult:
    model: onnx.ModelProto  # the pruned model (the input itself when nothing was cut)
    plan: Plan
    report: Report
    analysis: Analysis | None = None  # of the input model (its view holds the cut graph)
    measured: Measured | None = None


def prune_model(model: onnx.ModelProto, options: PruneOptions, measured: Measured | None = None) -> PruneResult:
    """Remove what ``options.widths`` asks for (a ratio, per-group ratios, or a plan).

    ``measured``: scores and statistics of this model and options from an earlier prune
    (``result.measured``): a search trying many ratios measures the data once.
    """
    started = time.perf_counter()
    widths, data = options.widths, options.data
    calib = data.data.sample(data.calib_samples, options.seed) if isinstance(data.data, Dataset) else None
    compensate = calib is not None and data.compensate is not False
    planned = isinstance(widths.plan, Plan)
    criterion = widths.importance if not planned else None
    # the original's outputs on the calibration samples, kept from the measuring pass for the
    # reference that compensation and reconstruction are reported against (when it runs on them all)
    reconstruct = calib is not None and data.reconstruct is not False
    outputs = OutputCapture(model) if (compensate or reconstruct) and len(calib) <= MEASURED_SAMPLES else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = steps.analyse(model, options.analysis)
        stage_done("analyse")
        if measured is not None:
            stats = measured.stats
        else:
            stats = steps.measure(model, analysis, calib, criterion, compensate, data.batch_size, options.quiet,
                                  outputs)
            if stats is not None:
                stage_done("measure")
        if planned:
            plan, scores, allocation, searched = widths.plan, {}, None, None
            check_plan(plan, analysis.groups)
        else:
            scores = measured.scores if measured is not None else steps.score(analysis, criterion, options.seed,
                                                                              stats)
            per_group, allocation, searched = _group_ratios(model, analysis, scores, stats, calib, options)
            plan = steps.choose(analysis, scores, widths, per_group)
        stage_done("allocate" if allocation else "plan")
    report = _report(analysis, plan, scores, widths.ratio, criterion or "plan")
    report.allocation = allocation and allocation.to_json()
    if searched is not None:  # a speedup budget met by the allocation
        report.target = {**searched.to_json(), "allocated": True}
    report.round_to = None if planned else widths.round_to
    report.add_warnings(caught)
    hidden = [g for g in analysis.prunable if g.kind == "hidden" and len(plan.keep.get(g.id, ())) < g.size]
    if hidden:
        report.warnings.append(
            f"`prune_hidden` cut the hidden size of {len(hidden)} group(s): LayerNorm statistics change, "
            "so accuracy needs recovery training (`distill` or `finetune`)")
    if calib is not None:
        report.data = {"source": calib.source, "samples": len(calib), "notes": calib.notes}
    pruned = model
    if plan.keep:
        cut = steps.cut(model, analysis, plan, stats if compensate else None)
        stage_done("cut")
        pruned = cut.model
        if cut.changes:
            report.io_changes = iochange.describe(cut.changes, declared_shapes(model))
        report.params_after = count_params(pruned)
        report.macs_after = count_macs(pruned, iochange.shrink_shapes(analysis.shapes.pinned_inputs, cut.changes))
        if cut.compensation is not None or reconstruct:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                reference = Reference(model, calib.sample(MEASURED_SAMPLES, seed=0), data.batch_size,
                                      captured=outputs)
                measured_cut = None  # the cut model against the reference: measured once, reported twice
                if cut.compensation is not None:
                    report.compensation, measured_cut = _compensation_effect(
                        model, analysis, pruned, plan, cut.compensation, reference, options)
                    stage_done("compensate")
                if reconstruct:
                    pruned, report.reconstruction = _reconstructed(model, cut.model, cut.removed, calib, reference,
                                                                   options, measured_cut=measured_cut)
                    stage_done("reconstruct")
            report.add_warnings(caught)
    report.seconds = time.perf_counter() - started
    return PruneResult(pruned, plan, report, analysis, Measured(scores, stats))


def _group_ratios(model, analysis, scores, stats, calib, options: PruneOptions):
    """Group id -> ratio for the groups that do not take the uniform ratio; the allocation, if any;
    and the speedup search that chose it, if a speedup budget did."""
    widths = options.widths
    chosen = {g.id: widths.head_ratio for g in analysis.prunable if g.kind == "heads"} \
        if widths.head_ratio is not None else {}
    allocation = searched = None
    if widths.allocate == "sensitivity":
        prepared = Prepared(analysis, scores, stats)
        target = options.target
        if target is None:
            allocation = allocate_ratios(model, calib, widths.ratio, options, prepared)
        elif target.metric == "speedup":
            allocation, searched = allocate_for_speedup(model, calib, options, prepared)
        else:
            allocation = _within_budget(model, analysis, scores, options, allocate_ratios(
                model, calib, 1 - target.value, options, prepared, unit=target.metric))
        chosen.update(allocation.ratios)
    elif widths.ratios:
        chosen.update(resolve_ratios(analysis.groups, widths.ratios))
    return chosen, allocation, searched


def _within_budget(model, analysis, scores, options: PruneOptions, allocation):
    """The allocation, its goal raised until the cut model meets the budget: the separate
    measurements overstate what two cut groups that meet save together."""
    target, widths = options.target, options.widths
    for _ in range(BUDGET_TRIES):
        plan = steps.choose(analysis, scores, widths, allocation.ratios)
        cut = steps.cut(model, steps.reanalyse(analysis, options.analysis), plan)
        kept = _kept(model, cut, analysis, target.metric)
        if kept <= target.value + 1e-9:
            break
        allocation = choose_allocation(allocation.sensitivity, min(allocation.target + kept - target.value, 1.0),
                                       allocation.unit)
    return allocation


def _kept(model, cut: steps.Cut, analysis, metric: str) -> float:
    if metric == "params":
        return count_params(cut.model) / count_params(model)
    shapes = analysis.shapes.pinned_inputs
    return count_macs(cut.model, iochange.shrink_shapes(shapes, cut.changes)) / count_macs(model, shapes)


def declared_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Graph inputs' and outputs' shapes as declared: sizes, or names of dynamic dims."""
    return {vi.name: [d.dim_param or declared_dim(d) for d in vi.type.tensor_type.shape.dim]
            for vi in (*model.graph.input, *model.graph.output)}


def _compensation_effect(model, analysis, pruned, plan, folded, reference: Reference, options: PruneOptions):
    """How much output error compensation removed, on (up to 256 of) the calibration samples; and
    the measurement of ``pruned`` (the compensated cut), which reconstruction reports again."""
    plain = steps.cut(model, steps.reanalyse(analysis, options.analysis), plan).model
    measured = {name: reference.measure(m) for name, m in (("without", plain), ("with", pruned))}
    errors = {name: m.output_error for name, m in measured.items()}
    return {**folded.to_json(), "output_error": errors}, measured["with"]


def _heads_kept(group, kept) -> tuple[int, int]:
    """(heads, heads kept): the positions of the group's head slot over its positions per head (a
    unit of grouped-query attention holds several query heads; an attention op's output axis holds
    heads x head size), or its units where there is none."""
    kept_set = set(kept)
    slot = group.dims.get(group.head_slot) if group.head_slot else None
    if slot is None:
        members = group.unit_members()
        return len(members), sum(1 for m in members if int(m[0]) in kept_set)
    owned = slot.owner[slot.owner >= 0]
    per_head = group.head_size
    return len(owned) // per_head, sum(1 for o in owned if int(o) in kept_set) // per_head


def reconstruct_depth(model: onnx.ModelProto, pruned: onnx.ModelProto, moved: frozenset[str],
                      options: PruneOptions) -> tuple[onnx.ModelProto, dict]:
    """After a depth cut alone (pipeline/depth.py): every linear node from the first reader of a
    ``moved`` tensor on (a removed block's input, which its output's readers now read) refitted to
    ``model``'s outputs, which keep their names; kept only if the held-out check says so, as after
    a channel cut. ``options``: validated, with data."""
    data = options.data
    calib = data.data.sample(data.calib_samples, options.seed)
    reference = Reference(model, calib.sample(MEASURED_SAMPLES, seed=0), data.batch_size)
    # the readers' ranks come from the recorded shapes, which the channel cut refreshes and the depth
    # cut only trims (an export without them, as the legacy exporter's, would leave every conv unknown)
    shaped = onnx.ModelProto()
    shaped.CopyFrom(pruned)
    return _reconstructed(model, refresh_value_info(shaped), {}, calib, reference, options, moved)


def _reconstructed(model, cut_model: onnx.ModelProto, removed: dict, calib: Dataset, reference: Reference,
                   options: PruneOptions, moved: frozenset[str] = frozenset(),
                   measured_cut=None) -> tuple[onnx.ModelProto, dict]:
    """The cut model with its readers refitted (recovery/reconstruct.py) if that brings the
    model's outputs closer to the original's on samples the fit did not see; and what it did.
    ``measured_cut``: ``reference.measure(cut_model)`` where it was measured already."""
    fit, check = _fit_and_check(calib, options.seed)
    refitted, done = reconstruct(model, cut_model, removed, fit, options.data.batch_size, downstream=True,
                                 moved=moved)
    found = done.to_json()
    judge = _judge(model, check, options.data.batch_size) if done.readers else None
    if judge is not None:
        held = {"before": judge.measure(cut_model).output_error, "after": judge.measure(refitted).output_error}
        found["held_out"] = {"samples": len(check), "output_error": held}
        found["kept"] = held["after"] < held["before"]
    else:
        found["kept"] = bool(done.readers)
    result = refitted if found["kept"] else cut_model
    before, after = measured_cut or reference.measure(cut_model), reference.measure(refitted)
    return result, {**found, "output_error": {"before": before.output_error, "after": after.output_error},
                    "agreement": {"before": before.agreement, "after": after.agreement}}


def _judge(model, check: Dataset | None, batch_size: int | None) -> Reference | None:
    """The original's outputs on the check samples; None without them, or when they are fewer
    than a model with a fixed batch size runs on (the fit is then kept unchecked)."""
    if check is None:
        return None
    try:
        return Reference(model, check, batch_size)
    except UsageError:
        return None


def _fit_and_check(calib: Dataset, seed: int) -> tuple[Dataset, Dataset | None]:
    """(samples to fit on, samples to judge the fit on): RECONSTRUCTED_SAMPLES and up to
    MEASURED_SAMPLES of the others; with no others, a held-out CHECKED_FRACTION (Dataset.split;
    none from fewer than 8 samples)."""
    if len(calib) > RECONSTRUCTED_SAMPLES:
        order = np.random.default_rng(seed).permutation(len(calib))
        fit, rest = order[:RECONSTRUCTED_SAMPLES], order[RECONSTRUCTED_SAMPLES:][:MEASURED_SAMPLES]
        return calib.subset(np.sort(fit)), calib.subset(np.sort(rest))
    if len(calib) >= 8:
        return calib.split(CHECKED_FRACTION, seed)
    return calib, None


def _report(analysis: Analysis, plan: Plan, scores, ratio, importance: str) -> Report:
    model = analysis.model
    per_output = macs_by_output(model, shapes=analysis.shapes.static)
    output_of = {n.name: n.outputs[0].name for n in analysis.view.nodes if n.outputs}
    groups, blocked = [], []
    for g in analysis.groups:
        if g.blocked:
            blocked.append(BlockedGroup(g.id, g.sources, g.size, "; ".join(g.blocked),
                                        held_macs(g.nodes, output_of, per_output), g.modules))
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
        report = GroupReport(g.id, g.sources, g.nodes, g.size, len(kept), info, g.kind, modules=g.modules)
        if g.kind == "heads":
            report.units_before, report.units_after = _heads_kept(g, kept)
        groups.append(report)
    params = count_params(model)
    macs = total_macs(per_output)
    return Report(
        input="", output=None, ratio=ratio, importance=importance,
        params_before=params, params_after=params, macs_before=macs, macs_after=macs,
        groups=groups, blocked=blocked, dynamic_dims=[c.to_json() for c in analysis.shapes.chosen],
        input_shapes={k: list(v) for k, v in analysis.shapes.pinned_inputs.items()},
        barriers=barrier_macs([g for g in analysis.groups if g.blocked], output_of, per_output),
        modules=named_modules(analysis.groups, analysis.view.modules),
    )


def unpruned(model: onnx.ModelProto, input_shapes) -> PruneResult:
    """Sparsity alone: no channel is planned; the report keeps the model's counts."""
    shapes, chosen = resolve_with_choices(model, input_shapes)
    params, macs = count_params(model), count_macs(model, shapes)
    report = Report(input="", output=None, ratio=None, importance=NO_STRUCTURED, params_before=params,
                    params_after=params, macs_before=macs, macs_after=macs, groups=[], blocked=[],
                    dynamic_dims=[c.to_json() for c in chosen], input_shapes={k: list(v) for k, v in shapes.items()})
    return PruneResult(model, Plan(), report)


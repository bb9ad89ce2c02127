"""Per-group sensitivity: each prunable group cut ALONE at several ratios, measured on data.

Every other group stays whole, and the cut model runs on the calibration
data. Measured per (group, ratio), by metrics.Reference: the output error
against the original model (relative RMS over all outputs and samples) and
the top-1 accuracy when the data has integer labels and the first output is
(batch, classes) logits. The model is analysed, measured and scored once
(the same steps as a prune); each cut takes a fresh analysis (a cut edits
the graph it is given, and onnx-graphsurgeon graphs cannot be deep-copied),
which costs far less than running the cut model.

``allocate_ratios`` turns the measurement into per-group ratios
(planning/allocation.py: ``--allocate sensitivity``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import onnx

from ..analysis.analyse import Analysis
from ..analysis.stats import count_macs, count_params
from ..checks import check_grid
from ..cut import iochange
from ..data import Dataset
from ..metrics import Measured, Reference
from ..options import PruneOptions, validate_widths
from ..planning.allocation import Allocation, allocation_grid, choose_allocation
from ..planning.plan import make_plan
from ..progress import progress
from ..report.sensitivity import GroupSensitivity, Sensitivity
from . import steps

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# Samples each cut of an allocation runs on. The allocation only ranks groups by damage per MAC,
# and a few hundred cuts each over all the data dominated a budgeted prune's time (an
# EfficientNet-Lite1 on 250 photos: about 15 minutes on 2 cores); the relative output error
# over 64 samples orders them the same way (docs/budgets.md gives the measured comparison).
ALLOCATION_SAMPLES = 64


@dataclass
class Prepared:
    """What a prune has already computed for the model: reused, not measured again."""

    analysis: Analysis
    scores: dict
    stats: dict | None


def measure_sensitivity(model: onnx.ModelProto, data: Dataset, ratios=DEFAULT_RATIOS, *,
                        options: PruneOptions | None = None, prepared: Prepared | None = None,
                        **keywords) -> Sensitivity:
    """Cut each prunable group alone at each ratio and measure the cut model on ``data``.

    ``options`` (or the prune keywords: ``importance``, ``round_to``,
    ``min_channels``, ``compensate`` (default on), ``batch_size``,
    ``input_shapes``, ``ignore``, ``prune_hidden``, ``allow_io_change``,
    ``seed``, ``quiet``) say how each group is cut, as a prune would; the
    model is never modified.
    """
    started = time.perf_counter()
    ratios = check_grid(ratios)
    options = options or PruneOptions.from_keywords(**keywords)
    widths = validate_widths(options.widths, True, needs_amount=False)
    compensate = options.data.compensate is not False
    batch = options.data.batch_size
    if prepared is None:
        analysis = steps.analyse(model, options.analysis)
        stats = steps.measure(model, analysis, data, widths.importance, compensate, batch, options.quiet)
        prepared = Prepared(analysis, steps.score(analysis, widths.importance, options.seed, stats), stats)
    groups = prepared.analysis.prunable
    # cuts are made from the uncut export (the model as normalised, which every cut exports), and
    # each runs from where it differs from it
    uncut, base = steps.as_normalised(prepared.analysis, options.analysis)
    reference = Reference(model, data, batch, downstream=uncut)
    shapes = prepared.analysis.shapes.pinned_inputs
    macs, params = count_macs(model, shapes), count_params(model)
    results = [GroupSensitivity(g.id, g.sources, g.size, [], [], [] if reference.accuracy is not None else None,
                                modules=g.modules) for g in groups]
    cells = [(g, r, i) for i, g in enumerate(groups) for r in ratios]
    for group, ratio, index in progress(cells, len(cells), "sensitivity", options.quiet, unit="cut"):
        plan = make_plan([group], prepared.scores, ratio, widths.round_to, min_channels=widths.min_channels)
        removed = group.size - len(plan.keep[group.id])
        fewer_macs = fewer_params = 0
        if removed:
            fresh = steps.reanalyse(base, options.analysis)
            cut = steps.cut(base.model, fresh, plan, prepared.stats if compensate else None)
            measured = reference.measure(cut.model)
            error, accuracy = measured.output_error, measured.accuracy
            after = count_macs(cut.model, iochange.shrink_shapes(shapes, cut.changes))
            fewer_macs = macs - after if macs is not None and after is not None else 0
            fewer_params = params - count_params(cut.model)
        else:  # rounding kept every channel: the model is the original
            error, accuracy = 0.0, reference.accuracy
            measured = Measured(0.0, reference.samples, divergence=0.0 if reference.classes else None)
        result = results[index]
        result.removed.append(removed)
        result.macs.append(fewer_macs)
        result.params.append(fewer_params)
        result.error.append(error)
        if result.accuracy is not None:
            result.accuracy.append(accuracy)
        if measured.divergence is not None:
            result.divergence = (result.divergence or []) + [measured.divergence]
    return Sensitivity(ratios, widths.importance, len(data), compensate, reference.accuracy, results,
                       time.perf_counter() - started, macs, params,
                       [c.to_json() for c in prepared.analysis.shapes.chosen], {k: list(v) for k, v in shapes.items()})


def allocate_ratios(model: onnx.ModelProto, data: Dataset, target: float, options: PruneOptions,
                    prepared: Prepared | None = None, unit: str = "channels") -> Allocation:
    """Measure on the grid for ``target`` and allocate per-group ratios removing ``target`` of the
    prunable channels (or of the model's MACs or params: ``unit``)."""
    measured = sensitivity_for_allocation(model, data, allocation_grid(target, unit), options, prepared)
    return choose_allocation(measured, target, unit)


def sensitivity_for_allocation(model: onnx.ModelProto, data: Dataset, grid, options: PruneOptions,
                               prepared: Prepared | None = None) -> Sensitivity:
    """Every group cut alone at each ratio of ``grid``, on ALLOCATION_SAMPLES of ``data``: what an
    allocation chooses from."""
    data = data.sample(ALLOCATION_SAMPLES, options.seed)
    return measure_sensitivity(model, data, grid, options=replace(options, widths=replace(
        options.widths, ratio=None, allocate="uniform")), prepared=prepared)

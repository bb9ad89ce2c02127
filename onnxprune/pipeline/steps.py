"""The steps of the flow as plain functions on plain objects.

    analysis = analyse(model, options.analysis)              # channel groups
    stats = measure(model, analysis, calib, criterion, ...)  # activations/gradients, when data is used
    scores = score(analysis, criterion, seed, stats)         # importance per channel
    plan = choose(analysis, scores, widths, ratios)          # kept channels per group
    cut = cut(model, analysis, plan, stats)                  # the pruned model

The pipelines (prune.py: one prune; sensitivity.py: each group cut alone;
target.py: the ratio that meets a budget) are compositions of these; each
step delegates to the package that holds its knowledge. A cut edits the
analysis's graph view in place, so each cut takes an analysis of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..analysis.analyse import Analysis
from ..analysis.analyse import analyse as analyse_model
from ..cut import iochange
from ..cut.compensate import Compensation, compensate
from ..cut.export import export
from ..cut.refit import refit
from ..cut.surgery import apply_plan
from ..data import Dataset, load_data
from ..metrics import OutputCapture
from ..options import AnalysisOptions, DataOptions, WidthOptions
from ..planning.plan import Plan, make_plan
from ..scoring.calibration import GroupStats
from ..scoring.calibration import measure as measure_stats
from ..scoring.criteria import needs_activations, needs_data, needs_gradients, needs_grams, score_groups


@dataclass
class Cut:
    """A pruned model, the graph inputs/outputs it reshaped, and what compensation did."""

    model: onnx.ModelProto
    changes: list[iochange.IOChange]
    compensation: Compensation | None = None
    removed: dict | None = None  # (tensor, axis) -> positions removed there: what reconstruction refits


def analyse(model: onnx.ModelProto, options: AnalysisOptions) -> Analysis:
    return analyse_model(model, options)


def reanalyse(analysis: Analysis, options: AnalysisOptions) -> Analysis:
    """A fresh analysis of the model ``analysis`` was made of, for one more cut (a cut edits the
    view it is given); the model's shapes, inferred once, are reused (on EfficientNet-Lite1,
    0.29 -> 0.21 s an analysis)."""
    return analyse_model(analysis.model, options, analysis.shapes)


def as_normalised(analysis: Analysis, options: AnalysisOptions) -> tuple[onnx.ModelProto, Analysis]:
    """(The model as ``analysis`` normalised it, exported uncut: constant arithmetic such as
    TF-style 'same' padding folded; its analysis when it finds the same groups, else
    ``analysis``). Cutting either analysis gives the same model, and a fresh analysis of the
    normalised one, for each of many cuts (sensitivity's), skips the import's folding
    (EfficientNet-Lite1: 591 nodes, 150 once folded)."""
    uncut = cut(analysis.model, reanalyse(analysis, options), make_plan([], {}, 0.0)).model
    normalised = analyse_model(uncut, options, analysis.shapes)
    return uncut, normalised if _same_groups(normalised, analysis) else analysis


def _same_groups(a: Analysis, b: Analysis) -> bool:
    def key(g):
        return g.id, g.size, tuple(g.sources), tuple(g.blocked), g.prunable, g.units.tobytes()

    return [key(g) for g in a.groups] == [key(g) for g in b.groups]


def data_of(model: onnx.ModelProto, options: DataOptions) -> Dataset | None:
    """The data the options name, loaded and checked against ``model`` (once per run)."""
    if options.data is None or isinstance(options.data, Dataset):
        return options.data
    return load_data(options.data, model, options.images)


def measure(model: onnx.ModelProto, analysis: Analysis, calib: Dataset | None, criterion: str | None,
            compensate: bool, batch_size: int | None, quiet: bool = True,
            outputs: OutputCapture | None = None) -> dict[str, GroupStats] | None:
    """What the data criterion ``criterion`` (None: a weight criterion) and compensation need;
    ``outputs`` is handed the model's outputs from the same pass, when one runs."""
    data_criterion = criterion is not None and needs_data(criterion)
    if calib is None or not (data_criterion or compensate):
        return None
    scored_by_activations = data_criterion and needs_activations(criterion)
    return measure_stats(model, analysis.prunable, analysis.view, calib,
                         gradients=data_criterion and needs_gradients(criterion),
                         activations=compensate or scored_by_activations,
                         grams=compensate, obs=data_criterion and needs_grams(criterion), batch_size=batch_size,
                         quiet=quiet, means_only=not scored_by_activations,
                         also=(outputs,) if outputs is not None else ())


def score(analysis: Analysis, criterion: str, seed: int, stats: dict | None) -> dict:
    """Scores per prunable group; ``stats`` feed the data criteria (ignored by the others)."""
    return score_groups(analysis.groups, analysis.view, criterion, seed, stats if needs_data(criterion) else None)


def choose(analysis: Analysis, scores: dict, widths: WidthOptions, ratios: dict[str, float] | None = None) -> Plan:
    """The channels each group keeps: ``widths.ratio`` everywhere but for ``ratios`` (group id -> ratio)."""
    return make_plan(analysis.groups, scores, widths.ratio or 0.0, widths.round_to, widths.global_ranking,
                     widths.min_channels, widths.max_group_ratio, ratios)


def cut(model: onnx.ModelProto, analysis: Analysis, plan: Plan, stats: dict | None = None) -> Cut:
    """``plan`` applied to ``analysis``'s graph, exported. With ``stats``, the readers of cut groups
    are refitted where Gram matrices were measured (cut/refit.py) and bias-compensated elsewhere."""
    done = None
    if stats is not None:
        refitted = refit(analysis.view, analysis.groups, plan, stats)
        done = compensate(analysis.view, analysis.groups, plan, stats, frozenset(refitted.readers))
        done.refitted = refitted.readers
    surgery = apply_plan(analysis.view, analysis.groups, plan)
    changes = iochange.find_io_changes(analysis.view, surgery)
    pruned = export(analysis.view, model, changes)
    iochange.record(pruned, changes)  # relative to this input (replaces the record of an earlier run)
    return Cut(pruned, changes, done, dict(surgery.dims))

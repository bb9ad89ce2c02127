"""Pruning in rounds, with recovery after each: prune -> [train] -> prune -> [train] ...

Each round removes 1 - (1 - ratio)^(1/steps) of the channels left, so that
the rounds together keep (1 - ratio) of each group, re-scoring on the model
the previous round left; the teacher is always the original model.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from ..cut import iochange
from ..cut.surgery import positions
from ..options import PruneOptions
from ..recovery.train import FeaturePoint, train
from ..scoring.calibration import read_points
from .prune import PruneResult, prune_model


def prune_rounds(model: onnx.ModelProto, options: PruneOptions) -> PruneResult:
    """Prune in ``options.steps`` rounds (validated options, data loaded), recovering after each
    round when ``options.training`` is given."""
    steps, widths, training = options.steps, options.widths, options.training
    per_round = widths.ratio if steps == 1 or widths.ratio is None else 1 - (1 - widths.ratio) ** (1 / steps)
    head_ratio = widths.head_ratio
    if head_ratio is not None and steps > 1:
        head_ratio = 1 - (1 - head_ratio) ** (1 / steps)
    data = options.data.data
    current, rounds, first, changes = model, [], None, []
    for step in range(steps):
        # a cache reshaped by an earlier round: this round's input takes the kept positions of the data
        round_data = iochange.candidate_data(data, changes) if data is not None else None
        result = prune_model(current, replace(options, widths=replace(widths, ratio=per_round, head_ratio=head_ratio),
                                              data=replace(options.data, data=round_data)))
        if result.model is not current:  # recorded relative to the input model, for verification and training
            changes = iochange.compose(changes, iochange.read(result.model))
            iochange.record(result.model, changes)
        first = first or result
        if training is not None and result.model is not current:
            features = feature_points(result) if steps == 1 and training.feature_weight > 0 else ()
            result.model, trained = train(result.model, model, data, training, groups=None, features=features)
            result.report.training = trained.to_json()
        rounds.append({"round": step + 1, "ratio": per_round, "params_after": result.report.params_after,
                       "macs_after": result.report.macs_after, "training": result.report.training})
        current = result.model
    if steps > 1:
        result.report.params_before, result.report.macs_before = first.report.params_before, first.report.macs_before
        result.report.ratio = widths.ratio
        result.report.rounds = rounds
    return result


def feature_points(result: PruneResult) -> list[FeaturePoint]:
    """Where student and teacher features are matched: the read points of every cut group."""
    points, student_tensors = [], {n for node in result.model.graph.node for n in node.input}
    for group in result.analysis.prunable:
        if group.id not in result.plan.keep:
            continue
        removed = result.plan.removed(group.id)
        for p in read_points(group, result.analysis.view):
            if p.name in student_tensors and p.axis > 0:
                gone = positions(p.owner, removed)
                points.append(FeaturePoint(p.name, p.axis, np.setdiff1d(np.arange(len(p.owner)), gone)))
    return points

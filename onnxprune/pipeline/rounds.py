"""Pruning in rounds, with recovery after each: prune -> [train] -> prune -> [train] ...

Each round removes 1 - (1 - ratio)^(1/steps) of the channels left, so that
the rounds together keep (1 - ratio) of each group, re-scoring on the model
the previous round left; the teacher is always the original model. What the
rounds removed is checked against what was asked (reduction.py).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from ..cut import iochange
from ..cut.surgery import positions
from ..options import PruneOptions
from ..progress import stage_done
from ..recovery.train import FeaturePoint, train
from ..scoring.calibration import read_points
from .prune import PruneResult, prune_model
from .reduction import require_reduction, weak_reduction_warning


def prune_rounds(model: onnx.ModelProto, options: PruneOptions, teacher: onnx.ModelProto | None = None) -> PruneResult:
    """Prune in ``options.steps`` rounds (validated options, data loaded), recovering after each
    round when ``options.training`` is given, from ``teacher`` (default ``model``: the input of
    the run where no step came before)."""
    teacher = model if teacher is None else teacher
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
        if step == steps - 1:  # the last cut fixes the MACs and training changes none: check before training
            require_reduction(first.report.macs_before, result.report.macs_after,
                              options.gate and options.gate.min_reduction, result.report.barriers,
                              result.report.modules)
        if training is not None and (result.model is not current or teacher is not model):
            features = feature_points(result) if steps == 1 and training.feature_weight > 0 else ()
            result.model, trained = train(result.model, teacher, data, training, groups=None, features=features)
            stage_done("train")
            result.report.training = trained.to_json()
        rounds.append({"round": step + 1, "ratio": per_round, "params_after": result.report.params_after,
                       "macs_after": result.report.macs_after, "training": result.report.training})
        current = result.model
    if steps > 1:
        result.report.params_before, result.report.macs_before = first.report.params_before, first.report.macs_before
        result.report.ratio = widths.ratio
        result.report.rounds = rounds
    warning = weak_reduction_warning(result.report, options)
    if warning:
        result.report.warnings.append(warning)
    return result


def feature_points(result: PruneResult) -> list[FeaturePoint]:
    """Where student and teacher features are matched: the read points of every cut group, and
    every block output (``block_outputs``), each at the channels the student kept."""
    points, seen = [], set()
    student_tensors = {n for node in result.model.graph.node for n in [*node.input, *node.output]}
    for group in result.analysis.prunable:
        if group.id not in result.plan.keep:
            continue
        removed = result.plan.removed(group.id)
        for p in read_points(group, result.analysis.view):
            if p.name in student_tensors and p.axis > 0:
                gone = positions(p.owner, removed)
                points.append(FeaturePoint(p.name, p.axis, np.setdiff1d(np.arange(len(p.owner)), gone)))
                seen.add(p.name)
    for name, axis, size in block_outputs(result.analysis):
        if name in seen or name not in student_tensors:
            continue
        kept = np.arange(size)
        for group in result.analysis.prunable:
            slot = group.dims.get((name, axis))
            if slot is not None and group.id in result.plan.keep:
                kept = np.setdiff1d(kept, positions(slot.owner, result.plan.removed(group.id)))
        points.append(FeaturePoint(name, axis, kept))
    return points


def block_outputs(analysis) -> list[tuple[str, int, int]]:
    """(tensor, channel axis, channels) of each residual join: an Add of two computed tensors of
    one shape (a ResNet/MobileNet block, a transformer layer's attention or MLP sublayer).
    Matching them (besides the cut groups' read points) keeps the residual stream on the
    teacher's track, the part of a pretrained net its later layers depend on most. The channel
    axis is the one a channel group has there, else 1 (NCHW) for rank 4 and the last otherwise."""
    view, found = analysis.view, []
    grouped = {name: axis for group in analysis.groups for name, axis in group.dims}
    for node in view.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or any(view.is_constant(t) for t in node.inputs):
            continue
        shapes = [view.shape(t) for t in node.inputs]
        if shapes[0] is None or shapes[0] != shapes[1] or len(shapes[0]) < 2:
            continue
        name = node.outputs[0].name
        axis = grouped.get(name, 1 if len(shapes[0]) == 4 else len(shapes[0]) - 1)
        if isinstance(shapes[0][axis], int):
            found.append((name, axis, shapes[0][axis]))
    return found

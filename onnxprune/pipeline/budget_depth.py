"""A MACs or params budget shared between depth and width, chosen by what each share costs.

With ``depth`` R, a budget and data, the depth step's blocks are tried as
k = 0, 1, ... of them (the least important first); for each, the channels
meet the rest of the budget (one uniform ratio, searched as pipeline/target.py
does), and the model's output error on the calibration samples is measured.
The share with the least error is taken: all depth, all width, or between.
"""

from __future__ import annotations

from dataclasses import replace

import onnx

from ..depth_options import DepthOptions
from ..errors import UsageError
from ..metrics import Reference
from ..options import PruneOptions, Target
from .depth import MEASURED_SAMPLES, DepthResult, prune_depth, rest_of_budget
from .prune import prune_model
from .target import find_ratio


def depth_for_budget(model: onnx.ModelProto, options: PruneOptions, budget: Target,
                     first: DepthResult) -> DepthResult:
    """The depth step's result with as many of ``first``'s blocks as meet ``budget`` at the least
    output error; its record lists every share tried (``record["budget"]``)."""
    scores = {b["id"]: b.get("score", 0.0) for b in first.record["removed"]}
    order = sorted((b.id for b in first.removed), key=lambda i: scores[i])
    data = options.data.data.sample(MEASURED_SAMPLES, options.seed)
    reference = Reference(model, data, options.data.batch_size)
    # how the shares are compared: one uniform ratio, no compensation or reconstruction (they change no width)
    trial = replace(options, target=None, widths=replace(options.widths, allocate="uniform"),
                    data=replace(options.data, data=data, compensate=False, reconstruct=False))
    tried, results = [], {}
    for k in range(len(order) + 1):
        depth = first if k == len(order) else prune_depth(model, replace(options, depth=DepthOptions(
            None, tuple(order[:k]), None)))
        rest = rest_of_budget(budget, depth)
        ratio, candidate = 0.0, depth.model
        if rest is not None:
            try:
                ratio = find_ratio(depth.model, rest, None, trial).ratio
            except UsageError:  # the channels alone cannot meet the rest
                tried.append({"blocks": k, "ratio": None, "output_error": None})
                continue
            candidate = prune_model(depth.model, replace(trial, widths=replace(trial.widths, ratio=ratio))).model
        error = reference.measure(candidate).output_error
        tried.append({"blocks": k, "ratio": ratio, "output_error": error})
        results[k] = depth
    measured = [t for t in tried if t["output_error"] is not None]
    if not measured:
        raise UsageError(f"{budget.option} cannot be met with or without the blocks `depth` removes")
    best = min(measured, key=lambda t: t["output_error"])
    chosen = results[best["blocks"]]
    chosen.record = {**chosen.record, "criterion": first.record["criterion"], "ratio": first.record["ratio"],
                     "budget": {"tried": tried, "blocks": best["blocks"]}}
    return chosen

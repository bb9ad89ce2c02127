"""A budget shared between depth and width, chosen by what each share costs.

With ``depth`` R and a budget, the depth step's blocks are tried as k = 0, 1,
... of them (the least important first); for each, the channels meet the rest
(one uniform ratio, searched as pipeline/target.py does):

- a MACs or params budget (with data): the rest of the input's budget, counted;
- a speedup budget: the input's latency over the candidate's, measured, the
  blocks' share included (ratio 0 is timed: the blocks alone may meet it).

The share is then chosen by the model's output error on the calibration
samples where there is data: the least, all depth, all width or between.
A speedup budget without data takes the share that keeps the most MACs at
the speedup asked for: every share meets it as measured, and the one whose
cut turns the fewest MACs into that latency removed the least of the model
(what is left to compare without data). The measured margins are not compared:
they are within the timing noise of one another, so they would choose by chance.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from ..depth_options import DepthOptions
from ..errors import BudgetUnreachable, UsageError
from ..metrics import Reference
from ..options import PruneOptions, Target
from .depth import MEASURED_SAMPLES, DepthResult, prune_depth, rest_of_budget
from .prune import prune_model
from .search import TargetResult
from .target import find_ratio


def depth_for_budget(model: onnx.ModelProto, options: PruneOptions, budget: Target, first: DepthResult,
                     base_path: str | Path | None = None) -> tuple[DepthResult, TargetResult | None]:
    """The depth step's result with as many of ``first``'s blocks as meet ``budget`` best, and for a
    speedup budget that share's search (its ratio is the one timed; searching again would time
    other candidates). Its record lists every share tried (``record["budget"]``). ``base_path``:
    ``model``'s file, what a speedup is timed against."""
    scores = {b["id"]: b.get("score", 0.0) for b in first.record["removed"]}
    order = sorted((b.id for b in first.removed), key=lambda i: scores[i])
    data = options.data.data
    if data is not None:
        data = data.sample(MEASURED_SAMPLES, options.seed)
    reference = Reference(model, data, options.data.batch_size) if data is not None else None
    # how the shares are compared: one uniform ratio, no compensation or reconstruction (they change no width)
    trial = replace(options, target=None, widths=replace(options.widths, allocate="uniform"),
                    data=replace(options.data, data=data, compensate=False, reconstruct=False))
    tried, results = [], {}
    for k in range(len(order) + 1):
        depth = first if k == len(order) else prune_depth(model, replace(options, depth=DepthOptions(
            None, tuple(order[:k]), None)))
        share = _share(model, depth, budget, trial, base_path)
        if share is None:  # the channels cannot meet the rest of it
            tried.append({"blocks": k, "ratio": None, "output_error": None})
            continue
        candidate, entry, search = share
        entry["output_error"] = reference.measure(candidate).output_error if reference is not None else None
        tried.append({"blocks": k, **entry})
        results[k] = depth, search
    met = [t for t in tried if t["ratio"] is not None]
    if not met:
        raise UsageError(f"{budget.option} cannot be met with or without the blocks `depth` removes")
    if reference is not None:
        best, chosen_by = min(met, key=lambda t: t["output_error"]), "output_error"
    else:  # a speedup budget without data (a MACs or params one takes all the blocks, pipeline/run.py)
        best, chosen_by = max(met, key=lambda t: (t["macs"] or 0.0, -t["blocks"])), "macs_kept"
    chosen, search = results[best["blocks"]]
    chosen.record = {**chosen.record, "criterion": first.record["criterion"], "ratio": first.record["ratio"],
                     "budget": {"tried": tried, "blocks": best["blocks"], "chosen_by": chosen_by}}
    return chosen, search if budget.metric == "speedup" else None


def _share(model: onnx.ModelProto, depth: DepthResult, budget: Target, trial: PruneOptions, base_path):
    """The candidate for one share of blocks (the channels meeting the rest of ``budget`` on what
    ``depth`` left), what the record lists of it, and the speedup search; None where it cannot be met."""
    rest = budget if budget.metric == "speedup" else rest_of_budget(budget, depth)
    ratio, search, candidate = 0.0, None, depth.model
    if rest is not None:
        try:
            search = find_ratio(depth.model, rest, base_path, trial, base=model if depth.removed else None)
        except BudgetUnreachable:  # the channels cannot meet the rest
            return None
        ratio = search.ratio
    macs = depth.record["macs_after"]
    if ratio:
        pruned = prune_model(depth.model, replace(trial, widths=replace(trial.widths, ratio=ratio)))
        candidate, macs = pruned.model, pruned.report.macs_after
    macs_before = depth.macs_before
    entry = {"ratio": ratio, "macs": macs / macs_before if macs_before and macs is not None else None}
    if search is not None and budget.metric == "speedup":
        entry["speedup"] = search.achieved
    return candidate, entry, search


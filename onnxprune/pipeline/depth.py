"""Depth pruning, the first step of a run: find the blocks -> score -> choose -> cut.

    blocks = find_blocks(model, shapes)          # analysis/blocks.py
    scores = block_scores(model, removable, ...) # scoring/blocks.py
    chosen = choose_blocks(blocks, scores, R)    # planning/depth.py (or a plan's ids)
    model = remove_blocks(model, chosen)         # cut/depth.py

The channels are pruned after it, on the model it leaves (a plan's groups
are those of that model). The record goes into the report (``Report.depth``)
and the plan (``Plan.blocks``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import onnx

from ..analysis.blocks import Block, find_blocks
from ..analysis.stats import count_macs, count_params
from ..cut import iochange
from ..cut.depth import remove_blocks
from ..data import Dataset
from ..errors import UsageError
from ..graph.shapes import analyse_shapes
from ..options import PruneOptions, Target
from ..planning.depth import choose_blocks, named_blocks, planned_blocks
from ..planning.plan import Plan
from ..report.records import Report
from ..scoring.blocks import block_scores

MEASURED_SAMPLES = 64  # calibration samples the data criteria score blocks on


@dataclass
class DepthResult:
    model: onnx.ModelProto  # without the removed blocks (the input itself when none go)
    removed: list[Block]
    record: dict  # Report.depth
    params_before: int
    macs_before: int | None

    @property
    def changes(self) -> list[iochange.IOChange]:
        """The graph inputs and outputs the cut removed (a KV cache, with `allow_io_change`)."""
        return iochange.read(self.model) if self.removed else []


def prune_depth(model: onnx.ModelProto, options: PruneOptions) -> DepthResult:
    """Remove the blocks that ``options.depth`` (or a plan's ``blocks``) names; validated options.
    With ``options.steps`` K > 1, the fraction goes in K rounds, the blocks found and scored again
    on the model each round leaves (a block's importance changes once its neighbours are gone)."""
    started = time.perf_counter()
    depth = options.depth
    shapes = analyse_shapes(model, options.analysis.input_shapes)
    blocks = find_blocks(model, shapes.static, options.analysis.allow_io_change)
    removable = [b for b in blocks if b.removable]
    plan = options.widths.plan if isinstance(options.widths.plan, Plan) else None
    scores, criterion, rounds = {}, None, []
    if plan is not None and plan.blocks:
        chosen, criterion = planned_blocks(blocks, plan.blocks), "plan"
        pruned = remove_blocks(model, chosen) if chosen else model
    else:
        named = named_blocks(blocks, depth.drop_blocks) if depth.drop_blocks else []
        criterion = depth.block_importance if depth.depth else None
        total = max(round((depth.depth or 0.0) * len(removable)), len(named))
        pruned, chosen = model, []
        steps = options.steps if depth.depth else 1
        for step in range(steps):
            count = -(-(total - len(chosen)) // (steps - step))  # what is left, over the rounds left
            if count <= 0:
                break
            current = _same_ids(find_blocks(pruned, shapes.static, options.analysis.allow_io_change), blocks) \
                if step else blocks
            candidates = [b for b in current if b.removable]
            if depth.depth and candidates:
                data = _calibration(options, iochange.read(pruned) if step else [])
                scores = block_scores(pruned, candidates, criterion, data, options.data.batch_size)
            picked = choose_blocks(current, scores, None, named if step == 0 else [], count=count)
            rounds.append({"round": step + 1, "removed": [b.id for b in picked]})
            pruned = remove_blocks(pruned, picked) if picked else pruned
            chosen += picked
    kept_ids = {b.id for b in chosen}
    record = {
        "criterion": criterion,
        "ratio": depth.depth if depth is not None else None,
        "blocks": len(blocks), "removable": len(removable),
        "removed": [{**b.to_json(), **({"score": scores[b.id]} if b.id in scores else {})} for b in chosen],
        "kept": [{"id": b.id, "kind": b.kind, **({"score": scores[b.id]} if b.id in scores else {})}
                 for b in removable if b.id not in kept_ids],
        "not_removable": [{"id": b.id, "kind": b.kind, "reason": b.reason} for b in blocks if not b.removable],
        **({"rounds": rounds} if len(rounds) > 1 else {}),
        "seconds": 0.0,
    }
    record["params_after"] = count_params(pruned)
    record["macs_after"] = count_macs(pruned, iochange.shrink_shapes(shapes.pinned_inputs, iochange.read(pruned))) \
        if pruned is not model else count_macs(model, shapes=shapes.static)
    record["seconds"] = time.perf_counter() - started
    return DepthResult(pruned, chosen, record, count_params(model), count_macs(model, shapes=shapes.static))


def _same_ids(found: list[Block], first: list[Block]) -> list[Block]:
    """Blocks found again after a round, under the ids they had in the input model (a block's
    output tensor keeps its name; a ``block:N`` id would otherwise count again from 0)."""
    ids = {b.output: b.id for b in first}
    for block in found:
        block.id = ids.get(block.output, block.id)
    return found


def _calibration(options: PruneOptions, changes=()) -> Dataset | None:
    """Up to MEASURED_SAMPLES of the data, as a model without the ``changes``' inputs takes them."""
    data = options.data.data
    if not isinstance(data, Dataset):
        return None
    data = iochange.candidate_data(data, list(changes))
    return data.sample(min(MEASURED_SAMPLES, options.data.calib_samples or MEASURED_SAMPLES), options.seed)


def rest_of_budget(target: Target, depth: DepthResult) -> Target | None:
    """A MACs or params budget of the input model as one of the model the depth step left (the
    fraction of it to keep); None when the removed blocks alone meet it."""
    before = depth.macs_before if target.metric == "macs" else depth.params_before
    left = depth.record["macs_after"] if target.metric == "macs" else depth.record["params_after"]
    if not before or not left:
        raise UsageError(f"{target.option} with `depth`: this model's {target.metric} cannot be counted")
    value = target.value * before / left
    return None if value >= 1 else replace(target, value=value)


def record_depth(report: Report, plan: Plan, depth: DepthResult) -> None:
    """The depth step in the run's report and plan: what it removed, the counts from the input model."""
    report.depth = depth.record
    record = depth.record
    if not depth.removed and record["ratio"]:
        why = (f"none of its {record['blocks']} block(s) can be removed (onnxprune info says why)" if record["blocks"]
               else "it has no residual block")
        report.warnings.append(f"`depth` {record['ratio']:g} removed no block: {why}")
    report.params_before, report.macs_before = depth.params_before, depth.macs_before
    plan.blocks = [b.id for b in depth.removed]

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

from .errors import UsageError, VerificationFailed
from .graph import GraphView
from .groups import Group, find_groups
from .importance import score_groups
from .model import (
    AtomicModelWriter,
    check_output_path,
    ensure_writable,
    default_output_path,
    load_model,
    resolve_input_shapes,
)
from .shapes import Shapes, analyse_shapes
from .plan import Plan, check_plan, make_plan
from .report import BlockedGroup, GroupReport, Report
from .stats import count_macs, count_params
from .surgery import apply_plan, export
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


def analyse(model: onnx.ModelProto, input_shapes: dict | None = None, ignore=()) -> Analysis:
    """Channel groups of ``model`` (which is not modified)."""
    shapes = analyse_shapes(model, input_shapes)
    view = GraphView.from_model(model, shapes)
    return Analysis(model, shapes, view, find_groups(view, tuple(ignore)))


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
) -> PruneResult:
    """Prune ``model`` in memory: remove ``ratio`` of each group's channels, or apply ``plan``."""
    started = time.perf_counter()
    validate_options(ratio, round_to, min_channels, max_group_ratio)
    if ratio is None and plan is None:
        raise UsageError("give a ratio (--structured) or a plan (--plan-in)")
    if not isinstance(model, onnx.ModelProto):
        model = load_model(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        analysis = analyse(model, input_shapes, ignore)
        if plan is None:
            scores = score_groups(analysis.groups, analysis.view, importance, seed)
            plan = make_plan(analysis.groups, scores, ratio, round_to, global_ranking, min_channels, max_group_ratio)
        else:
            check_plan(plan, analysis.groups)
            scores = {}
    report = _report(analysis, plan, scores, ratio, importance if ratio is not None else "plan")
    report.warnings = [str(w.message) for w in caught]
    if plan.keep:
        apply_plan(analysis.view, analysis.groups, plan)
        pruned = export(analysis.view, model)
        report.params_after = count_params(pruned)
        report.macs_after = count_macs(pruned, analysis.shapes.pinned_inputs)
    else:
        pruned = model
    report.seconds = time.perf_counter() - started
    return PruneResult(pruned, plan, report)


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
        groups.append(GroupReport(g.id, g.sources, g.nodes, g.size, len(kept), info))
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
    **options,
) -> Report:
    """Prune a file and write the verified result atomically (unless ``dry_run``)."""
    started = time.perf_counter()
    input_path = Path(input_path)
    output = Path(output_path) if output_path else default_output_path(input_path)
    if not dry_run:
        check_output_path(input_path, output, force)
    for side, flag in ((report_path, "--report"), (plan_out, "--plan-out")):
        if side:
            ensure_writable(side, flag)
    plan = Plan.load(plan_in) if plan_in else None
    model = load_model(input_path)
    result = prune(model, ratio, plan=plan, seed=seed, **options)
    report = result.report
    report.input = str(input_path)
    if plan_out:
        result.plan.save(plan_out)
    if not dry_run:
        report.output = str(output)
        if result.model is model:  # nothing prunable: an unchanged copy
            _copy_model(input_path, model, output)
        else:
            _write_verified(result.model, output, input_path, report, verify, seed, options.get("input_shapes"))
        report.written = True
    report.seconds = time.perf_counter() - started
    if report_path:
        report.save(report_path)
    return report


def _write_verified(pruned, output: Path, input_path: Path, report: Report, verify: bool, seed, input_shapes):
    feeds = reference = None
    if verify:
        shapes = resolve_input_shapes(pruned, input_shapes)
        feeds, reference = run_original(input_path, shapes, index_bounds(pruned), seed)
    with AtomicModelWriter(output) as writer:
        tmp = writer.write(pruned)
        if verify:
            result = verify_file(tmp, feeds, reference)
            bad = [n for n, e in result.output_error.items() if not np.isfinite(e)]
            if bad:
                raise VerificationFailed(f"pruned model produces non-finite values in output {bad[0]}")
            report.output_error = result.output_error


def _copy_model(input_path: Path, model: onnx.ModelProto, output: Path) -> None:
    if output.exists() and output.samefile(input_path):
        return  # --force onto itself with nothing to cut: leave the input untouched
    with AtomicModelWriter(output) as writer:
        writer.write(model)

"""The result of a run: a plain record, its JSON form and the printed summary."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..analysis.stats import format_count
from ..model.save import write_text_file
from .text import (
    conversion_line,
    dynamic_line,
    group_label,
    labelled_reason,
    node_labels,
    quantization_line,
    summary_line,
    worth_a_line,
)

REPORT_SCHEMA = 1
# the JSON Schema of Report.to_json, shipped in the package (tests/test_json_output.py checks real reports)
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "report.schema.json"


def strict_json(value):
    """``value`` with what strict JSON cannot hold spelled out: NaN (a loss not measured) as null,
    an infinite error as "inf" / "-inf" (json.dumps would write NaN and Infinity, which many
    parsers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def run_environment() -> dict:
    """The versions a run used: onnxprune, Python, onnx, onnxruntime, and torch when it was loaded."""
    import platform
    import sys

    from .. import __version__

    versions = {"onnxprune": __version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "torch"):
        module = sys.modules.get(name)
        if module is None and name != "torch":  # torch only when the run used it
            try:
                module = __import__(name)
            except ImportError:
                continue
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    return versions


@dataclass
class GroupReport:
    id: str
    sources: list[str]
    nodes: list[str]
    channels_before: int
    channels_after: int
    importance: dict = field(default_factory=dict)
    kind: str = "channels"  # or "heads"
    units_before: int = 0  # heads (for kind "heads")
    units_after: int = 0
    modules: list[str | None] = field(default_factory=list)  # each source's module path (graph/names.py)


@dataclass
class BlockedGroup:
    id: str
    sources: list[str]
    channels: int
    reason: str
    macs: int | None = None  # of the group's nodes: what its barriers hold (None: a count unknown)
    modules: list[str | None] = field(default_factory=list)  # each source's module path (graph/names.py)


@dataclass
class TensorSparsity:
    """One weight tensor considered for sparsity (see onnxprune/sparsity.py)."""

    name: str
    nodes: list[str]  # the nodes that read it as a weight
    shape: list[int]
    elements: int
    zeros_before: int
    zeros_after: int
    sparsity: float  # zeros_after / elements
    pattern: str | None  # "unstructured" or "N:M along axis A"; None when skipped
    criterion: str | None  # "magnitude" or "scores"; None when skipped
    skipped: str | None = None  # why the tensor was left alone


@dataclass
class SparsityReport:
    """Unstructured or N:M sparsity; the totals cover the tensors that were sparsified."""

    pattern: str  # "unstructured" or "N:M"
    ratio: float | None  # unstructured only
    ranking: str | None  # unstructured only: "per-tensor" or "global"
    min_elements: int
    tensors: list[TensorSparsity]
    elements: int
    zeros_before: int
    zeros_after: int
    zipped_before: int | None  # deflate (level 6) of the model before / after sparsity, bytes
    zipped_after: int | None

    @property
    def sparsified(self) -> list[TensorSparsity]:
        return [t for t in self.tensors if t.skipped is None]

    @property
    def skipped(self) -> list[TensorSparsity]:
        return [t for t in self.tensors if t.skipped is not None]

    def summary_lines(self, verbose: bool = False) -> list[str]:
        how = self.pattern if self.ratio is None else f"{self.pattern} {self.ratio:g} {self.ranking}"
        share = f"{self.zeros_after / self.elements:.1%}" if self.elements else "n/a"
        line = (f"sparsity {how}: {format_count(self.zeros_after)} of {format_count(self.elements)} weights zero "
                f"({share}) in {len(self.sparsified)} tensor(s), {len(self.skipped)} skipped")
        if self.skipped and not verbose:
            line += f" (e.g. {self.skipped[0].name}: {self.skipped[0].skipped})"
        lines = [line]
        if verbose:
            lines += _sparsity_table(self.tensors)
        if self.zipped_before and self.zipped_after:
            lines.append(f"zipped  {_bytes(self.zipped_before):>9} -> {_bytes(self.zipped_after):<9}"
                         f"({self.zipped_before / self.zipped_after:.2f}x smaller)")
        return lines


NO_STRUCTURED = "none"  # Report.importance when only sparsity ran (no channel was planned)


@dataclass
class Report:
    input: str
    output: str | None
    ratio: float | None
    importance: str
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    groups: list[GroupReport]
    blocked: list[BlockedGroup]
    seconds: float = 0.0
    round_to: int | str | None = None  # the kept-width rounding applied: a multiple, "auto", None for a plan
    output_error: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    data: dict | None = None  # calibration data: source, samples
    compensation: dict | None = None  # readers, skipped, output_error without/with
    reconstruction: dict | None = None  # readers refitted, skipped, samples, seconds, output_error before/after
    training: dict | None = None  # recover.TrainingReport: epochs, best epoch, throughput
    rounds: list | None = None  # --steps K: per round ratio, params, MACs, training
    gate: dict | None = None  # the quality gate's measurement on the validation split
    allocation: dict | None = None  # --allocate: per-group ratios chosen and why (sensitivity.py)
    target: dict | None = None  # --target-*: the ratio searched for and each evaluation (target.py)
    bench: object | None = None  # --bench: onnxprune.bench.BenchResult of input vs output
    depth: dict | None = None  # --depth/--drop-blocks: blocks removed, kept, not removable (pipeline/depth.py)
    configs: list | None = None  # genai_config.json / config.json beside the output: what each changed
    io_changes: list | None = None  # --allow-io-change: graph inputs/outputs reshaped (iochange.describe)
    conversion: dict | None = None  # an old opset upgraded on load (model/load.py Conversion.to_json)
    # sizes chosen for the dynamic input dims left unpinned (model/dynamic.py DimChoice.to_json), and the
    # input shapes the analysis and MACs were taken at
    dynamic_dims: list[dict] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    # the barriers of the blocked groups, most MACs held first (analysis/stats.py barrier_macs)
    barriers: list[dict] = field(default_factory=list)
    # node name -> module path (graph/names.py), for each node named above that has one: the
    # summary shows nodes by it (``node_conv2d_3`` as ``features.3``)
    modules: dict[str, str] = field(default_factory=dict)
    written: bool = False
    sparsity: SparsityReport | None = None
    # the command line's effective options (cli/recipe.py): `--config` on this report reruns it
    recipe: dict | None = None
    command: list[str] | None = None  # the command line, when the run came from one
    environment: dict = field(default_factory=dict)  # versions of onnxprune and the runtimes (run_environment)
    stages: list[dict] = field(default_factory=list)  # each stage of the run and its seconds (progress.py)
    quantization: dict | None = None  # --quantize: how the written model was quantized (pipeline/quantize.py)
    schema_version: int = REPORT_SCHEMA

    @property
    def macs_ratio(self) -> float | None:
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def add_warnings(self, caught) -> None:
        """Caught warnings (``warnings.catch_warnings(record=True)``), each message once."""
        for message in (str(w.message) for w in caught):
            if message not in self.warnings:
                self.warnings.append(message)

    def to_json(self) -> dict:
        data = asdict(self)
        data["macs_ratio"] = self.macs_ratio
        return strict_json(data)

    def save(self, path) -> None:
        write_text_file(path, json.dumps(self.to_json(), indent=1) + "\n")

    def summary(self, verbose: bool = False) -> str:
        pruned = [g for g in self.groups if g.channels_after < g.channels_before]
        lines = [conversion_line(self.conversion)] if self.conversion else []
        if worth_a_line(self.dynamic_dims):  # the MACs below are counted at these sizes
            lines.append(dynamic_line(self.dynamic_dims, self.input_shapes))
        lines += [
            f"params  {format_count(self.params_before):>9} -> {format_count(self.params_after):<9}"
            f"({_ratio(self.params_before, self.params_after)})",
            f"MACs    {format_count(self.macs_before):>9} -> {format_count(self.macs_after):<9}"
            f"({_ratio(self.macs_before, self.macs_after)})",
        ]
        if self.depth:
            lines += _depth_lines(self.depth, verbose)
        if self.importance != NO_STRUCTURED:
            lines.append(f"groups  {len(pruned)} pruned, {len(self.groups) - len(pruned)} left whole, "
                         f"{len(self.blocked)} blocked{_rounding_note(self.round_to)}")
        labels = node_labels(self.modules)
        shown = pruned if verbose else pruned[:8]
        for g in shown:
            heads = f"({g.units_before} -> {g.units_after} heads) " if g.kind == "heads" else ""
            lines.append(f"  pruned  {g.channels_before:>5} -> {g.channels_after:<5} "
                         f"{heads}{group_label(g.sources, g.id, labels)}")
        if len(pruned) > len(shown):
            lines.append(f"  ... {len(pruned) - len(shown)} more pruned groups (`verbose` or `report_path`)")
        reasons: dict[str, list[BlockedGroup]] = {}
        for b in self.blocked:
            reasons.setdefault(_reason_kind(b.reason), []).append(b)
        for kind, items in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            example = items[0]
            lines.append(
                f"  blocked {len(items):>3} group(s): {kind} "
                f"(e.g. {group_label(example.sources, example.id, labels)}: "
                f"{labelled_reason(example.reason, labels)})"
            )
        if self.io_changes:
            lines.append(f"io      {len(self.io_changes)} graph input(s)/output(s) reshaped, removed or renamed "
                         "(`allow_io_change`):")
        changed = (self.io_changes or []) if verbose else (self.io_changes or [])[:8]
        for c in changed:
            if c["shape_after"] is None:  # removed with its block (depth pruning)
                lines.append(f"  {c['role']:<6}  {c['name']} {_shape(c['shape_before'])} removed")
                continue
            renamed = f" renamed {c['renamed']}" if c.get("renamed") else ""  # `renumber_cache`
            if not c["kept"]:
                lines.append(f"  {c['role']:<6}  {c['name']} {_shape(c['shape_before'])}{renamed}")
                continue
            kept = "; ".join(f"axis {a} keeps {_kept_positions(k)}" for a, k in c["kept"].items())
            lines.append(f"  {c['role']:<6}  {c['name']} {_shape(c['shape_before'])} -> {_shape(c['shape_after'])}"
                         f"  ({kept}){renamed}")
        if len(self.io_changes or []) > len(changed):
            lines.append(f"  ... {len(self.io_changes) - len(changed)} more reshaped (`verbose` or `report_path`)")
        for c in self.configs or []:  # genai_config.json / config.json beside the output (model/configs.py)
            changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in c["changes"].items()) or "unchanged"
            lines.append(f"config  {c['file']}: {changed}")
        if self.target:
            lines.append(summary_line(self.target))
        if self.data:
            lines.append(f"data    {self.data['samples']} calibration samples from {self.data['source']}")
        if self.compensation:
            c = self.compensation
            err = c.get("output_error") or {}
            effect = (f": output error {err['without']:.3g} -> {err['with']:.3g} on calibration data"
                      if err else "")
            refitted = f", {c['refitted']} reader(s) refitted" if c.get("refitted") else ""
            lines.append(f"compensation  {c['readers']} reader bias(es) adjusted{refitted}{effect}")
        if self.reconstruction:
            r = self.reconstruction
            err = r["output_error"]
            held = r.get("held_out")
            judged = (f"; on {held['samples']} samples it did not fit: {held['output_error']['before']:.3g} -> "
                      f"{held['output_error']['after']:.3g}" if held else "")
            verdict = "" if r.get("kept", True) else " (discarded: no better on the samples it did not fit)"
            lines.append(f"reconstruction  {r['readers']} layer(s) refitted on {r['samples']} samples in "
                         f"{r['seconds']:.1f} s: output error {err['before']:.3g} -> {err['after']:.3g}"
                         f"{judged}{verdict}")
        if self.sparsity is not None:
            lines += self.sparsity.summary_lines(verbose)
        if self.training:
            lines.extend(_training_lines(self.training))
        if self.quantization:
            lines.append(quantization_line(self.quantization))
        if self.rounds:
            lines.append(f"rounds  {len(self.rounds)} (each removes {self.rounds[0]['ratio']:.3f} of what is left)")
        if self.gate:
            g = self.gate
            acc = (f"accuracy {100 * g['original_accuracy']:.2f}% -> {100 * g['accuracy']:.2f}%, "
                   if "accuracy" in g else "")
            lines.append(f"gate    {acc}output error {g['output_error']:.4g} on {g['samples']} validation samples")
        if self.output_error:
            worst = max(self.output_error.values())
            lines.append(f"output  max deviation from the original {worst:.3g} (relative to output scale)")
        lines.append(f"time    {self.seconds:.2f} s")
        return "\n".join(lines)


def _depth_lines(depth: dict, verbose: bool) -> list[str]:
    removed = depth["removed"]
    how = f" by {depth['criterion']}" if depth.get("criterion") else ""
    unfit = depth["not_removable"]
    lines = [f"depth   {len(removed)} of {depth['removable']} removable block(s) removed{how}, "
             f"{len(unfit)} not removable"]
    shown = removed if verbose else removed[:8]
    lines += [f"  removed {b['id']} ({b['kind']})" for b in shown]
    if len(removed) > len(shown):
        lines.append(f"  ... {len(removed) - len(shown)} more removed blocks (`verbose` or `report_path`)")
    if unfit:
        lines.append(f"  not removable: {unfit[0]['id']}: {unfit[0]['reason']}"
                     + (f" (and {len(unfit) - 1} more)" if len(unfit) > 1 else ""))
    if depth.get("budget"):
        lines.append(_budget_line(depth["budget"]))
    return lines


def _budget_line(budget: dict) -> str:
    """The shares of a budget between depth and width (pipeline/budget_depth.py), on one line."""
    def share(t: dict) -> str:
        if t["ratio"] is None:
            return f"{t['blocks']} block(s) + channels: not met"
        measured = [f"{t['macs']:.3f} MACs" if t.get("macs") is not None else None,
                    f"{t['speedup']:.2f}x" if t.get("speedup") is not None else None,
                    f"error {t['output_error']:.3g}" if t.get("output_error") is not None else None]
        return f"{t['blocks']} block(s) + ratio {t['ratio']:.3f} ({', '.join(m for m in measured if m)})"

    how = {"output_error": "least output error", "macs_kept": "most MACs kept"}.get(budget.get("chosen_by"),
                                                                                      "least output error")
    return (f"  budget  blocks + channels tried: {'; '.join(share(t) for t in budget['tried'])}; "
            f"{budget['blocks']} block(s) taken ({how})")


def _training_lines(t: dict) -> list[str]:
    lines = [f"train   {t['mode']} on {t['device']}: {len(t['epochs'])} epoch(s), {t['train_samples']} samples, "
             f"{t['samples_per_second']:.0f} samples/s; best epoch {t['best_epoch']}"]
    rows = [("before", t["before"])] + [(f"epoch {e['epoch']}", e) for e in t["epochs"]]
    for label, e in rows:
        acc = f"  val accuracy {100 * e['val_accuracy']:.2f}%" if e.get("val_accuracy") is not None else ""
        measured = e.get("val_output_error") == e.get("val_output_error")  # NaN: not measured (no teacher)
        err = f"  output error {e['val_output_error']:.4g}" if measured else ""
        lines.append(f"  {label:<9} val loss {e['val_loss']:.4g}{acc}{err}")
    return lines


def _ratio(before, after) -> str:
    if not before or not after:
        return "n/a"
    return f"{before / after:.2f}x fewer"


def _shape(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _kept_positions(kept: list[int], shown: int = 16) -> str:
    return ", ".join(map(str, kept[:shown])) + (f", ... ({len(kept)})" if len(kept) > shown else "")


def _reason_kind(reason: str) -> str:
    for kind in ("graph output", "graph input", "no pruning rule", "ignored", "subgraph"):
        if kind in reason:
            return {"graph output": "reaches a graph output", "graph input": "reaches a graph input",
                    "no pruning rule": "op without a rule", "ignored": "`ignore`",
                    "subgraph": "a subgraph's input or output"}[kind]
    return "rule barrier"


def _sparsity_table(tensors: list[TensorSparsity]) -> list[str]:
    width = max([len(t.name) for t in tensors] + [6])
    lines = [f"  {'tensor':<{width}}  {'shape':<14} {'elements':>9} {'zeros before':>12} -> {'after':<9}"
             f"{'sparsity':>8}  pattern"]
    for t in tensors:
        shape = "x".join(map(str, t.shape))
        head = f"  {t.name:<{width}}  {shape:<14} {t.elements:>9} "
        if t.skipped is not None:
            lines.append(head + f"{'':>12}    {'':<9}{'':>8}  skipped: {t.skipped}")
        else:
            lines.append(head + f"{t.zeros_before:>12} -> {t.zeros_after:<9}{t.sparsity:>8.1%}  {t.pattern}")
    return lines


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _rounding_note(round_to) -> str:
    """How the kept widths were rounded, for the groups line (nothing for exact counts or a plan)."""
    if round_to == "auto":
        return "; widths multiples of 8 where within 12.5% (`round_to` 1: exact)"
    return f"; widths multiples of {round_to}" if isinstance(round_to, int) and round_to > 1 else ""

"""Per-group sensitivity, and per-group ratios chosen from it or read from a file.

Sensitivity: each prunable group is cut ALONE at several ratios (every other
group whole) and the cut model runs on the calibration data. Measured per
(group, ratio): the output error against the original model, relative RMS
||y - y'|| / ||y|| over all outputs and samples, and the top-1 accuracy when
the data has integer labels and the first output is (batch, classes) logits.
The model is analysed and scored once; each cut takes a fresh analysis
(surgery edits the graph it is given, and onnx-graphsurgeon graphs cannot be
deep-copied), which costs far less than running the cut model.

Allocation (``--allocate sensitivity``): starting from every group whole,
repeatedly raise the ratio of the group whose next step adds the least
measured squared error per channel removed (looking ahead over the whole
grid, so a flat stretch after a costly step is seen), until the removed
fraction of all prunable channels (channels, not MACs) reaches the target.
Squared errors of separate groups are treated as additive, as they are for
uncorrelated perturbations of the output: an approximation, but it ranks
groups by how much they matter, and it spreads the cut where a plain sum of
errors would pile it onto a few groups.

Ratio files (``--ratios FILE``): a JSON (or, with PyYAML, YAML) mapping from a
group id, or a glob over a group's source node names, to a ratio; later
entries override earlier ones.
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .api import analyse
from .calibration import batch_size_for, measure, model_batches
from .compensate import compensate as compensate_biases
from .data import Dataset
from .errors import MissingDependency, UsageError
from .importance import check_criterion, needs_data, score_groups
from .model import AtomicModelWriter
from .plan import make_plan
from .surgery import apply_plan, export
from . import iochange
from .iochange import find_io_changes

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
ALLOCATE_METHODS = ("sensitivity",)
_GRID_STEP = 0.1


# --- results ------------------------------------------------------------------------------

@dataclass
class GroupSensitivity:
    id: str
    sources: list[str]
    channels: int
    removed: list[int]  # channels actually removed at each ratio (rounding, tied units)
    error: list[float]  # relative RMS output error at each ratio
    accuracy: list[float] | None = None  # top-1 at each ratio, when labels fit


@dataclass
class Sensitivity:
    ratios: list[float]
    importance: str
    samples: int
    compensated: bool
    baseline_accuracy: float | None
    groups: list[GroupSensitivity]
    seconds: float = 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        for g in data["groups"]:  # inf/NaN are not JSON: a model that broke reads as null
            g["error"] = [e if math.isfinite(e) else None for e in g["error"]]
        return data

    def table(self) -> str:
        """One row per group: its source nodes, channels, the error at each ratio [top-1 %]."""
        labels = [_label(g.sources, g.id) for g in self.groups]
        width = max([len(s) for s in labels] + [5])
        cell = 15 if self.baseline_accuracy is not None else 8
        head = f"{'group':<{width}}  {'ch':>5}" + "".join(f"{r:>{cell}g}" for r in self.ratios)
        lines = [head]
        for label, g in zip(labels, self.groups):
            cells = [_cell(e, None if g.accuracy is None else g.accuracy[i]) for i, e in enumerate(g.error)]
            lines.append(f"{label:<{width}}  {g.channels:>5}" + "".join(f"{c:>{cell}}" for c in cells))
        what = "output error (relative RMS) when one group alone loses the fraction of channels above"
        if self.baseline_accuracy is not None:
            what += f"; [top-1 %], original {self.baseline_accuracy:.2%}"
        compensated = "with" if self.compensated else "without"
        lines.append(f"{what}; {self.samples} samples, {self.importance} importance, "
                     f"{compensated} compensation, {self.seconds:.1f} s")
        return "\n".join(lines)


def _cell(error: float, accuracy: float | None) -> str:
    text = f"{error:.4f}" if math.isfinite(error) else "inf"
    return text if accuracy is None else f"{text} [{100 * accuracy:.1f}]"


def _label(sources: list[str], gid: str, limit: int = 48) -> str:
    text = ", ".join(sources) if sources else gid
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- measuring ----------------------------------------------------------------------------

class _Evaluator:
    """The original's outputs on the data, computed once; cut models are compared with them."""

    def __init__(self, model: onnx.ModelProto, data: Dataset, batch_size: int):
        from .verify import session

        self.batches = list(model_batches(data, model, batch_size)[0])
        reference = session(model.SerializeToString())
        self.reference = [reference.run(None, feeds) for feeds, _ in self.batches]
        # the labels of the samples in the batches (a fixed batch size may leave the last few out)
        self.labels = np.concatenate([labels for _, labels in self.batches]) if self._labels_fit(data) else None
        self.baseline_accuracy = self._accuracy(self.reference)

    def _labels_fit(self, data: Dataset) -> bool:
        """Integer class labels, one per sample, and a first output of (batch, classes) logits."""
        if data.labels is None or data.labels.ndim != 1 or data.labels.dtype.kind not in "iu":
            return False
        first = [np.shape(outs[0]) for outs in self.reference]
        sizes = [len(next(iter(feeds.values()))) for feeds, _ in self.batches]
        return all(len(s) == 2 and s[0] == n and s[1] > 1 for s, n in zip(first, sizes))

    def _accuracy(self, outputs: list[list[np.ndarray]]) -> float | None:
        if self.labels is None:
            return None
        predicted = np.concatenate([np.argmax(outs[0], axis=1) for outs in outputs])
        return float(np.mean(predicted == self.labels))

    def __call__(self, model: onnx.ModelProto) -> tuple[float, float | None]:
        """(relative RMS output error, top-1 accuracy or None) of ``model``."""
        from .verify import session

        sess = session(model.SerializeToString())
        changes = iochange.read(model)  # --allow-io-change: compare the positions the cut model still has
        outputs = [sess.run(None, iochange.candidate_feeds(feeds, changes)) for feeds, _ in self.batches]
        names = [o.name for o in sess.get_outputs()]
        squared = scale = 0.0
        for expected, got in zip(self.reference, outputs):
            expected = list(iochange.comparable_outputs(dict(zip(names, expected)), changes).values())
            scale += sum(_squared(np.asarray(e, np.float64)) for e in expected)
            for e, g in zip(expected, got):
                e, g = np.asarray(e, np.float64), np.asarray(g, np.float64)
                finite = np.isfinite(e)  # where the original itself is not finite there is nothing to compare
                if not np.isfinite(g[finite]).all():
                    return math.inf, self._accuracy(outputs)
                squared += _squared(e[finite] - g[finite])
        error = math.sqrt(squared / scale) if scale > 0 else math.sqrt(squared)
        return error, self._accuracy(outputs)


def _squared(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.dot(finite.ravel(), finite.ravel()))


def _cut(model: onnx.ModelProto, plan, stats, analysis_options: dict) -> onnx.ModelProto:
    """``model`` with ``plan`` applied (compensated when ``stats`` is given), on a fresh analysis."""
    fresh = analyse(model, **analysis_options)
    if stats is not None:
        compensate_biases(fresh.view, fresh.groups, plan, stats)
    changes = find_io_changes(fresh.view, apply_plan(fresh.view, fresh.groups, plan))
    cut = export(fresh.view, model, changes)
    iochange.record(cut, changes)
    return cut


def check_ratios(ratios, what: str = "ratios") -> list[float]:
    values = list(ratios)
    if not values:
        raise UsageError(f"{what}: give at least one ratio")
    for r in values:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:  # also rejects NaN
            raise UsageError(f"{what}: every ratio must be in [0, 1), got {r}")
    return sorted(set(float(r) for r in values))


def measure_sensitivity(
    model: onnx.ModelProto,
    data: Dataset,
    ratios=DEFAULT_RATIOS,
    *,
    importance: str = "l1",
    seed: int = 0,
    round_to: int = 1,
    min_channels: int = 1,
    compensate: bool = True,
    batch_size: int | None = None,
    input_shapes: dict | None = None,
    ignore=(),
    prune_hidden: bool = False,
    allow_io_change: bool = False,
    analysis=None,
    scores: dict | None = None,
    stats: dict | None = None,
    quiet: bool = True,
) -> Sensitivity:
    """Cut each prunable group alone at each ratio and measure the cut model on ``data``.

    ``analysis``, ``scores`` and ``stats`` (activation statistics, for the data
    criteria and compensation) are computed here unless given, as
    ``api.prune`` does; ``model`` is never modified.
    """
    started = time.perf_counter()
    ratios = check_ratios(ratios)
    options = {"input_shapes": input_shapes, "ignore": tuple(ignore), "prune_hidden": prune_hidden,
               "allow_io_change": allow_io_change}
    if analysis is None:
        analysis = analyse(model, **options)
    groups = analysis.prunable
    batch = batch_size_for(model, batch_size)
    if scores is None or (compensate and stats is None):
        stats, scores = _scores_and_stats(model, analysis, data, importance, seed, compensate, batch, quiet)
    evaluate = _Evaluator(model, data, batch)
    results = [GroupSensitivity(g.id, g.sources, g.size, [], [], [] if evaluate.labels is not None else None)
               for g in groups]
    cells = [(g, r, i) for i, g in enumerate(groups) for r in ratios]
    for group, ratio, index in _progress(cells, quiet):
        plan = make_plan([group], scores, ratio, round_to, min_channels=min_channels)
        removed = group.size - len(plan.keep[group.id])
        if removed:
            error, accuracy = evaluate(_cut(model, plan, stats if compensate else None, options))
        else:  # rounding kept every channel: the model is the original
            error, accuracy = 0.0, evaluate.baseline_accuracy
        result = results[index]
        result.removed.append(removed)
        result.error.append(error)
        if result.accuracy is not None:
            result.accuracy.append(accuracy)
    return Sensitivity(ratios, importance, len(data), compensate, evaluate.baseline_accuracy, results,
                       time.perf_counter() - started)


def _scores_and_stats(model, analysis, data, importance, seed, compensate, batch, quiet):
    check_criterion(importance, True)
    data_criterion = needs_data(importance)
    stats = None
    if data_criterion or compensate:
        stats = measure(model, analysis.prunable, analysis.view, data,
                        gradients=importance in ("taylor", "fisher"),
                        activations=compensate or importance in ("activation", "apoz"),
                        batch_size=batch, quiet=quiet)
    scores = score_groups(analysis.groups, analysis.view, importance, seed, stats if data_criterion else None)
    return stats, scores


def _progress(cells: list, quiet: bool):
    """A bar with ETA on a terminal (tqdm, when installed); nothing in pipelines or with -q."""
    if quiet or not sys.stdout.isatty():
        return cells
    try:
        from tqdm import tqdm
    except ImportError:
        return cells
    return tqdm(cells, desc="sensitivity", unit="cut", leave=False)


# --- allocation ---------------------------------------------------------------------------

@dataclass
class Allocation:
    target: float  # fraction of all prunable channels to remove
    ratios: dict[str, float]  # group id -> chosen ratio (0: left whole)
    removed: int
    channels: int
    sensitivity: Sensitivity
    chosen_error: dict[str, float] = field(default_factory=dict)  # group id -> measured error at its ratio

    def to_json(self) -> dict:
        by_id = {g.id: g for g in self.sensitivity.groups}
        return {
            "method": "sensitivity",
            "unit": "channels",
            "target": self.target,
            "removed_fraction": self.removed / self.channels if self.channels else 0.0,
            "grid": self.sensitivity.ratios,
            "samples": self.sensitivity.samples,
            "seconds": self.sensitivity.seconds,
            "groups": [{"id": gid, "sources": by_id[gid].sources, "channels": by_id[gid].channels,
                        "ratio": r, "error": self.chosen_error[gid]} for gid, r in self.ratios.items()],
        }


def allocation_grid(target: float) -> list[float]:
    """Steps of 0.1 up to twice the target (at most 0.9), and the target itself."""
    top = min(0.9, 2 * target) + 1e-9
    steps = [round(_GRID_STEP * k, 10) for k in range(1, 10) if _GRID_STEP * k <= top]
    return sorted(set(steps) | {float(target)})


def choose_allocation(sensitivity: Sensitivity, target: float) -> Allocation:
    """Per-group ratios removing at least ``target`` of all prunable channels, cheapest squared error first."""
    groups = sensitivity.groups
    total = sum(g.channels for g in groups)
    goal = target * total
    # A curve per group: (channels removed, squared error, ratio), starting whole. Squared: the
    # output perturbations of separate groups are roughly uncorrelated, so their energies add.
    curves = [[(0, 0.0, 0.0)] + [(n, e * e, r) for n, e, r in zip(g.removed, g.error, sensitivity.ratios)]
              for g in groups]
    at = [0] * len(groups)
    removed = 0
    while removed < goal - 1e-9:
        step = _cheapest_step(curves, at)
        if step is None:
            most = sum(max(n for n, _, _ in c) for c in curves)
            raise UsageError(f"--allocate: the measured ratios (up to {max(sensitivity.ratios):g}) remove at most "
                             f"{most} of {total} prunable channels, short of {target:g}")
        index, to = step
        removed += curves[index][to][0] - curves[index][at[index]][0]
        at[index] = to
    ratios = {g.id: curves[i][at[i]][2] for i, g in enumerate(groups)}
    errors = {g.id: math.sqrt(curves[i][at[i]][1]) for i, g in enumerate(groups)}
    return Allocation(target, ratios, removed, total, sensitivity, errors)


def _cheapest_step(curves, at) -> tuple[int, int] | None:
    """(group index, grid index) of the move that adds the least (squared) error per channel removed."""
    best, best_cost = None, math.inf
    for i, curve in enumerate(curves):
        here_removed, here_error, _ = curve[at[i]]
        for j in range(at[i] + 1, len(curve)):
            extra = curve[j][0] - here_removed
            if extra <= 0:
                continue
            cost = (curve[j][1] - here_error) / extra
            if best is None or cost < best_cost:
                best, best_cost = (i, j), cost
    return best


def allocate_ratios(model: onnx.ModelProto, data: Dataset, target: float, **options) -> Allocation:
    """Measure on the default grid for ``target`` and allocate (``options`` as for measure_sensitivity)."""
    return choose_allocation(measure_sensitivity(model, data, allocation_grid(target), **options), target)


def check_ratio_options(ratios, allocate, ratio, plan, data, global_ranking) -> None:
    """The per-group ratio options of api.prune, checked before any work."""
    if ratios is not None:
        check_ratio_mapping(ratios)
    if (ratios or allocate) and plan is not None:
        raise UsageError("--plan-in applies a plan exactly; --ratios/--allocate do not apply")
    if allocate is None:
        return
    if allocate not in ALLOCATE_METHODS:
        raise UsageError(f"unknown --allocate {allocate!r}; choose from {', '.join(ALLOCATE_METHODS)}")
    if ratios:
        raise UsageError("--ratios and --allocate are exclusive: the allocation chooses every group's ratio")
    if ratio is None:
        raise UsageError("--allocate sensitivity needs --structured R: the fraction of channels to remove overall")
    if data is None:
        raise UsageError("--allocate sensitivity measures output error on data: give --data FILE")
    if global_ranking:
        raise UsageError("--allocate and --global are exclusive: both decide how much each group loses")


def group_ratios(ratios, allocate, target, model, analysis, scores, stats, data,
                 **options) -> tuple[dict[str, float], Allocation | None]:
    """Per-group ratios for api.prune: ``ratios`` resolved against the groups, or allocated by sensitivity."""
    if allocate is None:
        return (resolve_ratios(analysis.groups, ratios) if ratios else {}), None
    allocation = allocate_ratios(model, data, target, analysis=analysis, scores=scores, stats=stats, **options)
    return allocation.ratios, allocation


def format_allocation(allocation: dict) -> str:
    """The ``allocation`` entry of a report as summary lines."""
    lines = [f"allocation  by sensitivity: {allocation['removed_fraction']:.1%} of prunable channels removed "
             f"(target {allocation['target']:g}), measured on {allocation['samples']} samples "
             f"in {allocation['seconds']:.1f} s"]
    for g in allocation["groups"]:
        error = "" if g["error"] is None else f"  error alone {g['error']:.4f}"
        lines.append(f"  ratio {g['ratio']:<5g} {g['channels']:>5} ch  {_label(g['sources'], g['id'])}{error}")
    return "\n".join(lines)


# --- ratio files --------------------------------------------------------------------------

def load_ratios(path) -> dict[str, float]:
    """A ``--ratios`` file: JSON, or YAML (.yaml/.yml) when PyYAML is installed."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--ratios {path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        mapping = _parse_yaml(text, path)
    else:
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--ratios {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return check_ratio_mapping(mapping, f"--ratios {path}")


def _parse_yaml(text: str, path: Path):
    try:
        import yaml
    except ImportError:
        raise MissingDependency(f"--ratios {path}: reading YAML needs PyYAML (pip install pyyaml); "
                                "or write the file as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--ratios {path}: not valid YAML ({type(exc).__name__})") from None


def check_ratio_mapping(mapping, what: str = "ratios") -> dict[str, float]:
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"{what}: expected a non-empty mapping from group id or node-name glob to a ratio")
    checked = {}
    for key, ratio in mapping.items():
        if not isinstance(key, str):
            raise UsageError(f"{what}: key {key!r} is not a group id or a glob")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise UsageError(f"{what}: ratio for {key!r} must be a number in [0, 1), got {ratio!r}")
        checked[key] = float(ratio)
    return checked


def resolve_ratios(groups, mapping: dict[str, float], what: str = "ratios") -> dict[str, float]:
    """Group id -> ratio: each key is a group id or a glob over group source names; later keys win."""
    mapping = check_ratio_mapping(mapping, what)
    prunable = [g for g in groups if g.prunable]
    resolved = {}
    for key, ratio in mapping.items():
        matched = [g for g in prunable if g.id == key] or [g for g in prunable if _glob_matches(g, key)]
        if not matched:
            raise UsageError(_no_match(groups, key, what))
        resolved.update({g.id: ratio for g in matched})
    return resolved


def _glob_matches(group, pattern: str) -> bool:
    return any(fnmatch.fnmatchcase(s, pattern) for s in group.sources)


def _no_match(groups, key: str, what: str) -> str:
    unprunable = next((g for g in groups if not g.prunable and (g.id == key or _glob_matches(g, key))), None)
    if unprunable is not None:
        why = "; ".join(unprunable.blocked) or "too narrow to prune"
        return f"{what}: {key!r} names a group that cannot be pruned ({why})"
    return f"{what}: {key!r} matches no group id or source node name (ids: onnxprune info --json)"


# --- output -------------------------------------------------------------------------------

def require_matplotlib():
    """pyplot on a file-only backend; a one-line error when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(sensitivity: Sensitivity, path) -> None:
    """Error (and top-1 accuracy, when measured) against ratio, one line per group, as a PNG."""
    plt = require_matplotlib()
    panels = 2 if sensitivity.baseline_accuracy is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    x = [0.0] + sensitivity.ratios
    for g in sensitivity.groups:
        label = _label(g.sources, g.id, 40)
        axes[0][0].plot(x, [0.0] + [e if math.isfinite(e) else np.nan for e in g.error], marker="o", ms=3,
                        label=label)
        if panels == 2:
            axes[0][1].plot(x, [sensitivity.baseline_accuracy] + g.accuracy, marker="o", ms=3, label=label)
    axes[0][0].set(xlabel="fraction of the group's channels removed", ylabel="relative RMS output error",
                   title="output error, one group pruned at a time")
    if panels == 2:
        axes[0][1].set(xlabel="fraction of the group's channels removed", ylabel="top-1 accuracy",
                       title="top-1 accuracy")
    if len(sensitivity.groups) <= 24:
        axes[0][-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    try:
        with AtomicModelWriter(path) as writer:
            writer.write_bytes(buffer.getvalue())
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None

"""Sensitivity measurements as records, a table and a plot (pipeline/sensitivity.py measures them)."""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import MissingDependency
from .text import clipped_label, dynamic_line, source_labels, worth_a_line


@dataclass
class GroupSensitivity:
    id: str
    sources: list[str]
    channels: int
    removed: list[int]  # channels actually removed at each ratio (rounding, tied units)
    error: list[float]  # relative RMS output error at each ratio
    accuracy: list[float] | None = None  # top-1 at each ratio, when labels fit
    macs: list[int] = field(default_factory=list)  # MACs removed at each ratio
    params: list[int] = field(default_factory=list)  # parameters removed at each ratio
    modules: list[str | None] = field(default_factory=list)  # each source's module path (graph/names.py)
    divergence: list[float] | None = None  # mean KL of the logits at each ratio, for classifiers (metrics.py)


@dataclass
class Sensitivity:
    ratios: list[float]
    importance: str
    samples: int
    compensated: bool
    baseline_accuracy: float | None
    groups: list[GroupSensitivity]
    seconds: float = 0.0
    macs: int | None = None  # of the model as measured (the whole model, every group whole)
    params: int | None = None
    # the sizes chosen for dynamic input dims (model/dynamic.py): the MACs are counted at them
    dynamic_dims: list[dict] = field(default_factory=list)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        for g in data["groups"]:  # inf/NaN are not JSON: a model that broke reads as null
            g["error"] = [e if math.isfinite(e) else None for e in g["error"]]
        return data

    def table(self) -> str:
        """One row per group: its source nodes, channels, the error at each ratio [top-1 %]."""
        names = source_labels(self.groups)
        labels = [clipped_label(g.sources, g.id, labels=names) for g in self.groups]
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
        if worth_a_line(self.dynamic_dims):
            lines.append(f"MACs counted at the {dynamic_line(self.dynamic_dims, self.input_shapes)}")
        lines.append(f"{what}; {self.samples} samples, {self.importance} importance, "
                     f"{compensated} compensation, {self.seconds:.1f} s")
        return "\n".join(lines)


def _cell(error: float, accuracy: float | None) -> str:
    text = f"{error:.4f}" if math.isfinite(error) else "inf"
    return text if accuracy is None else f"{text} [{100 * accuracy:.1f}]"


def require_matplotlib():
    """pyplot on a file-only backend; a one-line error when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependency("`plot` needs matplotlib: pip install matplotlib") from None
    return plt


def plot_png(sensitivity: Sensitivity) -> bytes:
    """Error (and top-1 accuracy, when measured) against ratio, one line per group: a PNG's bytes."""
    plt = require_matplotlib()
    panels = 2 if sensitivity.baseline_accuracy is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    x = [0.0] + sensitivity.ratios
    names = source_labels(sensitivity.groups)
    for g in sensitivity.groups:
        label = clipped_label(g.sources, g.id, 40, names)
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
    return figure_png(fig, dpi=120)


def figure_png(fig, dpi: int) -> bytes:
    """``fig`` as a PNG's bytes; the figure is closed."""
    plt = require_matplotlib()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()

"""A sweep's table and plot (pipeline/sweep.py measures it)."""

from __future__ import annotations

import math

from ..analysis.stats import format_count
from .sensitivity import figure_png, require_matplotlib


def _ratio_of(before: int | None, after: int | None) -> str:
    return f"{before / after:.2f}x" if before and after else "n/a"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _error(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if math.isfinite(value) else "inf"


def sweep_table(sweep) -> str:
    """One row per ratio (the original first): params, MACs, their reduction, the measured
    error/accuracy and latency; a failed ratio shows why instead."""
    timed = sweep.latency_ms is not None
    labelled = sweep.accuracy is not None
    head = ["ratio", "params", "MACs", "MACs ratio", "output error", "agreement %"]
    head += ["top-1 %"] if labelled else []
    head += ["latency ms", "speedup"] if timed else []
    rows = [["original", format_count(sweep.params), format_count(sweep.macs) if sweep.macs else "n/a", "1.00x",
             "0" if sweep.evaluated_on else "-", "100.0" if sweep.evaluated_on else "-"]
            + ([_percent(sweep.accuracy)] if labelled else [])
            + ([f"{sweep.latency_ms:.3f}", "1.00x"] if timed else [])]
    failures = []
    for p in sweep.points:
        if p.failed:
            failures.append(f"ratio {p.ratio:g}: {p.failed}")
            rows.append([f"{p.ratio:g}", "failed"] + [""] * (len(head) - 2))
            continue
        rows.append([f"{p.ratio:g}", format_count(p.params), format_count(p.macs) if p.macs else "n/a",
                     _ratio_of(sweep.macs, p.macs), _error(p.output_error), _percent(p.agreement)]
                    + ([_percent(p.accuracy)] if labelled else [])
                    + ([f"{p.latency_ms:.3f}" if p.latency_ms is not None else "-",
                        f"{p.speedup:.2f}x" if p.speedup is not None else "-"] if timed else []))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    if sweep.evaluated_on:
        lines.append(f"error, agreement{' and top-1' if labelled else ''} on {sweep.samples} samples of "
                     f"{sweep.evaluated_on}")
    if timed:
        b = sweep.bench
        threads = f", {b['threads']} thread(s)" if b.get("threads") else ""
        lines.append(f"latency: median of {b['iters']} runs at batch {b['batch']} on {b['provider']}{threads}, "
                     "each ratio timed side by side with the input (speedup against that run; the original's "
                     "latency is the median over the runs)")
    lines += failures
    return "\n".join(lines)


def sweep_png(sweep) -> bytes:
    """Accuracy (or output error) and speedup against MACs, one point per ratio: a PNG's bytes."""
    plt = require_matplotlib()
    done = [p for p in sweep.points if not p.failed and p.macs]
    panels = 2 if sweep.latency_ms is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    macs = [sweep.macs] + [p.macs for p in done]
    x = [m / 1e6 for m in macs] if all(macs) else [0.0] + [p.ratio for p in done]
    xlabel = "MACs (millions)" if all(macs) else "ratio"
    if sweep.accuracy is not None:
        y, ylabel = [sweep.accuracy] + [p.accuracy for p in done], "top-1 accuracy"
    elif sweep.evaluated_on:
        y, ylabel = [0.0] + [p.output_error for p in done], "relative RMS output error"
    else:
        y, ylabel = None, None
    labels = ["original"] + [f"{p.ratio:g}" for p in done]
    if y is not None:
        axes[0][0].plot(x, y, marker="o")
        for xi, yi, label in zip(x, y, labels):
            axes[0][0].annotate(label, (xi, yi), fontsize=7)
        axes[0][0].set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} against MACs")
    else:
        axes[0][0].text(0.5, 0.5, "no data given: nothing measured", ha="center", va="center")
        axes[0][0].set(xlabel=xlabel)
    if panels == 2:  # speedups, not raw latencies: each is measured side by side with the input
        axes[0][1].plot(x, [1.0] + [p.speedup for p in done], marker="o")
        axes[0][1].set(xlabel=xlabel, ylabel="speedup (input median / pruned median)",
                       title=f"speedup on {sweep.bench['provider']}, batch {sweep.bench['batch']}")
    return figure_png(fig, dpi=110)

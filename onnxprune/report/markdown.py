"""The run as Markdown (``--summary-md FILE|-``): what a CI job summary shows.

A table of what changed (params, MACs, latency when benchmarked, accuracy and
output error where measured), then what was pruned, what stayed whole and
why, the blocks removed, and the warnings. Names from the model are escaped
for Markdown (a ``|`` or a backtick in a node name cannot break the table).
"""

from __future__ import annotations

from ..analysis.stats import format_count
from .text import group_label, node_labels

_SHOWN = 10  # pruned groups listed; the JSON report has them all


def _cell(text) -> str:
    """A table cell: pipes escaped, code spans kept whole, one line."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _code(text) -> str:
    return f"`{_cell(text)}`"


def _fewer(before, after) -> str:
    return f"{before / after:.2f}x fewer" if before and after else "-"


def _metric_rows(report) -> list[list[str]]:
    rows = [["params", format_count(report.params_before), format_count(report.params_after),
             _fewer(report.params_before, report.params_after)],
            ["MACs", format_count(report.macs_before), format_count(report.macs_after),
             _fewer(report.macs_before, report.macs_after)]]
    bench = report.bench
    if bench is not None and bench.timings:
        for batch in sorted({t.batch for t in bench.timings}):
            timings = [t for t in bench.timings if t.batch == batch]
            if len(timings) >= 2:
                base, pruned = timings[0], timings[-1]
                rows.append([f"latency, batch {batch} ({bench.provider}, median)", f"{base.median_ms:.3f} ms",
                             f"{pruned.median_ms:.3f} ms", f"speedup {pruned.speedup:.2f}x"])
    gate = report.gate
    if gate and "accuracy" in gate:
        rows.append([f"top-1 on {gate['samples']} validation samples", f"{100 * gate['original_accuracy']:.2f}%",
                     f"{100 * gate['accuracy']:.2f}%", f"{-gate['accuracy_drop_points']:+.2f} points"])
    if gate:
        rows.append([f"output error on {gate['samples']} validation samples", "0", f"{gate['output_error']:.4g}", ""])
    recon = report.reconstruction
    if recon and recon.get("held_out"):
        held = recon["held_out"]
        rows.append([f"output error on {held['samples']} held-out calibration samples: cut, reconstructed",
                     f"{held['output_error']['before']:.4g}", f"{held['output_error']['after']:.4g}",
                     "reconstruction kept" if recon.get("kept", True) else "reconstruction discarded"])
    if report.training and report.training.get("epochs"):
        train = report.training
        best = train["epochs"][train["best_epoch"] - 1] if train.get("best_epoch") else train["before"]
        rows.append([f"{train['mode']} validation loss", f"{train['before']['val_loss']:.4g}",
                     f"{best['val_loss']:.4g}", f"best epoch {train.get('best_epoch', 0)} of {len(train['epochs'])}"])
    if report.output_error:
        worst = max(report.output_error.values())
        rows.append(["max deviation on random inputs (verification)", "", f"{worst:.3g}", "relative to output scale"])
    return rows


def markdown_summary(report) -> str:
    """The report as a Markdown section."""
    out = report.output or "(dry run: nothing written)"
    lines = [f"### onnxprune: {_code(report.input)} -> {_code(out)}", "",
             "| | before | after | change |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in _metric_rows(report)]
    labels = node_labels(report.modules)
    pruned = [g for g in report.groups if g.channels_after < g.channels_before]
    whole = [g for g in report.groups if g.channels_after == g.channels_before]
    lines += ["", f"**Pruned:** {len(pruned)} group(s); **left whole:** {len(whole)} (their ratio or rounding kept "
              f"every channel); **blocked:** {len(report.blocked)}."]
    if pruned:
        lines += ["", "| group | channels | kind |", "|---|---|---|"]
        for g in sorted(pruned, key=lambda g: g.channels_after - g.channels_before)[:_SHOWN]:
            units = f" ({g.units_before} -> {g.units_after} heads)" if g.kind == "heads" else ""
            lines.append(f"| {_code(group_label(g.sources, g.id, labels))} | {g.channels_before} -> "
                         f"{g.channels_after}{_cell(units)} | {_cell(g.kind)} |")
        if len(pruned) > _SHOWN:
            lines.append(f"| ... {len(pruned) - _SHOWN} more (the JSON report lists them all) | | |")
    if report.blocked:
        reasons: dict[str, list] = {}
        for b in report.blocked:
            reasons.setdefault(b.reason, []).append(b)
        lines += ["", "**Stayed whole, and why:**", "", "| groups | channels | reason | e.g. |", "|---|---|---|---|"]
        for reason, items in sorted(reasons.items(), key=lambda kv: -sum(b.channels for b in kv[1]))[:_SHOWN]:
            lines.append(f"| {len(items)} | {sum(b.channels for b in items)} | {_cell(reason)} | "
                         f"{_code(group_label(items[0].sources, items[0].id, labels))} |")
        if len(reasons) > _SHOWN:
            lines.append(f"| ... {len(reasons) - _SHOWN} more reasons | | | |")
    removed = (report.depth or {}).get("removed") or []
    if removed:
        lines += ["", f"**Blocks removed ({len(removed)}):** " + ", ".join(f"{_code(b['id'])} ({_cell(b['kind'])})"
                                                                          for b in removed)]
    if report.warnings:
        lines += ["", "**Warnings:**", ""] + [f"- {_cell(w)}" for w in report.warnings]
    return "\n".join(lines) + "\n"

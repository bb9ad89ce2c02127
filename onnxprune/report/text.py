"""Printed forms shared by the reports: how a node and a group are named (by the module path the
exporter recorded, where it did), and the summary lines of the parts other steps fill in (an
allocation, a budget search)."""

from __future__ import annotations

from collections import Counter

from ..analysis.stats import format_count
from ..errors import escape


def label_of(name: str, labels: dict[str, str] | None = None) -> str:
    """How a summary shows the node ``name``: its label, every non-printable character escaped, so
    that a name holding a newline or a terminal escape stays on its line and prints as text."""
    return escape((labels or {}).get(name, name))


def node_labels(modules: dict[str, str]) -> dict[str, str]:
    """ONNX node name -> how a summary shows the node: the module path its exporter recorded
    (graph/names.py; ``features.3`` for ``node_conv2d_3``), or ``path (name)`` where several of the
    nodes named share one path (a module's forward calling two convolutions). Nodes without a
    path are shown by their name."""
    shared = Counter(modules.values())
    return {name: path if shared[path] == 1 else f"{path} ({name})" for name, path in modules.items()}


def source_labels(groups) -> dict[str, str]:
    """``node_labels`` of the source nodes of groups that carry ``sources`` and ``modules``."""
    return node_labels({s: m for g in groups for s, m in zip(g.sources, g.modules) if m})


def group_label(sources: list[str], gid: str, labels: dict[str, str] | None = None) -> str:
    """A group by its first two source nodes (its id when it has none)."""
    shown = [label_of(s, labels) for s in sources[:2]]
    return ", ".join(shown) + (" ..." if len(sources) > 2 else "") if sources else gid


def clipped_label(sources: list[str], gid: str, limit: int = 48, labels: dict[str, str] | None = None) -> str:
    """A group by all its source nodes, cut to ``limit`` characters (for table columns)."""
    text = ", ".join(label_of(s, labels) for s in sources) if sources else gid
    return text if len(text) <= limit else text[: limit - 3] + "..."


def labelled_reason(reason: str, labels: dict[str, str]) -> str:
    """A blocked group's reasons ("Gemm node_linear_1: ignored (`ignore`); ...") with the node each
    names shown by its label ("Gemm classifier.1: ignored ...")."""
    parts = []
    for part in reason.split("; "):
        head, sep, message = part.partition(": ")
        op, space, node = head.partition(" ")
        parts.append(f"{op} {labels[node]}{sep}{message}" if sep and space and node in labels else part)
    return escape("; ".join(parts))


def format_allocation(allocation: dict) -> str:
    """The ``allocation`` entry of a report as summary lines."""
    lines = [f"allocation  by sensitivity: {allocation['removed_fraction']:.1%} of prunable channels removed "
             f"(target {allocation['target']:g}), measured on {allocation['samples']} samples "
             f"in {allocation['seconds']:.1f} s"]
    labels = node_labels({s: m for g in allocation["groups"] for s, m in zip(g["sources"], g["modules"]) if m})
    for g in allocation["groups"]:
        error = "" if g["error"] is None else f"  error alone {g['error']:.4f}"
        label = clipped_label(g["sources"], g["id"], labels=labels)
        lines.append(f"  ratio {g['ratio']:<5g} {g['channels']:>5} ch  {label}{error}")
    return "\n".join(lines)


def barrier_label(barrier: dict, labels: dict[str, str] | None = None) -> str:
    """A barrier (an entry of ``Report.barriers``) with the nodes it was met at:
    "ReduceMean ln/mean, ln/var: ReduceMean reduces over the channel axis ..."."""
    nodes = [label_of(n, labels) for n in barrier["nodes"]]
    if not nodes:
        return barrier["barrier"]
    where = ", ".join(nodes[:2]) + (f" and {len(nodes) - 2} more" if len(nodes) > 2 else "")
    op, _, message = barrier["barrier"].partition(": ")
    return f"{op} {where}: {message}"


def held_by(barriers: list[dict], shown: int = 3, labels: dict[str, str] | None = None) -> str:
    """The barriers that hold the most MACs (``Report.barriers``, ranked), on one line; each
    names the option that lifts it where there is one."""
    holding = [b for b in barriers if b["macs"] is None or b["macs"] > 0][:shown]
    if not holding:
        return "no blocked group holds MACs: a larger `ratio` removes more"
    return "the barriers holding the most MACs: " + "; ".join(
        f"{barrier_label(b, labels)} [{format_count(b['macs'])} MACs in {len(b['groups'])} group(s)]"
        for b in holding)


def conversion_line(conversion: dict) -> str:
    """The ``conversion`` entry of a report (an old opset upgraded on load) as one line."""
    return f"converted opset {conversion['from_opset']} -> {conversion['to_opset']} ({conversion['tool']})"


def worth_a_line(choices: list[dict]) -> bool:
    """Do the sizes chosen for dynamic dims need saying? Not a batch of 1 alone: nearly every
    model has one, it was always 1, and the shape printed beside the MACs shows it."""
    return any(c["kind"] != "batch" for c in choices)


def dynamic_line(choices: list[dict], input_shapes: dict[str, list[int]]) -> str:
    """The sizes chosen for dynamic input dims (``Report.dynamic_dims``) as one line."""
    from ..model.dynamic import DimChoice, describe_choices

    return "dynamic dims chosen: " + describe_choices([DimChoice(**c) for c in choices],
                                                      {k: tuple(v) for k, v in input_shapes.items()})


def summary_line(target: dict) -> str:
    """One line for the printed summary, from ``TargetResult.to_json()``."""
    n = len(target["evaluations"])
    if target["metric"] == "speedup":
        timed = sum(1 for e in target["evaluations"] if not e["cached"])
        chosen = (f"allocated by sensitivity, {target['ratio']:.3f} of the MACs removed" if target.get("allocated")
                  else f"ratio {target['ratio']:.4f} chosen")
        return (f"target  speedup >= {target['value']:g}x on {target['provider']} batch {target['batch']}: "
                f"{chosen}, {target['achieved']:.2f}x measured ({timed} benchmark run(s), {target['seconds']:.1f} s)")
    what = "MACs" if target["metric"] == "macs" else "params"
    if target.get("allocated"):
        return (f"target  {what} <= {target['value']:g} of the original: allocated by sensitivity, "
                f"{target['achieved']:.4f} kept")
    return (f"target  {what} <= {target['value']:g} of the original: ratio {target['ratio']:.4f} chosen, "
            f"{target['achieved']:.4f} kept ({n} prune(s), {target['seconds']:.1f} s)")


def quantization_line(record: dict) -> str:
    """The summary's line for the report's ``quantization`` (pipeline/quantize.py)."""
    how = (f"static, calibrated on {record['samples']} samples" if record["mode"] == "static"
           else "dynamic (no `data`: activation ranges computed at run time)")
    scales = "per channel" if record["per_channel"] else "per tensor"
    kept = f"; float model also written to {record['keep_float']}" if record.get("keep_float") else ""
    return f"quantize  {record['dtype']} weights {scales}, {record['format']} format, {how}{kept}"

"""Printed forms shared by the reports: how a group is named, and the summary lines of the parts
other steps fill in (an allocation, a budget search)."""

from __future__ import annotations

from ..analysis.stats import format_count


def group_label(sources: list[str], gid: str) -> str:
    """A group by its first two source nodes (its id when it has none)."""
    return ", ".join(sources[:2]) + (" ..." if len(sources) > 2 else "") if sources else gid


def clipped_label(sources: list[str], gid: str, limit: int = 48) -> str:
    """A group by all its source nodes, cut to ``limit`` characters (for table columns)."""
    text = ", ".join(sources) if sources else gid
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_allocation(allocation: dict) -> str:
    """The ``allocation`` entry of a report as summary lines."""
    lines = [f"allocation  by sensitivity: {allocation['removed_fraction']:.1%} of prunable channels removed "
             f"(target {allocation['target']:g}), measured on {allocation['samples']} samples "
             f"in {allocation['seconds']:.1f} s"]
    for g in allocation["groups"]:
        error = "" if g["error"] is None else f"  error alone {g['error']:.4f}"
        lines.append(f"  ratio {g['ratio']:<5g} {g['channels']:>5} ch  {clipped_label(g['sources'], g['id'])}{error}")
    return "\n".join(lines)


def barrier_label(barrier: dict) -> str:
    """A barrier (an entry of ``Report.barriers``) with the nodes it was met at:
    "ReduceMean ln/mean, ln/var: ReduceMean reduces over the channel axis ..."."""
    nodes = barrier["nodes"]
    if not nodes:
        return barrier["barrier"]
    where = ", ".join(nodes[:2]) + (f" and {len(nodes) - 2} more" if len(nodes) > 2 else "")
    op, _, message = barrier["barrier"].partition(": ")
    return f"{op} {where}: {message}"


def held_by(barriers: list[dict], shown: int = 3) -> str:
    """The barriers that hold the most MACs (``Report.barriers``, ranked), on one line; each
    names the option that lifts it where there is one."""
    holding = [b for b in barriers if b["macs"] is None or b["macs"] > 0][:shown]
    if not holding:
        return "no blocked group holds MACs: a larger `ratio` removes more"
    return "the barriers holding the most MACs: " + "; ".join(
        f"{barrier_label(b)} [{format_count(b['macs'])} MACs in {len(b['groups'])} group(s)]" for b in holding)


def conversion_line(conversion: dict) -> str:
    """The ``conversion`` entry of a report (an old opset upgraded on load) as one line."""
    return f"converted opset {conversion['from_opset']} -> {conversion['to_opset']} ({conversion['tool']})"


def summary_line(target: dict) -> str:
    """One line for the printed summary, from ``TargetResult.to_json()``."""
    n = len(target["evaluations"])
    if target["metric"] == "speedup":
        timed = sum(1 for e in target["evaluations"] if not e["cached"])
        return (f"target  speedup >= {target['value']:g}x on {target['provider']} batch {target['batch']}: "
                f"ratio {target['ratio']:.4f} chosen, {target['achieved']:.2f}x measured "
                f"({timed} benchmark run(s), {target['seconds']:.1f} s)")
    what = "MACs" if target["metric"] == "macs" else "params"
    if target.get("allocated"):
        return (f"target  {what} <= {target['value']:g} of the original: allocated by sensitivity, "
                f"{target['achieved']:.4f} kept")
    return (f"target  {what} <= {target['value']:g} of the original: ratio {target['ratio']:.4f} chosen, "
            f"{target['achieved']:.4f} kept ({n} prune(s), {target['seconds']:.1f} s)")

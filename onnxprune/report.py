"""The result of a run: a plain record, its JSON form and the printed summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .model import write_text_file
from .stats import format_count

REPORT_SCHEMA = 1


@dataclass
class GroupReport:
    id: str
    sources: list[str]
    nodes: list[str]
    channels_before: int
    channels_after: int
    importance: dict = field(default_factory=dict)


@dataclass
class BlockedGroup:
    id: str
    sources: list[str]
    channels: int
    reason: str


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
    output_error: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    written: bool = False
    schema_version: int = REPORT_SCHEMA

    @property
    def macs_ratio(self) -> float | None:
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    def to_json(self) -> dict:
        data = asdict(self)
        data["macs_ratio"] = self.macs_ratio
        return data

    def save(self, path) -> None:
        write_text_file(path, json.dumps(self.to_json(), indent=1) + "\n")

    def summary(self, verbose: bool = False) -> str:
        pruned = [g for g in self.groups if g.channels_after < g.channels_before]
        lines = [
            f"params  {format_count(self.params_before):>9} -> {format_count(self.params_after):<9}"
            f"({_ratio(self.params_before, self.params_after)})",
            f"MACs    {format_count(self.macs_before):>9} -> {format_count(self.macs_after):<9}"
            f"({_ratio(self.macs_before, self.macs_after)})",
            f"groups  {len(pruned)} pruned, {len(self.groups) - len(pruned)} left whole, "
            f"{len(self.blocked)} blocked",
        ]
        shown = pruned if verbose else pruned[:8]
        for g in shown:
            lines.append(f"  pruned  {g.channels_before:>5} -> {g.channels_after:<5} {_label(g.sources, g.id)}")
        if len(pruned) > len(shown):
            lines.append(f"  ... {len(pruned) - len(shown)} more pruned groups (--verbose or --report)")
        reasons: dict[str, list[BlockedGroup]] = {}
        for b in self.blocked:
            reasons.setdefault(_reason_kind(b.reason), []).append(b)
        for kind, items in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            example = items[0]
            lines.append(
                f"  blocked {len(items):>3} group(s): {kind} (e.g. {_label(example.sources, example.id)}: {example.reason})"
            )
        if self.output_error:
            worst = max(self.output_error.values())
            lines.append(f"output  max deviation from the original {worst:.3g} (relative to output scale)")
        lines.append(f"time    {self.seconds:.2f} s")
        return "\n".join(lines)


def _ratio(before, after) -> str:
    if not before or not after:
        return "n/a"
    return f"{before / after:.2f}x fewer"


def _label(sources: list[str], gid: str) -> str:
    return ", ".join(sources[:2]) + (" ..." if len(sources) > 2 else "") if sources else gid


def _reason_kind(reason: str) -> str:
    for kind in ("graph output", "graph input", "no pruning rule", "ignored", "subgraph"):
        if kind in reason:
            return {"graph output": "reaches a graph output", "graph input": "reaches a graph input",
                    "no pruning rule": "op without a rule", "ignored": "--ignore",
                    "subgraph": "read inside a subgraph"}[kind]
    return "rule barrier"

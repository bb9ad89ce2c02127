"""Groups + scores + ratio -> which channels each group keeps.

Channels are chosen by unit (tied channels go together) in order of the
unit's mean score. The kept count is the one the ratio asks for, rounded to a
multiple of ``round_to`` (the nearest multiple, ties upwards, never above the
original width, never below the minimum); a group too narrow for that is
left whole. ``round_to="auto"`` (the default) rounds to a multiple of 8,
halving the multiple while the rounded count is more than 12.5% away from the
requested one: the CPU kernels run multiples of 8 markedly faster
(runtime/hardware.py), and the halving keeps narrow groups (16 channels at
ratio 0.3 asks for 11.2: 8 would cut 29% too many) near what was asked. Groups
of tied units (attention heads) are not rounded under "auto": a head count
rounded to 8 would overshoot most ratios. With ``global_ranking`` all units of all groups are ranked
together (scores are per-weight means, see importance/), and each group keeps
at least ``min_channels`` and at least (1 - max_group_ratio) of its width.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import PlanMismatch, quoted
from ..model.save import write_text_file
from .reading import parse_json, read_text

PLAN_SCHEMA = 1


@dataclass
class Plan:
    keep: dict[str, list[int]] = field(default_factory=dict)  # group id -> kept channels
    sizes: dict[str, int] = field(default_factory=dict)  # group id -> channels before
    blocks: list[str] = field(default_factory=list)  # residual blocks removed whole (analysis/blocks.py), first

    def removed(self, group_id: str) -> np.ndarray:
        kept = np.zeros(self.sizes[group_id], bool)
        kept[self.keep[group_id]] = True
        return ~kept

    def to_json(self) -> dict:
        return {
            "schema_version": PLAN_SCHEMA,
            "groups": [{"id": g, "channels": self.sizes[g], "keep": self.keep[g]} for g in self.keep],
            **({"blocks": list(self.blocks)} if self.blocks else {}),
        }

    def save(self, path) -> None:
        write_text_file(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> Plan:
        data = parse_json(read_text(path, "plan"), path, "plan")
        if not isinstance(data, dict) or data.get("schema_version") != PLAN_SCHEMA:
            version = data.get("schema_version") if isinstance(data, dict) else None
            raise PlanMismatch(f"{path}: plan schema_version {quoted(version)}, expected {PLAN_SCHEMA}")
        groups = data.get("groups")
        if not isinstance(groups, list):
            raise PlanMismatch(f"{path}: not a valid onnxprune plan (no list of groups)")
        plan = cls()
        for entry in groups:
            gid, channels, keep = _plan_entry(entry, path)
            if gid in plan.keep:
                raise PlanMismatch(f"{path}: plan group {quoted(gid)} is listed twice")
            plan.keep[gid], plan.sizes[gid] = keep, channels
        blocks = data.get("blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, str) for b in blocks):
            raise PlanMismatch(f"{path}: plan blocks {quoted(blocks)} is not a list of block ids")
        if len(set(blocks)) != len(blocks):
            raise PlanMismatch(f"{path}: a plan block is listed twice")
        plan.blocks = blocks
        return plan


def _plan_entry(entry, path) -> tuple[str, int, list[int]]:
    """(id, channels, sorted kept indices) of one group of a plan file: integers only, no repeats.
    (A float index would be truncated by int(), 1.7 keeping channel 1; 1e400 is infinite.)"""
    if not isinstance(entry, dict) or not {"id", "channels", "keep"} <= set(entry):
        raise PlanMismatch(f"{path}: not a valid onnxprune plan (a group without id, channels and keep)")
    gid, channels, keep = entry["id"], entry["channels"], entry["keep"]
    if not isinstance(gid, str):
        raise PlanMismatch(f"{path}: plan group id {quoted(gid)} is not a string")
    if not _is_int(channels) or channels < 1:
        raise PlanMismatch(f"{path}: plan group {quoted(gid)}: channels {quoted(channels)} is not a positive integer")
    if not isinstance(keep, list):
        raise PlanMismatch(f"{path}: plan group {quoted(gid)}: keep is not a list of channel indices")
    bad = next((k for k in keep if not _is_int(k)), None)
    if bad is not None:
        raise PlanMismatch(f"{path}: plan group {quoted(gid)}: kept index {quoted(bad)} is not an integer")
    if len(set(keep)) != len(keep):
        raise PlanMismatch(f"{path}: plan group {quoted(gid)}: a kept index is listed twice")
    return gid, channels, sorted(keep)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_plan(plan: Plan, groups) -> None:
    """A plan made for this model: every id known, widths equal, indices valid, units whole."""
    by_id = {g.id: g for g in groups}
    for gid, keep in plan.keep.items():
        group = by_id.get(gid)
        if group is None:
            raise PlanMismatch(f"plan group {quoted(gid)} does not exist in this model")
        if not group.prunable:
            raise PlanMismatch(f"plan group {gid!r} is not prunable here: {'; '.join(group.blocked) or 'too narrow'}")
        if plan.sizes[gid] != group.size:
            raise PlanMismatch(f"plan group {gid!r} has {plan.sizes[gid]} channels, the model {group.size}")
        if not keep or keep[0] < 0 or keep[-1] >= group.size or len(set(keep)) != len(keep):
            raise PlanMismatch(f"plan group {gid!r}: kept indices must be distinct, within 0..{group.size - 1}, "
                               "not empty")
        kept = np.zeros(group.size, bool)
        kept[keep] = True
        for members in group.unit_members():
            if kept[members].any() and not kept[members].all():
                raise PlanMismatch(f"plan group {gid!r} splits channels that must go together {members.tolist()[:8]}")
        if emptied_slots(group, kept):
            raise PlanMismatch(f"plan group {gid!r} keeps no channel of a tensor (e.g. all of a Slice's channels)")


def nearest_multiple(target: float, step: int, low: int, high: int) -> int | None:
    """The multiple of ``step`` in [low, high] nearest to ``target`` (ties upwards)."""
    first = math.ceil(low / step) * step
    last = (high // step) * step
    if first > last:
        return None
    best = math.floor(target / step + 0.5) * step
    return min(max(best, first), last)


def _unit_order(group, scores) -> tuple[list[np.ndarray], np.ndarray]:
    members = group.unit_members()
    sizes = np.array([len(m) for m in members])
    unit_ids = np.repeat(np.arange(len(members)), sizes)
    unit_scores = np.bincount(unit_ids, scores[np.concatenate(members)]) / sizes
    order = np.argsort(-unit_scores, kind="stable")
    return [members[i] for i in order], unit_scores[order]


AUTO_ROUND_TO = "auto"
AUTO_MULTIPLE = 8  # the first multiple "auto" tries (runtime/hardware.py: the CPU's measured one)
AUTO_TOLERANCE = 0.125  # how far from the requested count a rounded one may be before the multiple halves


def _keep_count(group, target: float, round_to: int | str, min_channels: int) -> int:
    unit = len(group.unit_members()[0]) if _uniform_units(group) else 1
    if round_to == AUTO_ROUND_TO:
        return _auto_keep_count(group, target, unit, min_channels)
    step = math.lcm(unit, round_to)
    low = max(min_channels, step)
    count = nearest_multiple(target, step, low, group.size)
    return group.size if count is None else count


def _auto_keep_count(group, target: float, unit: int, min_channels: int) -> int:
    """The nearest multiple of 8, 4, 2, then 1 that is within 12.5% of ``target`` (units: never rounded)."""
    multiple = AUTO_MULTIPLE if unit == 1 else 1
    while True:
        step = unit * multiple
        count = nearest_multiple(target, step, max(min_channels, step), group.size)
        # the whole width is always a candidate: it runs as fast as the original did (ratio 0 keeps all)
        if count is None or abs(group.size - target) <= abs(count - target):
            count = group.size
        if multiple == 1 or abs(count - target) <= AUTO_TOLERANCE * target:
            return count
        multiple //= 2


def _uniform_units(group) -> bool:
    return len({len(m) for m in group.unit_members()}) == 1


def _choose(group, scores, count: int) -> list[int]:
    """Best units until ``count`` channels are kept; then no tensor may be left empty."""
    ordered, _ = _unit_order(group, scores)
    kept = np.zeros(group.size, bool)
    sizes = np.array([len(m) for m in ordered])
    # units are disjoint: the i-th is taken while those before it keep fewer than ``count``
    taken = int(np.searchsorted(np.cumsum(sizes) - sizes, count, side="left"))
    if taken:
        kept[np.concatenate(ordered[:taken])] = True
    emptied = emptied_slots(group, kept)  # e.g. a Slice that passes on only removed channels
    unit_of = {int(c): m for m in ordered for c in m} if emptied else {}
    for owner in emptied:
        best = owner[np.argmax(scores[owner])]
        kept[unit_of[int(best)]] = True
    return np.nonzero(kept)[0].tolist()


def emptied_slots(group, kept: np.ndarray) -> list[np.ndarray]:
    """Owners of the group's tensors (wholly its own) that would keep no channel."""
    empty = []
    for slot in group.dims.values():
        if (slot.owner >= 0).all() and not kept[slot.owner].any():
            empty.append(slot.owner)
    return empty


def make_plan(
    groups,
    scores: dict[str, np.ndarray],
    ratio: float,
    round_to: int | str = 1,
    global_ranking: bool = False,
    min_channels: int = 1,
    max_group_ratio: float = 0.9,
    ratios: dict[str, float] | None = None,
) -> Plan:
    """``ratios`` (group id -> ratio) overrides ``ratio`` for those groups, also under global ranking."""
    prunable = [g for g in groups if g.prunable]
    ratios = ratios or {}
    ranked = [g for g in prunable if g.id not in ratios]
    targets = (
        _global_targets(ranked, scores, ratio, min_channels, max_group_ratio)
        if global_ranking
        else {g.id: g.size * (1.0 - ratio) for g in ranked}
    )
    targets.update({g.id: g.size * (1.0 - ratios[g.id]) for g in prunable if g.id in ratios})
    plan = Plan()
    for g in prunable:
        count = _keep_count(g, targets[g.id], round_to, min_channels)
        plan.keep[g.id] = _choose(g, scores[g.id], count)
        plan.sizes[g.id] = g.size
    return plan


def _global_targets(groups, scores, ratio, min_channels, max_group_ratio) -> dict[str, float]:
    """Kept channels per group when all units are ranked together."""
    entries = []  # (score, group id, unit size)
    floor = {}
    for g in groups:
        ordered, unit_scores = _unit_order(g, scores[g.id])
        floor[g.id] = max(min_channels, math.ceil(g.size * (1 - max_group_ratio)))
        entries += [(s, g.id, len(m)) for m, s in zip(ordered, unit_scores)]
    kept = {g.id: g.size for g in groups}
    to_remove = ratio * sum(g.size for g in groups)
    removed = 0
    for _score, gid, n in sorted(entries, key=lambda e: e[0]):
        if removed >= to_remove:
            break
        if kept[gid] - n >= floor[gid]:
            kept[gid] -= n
            removed += n
    return {gid: float(k) for gid, k in kept.items()}

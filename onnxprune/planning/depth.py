"""Blocks + scores + a fraction -> which residual blocks go (depth pruning).

``depth`` R removes round(R x the removable blocks), the lowest-scored
first; ``drop_blocks`` globs name blocks that go whatever their score (they
count towards R). A plan's block ids are taken exactly.
"""

from __future__ import annotations

import fnmatch

from ..analysis.blocks import Block
from ..errors import PlanMismatch, UsageError


def named_blocks(blocks: list[Block], patterns, option: str = "`drop_blocks`") -> list[Block]:
    """The blocks whose ids match ``patterns``; a glob that matches no block, or only blocks that
    cannot be removed, is a one-line error naming them."""
    chosen = {}
    for pattern in patterns:
        hits = [b for b in blocks if fnmatch.fnmatchcase(b.id, pattern)]
        if not hits:
            known = ", ".join(b.id for b in blocks[:8]) + (" ..." if len(blocks) > 8 else "")
            raise UsageError(f"{option} {pattern!r} matches no block (blocks: {known or 'none'})")
        unfit = next((b for b in hits if not b.removable), None)
        if unfit is not None:
            raise UsageError(f"{option} {pattern!r}: block {unfit.id} cannot be removed: {unfit.reason}")
        chosen.update((b.id, b) for b in hits)
    return list(chosen.values())


def choose_blocks(blocks: list[Block], scores: dict[str, float], depth: float | None,
                  named: list[Block] = (), count: int | None = None) -> list[Block]:
    """``named`` and, up to round(depth x the removable blocks) in all (or ``count``), the
    lowest-scored others; in graph order."""
    removable = [b for b in blocks if b.removable]
    count = max(round((depth or 0.0) * len(removable)) if count is None else count, len(named))
    chosen = {b.id for b in named}
    if len(chosen) >= count:
        return [b for b in removable if b.id in chosen]
    for block in sorted((b for b in removable if b.id not in chosen), key=lambda b: scores[b.id]):
        if len(chosen) >= count:
            break
        chosen.add(block.id)
    return [b for b in removable if b.id in chosen]


def planned_blocks(blocks: list[Block], ids: list[str]) -> list[Block]:
    """The blocks a plan file names, each of which must exist here and be removable."""
    by_id = {b.id: b for b in blocks}
    for block_id in ids:
        block = by_id.get(block_id)
        if block is None:
            raise PlanMismatch(f"plan block {block_id!r} does not exist in this model")
        if not block.removable:
            raise PlanMismatch(f"plan block {block_id!r} cannot be removed here: {block.reason}")
    return [by_id[i] for i in ids]

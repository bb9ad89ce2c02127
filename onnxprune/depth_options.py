"""The options of depth pruning (pipeline/depth.py) and their checks; part of options.py's
``PruneOptions`` (``depth``), kept apart so that options.py stays small."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import UsageError


@dataclass
class DepthOptions:
    """Which residual blocks (analysis/blocks.py) to remove whole: a fraction of the removable
    ones, the least important first, and/or those named."""

    depth: float | None = None  # fraction of the removable blocks to remove
    drop_blocks: tuple[str, ...] = ()  # block id globs removed whatever their score
    # "removal", "influence" (with data) or "weights" (scoring/blocks.py); default: removal with
    # data, else weights
    block_importance: str | None = None


def validate_depth(depth: DepthOptions | None, has_data: bool, planned: bool = False) -> DepthOptions | None:
    """Check the depth options; a copy with the block criterion resolved (None: no depth pruning).
    Any budget (`target_macs`, `target_params`, `target_speedup`) combines with them: the blocks
    go first, then the channels meet the rest of it (pipeline/run.py). ``planned``: a plan is applied
    (it names the blocks itself)."""
    from .scoring.blocks import BLOCK_CRITERIA, DATA_CRITERIA

    if depth is None:
        return None
    ratio = depth.depth
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or math.isnan(ratio) or not 0 <= ratio < 1):
        raise UsageError(f"`depth` must be in [0, 1), got {ratio}")
    drop = (depth.drop_blocks,) if isinstance(depth.drop_blocks, str) else tuple(depth.drop_blocks or ())
    if not all(isinstance(g, str) and g for g in drop):
        raise UsageError(f"`drop_blocks` must be block id globs, got {depth.drop_blocks!r}")
    if planned:
        raise UsageError("`plan` and `depth`/`drop_blocks` are exclusive: a plan already says which blocks go")
    if ratio is None and not drop:
        raise UsageError("depth pruning needs `depth` R (a fraction of the removable blocks) or `drop_blocks`")
    criterion = depth.block_importance or ("removal" if has_data else "weights")
    if criterion not in BLOCK_CRITERIA:
        raise UsageError(f"unknown `block_importance` {criterion!r}; choose from {', '.join(BLOCK_CRITERIA)}")
    if criterion in DATA_CRITERIA and not has_data:
        raise UsageError(f"`block_importance` {criterion} measures on data: give `data` FILE (or use weights)")
    return replace(depth, drop_blocks=drop, block_importance=criterion)

"""The rule table's vocabulary: what a rule is told (``Reached``), what it answers
(``Relation`` of ``Link``s, ties or a barrier), the ``@rule`` decorator that fills
``RULES``, and ``lookup``. The families (conv.py, linear.py, ...) import this
module; ``rules/__init__`` imports the families, so importing ``onnxprune.rules``
fills the table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Reached:
    """Channels arrive at input (side="in") or output (side="out") ``index`` on ``axis``; for a
    node with subgraphs, side may also name one of them ("then_branch"): its output ``index``."""

    side: str
    index: int
    axis: int
    owner: np.ndarray


@dataclass
class Link:
    side: str  # "in", "out", or a subgraph attribute of the node ("then_branch"): that graph's outputs
    index: int
    axis: int
    owner: np.ndarray
    # For constants: what the slice is (weight, bias, bn_scale, ...): importance uses it.
    role: str = "data"


@dataclass
class Relation:
    links: list[Link] = field(default_factory=list)
    # Each entry: positions on the reached axis that must be pruned together.
    ties: list[np.ndarray] = field(default_factory=list)
    barrier: str | None = None
    # What the group's units are, when a rule can tell: "heads" where channels are
    # the head axis of attention (a batch axis of a MatMul between activations).
    kind: str | None = None
    # Positions on the reached axis that stay whole (packed q/k/v's keys and values where only query
    # heads go): their channels leave the group, with every channel tied to them.
    kept: np.ndarray | None = None
    # Where the node counts its heads, for kind "heads": (side, index, axis, positions per head); None:
    # the reached axis, one position per head (the head axis of a MatMul between activations).
    heads: tuple[str, int, int, int] | None = None


def barrier(reason: str) -> Relation:
    return Relation(barrier=reason)


def related(*links: Link, ties=()) -> Relation:
    return Relation(list(links), list(ties))


@dataclass
class Rule:
    relate: Callable
    source: Callable | None = None
    rewrite: Callable | None = None


# Keyed by op type for the default domain, by "domain.op" for others (``op_key``).
RULES: dict[str, Rule] = {}

DEFAULT_DOMAINS = ("", "ai.onnx")


def op_key(domain: str | None, op: str) -> str:
    """The table's key of ``op`` in ``domain``: the op type alone in the default domain, else
    "domain.op" (com.microsoft.Attention, which is not the standard Attention)."""
    return op if domain in (None, *DEFAULT_DOMAINS) else f"{domain}.{op}"


def rule(*ops: str, source=None, rewrite=None, domain: str = ""):
    """Register ``relate`` for ``ops`` of ``domain`` (default: the ONNX default domain)."""

    def register(relate):
        for op in ops:
            RULES[op_key(domain, op)] = Rule(relate, source, rewrite)
        return relate

    return register


def lookup(node) -> Rule | None:
    return RULES.get(op_key(node.domain, node.op))


def other_side(r: Reached, index: int = 0) -> str:
    return "out" if r.side == "in" else "in"


def passthrough(r: Reached, axis: int | None = None) -> Relation:
    """Input 0 <-> output 0 on the same axis (or ``axis``), identity mapping."""
    return related(Link(other_side(r), 0, r.axis if axis is None else axis, r.owner))


def blocks_of(size: int, block: int) -> list[np.ndarray]:
    """Contiguous runs of ``block`` positions: [0..block), [block..2*block), ..."""
    return [np.arange(s, s + block) for s in range(0, size, block)]


def strided(size: int, period: int) -> list[np.ndarray]:
    """Positions equal modulo ``period``: {j, j+period, j+2*period, ...} for each j."""
    return [np.arange(j, size, period) for j in range(period)]


def normalise_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis

"""Channel groups: propagate channel facts along the graph with the rule table.

A group starts at a channel space that a node creates (a Conv's filters, a
Gemm's output features) and grows along every edge the rules relate, forward
and backward, until it is closed: every (tensor, axis) slot that carries its
channels, every constant slice that goes with them, and the ties between
channels that must be pruned together. ``owner`` arrays map a slot's
positions to the group's channel indices (-1: not this group's), which
expresses Concat offsets, Flatten repeats and Split ranges exactly. A rule
may keep some reached positions whole (``Relation.kept``: packed q/k/v's keys
and values where only query heads go): once the group is closed, their
channels and every channel tied to them leave it, so no cut touches them.

Subgraph nodes (If branches, Loop and Scan bodies) take part like the
others: a body's conv creates a group, a tensor of an outer scope leads into
the body nodes that read it, and a body's inputs and outputs lead to the node
that owns the body (``GraphView.subgraph_ends``), whose rule maps them to its
own inputs and outputs (rules/control.py).

A group is blocked when it reaches a barrier: a graph input or output, an op
without a rule, an ignored node, the input or output of a subgraph that no
rule maps (a custom op's), or a rule that says no. Blocked groups are
reported, never pruned. The one exception is opt-in: with
``allow_io_change``, attention heads may reach graph inputs and outputs (a
decoder's KV cache), whose head axis then shrinks (iochange.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.names import matches
from ..graph.view import GraphView
from ..rules.quant import dequantized_constant
from ..rules.registry import Reached, lookup

MAX_REASONS = 3
MORE_REASONS = "... and "  # how the reasons beyond MAX_REASONS are summed up


@dataclass
class DimSlot:
    """Channels on ``axis`` of a computed tensor."""

    tensor: gs.Tensor
    axis: int
    owner: np.ndarray


@dataclass
class ParamSlot:
    """A constant input of ``node`` sliced along ``axis`` with the channels."""

    node: gs.Node
    input: int
    axis: int
    owner: np.ndarray
    role: str

    @property
    def tensor(self) -> gs.Constant:
        return self.node.inputs[self.input]


@dataclass
class Group:
    id: str
    size: int
    sources: list[str]
    dims: dict[tuple[str, int], DimSlot] = field(default_factory=dict)
    params: dict[tuple[int, int, int], ParamSlot] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    units: np.ndarray | None = None  # unit id per channel: channels of one unit go together
    kind: str = "channels"  # or "heads": units are attention heads (see --head-ratio)
    # kind "heads": a slot whose axis is the heads of an attention product, one position per head (a unit
    # may hold several: grouped-query attention's r-th query head of every key/value group)
    head_slot: tuple[str, int] | None = None
    head_size: int = 1  # positions of head_slot per head (a channel axis: the head size)
    modules: list[str | None] = field(default_factory=list)  # each source's module path (graph/names.py)
    _members: list | None = field(default=None, repr=False)

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.size > 1 and len(self.unit_members()) > 1

    def unit_members(self) -> list[np.ndarray]:
        """Channels of each unit, units ordered by their first channel."""
        if self._members is None:
            _, first, inverse = np.unique(self.units, return_index=True, return_inverse=True)
            by_unit = np.argsort(inverse, kind="stable")
            ends = np.cumsum(np.bincount(inverse)).tolist()
            # views of one array by slicing, not np.split (2.7 us a unit: 0.1 s over ViT-B's groups)
            members = [by_unit[a:b] for a, b in zip([0, *ends[:-1]], ends)]
            self._members = [members[u] for u in np.argsort(first).tolist()]
        return self._members


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, xs) -> None:
        roots = [self.find(x) for x in (xs.tolist() if isinstance(xs, np.ndarray) else xs)]
        for r in roots[1:]:
            self.parent[r] = roots[0]


def find_groups(view: GraphView, ignore: tuple[str, ...] = (), allow_io_change: bool = False) -> list[Group]:
    """All channel groups of the graph, in topological order of their sources.

    A source whose channels a blocked group has already taken gets a group of its own when that one
    can be cut: which slots a group takes depends on where it starts (a Reshape to heads is followed
    on the head axis from a query projection, on head_dim from a multi-query attention's single
    key/value head, whose group then spreads through the RoPE tables shared by every layer), and a
    blocked group is never cut, so it constrains nothing. A regrown group that is blocked too is
    dropped, and the slots that hold its channels one to one are not tried again (a start there
    would grow the same group: the residual stream of every layer, blocked by its LayerNorms).
    """
    claims: dict[tuple[str, int], np.ndarray] = {}  # slot -> owning group index per position
    cuttable: dict[tuple[str, int], np.ndarray] = {}  # the same, by groups that are not blocked
    tried: set[tuple[str, int]] = set()  # slots of dropped regrown groups
    groups: list[Group] = []
    ignored = _ignored_nodes(view, ignore)
    for node in view.all_nodes:  # subgraph nodes too: a conv in an If branch or a Loop body
        rule = lookup(node)
        if rule is None or rule.source is None:
            continue
        for out_index, axis in rule.source(node, view):
            tensor = node.outputs[out_index]
            size = view.dim(tensor, axis)
            if size is None:
                groups.append(Group(f"{tensor.name}", 0, [node.name], nodes=[node.name],
                                    blocked=[f"{node.op} {node.name}: output width unknown"],
                                    modules=[view.modules.get(node.name)]))
                continue
            taken = claims.get((tensor.name, axis))
            free = np.ones(size, bool) if taken is None else taken < 0
            regrown = not free.any()
            if regrown:
                taken = cuttable.get((tensor.name, axis))
                free = np.ones(size, bool) if taken is None else taken < 0
                if (tensor.name, axis) in tried or not free.any():
                    continue
            owner = np.full(size, -1)
            owner[free] = np.arange(int(free.sum()))
            group = _grow(view, node, tensor, axis, owner, len(groups), cuttable if regrown else claims, ignored,
                          allow_io_change)
            if regrown and not group.prunable:
                tried.update(_one_to_one(group))
                continue
            groups.append(group)
            _claim(group, len(groups) - 1, claims, view)
            if not group.blocked:
                _claim(group, len(groups) - 1, cuttable, view)
    return groups


def _one_to_one(group: Group) -> list[tuple[str, int]]:
    """Slots of ``group`` whose positions are each one of its channels, all distinct."""
    return [key for key, slot in group.dims.items()
            if (slot.owner >= 0).all() and len(np.unique(slot.owner)) == len(slot.owner)]


def _ignored_nodes(view: GraphView, patterns: tuple[str, ...]) -> set[str]:
    """Nodes an ``ignore`` glob matches (GraphView.names_of: by name, module path or the name of a
    constant input); a warning for each glob that matches none."""
    view.warn_unmatched(patterns)
    return {node.name for node in view.all_nodes
            if patterns and any(matches(n, patterns) for n in view.names_of(node))}


def _claim(group: Group, index: int, claims, view: GraphView) -> None:
    for key, slot in group.dims.items():
        taken = claims.setdefault(key, np.full(len(slot.owner), -1))
        taken[slot.owner >= 0] = index


def _grow(view, source, tensor, axis, owner, index, claims, ignored, allow_io_change=False) -> Group:
    group = Group(id=tensor.name, size=int((owner >= 0).sum()), sources=[source.name])
    io_reasons: list[str] = []  # graph inputs/outputs reached: barriers unless heads may change them
    uf = _UnionFind(group.size)
    queue: deque = deque()
    seen_nodes: dict[str, None] = {}
    kept: set[int] = set()  # channels a rule keeps whole (Relation.kept)

    def block(reason: str) -> None:
        if reason not in group.blocked:
            group.blocked.append(reason)

    def add_dim(t: gs.Tensor, ax: int, own: np.ndarray) -> None:
        key = (t.name, ax)
        slot = group.dims.get(key)
        if slot is None:
            taken = claims.get(key)
            if taken is not None and ((taken >= 0) & (own >= 0)).any():
                block(f"{t.name}: channels overlap another group")
            group.dims[key] = DimSlot(t, ax, own.copy())
            queue.append(group.dims[key])
            return
        tie_where_they_differ(slot.owner, own)
        new = (own >= 0) & (slot.owner < 0)
        if new.any():
            slot.owner[new] = own[new]
            queue.append(slot)

    def add_param(node, i, ax, own, role) -> None:
        key = (id(node), i, ax)
        slot = group.params.get(key)
        if slot is None:
            group.params[key] = ParamSlot(node, i, ax, own.copy(), role)
            return
        tie_where_they_differ(slot.owner, own)
        slot.owner = np.where(slot.owner >= 0, slot.owner, own)

    def tie_where_they_differ(have: np.ndarray, new: np.ndarray) -> None:
        """A position reached as channel a by one path and b by another goes only when both go:
        a and b become one unit (e.g. the halves of a Split added together, a head's
        channels met again through its head index)."""
        differ = (have >= 0) & (new >= 0) & (have != new)
        if differ.any():  # (rare: most paths agree; a Python loop over every position cost 0.2 s on BERT-base)
            # each pair once, in the order of the positions (a pair met again is a union made already)
            for a, b in dict.fromkeys(zip(have[differ].tolist(), new[differ].tolist())):
                uf.union((a, b))

    def visit(node, reached: Reached, at: gs.Tensor) -> None:
        seen_nodes.setdefault(node.name)
        if node.name in ignored:
            block(f"{node.op} {node.name}: ignored (`ignore`)")
            return
        rule = lookup(node)
        scope = view.scopes.get(node.name)
        where = f" (in {scope})" if scope else ""
        if rule is None:
            domain = f"{node.domain}::" if node.domain else ""
            block(f"{domain}{node.op} {node.name}: no pruning rule for this op{where}")
            return
        relation = rule.relate(node, view, reached)
        if relation.barrier:
            block(f"{node.op} {node.name}: {relation.barrier}{where}")
            return
        if relation.kind:
            group.kind = relation.kind
            if group.head_slot is None:
                group.head_slot, group.head_size = _head_slot(node, relation, at, reached.axis)
        if relation.kept is not None:
            kept.update(int(c) for c in reached.owner[relation.kept] if c >= 0)
        for positions in relation.ties:
            chans = reached.owner[positions]
            if (chans < 0).any() and (chans >= 0).any():
                block(f"{node.op} {node.name}: ties channels of this group with others")
                return
            if (chans >= 0).any():
                uf.union(chans)
        for link in relation.links:
            tensors = {"in": node.inputs, "out": node.outputs}.get(link.side) or _subgraph_side(node, link.side)
            t = tensors[link.index] if link.index < len(tensors) else None
            if t is None or t.name == "" or not (link.owner >= 0).any():
                continue
            if view.is_constant(t):
                add_param(node, link.index, link.axis, link.owner, link.role)
            elif (stored := dequantized_constant(view, t)) is not None:
                add_dequantized(stored, link)
            else:
                add_dim(t, link.axis, link.owner)

    def add_dequantized(node, link) -> None:
        """A constant stored quantized: its DequantizeLinear's rule says which of its integer
        values, scales and zero points go with the channels (rules/quant.py)."""
        seen_nodes.setdefault(node.name)
        if len(view.consumers(node.outputs[0])) > 1:
            block(f"{node.op} {node.name}: quantized constant shared by several nodes")
            return
        relation = lookup(node).relate(node, view, Reached("out", 0, link.axis, link.owner))
        if relation.barrier:
            block(f"{node.op} {node.name}: {relation.barrier}")
            return
        for inner in relation.links:
            if inner.side == "in":
                role = link.role if inner.index == 0 else inner.role  # the integer values play the float's part
                add_param(node, inner.index, inner.axis, inner.owner, role)

    add_dim(tensor, axis, owner)
    while queue:
        slot = queue.popleft()
        t, ax, own = slot.tensor, slot.axis, slot.owner.copy()
        if view.is_graph_output(t):
            io_reasons.append(f"reaches graph output {t.name}")
        if view.is_graph_input(t):
            io_reasons.append(f"reaches graph input {t.name}")
        if t.name in view.boundaries:  # a subgraph of an op no rule knows (a custom op's)
            block(f"{t.name} is {view.boundaries[t.name]}: channels do not cross a subgraph's inputs or outputs")
        producer = view.producer(t)
        if producer is not None:
            visit(producer, Reached("out", _index_of(producer.outputs, t), ax, own), t)
        for owner_node, side, index in view.subgraph_ends.get(t.name, ()):  # an input or output of a body
            visit(owner_node, Reached(side, index, ax, own), t)
        for node, i in view.consumers(t):
            visit(node, Reached("in", i, ax, own), t)
    if io_reasons and not (allow_io_change and group.kind == "heads"):
        reasons = list(dict.fromkeys(io_reasons))
        if group.kind == "heads":
            reasons[0] += " (attention heads: `allow_io_change` lets them change its shape)"
        group.blocked = reasons + group.blocked
    group.units = np.array([uf.find(c) for c in range(group.size)])
    if kept:
        _drop_kept(group, kept)
    group.nodes = list(seen_nodes)
    group.sources = _sources(view, group)
    group.modules = [view.modules.get(s) for s in group.sources]
    group.blocked = group.blocked[:MAX_REASONS] + (
        [f"{MORE_REASONS}{len(group.blocked) - MAX_REASONS} more"] if len(group.blocked) > MAX_REASONS else []
    )
    return group


def _head_slot(node, relation, at, axis) -> tuple[tuple[str, int], int]:
    """The slot that counts a group's heads and its positions per head: where the rule says
    (an attention op's output, whose axis holds heads x head size), else the reached one."""
    if relation.heads is None:
        return (at.name, axis), 1
    side, index, head_axis, per_head = relation.heads
    return (({"in": node.inputs, "out": node.outputs}[side][index]).name, head_axis), per_head


def _drop_kept(group: Group, kept: set[int]) -> None:
    """Take the channels rules keep whole out of ``group``, with every channel of their units: their
    positions become -1 (not this group's) in every slot, so no cut touches them; slots left with no
    channel of the group go, the others are renumbered."""
    gone = np.isin(group.units, group.units[sorted(kept)])
    renumbered = np.where(gone, -1, np.cumsum(~gone) - 1)
    for slots in (group.dims, group.params):
        for key, slot in list(slots.items()):
            slot.owner = np.where(slot.owner >= 0, renumbered[np.maximum(slot.owner, 0)], -1)
            if (slot.owner < 0).all():
                del slots[key]
    group.units = np.unique(group.units[~gone], return_inverse=True)[1]
    group.size = int((~gone).sum())


def barrier_of(reason: str, nodes) -> tuple[str, str | None]:
    """The barrier a reason of a blocked group names, and the node it was met at (None for a
    graph input or output, or a tensor): "ReduceMean ln/mean: reduces ..." is met at node
    ln/mean (one of the group's ``nodes``) and is the barrier "ReduceMean: reduces ...", which
    every node of that op and reason shares."""
    head, sep, message = reason.partition(": ")
    op, _, node = head.partition(" ")
    if sep and node in nodes:
        return f"{op}: {message}", node
    return reason, None


def named_modules(groups: list[Group], modules: dict[str, str]) -> dict[str, str]:
    """Node name -> module path (``GraphView.modules``) for each node that reports of ``groups``
    name: their sources, and the nodes their blocked reasons were met at."""
    named = [n for g in groups for n in g.sources]
    named += [at for g in groups for r in g.blocked if (at := barrier_of(r, g.nodes)[1]) is not None]
    return {n: modules[n] for n in dict.fromkeys(named) if n in modules}


def _sources(view: GraphView, group: Group) -> list[str]:
    """Nodes whose own output channels are (part of) this group."""
    found: dict[str, None] = {}  # in order, each once (a list's `in` made this quadratic in sources)
    for slot in group.dims.values():
        node = view.producer(slot.tensor)
        rule = lookup(node) if node is not None else None
        if rule is not None and rule.source is not None and node.name not in found:
            index = _index_of(node.outputs, slot.tensor)
            if (index, slot.axis) in rule.source(node, view):
                found[node.name] = None
    return list(found)


def _subgraph_side(node, side: str) -> list:
    """The tensors a link's side names: "body" a subgraph's outputs, "body:in" its inputs."""
    name, _, which = side.partition(":")
    body = node.attrs.get(name)
    if body is None or not hasattr(body, "outputs"):
        return []
    return list(body.inputs if which == "in" else body.outputs)


def _index_of(tensors, t) -> int:
    return next(i for i, x in enumerate(tensors) if x is t)

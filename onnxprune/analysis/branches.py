"""The graph walks the block finders share (analysis/blocks.py, analysis/skipblocks.py): producers and
consumers by node index, a found branch, the nodes between a tensor and the node a branch ends in."""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass
class _Graph:
    """Producers and consumers of a model's main graph, by node index (nodes are in topological order)."""

    model: onnx.ModelProto
    producer: dict[str, int]
    consumers: dict[str, list[int]]
    constants: set[str]
    matrices: set[str]  # initializers of rank 2 or more: weights
    outputs: set[str]
    inputs: set[str]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Graph:
        producer, consumers = {}, {}
        constants = {t.name for t in model.graph.initializer}
        for i, node in enumerate(model.graph.node):
            for name in node.output:
                producer[name] = i
            if node.op_type == "Constant":
                constants.update(node.output)
            for name in dict.fromkeys(node.input):
                if name:
                    consumers.setdefault(name, []).append(i)
        matrices = {t.name for t in model.graph.initializer if len(t.dims) >= 2}
        return cls(model, producer, consumers, constants, matrices, {o.name for o in model.graph.output},
                   {i.name for i in model.graph.input})

    def node(self, i: int) -> onnx.NodeProto:
        return self.model.graph.node[i]


@dataclass
class _Found:
    """A residual branch found: y = x + F, the sum an Add (or a Skip*Norm node), F its nodes."""

    add: int  # the residual Add's node index
    x: str
    f: str
    branch: list[int]  # node indices of F, in graph order
    norm: int | None = None  # the LayerNormalization that reads the sum (post-norm)
    reason: str | None = None
    writer: str | None = None  # the weight of the branch's last node that has one
    skip: bool = False  # ``add`` is the Skip*Norm node the branch enters (analysis/skipblocks.py)


SHAPE_OPS = ("Shape", "Size")  # read only x's shape, which removing the block leaves as it is


def _between(graph: _Graph, x: str, last: int, add: int) -> list[int]:
    """Nodes that descend from tensor ``x`` and lead to node ``last`` (ending there), all before
    ``add``; empty when ``last`` does not descend from ``x``. What descends from x's shape alone
    is not the branch's: it reads x's shape, the same once the block is gone (the legacy
    exporter builds the attention mask of every layer from the first layer's input shape)."""
    descends, frontier = set(), [x]
    while frontier:
        for i in graph.consumers.get(frontier.pop(), ()):
            if i < add and i not in descends and graph.node(i).op_type not in SHAPE_OPS:
                descends.add(i)
                frontier.extend(graph.node(i).output)
    if last not in descends:
        return []
    leads, stack = {last}, [last]
    while stack:
        for name in graph.node(stack.pop()).input:
            j = graph.producer.get(name)
            if j is not None and j in descends and j not in leads:
                leads.add(j)
                stack.append(j)
    return sorted(leads | _readers_within(graph, leads, add))


def _readers_within(graph: _Graph, nodes: set[int], add: int) -> set[int]:
    """Nodes before ``add`` that read the tensors of ``nodes`` (and so on): the shape arithmetic a
    branch does on its own tensors (Shape -> Gather -> Concat -> Reshape) goes with it. Whether
    one of them is read beyond the block is the leak check's to say."""
    found, frontier = set(), [t for i in nodes for t in graph.node(i).output]
    while frontier:
        for j in graph.consumers.get(frontier.pop(), ()):
            if j < add and j not in nodes and j not in found:
                found.add(j)
                frontier.extend(graph.node(j).output)
    return found


def _subgraph_problem(graph: _Graph, nodes: list[int]) -> str | None:
    for i in nodes:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in graph.node(i).attribute):
            return f"holds a subgraph ({graph.node(i).op_type} {graph.node(i).name})"
    return None

"""Residual blocks: the units depth pruning removes whole (cut/depth.py).

A *block* is a residual branch ``y = x + F(x)`` whose removal leaves ``y = x``
with unchanged shapes: a ResNet basic or bottleneck block without a
projection, an inverted residual with an identity skip, a ConvNeXt block, a
pre-norm transformer's attention or MLP sub-block. It is found from the
graph alone, without names: an ``Add`` of two computed tensors one of which,
``x``, is an ancestor of the other, ``F(x)``. The branch is every node that
descends from ``x`` and leads to ``F(x)``; nodes it reads that do not descend
from ``x`` (an attention mask, shape constants) are shared and stay.

A post-norm layer (BERT) normalises the sum: ``h = LN(x + F(x))`` where x is
itself a LayerNorm's output (the last sum of a pre-norm stack also feeds a
LayerNorm alone, the final one, but its x is a sum), so no
sub-block alone leaves ``y = x`` (removing F still leaves ``LN(x)``). Two
such sub-blocks in a row, ``LN(h + G(h))`` after ``h = LN(x + F(x))``, are one
transformer layer, and that layer, both LayerNorms included, is the unit: it
becomes the identity.

A pre-norm sum fused into a Skip*Norm node (onnxruntime-genai's builder,
onnxruntime's optimizer) holds sub-blocks of its own: analysis/skipblocks.py.
A post-norm one (a BERT fused by onnxruntime's optimizer) holds post-norm
sub-blocks, paired into layers here as the unfused ones: analysis/postnorm_skip.py.

A candidate that is not safely removable is kept with its reason: the branch
changes the shape, one of its tensors is read outside it or is a graph
output (a KV cache), it holds a subgraph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from ..graph.names import module_paths, scoped_name_path
from .branches import _between, _Found, _Graph, _subgraph_problem
from .postnorm_skip import find_post_norm_skip_blocks
from .skipblocks import find_skip_blocks
from .stats import macs_by_output

RESIDUAL = "residual"  # y = x + F(x): F goes, y = x
POST_NORM = "post-norm layer"  # LN(h + G(h)) after h = LN(x + F(x)): the whole layer goes


@dataclass
class Block:
    id: str
    kind: str  # RESIDUAL or POST_NORM
    input: str  # x: what the block's output becomes
    output: str  # y (a post-norm layer: its second LayerNorm's output, or its second Skip*Norm node's output 0)
    nodes: list[str]  # first output of each node removed with it (output names are unique, node names may be empty)
    node_names: list[str]
    macs: int | None = 0
    params: int = 0
    reason: str | None = None  # why it cannot be removed; None: removable
    weights: list[str] = field(default_factory=list)  # the initializers of its nodes
    # the weight of each branch's last weighted node: what writes into the residual stream (scoring/blocks.py)
    writers: list[str] = field(default_factory=list)
    weighted: list[str] = field(default_factory=list)  # names of its nodes that have MACs
    # with `allow_io_change`: the graph outputs it writes (a KV cache) and the graph inputs only it
    # reads, but for Shape nodes (their shapes), removed with it
    io_outputs: list[str] = field(default_factory=list)
    io_inputs: dict[str, list | None] = field(default_factory=dict)
    # a sub-block whose sum is fused (analysis/skipblocks.py): the first output of the Skip*Norm node
    # its result enters, which the cut turns into the plain norm of ``input`` (cut/skipnorm.py)
    skip_norm: str | None = None
    branch_output: str | None = None  # its result F, that node's operand

    @property
    def removable(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "input": self.input, "output": self.output,
                "nodes": len(self.nodes), "macs": self.macs, "params": self.params,
                **({"reason": self.reason} if self.reason else {}),
                **({"io_removed": [*self.io_inputs, *self.io_outputs]} if self.io_outputs else {})}


def find_blocks(model: onnx.ModelProto, shapes: dict[str, tuple], allow_io_change: bool = False) -> list[Block]:
    """Every residual block of ``model`` (its static ``shapes``: tensor -> dims), in graph order,
    removable ones and the others with their reasons. ``allow_io_change``: a block that writes a
    KV cache may go with the cache's graph inputs and outputs."""
    graph = _Graph.of(model)
    per_output = macs_by_output(model, shapes=shapes)
    sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
    found, sums = [], set()
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        branch = _branch(graph, i, shapes)
        # x + relu(x) and the like hold no layer to remove (a tanh GELU's x + 0.044715 x^3)
        if branch is None or not any(per_output.get(graph.node(j).output[0]) != 0 for j in branch.branch
                                     if graph.node(j).output[0] in per_output):
            continue
        # A "branch" through another residual sum is no block: it is the path from a tensor read
        # early (an attention mask) to a later layer's scores, where that mask is added again.
        if not sums.intersection(branch.branch):
            found.append(branch)
            sums.add(i)
    fused = find_skip_blocks(graph) + find_post_norm_skip_blocks(graph)
    blocks = _pair_post_norm(graph, sorted(found + fused, key=lambda item: item.add))  # pairs: in graph order
    paths = module_paths(model)
    paths.update({n.name: p for n in model.graph.node if n.name not in paths and (p := scoped_name_path(n.name))})
    for block in blocks:
        block.macs = _sum_or_none(per_output.get(name, 0) for name in block.nodes)
        block.weights = sorted({t for name in block.nodes for t in graph.node(graph.producer[name]).input
                                if t in sizes})
        block.params = int(sum(sizes[t] for t in block.weights))
        block.weighted = [n for out, n in zip(block.nodes, block.node_names) if per_output.get(out)]
        if block.reason is None:
            block.reason = _shape_problem(shapes, block) or _leak(graph, block, shapes, allow_io_change)
    _name(blocks, paths)
    return blocks


def _branch(graph: _Graph, add: int, shapes: dict[str, tuple]) -> _Found | None:
    """The residual branch of the Add at ``add``: which operand is the skip x, and the nodes from
    x to F(x). None when neither operand leads to the other (no identity skip), or the sum
    broadcasts (a mask added to attention scores): then it is no residual."""
    node = graph.node(add)
    a, b = node.input
    if a == b or a in graph.constants or b in graph.constants:
        return None
    if shapes.get(a) is not None and shapes.get(b) is not None and tuple(shapes[a]) != tuple(shapes[b]):
        return None
    for x, f in ((a, b), (b, a)):
        if f not in graph.producer:
            continue
        nodes = _between(graph, x, graph.producer[f], add)
        if nodes:
            found = _Found(add, x, f, nodes)
            found.norm = _norm_after(graph, node.output[0]) if _normalised(graph, x) else None
            found.reason = _subgraph_problem(graph, nodes)
            found.writer = next((t for i in reversed(nodes) for t in graph.node(i).input if t in graph.matrices), None)
            return found
    return _projection(graph, add)


PROJECTION_DEPTH = 3  # nodes walked back along a computed skip to find where it leaves the stream


def _projection(graph: _Graph, add: int) -> _Found | None:
    """A block whose skip is computed (a ResNet downsampling block: a strided 1x1 conv): the
    tensor that both operands come from, a few single-input nodes up the skip. Listed, not
    removable: without the block the next one would read the wrong shape."""
    a, b = graph.node(add).input
    for skip, f in ((a, b), (b, a)):
        chain, tensor = [], skip
        for _ in range(PROJECTION_DEPTH):
            i = graph.producer.get(tensor)
            computed = [t for t in graph.node(i).input if t and t not in graph.constants] if i is not None else []
            if len(computed) != 1:
                break
            chain.append(i)
            tensor = computed[0]
            nodes = _between(graph, tensor, graph.producer[f], add) if f in graph.producer else []
            if nodes:
                first = graph.node(chain[0])
                return _Found(add, tensor, f, sorted({*nodes, *chain}),
                              reason=f"its skip is computed ({first.op_type} {first.name or first.output[0]}): "
                                     "a projection, not the identity")
    return None


def _norm_after(graph: _Graph, y: str) -> int | None:
    """The LayerNormalization that alone reads the sum ``y`` (a post-norm sub-block), if any."""
    readers = graph.consumers.get(y, [])
    if len(readers) == 1 and y not in graph.outputs:
        node = graph.node(readers[0])
        if node.op_type == "LayerNormalization" and node.input[0] == y:
            return readers[0]
    return None


def _normalised(graph: _Graph, x: str) -> bool:
    """Is ``x`` a LayerNorm's output? A post-norm stream is (BERT: the embeddings' LayerNorm, then
    each sub-block's); a pre-norm stream is a sum, whose last one alone feeds the final LayerNorm."""
    i = graph.producer.get(x)
    return i is not None and graph.node(i).op_type == "LayerNormalization"


def _pair_post_norm(graph: _Graph, found: list[_Found]) -> list[Block]:
    """Residual blocks as they are; post-norm sub-blocks two by two, each pair one layer."""
    blocks, pending = [], None  # pending: a post-norm sub-block waiting for the one after it
    for item in found:
        if item.norm is None:
            blocks.append(_residual(graph, item))
            continue
        if pending is not None and item.x == graph.node(pending.norm).output[0]:
            blocks.append(_layer(graph, pending, item))
            pending = None
            continue
        if pending is not None:
            blocks.append(_lone(graph, pending))
        pending = item
    if pending is not None:
        blocks.append(_lone(graph, pending))
    return sorted(blocks, key=lambda b: graph.producer[b.output])


def _block(graph: _Graph, kind: str, x: str, y: str, nodes: list[int], reason: str | None,
           parts: tuple[_Found, ...]) -> Block:
    nodes = sorted(set(nodes))
    return Block("", kind, x, y, [graph.node(i).output[0] for i in nodes], [graph.node(i).name for i in nodes],
                 reason=reason, writers=[p.writer for p in parts if p.writer])


def _residual(graph: _Graph, item: _Found) -> Block:
    if item.skip:  # the Skip*Norm node stays, rewritten: its sum (or, with none, its norm) stands for y
        node = graph.node(item.add)
        y = node.output[3] if len(node.output) > 3 and node.output[3] else node.output[0]
        block = _block(graph, RESIDUAL, item.x, y, item.branch, item.reason, (item,))
        block.skip_norm, block.branch_output = node.output[0], item.f
        return block
    return _block(graph, RESIDUAL, item.x, graph.node(item.add).output[0], [*item.branch, item.add], item.reason,
                  (item,))


def _layer(graph: _Graph, first: _Found, second: _Found) -> Block:
    nodes = [*first.branch, first.add, first.norm, *second.branch, second.add, second.norm]
    return _block(graph, POST_NORM, first.x, graph.node(second.norm).output[0], nodes,
                  first.reason or second.reason, (first, second))


def _lone(graph: _Graph, item: _Found) -> Block:
    """A post-norm sub-block with no partner: removing it would leave LN(x), not x."""
    return _block(graph, POST_NORM, item.x, graph.node(item.norm).output[0], [*item.branch, item.add, item.norm],
                  item.reason or "a post-norm sub-block without the sub-block after it: removing it leaves "
                  "LayerNorm(x), not x", (item,))


def _shape_problem(shapes: dict[str, tuple], block: Block) -> str | None:
    before, after = shapes.get(block.input), shapes.get(block.output)
    if before is None or after is None or not all(isinstance(d, int) for d in (*before, *after)):
        return "the shapes of its input and output are not known (pin them with `input_shapes`)"
    if tuple(before) != tuple(after):
        return f"it changes the shape ({list(before)} -> {list(after)}): the sum broadcasts"
    return None


def _leak(graph: _Graph, block: Block, shapes: dict[str, tuple], allow_io_change: bool) -> str | None:
    """Why removing the block would change something outside it: one of its tensors (but its
    output) is read by a node outside it or is a graph output. A decoder's attention writes its
    KV cache so (``present`` out of the ``past`` in, which only it reads): with
    ``allow_io_change`` those inputs and outputs go with the block (``io_inputs``, ``io_outputs``)."""
    inside = {graph.producer[name] for name in block.nodes}
    returned = []
    for i in sorted(inside):
        for name in graph.node(i).output:
            if name == block.output or not name:
                continue
            if name in graph.outputs:
                returned.append(name)
            outside = [j for j in graph.consumers.get(name, ()) if j not in inside
                       and not (name == block.branch_output and graph.node(j).output[0] == block.skip_norm)]
            if outside:
                reader = graph.node(outside[0])
                return f"its tensor {name} is also read by {reader.op_type} {reader.name or '(unnamed)'}"
    if not returned:
        return None
    # its own inputs: those it reads and nothing else does, but for Shape nodes (the dynamo export of
    # GPT-2 reads the past length off a layer's past_value), which the cut points at a kept layer's
    # input declared alike (cut/depth.py)
    own = [t for t in sorted(graph.inputs) if set(graph.consumers.get(t, ())) & inside
           and all(j in inside or graph.node(j).op_type == "Shape" for j in graph.consumers[t])]
    if not own:
        return f"its tensor {returned[0]} is a graph output"
    if not allow_io_change:
        return (f"its tensor {returned[0]} is a graph output (a cache it reads from {own[0]}: `allow_io_change` "
                "removes both with the block)")
    block.io_outputs = returned
    block.io_inputs = {t: list(shapes[t]) if shapes.get(t) is not None else None for t in own}
    return None


def _sum_or_none(values) -> int | None:
    values = list(values)
    return None if None in values else int(sum(values))


# --- ids ------------------------------------------------------------------------------------

def _name(blocks: list[Block], paths: dict[str, str]) -> None:
    """Each block's id: the module path its nodes have in common (the exporter's, graph/names.py:
    the dynamo exporter's metadata, or the legacy exporter's scoped node names), else block:N
    (N counting the blocks in graph order). Where two blocks share a path (a layer's attention
    and MLP sub-blocks in ``h.0``), each takes that of its weighted nodes
    (``h.0.attn``, ``h.0.mlp``), and where even those agree, block:N."""
    first = [_common([paths.get(n) for n in b.node_names]) for b in blocks]
    weighted = [_common([paths.get(n) for n in b.weighted]) for b in blocks]
    for n, block in enumerate(blocks):
        choice = first[n]
        if choice is not None and first.count(choice) > 1:
            choice = weighted[n] if weighted[n] is not None and weighted.count(weighted[n]) == 1 else None
        block.id = choice or f"block:{n}"
    taken = [b.id for b in blocks]
    for n, block in enumerate(blocks):  # a path equal to another block's block:N (never in practice) stays unique
        if taken.count(block.id) > 1:
            block.id = f"block:{n}"


def _common(paths: list[str | None]) -> str | None:
    """The longest dotted prefix of every path given (paths missing are left out)."""
    known = [p.split(".") for p in paths if p]
    if not known:
        return None
    prefix = known[0]
    for parts in known[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix) or None

"""Remove whole blocks (analysis/blocks.py): each block's output becomes its input, ``y = x``.

The block's nodes go; so do the nodes and initializers that only they used
(a Constant, a shape computation, a weight), and the shapes recorded for the
tensors that are gone. Every other tensor keeps its name and shape: a block
is removable only where its input and output have one shape. Where the
block's output is a graph output, an Identity keeps that name.

A decoder's attention block found under ``allow_io_change`` takes its KV
cache with it: the graph outputs it wrote and the graph inputs only it read
go, recorded as removed in the model's metadata (cut/iochange.py), so that
verification, output errors and training feed and compare the rest.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..analysis.blocks import Block
from . import iochange


def remove_blocks(model: onnx.ModelProto, blocks: list[Block]) -> onnx.ModelProto:
    """A copy of ``model`` without ``blocks`` (found on this model, all removable); the input is not modified."""
    unfit = [b.id for b in blocks if not b.removable]
    if unfit:
        raise ValueError(f"blocks not removable: {', '.join(unfit)}")
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    graph = pruned.graph
    renamed: dict[str, str] = {}  # a removed block's output -> the tensor that stands for it now
    gone: set[str] = set()  # first outputs of the removed nodes
    for block in sorted(blocks, key=lambda b: -len(b.nodes)):  # a block inside a removed one goes with it
        if block.output in gone:
            continue
        gone.update(block.nodes)
        renamed[block.output] = block.input
    keep = [n for n in graph.node if not (n.output and n.output[0] in gone)]
    resolved = {name: _resolve(name, renamed) for name in renamed}
    for node in keep:
        for i, name in enumerate(node.input):
            if name in resolved:
                node.input[i] = resolved[name]
    outputs = {o.name for o in graph.output}
    keep += [helper.make_node("Identity", [resolved[name]], [name], name=f"{name}/identity")
             for name in resolved if name in outputs]
    used_before = _used(graph.node)
    changes = _drop_cache_outputs(graph, [b for b in blocks if b.io_outputs])
    outputs = {o.name for o in graph.output}
    keep = _live(keep, outputs)
    del graph.node[:]
    graph.node.extend(keep)
    _drop_unused(graph, used_before)
    if changes:
        changes += _drop_cache_inputs(graph, [b for b in blocks if b.io_outputs])
        iochange.record(pruned, iochange.read(model) + changes)  # an earlier cut's record stays, extended
    return pruned


def _drop_cache_outputs(graph: onnx.GraphProto, blocks: list[Block]) -> list[iochange.IOChange]:
    """The graph outputs the removed blocks wrote (their KV cache, under `allow_io_change`)."""
    gone = {name for b in blocks for name in b.io_outputs}
    dropped = [o for o in graph.output if o.name in gone]
    for o in dropped:
        graph.output.remove(o)
    return [iochange.removal(o.name, "output") for o in dropped]


def _drop_cache_inputs(graph: onnx.GraphProto, blocks: list[Block]) -> list[iochange.IOChange]:
    """The graph inputs only the removed blocks read (their past cache), now read by none."""
    read = _used(graph.node) | _subgraph_reads(graph.node)
    own = {name: shape for b in blocks for name, shape in b.io_inputs.items()}
    dropped = [i for i in graph.input if i.name in own and i.name not in read]
    for i in dropped:
        graph.input.remove(i)
    return [iochange.removal(i.name, "input", own[i.name]) for i in dropped]


def _resolve(name: str, renamed: dict[str, str]) -> str:
    """Follow a chain of removed blocks (block B read block A's output) to the tensor left."""
    while name in renamed:
        name = renamed[name]
    return name


def _used(nodes) -> set[str]:
    return {name for node in nodes for name in node.input if name}


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` less those whose outputs no node and no graph output reads (dead once a block went)."""
    while True:
        read = _used(nodes) | outputs | _subgraph_reads(nodes)
        live = [n for n in nodes if not n.output or any(o in read for o in n.output if o)]
        if len(live) == len(nodes):
            return live
        nodes = live


def _subgraph_reads(nodes) -> set[str]:
    """Names the subgraphs of ``nodes`` read from the graph around them (an If branch's weights)."""
    read = set()
    for node in nodes:
        for a in node.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                read |= _used(g.node) | _subgraph_reads(g.node)
    return read


def _drop_unused(graph: onnx.GraphProto, used_before: set[str]) -> None:
    """Initializers and shapes of tensors that only the removed nodes read."""
    used = _used(graph.node) | _subgraph_reads(graph.node) | {o.name for o in graph.output}
    dead = [t for t in graph.initializer if t.name in used_before and t.name not in used]
    for t in dead:
        graph.initializer.remove(t)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}
    stale = [v for v in graph.value_info if v.name not in produced]
    for v in stale:
        graph.value_info.remove(v)

"""Remove whole blocks (analysis/blocks.py): each block's output becomes its input, ``y = x``.

The block's nodes go; so do the nodes and initializers that only they used
(a Constant, a shape computation, a weight), and the shapes recorded for the
tensors that are gone. Every other tensor keeps its name and shape: a block
is removable only where its input and output have one shape. Where the
block's output is a graph output, an Identity keeps that name. A sub-block
whose sum was fused into a Skip*Norm node leaves that node as the plain
norm of its stream (cut/skipnorm.py).

A decoder's attention block found under ``allow_io_change`` takes its KV
cache with it: the graph outputs it wrote and the graph inputs only it read
(Shape nodes elsewhere read a kept layer's input instead) go, recorded as
removed in the model's metadata (cut/iochange.py), so that verification,
output errors and training feed and compare the rest.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..analysis.blocks import Block
from . import iochange
from .renumber import cache_template
from .skipnorm import unskip


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
    unskipped: dict[str, str] = {}  # a Skip*Norm node a removed branch entered (its first output) -> its stream
    for block in sorted(blocks, key=lambda b: -len(b.nodes)):  # a block inside a removed one goes with it
        if block.output in gone:
            continue
        gone.update(block.nodes)
        if block.skip_norm is not None:
            unskipped[block.skip_norm] = block.input
        else:
            renamed[block.output] = block.input
    keep = []
    for node in graph.node:
        if node.output and node.output[0] in unskipped:
            nodes, sums = unskip(node, unskipped[node.output[0]])
            keep += nodes
            renamed.update(sums)
        elif not (node.output and node.output[0] in gone):
            keep.append(node)
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
    """The graph inputs only the removed blocks read (their past cache), now read by none (one that
    Shape nodes still read takes its shape from a kept layer's input: ``_shape_from_kept``)."""
    own = {name: shape for b in blocks for name, shape in b.io_inputs.items()}
    _shape_from_kept(graph, set(own))
    read = _used(graph.node) | _subgraph_reads(graph.node)
    dropped = [i for i in graph.input if i.name in own and i.name not in read]
    for i in dropped:
        graph.input.remove(i)
    return [iochange.removal(i.name, "input", own[i.name]) for i in dropped]


def _shape_from_kept(graph: onnx.GraphProto, own: set[str]) -> None:
    """A removed layer's cache input that the graph still reads, with Shape nodes only (the dynamo
    export of GPT-2 reads the batch size and the past length off layer 0's and the last layer's
    past_value), is read off a kept layer's input of the same cache template (cut/renumber.py)
    declared with the same type and dims: the same sizes by the model's own declaration, so the
    removed layer's input can go with it, and the cache left is numbered like the layers left."""
    inputs = {i.name: i for i in graph.input}
    inside = _subgraph_reads(graph.node)
    for name in sorted(own & set(inputs) - inside):
        readers = [n for n in graph.node if name in n.input]
        if not readers or any(n.op_type != "Shape" or n.domain not in ("", "ai.onnx") for n in readers):
            continue
        twin = next((i.name for i in graph.input if i.name not in own and _same_cache(inputs[name], i)), None)
        for node in readers if twin is not None else ():
            node.input[0] = twin


def _same_cache(a: onnx.ValueInfoProto, b: onnx.ValueInfoProto) -> bool:
    """Two cache tensors of one template, declared alike with every dim named or sized."""
    template_a, template_b = cache_template(a.name), cache_template(b.name)
    dims = a.type.tensor_type.shape.dim
    return (template_a is not None and template_b is not None and template_a[0] == template_b[0]
            and a.type.tensor_type.HasField("shape") and a.type == b.type
            and all(d.HasField("dim_value") or d.HasField("dim_param") for d in dims))


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

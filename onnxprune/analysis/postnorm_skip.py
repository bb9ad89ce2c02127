"""Post-norm sub-blocks whose sum is fused into a Skip*Norm node (a BERT fused by onnxruntime's optimizer).

``optimize_model(model_type="bert")`` fuses each post-norm sum and the
LayerNorm after it into one ``SkipLayerNormalization`` (com.microsoft)
whose output 0, the normalised sum, is the stream itself::

    x = EmbedLayerNormalization(...)[0]    (or a plain LayerNormalization)
    h = SkipNorm(Attn(x), x)[0]            the optimizer writes (branch, stream)
    y = SkipNorm(MLP(h), h)[0]             the layer's output, the next layer's x

A sub-block is the branch from the stream ``x`` (output 0 of a Skip*Norm,
EmbedLayerNormalization or plain norm node) to one operand of a Skip*Norm
node whose other operand is ``x`` (either order). Alone it is not removable
(removing the branch still leaves ``norm(x)``); analysis/blocks.py pairs two
in a row into one layer, as for an unfused BERT, and the layer, both Skip
nodes included, becomes the identity (cut/depth.py: ``y := x``). Found from
the graph alone, no names. A pre-norm Skip*Norm sum (analysis/skipblocks.py)
never matches: its stream operand is a sum (output 3), which its branch does
not read.
"""

from __future__ import annotations

from .branches import _between, _Found, _Graph, _subgraph_problem
from .skipblocks import MS, PLAIN_NORMS, is_skip_norm

EMBED_NORM = "EmbedLayerNormalization"  # com.microsoft: the embeddings' sum and LayerNorm, output 0 normalised
EXTRA = {1: "mean", 2: "inv_std_var", 3: "pre-norm sum"}  # a Skip*Norm's outputs the removed layer takes along


def find_post_norm_skip_blocks(graph: _Graph) -> list[_Found]:
    """The post-norm sub-block entering each Skip*Norm node that has one, in graph order
    (``_Found.add`` and ``_Found.norm``: that node's index; blocks.py pairs them into layers)."""
    found = []
    for i, node in enumerate(graph.model.graph.node):
        if is_skip_norm(node) and len(node.input) >= 2:
            item = _post_norm_branch(graph, i)
            if item is not None:
                found.append(item)
    return found


def _post_norm_branch(graph: _Graph, s: int) -> _Found | None:
    node = graph.node(s)
    a, b = node.input[:2]
    for stream, f in ((a, b), (b, a)):
        if not stream or stream == f or f not in graph.producer or not _normalised_stream(graph, stream):
            continue
        nodes = _between(graph, stream, graph.producer[f], s)
        # through another norm of the stream: a path across layers, not one sub-block
        if not nodes or any(_is_norm(graph.node(j)) for j in nodes):
            continue
        item = _Found(s, stream, f, nodes, norm=s)
        item.reason = _subgraph_problem(graph, nodes) or _extra_output_read(graph, node)
        item.writer = next((t for j in reversed(nodes) for t in graph.node(j).input if t in graph.matrices), None)
        return item
    return None


def _normalised_stream(graph: _Graph, tensor: str) -> bool:
    """Is ``tensor`` output 0 of a norm node: a post-norm stream (not a pre-norm Skip node's sum)?"""
    i = graph.producer.get(tensor)
    if i is None:
        return False
    node = graph.node(i)
    return node.output[0] == tensor and (_is_norm(node) or (node.op_type == EMBED_NORM and node.domain == MS))


def _is_norm(node) -> bool:
    return is_skip_norm(node) or (node.op_type in PLAIN_NORMS and node.domain in ("", "ai.onnx", MS))


def _extra_output_read(graph: _Graph, node) -> str | None:
    """The layer goes with its Skip*Norm nodes: their other outputs must be read by no one."""
    for k, what in EXTRA.items():
        name = node.output[k] if len(node.output) > k else ""
        if name and (graph.consumers.get(name) or name in graph.outputs):
            return f"the {what} output of {node.op_type} {node.name or node.output[0]} is read"
    return None

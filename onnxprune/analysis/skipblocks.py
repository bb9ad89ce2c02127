"""Residual sub-blocks whose sum is fused into a Skip*Norm node (analysis/blocks.py finds the others).

onnxruntime-genai's model builder and onnxruntime's ``optimize_model`` fuse a
pre-norm transformer's residual sum and the norm after it into one
``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``
(com.microsoft; rules/contrib.py): inputs (input, skip, gamma[, beta][, bias]),
outputs (norm(input + skip [+ bias]), mean, inv_std_var, the sum). The residual
stream is output 3, the normalised output 0 feeds the next sub-block::

    h_k, r_k = SkipNorm(r_k-1, F_k-1)      (the first layer: h_0 = Norm(r_0))
    F_k = attention or MLP of h_k
    h_k+1, r_k+1 = SkipNorm(r_k, F_k)

A sub-block is the branch from ``h_k`` (output 0 of a Skip*Norm node whose
sum is ``r_k``, or of a plain norm reading ``r_k``) to ``F_k``, an operand of
the next Skip*Norm node whose other operand is ``r_k``. Removing it makes
``F_k`` zero: that node becomes the plain norm of ``r_k`` (cut/skipnorm.py)
and ``r_k+1 = r_k``. Found from the graph alone, no names.
"""

from __future__ import annotations

from .branches import _between, _Found, _Graph, _subgraph_problem

MS = "com.microsoft"
SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
PLAIN_NORMS = ("SimplifiedLayerNormalization", "LayerNormalization")  # the first layer's, in the ONNX domain
SUM = 3  # a Skip*Norm's output holding input + skip (+ bias): the residual stream
STATS = (1, 2)  # its mean and inv_std_var outputs, which the plain norm it becomes does not give alike


def is_skip_norm(node) -> bool:
    return node.domain == MS and node.op_type in SKIP_NORMS


def find_skip_blocks(graph: _Graph) -> list[_Found]:
    """The sub-block entering each Skip*Norm node, in graph order (``_Found.add``: that node's index)."""
    found = []
    for i, node in enumerate(graph.model.graph.node):
        if is_skip_norm(node) and len(node.input) >= 2:
            item = _skip_branch(graph, i)
            if item is not None:
                found.append(item)
    return found


def _skip_branch(graph: _Graph, s: int) -> _Found | None:
    """The branch whose result is one operand of the Skip*Norm node at ``s`` and which reads the
    normalised stream that the other operand is the sum of; None when there is none."""
    node = graph.node(s)
    a, b = node.input[:2]
    for stream, f in ((a, b), (b, a)):
        if not stream or f not in graph.producer or stream == f:
            continue
        for h in _normalised(graph, stream):
            nodes = _between(graph, h, graph.producer[f], s)
            # through another norm of the stream: not one sub-block (a path across layers)
            if not nodes or any(_is_norm(graph.node(j)) for j in nodes):
                continue
            item = _Found(s, stream, f, nodes, skip=True)
            item.reason = _subgraph_problem(graph, nodes) or _stats_read(graph, node)
            item.writer = next((t for i in reversed(nodes) for t in graph.node(i).input if t in graph.matrices),
                               None)
            return item
    return None


def _normalised(graph: _Graph, stream: str) -> list[str]:
    """The normalised tensors of the residual ``stream``: output 0 of the Skip*Norm node whose sum
    it is, and of each plain norm reading it (the first layer's input norm)."""
    found = []
    i = graph.producer.get(stream)
    if i is not None and is_skip_norm(graph.node(i)) and list(graph.node(i).output[SUM:SUM + 1]) == [stream]:
        found.append(graph.node(i).output[0])
    for j in graph.consumers.get(stream, ()):
        node = graph.node(j)
        if node.op_type in PLAIN_NORMS and node.domain in ("", "ai.onnx") and node.input[0] == stream:
            found.append(node.output[0])
    return found


def _is_norm(node) -> bool:
    return is_skip_norm(node) or (node.op_type in PLAIN_NORMS and node.domain in ("", "ai.onnx"))


def _stats_read(graph: _Graph, node) -> str | None:
    """The plain norm the cut leaves gives no mean and inv_std_var of the sum as the Skip node did."""
    for k in STATS:
        name = node.output[k] if len(node.output) > k else ""
        if name and (graph.consumers.get(name) or name in graph.outputs):
            return f"the mean / inv_std_var output of {node.op_type} {node.name or node.output[0]} is read"
    return None

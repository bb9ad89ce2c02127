"""The Skip*Norm node a removed sub-block entered, without it (analysis/skipblocks.py).

With the branch gone its operand is zero, so ``SkipNorm(stream, F[, bias])``
becomes the plain norm of ``stream`` (+ bias): SimplifiedLayerNormalization
or LayerNormalization (ONNX domain, as the builder writes the first layer's),
same gamma, beta and epsilon, over the last axis as the Skip node normalises.
Its sum output is then ``stream`` itself (the caller renames its readers),
or, with a bias, an Add that keeps the sum's name so the math holds.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..analysis.skipblocks import SUM

PLAIN = {"SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
         "SkipLayerNormalization": "LayerNormalization"}
BIAS = {"SkipSimplifiedLayerNormalization": 3, "SkipLayerNormalization": 4}  # the optional bias input
BETA = {"SkipLayerNormalization": 3}
SKIP_EPSILON = 1e-12  # onnxruntime's default for SkipLayerNormalization and SkipSimplifiedLayerNormalization


def unskip(node: onnx.NodeProto, stream: str) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """The nodes that replace Skip*Norm ``node`` once its operand other than ``stream`` is zero,
    and the renaming its sum output takes ({sum: stream}; none with a bias, whose Add keeps it)."""
    inputs = list(node.input) + [""] * 5
    name = node.name or node.output[0]
    total = node.output[SUM] if len(node.output) > SUM else ""
    bias = inputs[BIAS[node.op_type]]
    nodes, renamed, normed = [], {}, stream
    if bias:
        normed = total or f"{name}/sum"
        nodes.append(helper.make_node("Add", [stream, bias], [normed], name=f"{name}/bias"))
    elif total:
        renamed[total] = stream
    beta = inputs[BETA[node.op_type]] if node.op_type in BETA else ""
    # absent, the Skip ops' own default (as the executor reads them, executor/ops/contrib.py), not the
    # plain norm's 1e-5 that the new node would take
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), SKIP_EPSILON)
    nodes.append(helper.make_node(PLAIN[node.op_type], [normed, inputs[2], *([beta] if beta else [])],
                                  [node.output[0]], name=f"{name}/plain", axis=-1, epsilon=epsilon))
    return nodes, renamed

"""onnxruntime's contrib ops (com.microsoft, and the few it registers in the default domain),
what onnxruntime's transformer optimizer and onnxruntime-genai's model builder emit, with
RMSNormalization, the standard op of opset 23 that does the same as one of them; their
attention ops are in contrib_attention.py.

Normalisations over the last axis (SimplifiedLayerNormalization and RMSNormalization: RMSNorm;
SkipLayerNormalization and SkipSimplifiedLayerNormalization: a residual add, then LayerNorm or
RMSNorm) pass channels on every other axis; the hidden size passes only with `prune_hidden`,
as through LayerNormalization (the statistics change), and its scale, shift and bias are sliced.
A Skip* node's optional mean and inverse-std outputs are statistics over the hidden size: a
barrier where they are used; its fourth output (the sum before normalising) carries the channels.

EmbedLayerNormalization (BERT's embeddings and their LayerNorm in one node) passes the hidden
size, with `prune_hidden`, to the columns of its tables. The fused activations (BiasGelu,
FastGelu with its optional bias, QuickGelu, Gelu) are elementwise: the bias is sliced with
the channels.

MatMulNBits (int4/int8 block-quantised weights, what `-p int4` of the model builder emits)
creates its output features: they go with the packed weight's rows and their scales, zero
points and bias; its input channels go in whole quantisation blocks (`block_size` of them
tied), with those blocks of every row; ``N`` and ``K`` are rewritten. The packed values are
not magnitudes: the scales stand for them in magnitude scores.
"""

from __future__ import annotations

import numpy as np

from ..graph.view import attr
from .elementwise import elementwise
from .registry import Link, Reached, Relation, barrier, blocks_of, normalise_axis, op_key, rule

MS = "com.microsoft"


def present(t) -> bool:
    return t is not None and t.name != ""


def used(node, view, index: int) -> bool:
    """Whether output ``index`` is read: by a node, or as a graph output."""
    if index >= len(node.outputs) or not present(node.outputs[index]):
        return False
    t = node.outputs[index]
    return bool(t.outputs) or view.is_graph_output(t)


def given(node, index: int) -> bool:
    return index < len(node.inputs) and present(node.inputs[index])


# --- normalisations over the last axis -------------------------------------------------------

# op key -> (data inputs, {parameter input: role}, outputs carrying the channels, statistics outputs)
_NORMS = {
    "SimplifiedLayerNormalization": ((0,), {1: "norm_scale"}, (0,), (1,)),
    "RMSNormalization": ((0,), {1: "norm_scale"}, (0,), ()),
    f"{MS}.SkipLayerNormalization": ((0, 1), {2: "norm_scale", 3: "norm_shift", 4: "bias"}, (0, 3), (1, 2)),
    f"{MS}.SkipSimplifiedLayerNormalization": ((0, 1), {2: "norm_scale", 3: "bias"}, (0, 3), (1, 2)),
}


def _tensor_axis(view, t, out_axis: int, out_rank: int) -> int | None:
    """The axis of ``t`` that ``out_axis`` of a rank-``out_rank`` tensor meets (right-aligned
    broadcasting); None where ``t`` broadcasts along it."""
    rank = view.rank(t)
    axis = out_axis - (out_rank - rank) if rank is not None else -1
    return axis if axis >= 0 and view.dim(t, axis) not in (1, None) else None


@rule("SimplifiedLayerNormalization", "RMSNormalization")
@rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def last_axis_norm(node, view, r: Reached):
    data, params, carriers, statistics = _NORMS[op_key(node.domain, node.op)]
    if any(used(node, view, i) for i in statistics):
        return barrier("its mean / inverse-std outputs are used")
    side_indices = data if r.side == "in" else carriers
    if r.index not in side_indices:
        return barrier(f"channels reach a {node.op} parameter as an activation")
    rank = view.rank(node.outputs[0])
    if rank is None:
        return barrier("output shape unknown")
    reached_rank = view.rank((node.inputs if r.side == "in" else node.outputs)[r.index])
    axis = r.axis + rank - reached_rank  # on the output's axes (a Skip* skip may be of lower rank)
    first = normalise_axis(int(attr(node, "axis", -1)), rank)
    hidden = axis >= first
    if hidden and not (view.prune_hidden and first == rank - 1):
        return barrier(f"{node.op} normalises over the channel axis "
                       "(the hidden size is pruned only with `prune_hidden`)")
    links = []
    for i in data:
        t = node.inputs[i] if given(node, i) else None
        at = _tensor_axis(view, t, axis, rank) if t is not None else None
        if at is not None and not (r.side == "in" and r.index == i):
            links.append(Link("in", i, at, r.owner))
    for j in carriers:
        if j < len(node.outputs) and present(node.outputs[j]) and not (r.side == "out" and r.index == j):
            links.append(Link("out", j, axis, r.owner))
    if hidden:
        links += [Link("in", i, 0, r.owner, role) for i, role in params.items() if given(node, i)]
    return Relation(links, kind="hidden" if hidden else None)


@rule("EmbedLayerNormalization", domain=MS)
def embed_layer_norm(node, view, r: Reached):
    """BERT's embeddings fused: word, position and segment rows summed, then LayerNorm. Its
    outputs' hidden size (the tables' columns) passes only with `prune_hidden`."""
    if r.side == "in" or r.index == 1 or r.axis != 2:
        return barrier("EmbedLayerNormalization's inputs are ids, tables and a mask")
    if not view.prune_hidden:
        return barrier("EmbedLayerNormalization normalises over the channel axis "
                       "(the hidden size is pruned only with `prune_hidden`)")
    links = [Link("out", j, 2, r.owner) for j in (0, 2)
             if j != r.index and j < len(node.outputs) and present(node.outputs[j])]
    links += [Link("in", i, 1, r.owner, "data") for i in (2, 3, 4) if given(node, i)]
    links += [Link("in", i, 0, r.owner, "norm_scale" if i == 5 else "norm_shift") for i in (5, 6) if given(node, i)]
    return Relation(links, kind="hidden")


# --- fused activations -----------------------------------------------------------------------

# x * Phi(x) after adding a bias (BiasGelu; FastGelu's optional bias), its tanh or sigmoid
# approximations (FastGelu, QuickGelu): elementwise, the bias broadcast along the last axis.
rule("BiasGelu", "FastGelu", "QuickGelu", "Gelu", domain=MS)(elementwise)


# --- MatMulNBits: Y = A @ dequantize(B)^T, B packed (N, blocks of K, bytes of a block) -----------

def _nbits_layout(node, view) -> tuple[int, int, int] | None:
    """(N, blocks along K, block size) of a MatMulNBits, from its attributes and packed weight."""
    n, block = int(attr(node, "N", 0)), int(attr(node, "block_size", 0))
    blocks = view.dim(node.inputs[1], 1) if view.rank(node.inputs[1]) == 3 else None
    return (n, blocks, block) if n and block and blocks else None


def _per_row(view, t, n: int, owner, block_owner=None):
    """A link owner for a per-(row, block) parameter of shape (N, blocks) or (N * blocks,): ``owner``
    over the rows, or ``block_owner`` over the blocks of every row."""
    if view.rank(t) == 2:
        return (0, owner) if block_owner is None else (1, block_owner)
    per_row = view.dim(t, 0) // n
    return (0, np.repeat(owner, per_row)) if block_owner is None else (0, np.tile(block_owner, n))


def nbits_source(node, view):
    if view.is_constant(node.inputs[1]) and not view.is_constant(node.inputs[0]):
        rank = view.rank(node.outputs[0])
        return [(0, rank - 1)] if rank else []
    return []


def nbits_rewrite(node, view, cut):
    out, a = node.outputs[0], node.inputs[0]
    node.attrs["N"] = cut.new_dim(out, view.rank(out) - 1)
    node.attrs["K"] = cut.new_dim(a, view.rank(a) - 1)


@rule("MatMulNBits", domain=MS, source=nbits_source, rewrite=nbits_rewrite)
def matmul_nbits(node, view, r: Reached):
    """N (the output features) goes with the packed weight's rows, their scales, zero points and
    bias; K (the input channels) in whole quantisation blocks, with those blocks of every row.
    Zero points packed several blocks a byte cannot lose one block: a barrier on K."""
    layout = _nbits_layout(node, view)
    if layout is None or not all(view.is_constant(t) for t in node.inputs[1:] if present(t)):
        return barrier("packed weight, scales or zero points computed at run time")
    if given(node, 4):
        return barrier("g_idx reorders K (act-order quantisation)")
    n, blocks, block = layout
    rank = view.rank(node.outputs[0])
    reached_rank = view.rank((node.inputs if r.side == "in" else node.outputs)[r.index])
    if r.index != 0 or rank is None:
        return barrier("channels reach a MatMulNBits parameter as an activation")
    last = r.axis == reached_rank - 1
    if not last:
        return Relation([Link("out" if r.side == "in" else "in", 0, r.axis, r.owner)])
    scales, zeros = node.inputs[2], node.inputs[3] if given(node, 3) else None
    if r.side == "out":  # N
        links = [Link("in", 1, 0, r.owner, "quantized")]
        links.append(Link("in", 2, *_per_row(view, scales, n, r.owner), "weight"))
        if zeros is not None:
            links.append(Link("in", 3, *_per_row(view, zeros, n, r.owner), "quantized"))
        if given(node, 5):
            links.append(Link("in", 5, 0, r.owner, "bias"))
        return Relation(links)
    # K, in whole blocks: a block's owner is its first channel's (the block's channels are tied)
    block_owner = r.owner[::block]
    if len(block_owner) != blocks:
        return barrier("K does not fit the packed weight's blocks")
    links = [Link("in", 1, 1, block_owner, "quantized"),
             Link("in", 2, *_per_row(view, scales, n, None, block_owner), "weight")]
    if zeros is not None:
        if view.is_constant(zeros) and view.value(zeros).dtype == np.uint8 and int(attr(node, "bits", 4)) < 8:
            return barrier("zero points packed several blocks a byte: K cannot lose one block")
        links.append(Link("in", 3, *_per_row(view, zeros, n, None, block_owner), "quantized"))
    return Relation(links, ties=blocks_of(len(r.owner), block))

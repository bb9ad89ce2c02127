"""Attention ops of onnxruntime (com.microsoft) and the standard Attention of opset 23, as
onnxruntime's transformer optimizer, onnxruntime-genai's model builder and torch's dynamo
exporter (sdpa at opset 23) write them.

Attention (com.microsoft) computes q, k and v from one packed weight (in, 3 x hidden) and a
packed bias, splits each into ``num_heads`` heads and writes the heads side by side: the
node creates the head channels (its output features), heads go whole (a head's channels are
tied), the same columns of the q, k and v blocks of the weight and bias go with them, and
``num_heads`` is rewritten. Its input's hidden size reaches the weight's rows.
MultiHeadAttention (com.microsoft) and the standard Attention take q, k and v computed
outside: the head channels of all three and of the output are one group.

GroupQueryAttention (num_heads query heads sharing kv_num_heads key/value heads, q/k/v packed
or separate, rotary inside) loses a key/value head with the query heads that share it, with
the caches' head axis and the head sinks, or (without whole groups, the default) query heads
only, as many in every group: keys, values and caches stay, and of packed q/k/v the key and
value columns stay whole (kept out of the projection's group); the head counts are rewritten,
the cos/sin caches are untouched. The standard Attention with fewer key/value heads than query
heads (grouped-query attention, opset 23) does the same without caches. GroupQueryAttention's caches
(past inputs, present outputs) are the model's interface: they change only with
`allow_io_change`. The other attention ops with a KV cache are a barrier, and so is any mask
or bias with a head axis. RotaryEmbedding rotates pairs within a head: whole heads pass.
"""

from __future__ import annotations

import numpy as np

from ..graph.view import attr
from .contrib import MS, given, used
from .registry import Link, Reached, Relation, barrier, blocks_of, rule

KV_WHOLE = "key/value heads go only with their whole group of query heads (`prune_kv_groups`)"


def _per_head_bias(node, view, indices) -> bool:
    """Whether one of the masks or biases at ``indices`` has a head axis (batch, heads, queries,
    keys) of more than one head: it would have to lose the same heads, and no rule cuts it."""
    for i in indices:
        if given(node, i) and view.rank(node.inputs[i]) == 4 and view.dim(node.inputs[i], 1) != 1:
            return True
    return False


def _head_size(width: int | None, heads: int) -> int | None:
    return width // heads if width and heads > 0 and width % heads == 0 else None


def _packed_sizes(node, view) -> list[int] | None:
    """Attention's q, k and v widths (qkv_hidden_sizes, else three equal thirds of the weight)."""
    sizes = attr(node, "qkv_hidden_sizes")
    if sizes:
        return [int(s) for s in sizes]
    columns = view.dim(node.inputs[1], 1)
    return [columns // 3] * 3 if columns and columns % 3 == 0 else None


def packed_attention_source(node, view):
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or not view.is_constant(w) or view.rank(w) != 2 or view.is_constant(node.inputs[0]):
        return []
    return [(0, 2)] if view.rank(node.outputs[0]) == 3 else []


def packed_attention_rewrite(node, view, cut):
    heads = int(attr(node, "num_heads"))
    width = view.dim(node.outputs[0], 2)
    new_heads = cut.new_dim(node.outputs[0], 2) // _head_size(width, heads)
    node.attrs["num_heads"] = new_heads
    if attr(node, "qkv_hidden_sizes"):
        node.attrs["qkv_hidden_sizes"] = [cut.new_dim(node.outputs[0], 2)] * 3


@rule("Attention", domain=MS, source=packed_attention_source, rewrite=packed_attention_rewrite)
def packed_attention(node, view, r: Reached):
    if any(given(node, i) for i in (4, 6)) or used(node, view, 1):
        return barrier("a KV cache (past / present) is used")
    if attr(node, "do_rotary", 0):
        return barrier("rotary embedding inside the node")
    if _per_head_bias(node, view, (5,)):
        return barrier("an attention bias per head")
    if not view.is_constant(node.inputs[1]) or view.rank(node.inputs[1]) != 2:
        return barrier("the packed q/k/v weight is computed at run time")
    sizes = _packed_sizes(node, view)
    if sizes is None or len(set(sizes)) != 1:
        return barrier("q, k and v have different widths")
    if r.side == "in":
        if r.index != 0 or r.axis != view.rank(node.inputs[0]) - 1:
            return barrier("Attention mixes the sequence" if r.index == 0 else
                           "channels reach an Attention parameter as an activation")
        return Relation([Link("in", 1, 0, r.owner, "weight")])
    if r.index != 0 or r.axis != 2:
        return barrier("Attention's output is cut only on its features")
    head = _head_size(sizes[2], int(attr(node, "num_heads", 0)))
    if head is None or len(r.owner) != sizes[2]:
        return barrier("heads do not divide the width")
    packed = np.concatenate([r.owner] * 3)
    links = [Link("in", 1, 1, packed, "weight")]
    if given(node, 2):
        links.append(Link("in", 2, 0, packed, "bias"))
    return Relation(links, ties=blocks_of(len(r.owner), head), kind="heads", heads=("out", 0, 2, head))


def _separate_qkv(node, view, r: Reached, heads: int, cache_inputs, cache_outputs, bias: int | None, masks=()):
    """The relation of q, k and v given separately as (batch, sequence, heads x head size): the
    last axis of all three and of the output are one set of head channels."""
    if any(given(node, i) for i in cache_inputs) or any(used(node, view, j) for j in cache_outputs):
        return barrier("a KV cache (past / present) is used")
    if _per_head_bias(node, view, masks):
        return barrier("an attention mask or bias per head")
    q, k, v = (node.inputs[i] if given(node, i) else None for i in range(3))
    if k is None or v is None or any(view.rank(t) != 3 for t in (q, k, v, node.outputs[0])):
        return barrier("q, k and v are not all (batch, sequence, hidden)")
    width = view.dim(node.outputs[0], 2)
    if not (view.dim(q, 2) == view.dim(k, 2) == view.dim(v, 2) == width):
        return barrier("q, k and v have different widths")
    reached = (0, 1, 2) if r.side == "in" else (0,)
    if r.index not in reached or r.axis != 2:
        return barrier(f"{node.op} mixes the sequence" if r.index in reached else
                       f"channels reach a {node.op} mask or parameter as an activation")
    head = _head_size(width, heads)
    if head is None:
        return barrier("heads do not divide the width")
    links = [Link("in", i, 2, r.owner) for i in range(3) if not (r.side == "in" and r.index == i)]
    if r.side == "in":
        links.append(Link("out", 0, 2, r.owner))
    if bias is not None and given(node, bias):
        links.append(Link("in", bias, 0, np.concatenate([r.owner] * 3), "bias"))
    return Relation(links, ties=blocks_of(width, head), kind="heads", heads=("out", 0, 2, head))


def _rewrite_heads(*attributes: str):
    """Rewrite the head-count attributes that are set to the heads left: the output's width on
    (batch, sequence, hidden), its head axis on (batch, heads, sequence, head size)."""
    def rewrite(node, view, cut):
        out = node.outputs[0]
        if view.rank(out) == 4:
            new = cut.new_dim(out, 1)
        else:
            head = view.dim(out, 2) // int(attr(node, attributes[0]))
            new = cut.new_dim(out, 2) // head
        for name in attributes:
            if attr(node, name) is not None:
                node.attrs[name] = new
    return rewrite


@rule("MultiHeadAttention", domain=MS, rewrite=_rewrite_heads("num_heads"))
def multi_head_attention(node, view, r: Reached):
    return _separate_qkv(node, view, r, int(attr(node, "num_heads", 0)), (6, 7), (1, 2, 3), bias=3, masks=(4, 5))


def standard_attention_rewrite(node, view, cut):
    """q_num_heads and kv_num_heads (where set) to the query and key heads left: counted on the head
    axis (batch, heads, sequence, head size), or as the width over the head size."""
    q, k = node.inputs[0], node.inputs[1]
    if view.rank(q) == 4:
        new = {"q_num_heads": cut.new_dim(q, 1), "kv_num_heads": cut.new_dim(k, 1)}
    else:
        head = view.dim(q, 2) // int(attr(node, "q_num_heads"))
        new = {"q_num_heads": cut.new_dim(q, 2) // head, "kv_num_heads": cut.new_dim(k, 2) // head}
    for name, heads in new.items():
        if attr(node, name) is not None:
            node.attrs[name] = heads


@rule("Attention", rewrite=standard_attention_rewrite)
def standard_attention(node, view, r: Reached):
    q_heads, kv_heads = int(attr(node, "q_num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    if view.rank(node.inputs[0]) == 4:
        if view.dim(node.inputs[0], 1) != view.dim(node.inputs[1], 1):
            return _grouped_standard_attention(node, view, r)
        return _head_axis_attention(node, view, r)
    if q_heads != kv_heads:
        return _grouped_standard_attention(node, view, r)
    return _separate_qkv(node, view, r, q_heads, (4, 5), (1, 2, 3), bias=None, masks=(3,))


def _head_axis_attention(node, view, r: Reached):
    """The standard Attention on (batch, heads, sequence, head size): the head axis (1) of q, k,
    v and the output is one set of channels, each one a head."""
    if any(given(node, i) for i in (4, 5)) or any(used(node, view, j) for j in (1, 2, 3)):
        return barrier("a KV cache (past / present) is used")
    if _per_head_bias(node, view, (3,)):
        return barrier("an attention mask per head")
    q, k, v = node.inputs[:3]
    if not (view.dim(q, 1) == view.dim(k, 1) == view.dim(v, 1)):
        return barrier("keys and values have different head counts")
    reached = (0, 1, 2) if r.side == "in" else (0,)
    if r.index not in reached or r.axis != 1:
        return barrier("Attention mixes the sequence and the head size" if r.index in reached else
                       "channels reach an Attention mask as an activation")
    links = [Link("in", i, 1, r.owner) for i in range(3) if not (r.side == "in" and r.index == i)]
    if r.side == "in":
        links.append(Link("out", 0, 1, r.owner))
    return Relation(links, kind="heads")


def _standard_gqa_layout(node, view) -> tuple[int, tuple[int, int, int]] | str:
    """(head axis, (query heads, key/value heads, positions per head)) of a grouped standard Attention:
    on (batch, heads, sequence, head size) one position per head, on (batch, sequence, heads x head
    size) the head size; or why it does not fit."""
    q, k, v, out = node.inputs[0], node.inputs[1], node.inputs[2], node.outputs[0]
    if view.rank(q) == 4:
        heads, kv_heads = view.dim(q, 1), view.dim(k, 1)
        fits = heads and kv_heads and view.dim(v, 1) == kv_heads and view.dim(out, 1) == heads
        axis, layout = 1, (heads, kv_heads, 1)
    else:
        heads, kv_heads = int(attr(node, "q_num_heads", 0)), int(attr(node, "kv_num_heads", 0))
        head = _head_size(view.dim(q, 2), heads)
        fits = head and kv_heads > 0 and view.dim(k, 2) == view.dim(v, 2) == kv_heads * head \
            and view.dim(out, 2) == heads * head
        axis, layout = 2, (heads, kv_heads, head)
    if not fits:
        return "heads do not divide the widths (or values have another head size)"
    if heads % kv_heads:
        return "query heads are not a multiple of the key/value heads"
    return axis, layout


def _grouped_standard_attention(node, view, r: Reached):
    """The standard Attention with q_num_heads query heads over fewer key/value heads. By default
    the r-th query head of every group goes together (num_heads stays a multiple of the key/value
    heads; keys and values stay whole); with ``prune_kv_groups`` a key/value head with its query
    heads, as GroupQueryAttention's."""
    if any(given(node, i) for i in (4, 5)) or any(used(node, view, j) for j in (1, 2, 3)):
        return barrier("a KV cache (past / present) is used")
    if _per_head_bias(node, view, (3,)):
        return barrier("an attention mask per head")
    fitted = _standard_gqa_layout(node, view)
    if isinstance(fitted, str):
        return barrier(fitted)
    axis, layout = fitted
    slot = {("in", 0): "query", ("in", 1): "key", ("in", 2): "value", ("out", 0): "output"}.get((r.side, r.index))
    if slot is None or r.axis != axis:
        return barrier("Attention mixes the sequence" if slot else "channels reach an Attention mask as an activation")
    shown = ("out", 0, axis, layout[2])
    if not _whole_kv_groups(view):
        if slot in ("key", "value"):
            return barrier(KV_WHOLE)
        links = [Link(side, 0, axis, r.owner) for side in ("in", "out") if side != r.side]
        return Relation(links, ties=_within_group_ties(layout), kind="heads", heads=shown)
    q, k, v = _gqa_spread(r, slot, layout)
    wanted = [("in", 0, q), ("in", 1, k), ("in", 2, v), ("out", 0, q)]
    links = [Link(side, i, axis, own) for side, i, own in wanted if (side, i) != (r.side, r.index)]
    return Relation(links, ties=_gqa_ties(slot, layout), kind="heads", heads=shown)


# --- GroupQueryAttention: num_heads query heads share kv_num_heads key/value heads ---------------

def _gqa_layout(node, view) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head size) of a GroupQueryAttention, when they fit."""
    heads, kv_heads = int(attr(node, "num_heads", 0)), int(attr(node, "kv_num_heads", 0))
    width = view.dim(node.outputs[0], 2) if view.rank(node.outputs[0]) == 3 else None
    head = _head_size(width, heads)
    if head is None or kv_heads <= 0 or heads % kv_heads:
        return None
    return heads, kv_heads, head


def _gqa_spread(r: Reached, slot: str, layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The owners of the query, key and value channels (heads x head size each) implied by the
    channels reaching ``slot``: a query channel and the channel at the same place in its key/value
    head are one (several query heads then read one key/value channel: they go together)."""
    heads, kv_heads, head = layout
    share = heads // kv_heads
    q_head_of_kv = np.repeat(np.arange(kv_heads) * share, head) * head + np.tile(np.arange(head), kv_heads)
    kv_of_q = np.repeat(np.arange(heads) // share, head) * head + np.tile(np.arange(head), heads)
    if slot in ("query", "output"):
        q = r.owner
        k = v = q[q_head_of_kv]
    elif slot in ("key", "value"):
        k = v = r.owner
        q = k[kv_of_q]
    elif slot == "packed":
        q, k, v = np.split(r.owner, [heads * head, (heads + kv_heads) * head])
    else:  # a cache's head axis: one channel per key/value head
        k = v = np.repeat(r.owner, head)
        q = k[kv_of_q]
    return q, k, v


def _gqa_ties(slot: str, layout) -> list[np.ndarray]:
    """Positions of the reached slot that go together: one key/value head and its query heads."""
    heads, kv_heads, head = layout
    q_span, kv_span = heads // kv_heads * head, head
    ties = []
    for j in range(kv_heads):
        q, kv = np.arange(j * q_span, (j + 1) * q_span), np.arange(j * kv_span, (j + 1) * kv_span)
        ties.append({"query": q, "output": q, "key": kv, "value": kv, "cache": np.array([j]),
                     "packed": np.concatenate([q, heads * head + kv, (heads + kv_heads) * head + kv])}[slot])
    return ties


def gqa_rewrite(node, view, cut):
    head = _gqa_layout(node, view)[2]
    width = cut.new_dim(node.outputs[0], 2)
    node.attrs["num_heads"] = width // head
    if given(node, 1):
        node.attrs["kv_num_heads"] = cut.new_dim(node.inputs[1], 2) // head
    else:  # packed: what is not query is key and value, as wide
        node.attrs["kv_num_heads"] = (cut.new_dim(node.inputs[0], 2) - width) // (2 * head)


def _whole_kv_groups(view) -> bool:
    """Whether key/value heads go, each with its query heads (the view's prune_kv_groups), or
    only query heads, as many in every group. The option comes with the rules for grouped-query attention
    written out (repeat_kv); a view without it cuts whole groups."""
    return getattr(view, "prune_kv_groups", True)


def _within_group_ties(layout) -> list[np.ndarray]:
    """Positions of the query heads (heads x positions per head, first on the axis) that go together:
    the r-th query head of every key/value group, so every group keeps as many."""
    heads, kv_heads, head = layout
    share = heads // kv_heads
    return [np.concatenate([np.arange(h * head, (h + 1) * head) for h in range(j, heads, share)])
            for j in range(share)]


def _query_heads_within_groups(node, view, r: Reached, slot: str, layout, packed: bool) -> Relation:
    """Query heads only, the r-th of every key/value group together (so num_heads stays a
    multiple of kv_num_heads); keys, values and the caches stay whole. Packed q/k/v ([q | k | v]
    on the last axis): the query columns go, the key and value columns are kept (``Relation.kept``:
    they leave the group of the packed projection's output features)."""
    heads, kv_heads, head = layout
    width = heads * head
    if slot in ("key", "value", "cache") or (slot == "packed" and (r.owner[:width] < 0).all()):
        return barrier(KV_WHOLE)
    q = r.owner[:width]
    kv = np.full(2 * kv_heads * head, -1)
    wanted = {("in", 0): np.concatenate([q, kv]) if packed else q, ("out", 0): q}
    links = [Link(side, i, 2, own) for (side, i), own in wanted.items() if (side, i) != (r.side, r.index)]
    if given(node, 11):
        links.append(Link("in", 11, 0, q[::head], "bias"))
    kept = np.arange(width, len(r.owner)) if slot == "packed" else None
    return Relation(links, ties=_within_group_ties(layout), kind="heads", kept=kept, heads=("out", 0, 2, head))


@rule("GroupQueryAttention", domain=MS, rewrite=gqa_rewrite)
def group_query_attention(node, view, r: Reached):
    """With whole groups: heads go by key/value head with the query heads that share it: the
    query, key and value channels (packed in one input, or three), the output's, the caches' head
    axis (past inputs, present outputs: the model's interface, changed only with
    `allow_io_change`) and the per-head sinks. Else query heads only (``_query_heads_within_groups``).
    The rotary cos/sin caches are per position within a head: untouched."""
    layout = _gqa_layout(node, view)
    if layout is None:
        return barrier("heads do not divide the width")
    if used(node, view, 3) or any(given(node, i) for i in (12, 13, 16)):
        return barrier("attention scores output, a quantised KV cache or packed batching is used")
    if given(node, 10) and view.dim(node.inputs[10], 1) not in (1, None):
        return barrier("an attention bias per head")
    packed = not given(node, 1)
    slots = {("in", 0): "packed" if packed else "query", ("in", 1): "key", ("in", 2): "value",
             ("in", 3): "cache", ("in", 4): "cache", ("out", 0): "output", ("out", 1): "cache", ("out", 2): "cache"}
    slot = slots.get((r.side, r.index))
    axis = 1 if slot == "cache" else 2
    if slot is None or r.axis != axis:
        return barrier("GroupQueryAttention mixes the sequence" if slot else
                       "channels reach a GroupQueryAttention parameter as an activation")
    if not _whole_kv_groups(view):
        return _query_heads_within_groups(node, view, r, slot, layout, packed)
    heads, kv_heads, head = layout
    q, k, v = _gqa_spread(r, slot, layout)
    wanted = [("in", 0, 2, np.concatenate([q, k, v]) if packed else q), ("out", 0, 2, q)]
    if not packed:
        wanted += [("in", 1, 2, k), ("in", 2, 2, v)]
    wanted += [("in", 3, 1, k[::head]), ("out", 1, 1, k[::head]), ("in", 4, 1, v[::head]), ("out", 2, 1, v[::head])]
    links = [Link(side, i, ax, own) for side, i, ax, own in wanted if (side, i) != (r.side, r.index)]
    if given(node, 11):
        links.append(Link("in", 11, 0, q[::head], "bias"))
    return Relation(links, ties=_gqa_ties(slot, layout), kind="heads", heads=("out", 0, 2, head))


# --- RotaryEmbedding (com.microsoft): rotates pairs within each head -------------------------------

def _rotary_head(node, view) -> int | None:
    """The head size: the width over num_heads; without num_heads, twice the caches' width (how
    onnxruntime infers it; the head count then follows the width by itself)."""
    heads = int(attr(node, "num_heads", 0))
    if heads:
        return _head_size(view.dim(node.inputs[0], 2), heads)
    half = view.dim(node.inputs[2], 1)
    return 2 * half if half and not attr(node, "rotary_embedding_dim") else None


def rotary_rewrite(node, view, cut):
    if view.rank(node.inputs[0]) == 3 and attr(node, "num_heads"):
        node.attrs["num_heads"] = cut.new_dim(node.inputs[0], 2) // _rotary_head(node, view)


@rule("RotaryEmbedding", domain=MS, rewrite=rotary_rewrite)
def rotary_embedding(node, view, r: Reached):
    """Whole heads pass (a head's channels are rotated in pairs, so they are tied); positions
    and the cos/sin caches are untouched."""
    if r.index != 0:
        return barrier("channels reach RotaryEmbedding's positions or caches")
    rank = view.rank(node.inputs[0])
    other = "out" if r.side == "in" else "in"
    if rank == 4:  # (batch, heads, sequence, head size)
        if r.axis == 1:
            return Relation([Link(other, 0, 1, r.owner)], kind="heads")
        return barrier("RotaryEmbedding rotates within a head")
    if rank != 3 or r.axis != 2:
        return barrier("RotaryEmbedding mixes the sequence" if rank == 3 else "input shape unknown")
    head = _rotary_head(node, view)
    if head is None or len(r.owner) % head:
        return barrier("heads do not divide the width")
    return Relation([Link(other, 0, 2, r.owner)], ties=blocks_of(len(r.owner), head), kind="heads",
                    heads=("out", 0, 2, head))

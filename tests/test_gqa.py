"""Grouped-query and multi-query attention in decomposed exports (issue 15, point 1).

The key/value heads are repeated for their group of query heads before the
attention products (``repeat_kv``: Unsqueeze -> Expand or Tile -> Reshape).
By default the query heads are cut within each key/value group, as many in
every group (the r-th query head of every group goes together), and the
key/value projections stay whole; ``prune_kv_groups`` removes whole
key/value heads with their query heads. Checked on a small graph built with
onnx.helper (both repeat spellings, MQA), on the issue's reference Llama
(vocab 1,000, hidden 256, 4 layers, 8 heads, 2 KV heads, MLP 688; random
init) exported by both torch exporters, with and without a KV cache, and on
Qwen2 and Mistral configs of the same size. Every cut is valid and equals
the original with the removed heads' contributions zeroed (mask equivalence).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest

import onnxprune

from graphs import GraphBuilder, check_valid, input_value, make_feeds, masked_reference, rel_err, run

T, HIDDEN, HEAD_DIM = 5, 32, 8
HEADS = HIDDEN // HEAD_DIM  # 4 query heads


def gqa_graph(kv_heads: int = 2, repeat: str = "expand") -> onnx.ModelProto:
    """One attention block, heads=4 over ``kv_heads`` key/value heads, K and V repeated as
    transformers' ``repeat_kv`` is exported: (1, kv, T, d) -> Unsqueeze(2) -> Expand/Tile to
    (1, kv, n_rep, T, d) -> Reshape (1, heads, T, d); or as ``k[:, [0, 0, 1, 1]]`` (Gather)."""
    n_rep = HEADS // kv_heads
    g = GraphBuilder()
    x = g.input("x", (1, T, HIDDEN))

    def heads(t, n):
        t = g.op("Reshape", [t, g.ints([1, T, n, HEAD_DIM])])
        return g.op("Transpose", [t], perm=[0, 2, 1, 3])

    def repeated(t, name):
        if repeat == "gather":
            return g.op("Gather", [t, g.ints(np.arange(HEADS) // n_rep)], name=f"{name}_repeat", axis=1)
        t = g.op("Unsqueeze", [t, g.ints([2])])
        if repeat == "expand":
            t = g.op("Expand", [t, g.ints([1, kv_heads, n_rep, T, HEAD_DIM])], name=f"{name}_expand")
        else:
            t = g.op("Tile", [t, g.ints([1, 1, n_rep, 1, 1])], name=f"{name}_tile")
        return g.op("Reshape", [t, g.ints([1, HEADS, T, HEAD_DIM])], name=f"{name}_repeat")

    q = heads(g.matmul(x, HIDDEN, HIDDEN, name="q_proj"), HEADS)
    k = repeated(heads(g.matmul(x, HIDDEN, kv_heads * HEAD_DIM, name="k_proj"), kv_heads), "k")
    v = repeated(heads(g.matmul(x, HIDDEN, kv_heads * HEAD_DIM, name="v_proj"), kv_heads), "v")
    scores = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    att = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged = g.op("Reshape", [g.op("Transpose", [att], perm=[0, 2, 1, 3]), g.ints([1, T, HIDDEN])])
    return g.build(g.matmul(merged, HIDDEN, HIDDEN, name="o_proj"))


def heads_group(analysis):
    (group,) = [g for g in analysis.groups if g.kind == "heads"]
    return group


def prune_masked(model, ratio=None, plan=None, feeds=None, tol=1e-4, **options):
    """Prune with ``options``; check validity and mask equivalence against the original analysed with
    the same options. Returns the result and the analysis."""
    keys = ("input_shapes", "prune_kv_groups", "allow_io_change")
    analysis = onnxprune.analyse(model, **{k: options[k] for k in keys if k in options})
    result = onnxprune.prune(model, ratio, plan=plan, **options)
    check_valid(model, result.model)
    feeds = feeds or make_feeds(model)
    got, reference = run(result.model, feeds), run(masked_reference(model, analysis, result.plan), feeds)
    for a, b in zip(reference, got):
        assert rel_err(a, b) <= tol
    return result, analysis


def test_query_heads_are_cut_within_each_kv_group_by_default():
    model = gqa_graph()
    analysis = onnxprune.analyse(model)
    group = heads_group(analysis)
    assert "q_proj" in group.sources and "k_proj" not in group.sources
    # 4 query heads over 2 KV heads: units {head 0, head 2} and {head 1, head 3} (r-th of each group)
    units = [sorted({int(c) // HEAD_DIM for c in m}) for m in group.unit_members()]
    assert units == [[0, 2], [1, 3]]
    kv = [g for g in analysis.groups if {"k_proj", "v_proj"} & set(g.sources)]
    assert kv and all("prune_kv_groups" in g.blocked[0] for g in kv)

    keep = [c for c in range(group.size) if c // HEAD_DIM in (1, 3)]
    plan = onnxprune.Plan(keep={group.id: keep}, sizes={group.id: group.size})
    result, _ = prune_masked(model, plan=plan)
    pruned = result.model
    assert input_value(pruned, "q_proj", 1).shape == (HIDDEN, HIDDEN // 2)
    assert input_value(pruned, "k_proj", 1).shape == (HIDDEN, 2 * HEAD_DIM)  # K/V stay whole
    assert input_value(pruned, "k_expand", 1).tolist() == [1, 2, 1, T, HEAD_DIM]
    assert input_value(pruned, "k_repeat", 1).tolist() == [1, 2, T, HEAD_DIM]


def test_prune_kv_groups_removes_kv_heads_with_their_query_heads():
    model = gqa_graph()
    analysis = onnxprune.analyse(model, prune_kv_groups=True)
    group = heads_group(analysis)
    assert {"q_proj", "k_proj", "v_proj"} <= set(group.sources)
    units = [sorted({int(c) // HEAD_DIM for c in m if c < HIDDEN}) for m in group.unit_members()]
    assert sorted(units) == [[0, 1], [2, 3]]  # query heads 0, 1 read KV head 0; 2, 3 read KV head 1

    result, _ = prune_masked(model, 0.5, prune_kv_groups=True)
    pruned = result.model
    assert input_value(pruned, "q_proj", 1).shape == (HIDDEN, HIDDEN // 2)
    assert input_value(pruned, "k_proj", 1).shape == (HIDDEN, HEAD_DIM)
    assert input_value(pruned, "v_proj", 1).shape == (HIDDEN, HEAD_DIM)
    assert input_value(pruned, "k_expand", 1).tolist() == [1, 1, 2, T, HEAD_DIM]
    assert input_value(pruned, "k_repeat", 1).tolist() == [1, 2, T, HEAD_DIM]


@pytest.mark.parametrize("kv_groups", [False, True], ids=["within-groups", "kv-groups"])
def test_repeat_written_with_tile(kv_groups):
    model = gqa_graph(repeat="tile")
    result, analysis = prune_masked(model, 0.5, prune_kv_groups=kv_groups)
    assert len(heads_group(analysis).unit_members()) == 2
    # within groups: one query head per group, repeated once; whole groups: one group, repeated twice
    assert input_value(result.model, "k_tile", 1).tolist() == [1, 1, 2 if kv_groups else 1, 1, 1]
    assert input_value(result.model, "k_proj", 1).shape == (HIDDEN, (1 if kv_groups else 2) * HEAD_DIM)


@pytest.mark.parametrize("kv_groups", [False, True], ids=["within-groups", "kv-groups"])
def test_repeat_written_with_gather(kv_groups):
    model = gqa_graph(repeat="gather")
    analysis = onnxprune.analyse(model, prune_kv_groups=kv_groups)
    assert len(heads_group(analysis).unit_members()) == 2  # r-th query head of each group, or a group
    keep = {"k_repeat": [0, 0], "v_repeat": [0, 0]} if kv_groups else {"k_repeat": [0, 1], "v_repeat": [0, 1]}
    result, _ = prune_masked(model, 0.5, prune_kv_groups=kv_groups)
    for name, indices in keep.items():
        assert sorted(input_value(result.model, name, 1).tolist()) == indices
    assert input_value(result.model, "k_proj", 1).shape == (HIDDEN, (1 if kv_groups else 2) * HEAD_DIM)


def test_multi_query_attention_prunes_query_heads_freely():
    model = gqa_graph(kv_heads=1)
    analysis = onnxprune.analyse(model)
    assert len(heads_group(analysis).unit_members()) == HEADS  # one KV head: every query head alone
    result, _ = prune_masked(model, 0.5)
    assert input_value(result.model, "q_proj", 1).shape == (HIDDEN, HIDDEN // 2)
    assert input_value(result.model, "k_proj", 1).shape == (HIDDEN, HEAD_DIM)
    assert input_value(result.model, "k_expand", 1).tolist() == [1, 1, 2, T, HEAD_DIM]


def test_an_expand_shape_read_from_another_tensor_is_a_barrier():
    """Expand's channel entry computed from a tensor other than its input would not follow the cut."""
    g = GraphBuilder()
    x = g.input("x", (1, 4, 6))
    a = g.matmul(x, 6, 8, name="a")  # (1, 4, 8): the group reaches the Expand's input
    b = g.matmul(x, 6, 8, name="b")
    shape = g.op("Shape", [b])
    y = g.op("Expand", [g.op("Unsqueeze", [a, g.ints([1])]), g.op("Concat", [g.ints([1, 3]), g.op(
        "Slice", [shape, g.ints([1]), g.ints([3])])], axis=0)], name="expand")
    model = g.build(g.matmul(g.op("Reshape", [y, g.ints([1, 12, 8])]), 8, 4, name="c"))
    analysis = onnxprune.analyse(model)
    groups = {s: grp for grp in analysis.groups for s in grp.sources}
    assert not groups["b"].prunable and any("shape arithmetic" in r for r in groups["b"].blocked)


def test_an_expand_of_its_own_width_prunes():
    """``x.expand(n, *x.shape)`` exported with Shape(x): the entry is x's own width, right after the cut."""
    g = GraphBuilder()
    x = g.input("x", (1, 4, 6))
    a = g.op("Unsqueeze", [g.matmul(x, 6, 8, name="a"), g.ints([0])])  # (1, 1, 4, 8)
    own = g.op("Slice", [g.op("Shape", [a]), g.ints([1]), g.ints([4])])
    y = g.op("Expand", [a, g.op("Concat", [g.ints([3]), own], axis=0)], name="expand")  # (3, 1, 4, 8)
    model = g.build(g.matmul(g.op("ReduceSum", [y, g.ints([0])], keepdims=0), 8, 4, name="c"))
    result, _ = prune_masked(model, 0.5)
    assert input_value(result.model, "a", 1).shape == (6, 4)


def test_constant_of_shape_over_the_channels_is_rewritten():
    """A fill of (batch, T, C), T read from a dynamic input: C is a constant piece of the shape."""
    g = GraphBuilder()
    x = g.input("x", (1, "t", 6))
    a = g.matmul(x, 6, 8, name="a")
    shape = g.op("Concat", [g.op("Slice", [g.op("Shape", [x]), g.ints([0]), g.ints([2])]), g.ints([8])],
                 axis=0, name="fill_shape")
    half = onnx.numpy_helper.from_array(np.array([0.5], np.float32))
    fill = g.op("ConstantOfShape", [shape], name="fill", value=half)
    model = g.build(g.matmul(g.op("Add", [a, fill]), 8, 4, name="c"))
    result, _ = prune_masked(model, 0.5, feeds=make_feeds(model, dims={"t": 3}))
    assert input_value(result.model, "fill_shape", 1).tolist() == [4]
    assert run(result.model, make_feeds(model, dims={"t": 7}))[0].shape == (1, 7, 4)


def test_cli_prune_kv_groups(tmp_path, capsys):
    from graphs import run_main

    source, out = tmp_path / "gqa.onnx", tmp_path / "out.onnx"
    onnx.save(gqa_graph(), source)
    for flags, kv_width in (((), 2 * HEAD_DIM), (("--prune-kv-groups",), HEAD_DIM)):
        code, summary, err = run_main(capsys, source, "-o", out, "--force", "--structured", "0.5", *flags)
        assert code == 0, err
        assert "(4 -> 2 heads)" in summary  # query heads, whichever way they go
        pruned = onnx.load(out)
        assert input_value(pruned, "k_proj", 1).shape == (HIDDEN, kv_width)
        assert input_value(pruned, "q_proj", 1).shape == (HIDDEN, HIDDEN // 2)


# --- the reference Llama and its relatives (transformers, random init) -----------------------------

torch_needed = pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("torch", "transformers")),
                                  reason="needs torch and transformers")
VOCAB, SEQ, LAYERS, PAST, NEW = 1000, 32, 4, 3, 2


def decoder(family: str = "Llama", kv_heads: int = 2):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    config = getattr(transformers, f"{family}Config")(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=LAYERS, num_attention_heads=8,
        num_key_value_heads=kv_heads, intermediate_size=688, max_position_embeddings=128, use_cache=False)
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def export_decoder(path, exporter: str, family: str = "Llama", kv_heads: int = 2, cache: bool = False):
    """(input_ids, attention_mask[, past_key_i, past_value_i ...]) -> (logits[, present_...]); the
    attention mask is an input (without it transformers 5 traces torch.diff, which the legacy exporter
    cannot write)."""
    import torch
    import transformers

    class Decoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask, *past):
            if not cache:
                return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                             past_key_values=transformers.DynamicCache(ddp_cache_data=pairs, config=self.model.config))
            return (out.logits, *(t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)))

    past = [f"past_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")] if cache else []
    new = NEW if cache else SEQ
    args = (torch.randint(0, VOCAB, (1, new)), torch.ones(1, new + (PAST if cache else 0), dtype=torch.long))
    args += tuple(torch.rand(1, kv_heads, PAST, 32) for _ in past)
    names = {"input_names": ["input_ids", "attention_mask", *past],
             "output_names": ["logits", *(n.replace("past", "present") for n in past)]}
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(Decoder(decoder(family, kv_heads)), args, str(path), opset_version=17, dynamo=False,
                              **names)
        elif exporter == "dynamo-dynamic":  # batch and sequence dynamic
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(Decoder(decoder(family, kv_heads)), args, str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), **names)
        else:
            torch.onnx.export(Decoder(decoder(family, kv_heads)), args, str(path), dynamo=True,
                              external_data=False, **names)
    return onnx.load(str(path))


def decoder_feeds(model, seed=0, dims=None):
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value or (dims or {}).get(d.dim_param, 1) for d in vi.type.tensor_type.shape.dim]
        if vi.name == "input_ids":
            feeds[vi.name] = rng.integers(0, VOCAB, shape).astype(np.int64)
        elif vi.name == "attention_mask":
            feeds[vi.name] = np.ones(shape, np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def macs_ratio(model, pruned, shapes=None) -> float:
    return onnxprune.count_macs(model, shapes) / onnxprune.count_macs(pruned, shapes)


@torch_needed
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo", "dynamo-dynamic"])
def test_reference_llama_at_0_3(tmp_path, exporter):
    """Default: 8 query heads in 4 units (the r-th head of both groups) -> 6 heads per layer
    (0.3 of 4 units rounds to 1), MLP 688 -> 482: 1.34x fewer MACs, against 1.30x for the MLPs
    alone. ``prune_kv_groups``: 2 units (KV heads) -> 1: 1.47x. ``head_ratio`` 0.5 in the default
    mode: 8 -> 4 query heads per layer, K/V whole: 1.43x. MACs at batch 1, sequence 32 (also where
    they are dynamic: the dynamo export with dynamic batch and sequence, which the cut keeps dynamic).
    (The legacy exporter with dynamic axes computes repeat_kv's shapes from Shape(k): still a barrier.)"""
    model = export_decoder(tmp_path / "llama.onnx", exporter)
    shapes = {"input_ids": (1, SEQ), "attention_mask": (1, SEQ)}
    feeds = decoder_feeds(model, dims={"seq": SEQ})
    result, _ = prune_masked(model, 0.3, feeds=feeds, input_shapes=shapes)
    if exporter == "dynamo-dynamic":
        other = decoder_feeds(model, dims={"batch": 2, "seq": 17})
        assert run(result.model, other)[0].shape == (2, 17, VOCAB)
    heads = [g for g in result.report.groups if g.kind == "heads"]
    assert len(heads) == LAYERS and all((g.units_before, g.units_after) == (8, 6) for g in heads)  # query heads
    assert macs_ratio(model, result.model, shapes) > 1.33

    result, _ = prune_masked(model, 0.3, feeds=feeds, input_shapes=shapes, prune_kv_groups=True)
    heads = [g for g in result.report.groups if g.kind == "heads"]
    assert len(heads) == LAYERS and all((g.channels_before, g.channels_after) == (256, 128) for g in heads)
    assert all((g.units_before, g.units_after) == (8, 4) for g in heads)
    assert macs_ratio(model, result.model, shapes) >= 1.4

    result, _ = prune_masked(model, 0.3, feeds=feeds, input_shapes=shapes, head_ratio=0.5)
    assert macs_ratio(model, result.model, shapes) >= 1.4


@torch_needed
@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_reference_llama_with_kv_cache(tmp_path, exporter):
    """The cache holds the KV heads: by default they stay whole, so the cache keeps its shape; with
    ``prune_kv_groups`` (and ``allow_io_change``) its head axis shrinks 2 -> 1."""
    model = export_decoder(tmp_path / "llama-cache.onnx", exporter, cache=True)
    result, _ = prune_masked(model, 0.3, feeds=decoder_feeds(model))
    assert macs_ratio(model, result.model) > 1.3

    result = onnxprune.prune(model, 0.3, prune_kv_groups=True, allow_io_change=True)
    onnx.checker.check_model(result.model, full_check=True)
    cache = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in result.model.graph.input}
    assert cache["past_key_0"] == [1, 1, PAST, 32] and cache["past_value_3"] == [1, 1, PAST, 32]
    assert [o.shape for o in run(result.model, decoder_feeds(result.model))][1] == (1, 1, PAST + NEW, 32)
    assert macs_ratio(model, result.model) >= 1.4


@torch_needed
@pytest.mark.slow
@pytest.mark.parametrize("family, kv_heads", [("Qwen2", 2), ("Mistral", 2), ("Llama", 1)],
                         ids=["qwen2", "mistral", "llama-mqa"])
def test_relatives(tmp_path, family, kv_heads):
    model = export_decoder(tmp_path / f"{family}.onnx", "legacy", family, kv_heads)
    result, _ = prune_masked(model, 0.3, feeds=decoder_feeds(model))
    heads = [g for g in result.report.groups if g.kind == "heads"]
    assert len(heads) == LAYERS and all(g.channels_after < g.channels_before for g in heads)
    assert macs_ratio(model, result.model) > 1.33
    if kv_heads == 1:  # MQA: 8 single query heads in every layer (the K/V head's group, on head_dim,
        assert all((g.units_before, g.units_after) == (8, 6) for g in heads)  # spreads through RoPE tables)


def test_a_whole_axis_tiled_goes_with_all_its_copies_only_with_prune_kv_groups():
    """``k.repeat(1, 2, 1, 1)``: query head h reads KV head h % 2; a copy cannot go alone."""
    g = GraphBuilder()
    x = g.input("x", (1, T, HIDDEN))
    q = g.op("Transpose", [g.op("Reshape", [g.matmul(x, HIDDEN, HIDDEN, name="q_proj"),
                                            g.ints([1, T, HEADS, HEAD_DIM])])], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [g.matmul(x, HIDDEN, 2 * HEAD_DIM, name="k_proj"),
                                            g.ints([1, T, 2, HEAD_DIM])])], perm=[0, 2, 1, 3])
    k = g.op("Tile", [k, g.ints([1, 2, 1, 1])], name="k_tile")
    att = g.op("MatMul", [g.op("Softmax", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1),
                          k])
    merged = g.op("Reshape", [g.op("Transpose", [att], perm=[0, 2, 1, 3]), g.ints([1, T, HIDDEN])])
    model = g.build(g.matmul(merged, HIDDEN, HIDDEN, name="o_proj"))
    blocked = heads_group(onnxprune.analyse(model)).blocked
    assert any("repeats the whole channel axis" in r for r in blocked), blocked
    result, analysis = prune_masked(model, 0.5, prune_kv_groups=True)
    units = [sorted({int(c) // HEAD_DIM for c in m if c < HIDDEN}) for m in heads_group(analysis).unit_members()]
    assert sorted(units) == [[0, 2], [1, 3]]
    assert input_value(result.model, "k_proj", 1).shape == (HIDDEN, HEAD_DIM)
    assert input_value(result.model, "k_tile", 1).tolist() == [1, 2, 1, 1]

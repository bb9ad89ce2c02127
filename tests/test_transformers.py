"""Transformers exported by torch.onnx (random init, no download): attention heads and MLPs prune.

BERT (4 layers from BertConfig) with both exporters, GPT-2 (GPT2Model, 4
layers, use_cache=False; transformers 5 needs the dynamo exporter for it).
Each prune at 0.4 must give a valid model with the same output names and
shapes, at least 1.4x fewer MACs, and the mask-equivalence reference:
removing heads and MLP neurons equals zeroing their rows in the consumers.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest

import onnxprune

from graphs import check_valid, masked_reference, run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HEADS, HIDDEN, LAYERS, VOCAB, SEQ = 4, 64, 4, 500, 16


class LastHidden(torch.nn.Module):
    def __init__(self, model, cache_kw: bool):
        super().__init__()
        self.model, self.cache_kw = model, cache_kw

    def forward(self, *inputs):
        kwargs = {"use_cache": False} if self.cache_kw else {}
        return self.model(*inputs, **kwargs).last_hidden_state


def bert():
    config = transformers.BertConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                     intermediate_size=4 * HIDDEN, vocab_size=VOCAB)
    return LastHidden(transformers.BertModel(config), False), ["input_ids", "attention_mask"]


def gpt2():
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, use_cache=False)
    return LastHidden(transformers.GPT2Model(config), True), ["input_ids"]


def export(build, exporter: str, path) -> onnx.ModelProto:
    torch.manual_seed(0)
    model, names = build()
    model.eval()
    args = tuple(torch.randint(0, VOCAB, (2, SEQ)) if n == "input_ids" else torch.ones(2, SEQ, dtype=torch.long)
                 for n in names)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter == "legacy":
            axes = {n: {0: "batch", 1: "seq"} for n in [*names, "hidden"]}
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["hidden"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        elif exporter == "dynamo":
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["hidden"],
                              dynamo=True, external_data=False)
        else:  # "dynamo-dynamic": batch and sequence dynamic (sdpa then flattens k to transpose it)
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            torch.onnx.export(model, args, str(path), input_names=names, output_names=["hidden"], dynamo=True,
                              external_data=False, dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),))
    return onnx.load(str(path))


def feeds_for(model: onnx.ModelProto, batch=2, seq=SEQ, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        if vi.name == "input_ids":
            feeds[vi.name] = rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)
        else:
            mask = np.ones((batch, seq), np.int64)
            mask[0, seq - 3:] = 0  # padding, so the mask path is exercised
            feeds[vi.name] = mask
    return feeds


CASES = [
    pytest.param(bert, "legacy", id="bert-legacy"),
    pytest.param(bert, "dynamo", id="bert-dynamo", marks=pytest.mark.slow),
    pytest.param(gpt2, "dynamo", id="gpt2-dynamo", marks=pytest.mark.slow),
    pytest.param(bert, "dynamo-dynamic", id="bert-dynamo-dynamic", marks=pytest.mark.slow),
    pytest.param(gpt2, "dynamo-dynamic", id="gpt2-dynamo-dynamic", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = {}

    def get(build, exporter):
        key = (build.__name__, exporter)
        if key not in cache:
            cache[key] = export(build, exporter, tmp_path_factory.mktemp("tf") / f"{key[0]}-{exporter}.onnx")
        return cache[key]

    return get


def pinned(model) -> dict:
    return {vi.name: (2, SEQ) for vi in model.graph.input}


@pytest.mark.parametrize("build, exporter", CASES)
def test_heads_and_mlp_prune_at_0_4(exported, build, exporter):
    model = exported(build, exporter)
    shapes = pinned(model)
    analysis = onnxprune.analyse(model, shapes)
    heads = [g for g in analysis.prunable if g.kind == "heads"]
    assert len(heads) == LAYERS and all(len(g.unit_members()) == HEADS for g in heads)
    mlp = [g for g in analysis.prunable if g.kind == "channels" and g.size == 4 * HIDDEN]
    assert len(mlp) == LAYERS

    result = onnxprune.prune(model, 0.4, input_shapes=shapes)
    check_valid(model, result.model)
    feeds = feeds_for(model)
    got, expected = run(result.model, feeds), run(model, feeds)
    assert [o.shape for o in got] == [o.shape for o in expected]
    macs_before, macs_after = onnxprune.count_macs(model, shapes), onnxprune.count_macs(result.model, shapes)
    assert macs_before / macs_after >= 1.4
    reference = run(masked_reference(model, analysis, result.plan), feeds)
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-4, atol=1e-4 * np.abs(reference[0]).max())
    pruned_heads = [g for g in result.report.groups if g.kind == "heads"]
    assert all(g.units_before == HEADS and g.units_after == 2 for g in pruned_heads)


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo-dynamic", marks=pytest.mark.slow)])
def test_dynamic_axes_stay_dynamic_after_head_pruning(exported, exporter):
    """Head counts baked into Reshape targets are rewritten; batch and sequence stay free."""
    model = exported(bert, exporter)
    result = onnxprune.prune(model, 0.5, input_shapes=pinned(model))
    assert [g.units_after for g in result.report.groups if g.kind == "heads"] == [HEADS // 2] * LAYERS
    dims = [d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] and all(dims)
    for batch, seq in ((1, 5), (3, 31)):
        feeds = feeds_for(model, batch, seq, seed=1)
        assert run(result.model, feeds)[0].shape == (batch, seq, HIDDEN)


def test_head_ratio_applies_to_heads_only(exported):
    model = exported(bert, "legacy")
    result = onnxprune.prune(model, 0.5, head_ratio=0.25, input_shapes=pinned(model))
    for g in result.report.groups:
        if g.kind == "heads":
            assert (g.units_before, g.units_after) == (HEADS, 3)
        else:
            assert g.channels_after == g.channels_before // 2
    check_valid(model, result.model)


def test_hidden_size_is_left_alone_with_a_reason(exported):
    model = exported(bert, "legacy")
    analysis = onnxprune.analyse(model, pinned(model))
    hidden = [g for g in analysis.groups if g.size == HIDDEN and g.blocked]
    assert hidden and all("LayerNormalization" in "; ".join(g.blocked) for g in hidden)


# --- the hidden size (--prune-hidden) ---------------------------------------------------------

class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(ids, mask).logits


def bert_classifier():
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS,
                                     intermediate_size=4 * HIDDEN, vocab_size=VOCAB, num_labels=3)
    return Logits(transformers.BertForSequenceClassification(config)), ["input_ids", "attention_mask"]


@pytest.mark.parametrize("exporter", ["legacy", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_prune_hidden_through_layernorm_and_embeddings(exported, exporter):
    model = exported(bert_classifier, exporter)
    shapes = pinned(model)
    assert not any(g.kind == "hidden" for g in onnxprune.analyse(model, shapes).prunable)
    result = onnxprune.prune(model, 0.5, prune_hidden=True, input_shapes=shapes)
    check_valid(model, result.model)
    hidden = [g for g in result.report.groups if g.kind == "hidden"]
    assert len(hidden) == 1 and (hidden[0].channels_before, hidden[0].channels_after) == (HIDDEN, HIDDEN // 2)
    assert any("`prune_hidden`" in w and "recovery" in w for w in result.report.warnings)
    tables = [t for t in result.model.graph.initializer if len(t.dims) == 2 and t.dims[0] == VOCAB]
    assert tables and all(t.dims[1] == HIDDEN // 2 for t in tables)  # the word embeddings are sliced
    assert run(result.model, feeds_for(model))[0].shape == (2, 3)


def decomposed_layernorm_model(rms: bool = False):
    """x(N, T, 16) -> MatMul -> LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div (or RMSNorm) -> MatMul."""
    from graphs import GraphBuilder

    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 5, 16])
    h = b.matmul(x, 16, 16, name="proj_in")
    centred = h if rms else b.op("Sub", [h, b.op("ReduceMean", [h], axes=[-1], keepdims=1)])
    var = b.op("ReduceMean", [b.op("Pow", [centred, b.floats(2.0)])], axes=[-1], keepdims=1)
    normed = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.floats(1e-5)])])])
    h = b.op("Add", [b.op("Mul", [normed, b.weight((16,), "ln.scale", fan_in=1)]), b.weight((16,), "ln.bias")])
    return b.build(b.matmul(h, 16, 4, name="proj_out"), check=True)


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_decomposed_norms_prune_only_with_prune_hidden(rms):
    model = decomposed_layernorm_model(rms)
    group = next(g for g in onnxprune.analyse(model).groups if "proj_in" in g.sources)
    assert group.blocked and "reduces over the channel axis" in group.blocked[0]
    result = onnxprune.prune(model, 0.5, prune_hidden=True)
    check_valid(model, result.model)
    assert [g.channels_after for g in result.report.groups if g.kind == "hidden"] == [8]


# A decoder with a KV cache (heads meet the graph IO): tests/test_iochange.py.


class GroupedQueryAttention(torch.nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads (repeat_interleave)."""

    def __init__(self, hidden=HIDDEN, heads=HEADS, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = torch.nn.Linear(hidden, hidden)
        self.kv = torch.nn.Linear(hidden, 2 * kv_heads * self.head_dim)
        self.out = torch.nn.Linear(hidden, hidden)
        self.up, self.down = torch.nn.Linear(hidden, 4 * hidden), torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = (z.reshape(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                for z in self.kv(x).split(self.kv_heads * self.head_dim, dim=2))
        k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        att = torch.softmax(q @ k.transpose(2, 3) / self.head_dim ** 0.5, dim=-1) @ v
        h = x + self.out(att.transpose(1, 2).reshape(b, t, -1))
        return h + self.down(torch.relu(self.up(h)))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_grouped_query_attention_is_pruned_safely(tmp_path, exporter):
    """GQA (repeat_interleave: Tile in the legacy export, Expand in dynamo's): the query heads are cut
    within each key/value group, K/V stay whole (tests/test_gqa.py); exact (mask equivalence)."""
    torch.manual_seed(0)
    path = tmp_path / "gqa.onnx"
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(GroupedQueryAttention().eval(), (torch.rand(2, 5, HIDDEN),), str(path),
                              opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
        else:
            torch.onnx.export(GroupedQueryAttention().eval(), (torch.rand(2, 5, HIDDEN),), str(path), dynamo=True,
                              external_data=False, input_names=["x"], output_names=["y"])
    model = onnx.load(str(path))
    analysis = onnxprune.analyse(model)
    heads = [g for g in analysis.prunable if g.kind == "heads"]
    assert len(heads) == 1 and len(heads[0].unit_members()) == 2  # 4 query heads, the r-th of each group tied
    kv = [g for g in analysis.groups if any("prune_kv_groups" in r for r in g.blocked)]
    assert len(kv) == 1  # the fused K/V projection: left whole
    result = onnxprune.prune(model, 0.5)
    check_valid(model, result.model)
    x = {"x": np.random.default_rng(0).random((2, 5, HIDDEN), dtype=np.float32)}
    reference = run(masked_reference(model, analysis, result.plan), x)[0]
    np.testing.assert_allclose(run(result.model, x)[0], reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    assert any(g.channels_before == 4 * HIDDEN and g.channels_after == 2 * HIDDEN for g in result.report.groups)


class TimmStyleAttention(torch.nn.Module):
    """timm's ViT attention: one qkv projection reshaped to (B, N, 3, heads, head_dim), permuted to
    (3, B, heads, N, head_dim) and unbound into q, k, v."""

    def __init__(self, hidden=HIDDEN, heads=HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv, self.proj = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.up, self.down = torch.nn.Linear(hidden, 4 * hidden), torch.nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1) @ v
        h = x + self.proj(att.transpose(1, 2).reshape(b, n, c))
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_qkv_reshaped_to_three_by_heads_prunes_whole_heads(tmp_path, exporter):
    torch.manual_seed(0)
    path = tmp_path / "timm.onnx"
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter == "legacy":
            torch.onnx.export(TimmStyleAttention().eval(), (torch.rand(2, 5, HIDDEN),), str(path), opset_version=17,
                              dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch", 1: "tokens"}, "y": {0: "batch", 1: "tokens"}})
        else:
            torch.onnx.export(TimmStyleAttention().eval(), (torch.rand(2, 5, HIDDEN),), str(path), dynamo=True,
                              external_data=False, input_names=["x"], output_names=["y"])
    model = onnx.load(str(path))
    analysis = onnxprune.analyse(model, {"x": (2, 5, HIDDEN)})
    heads = [g for g in analysis.prunable if g.kind == "heads"]
    assert len(heads) == 1 and len(heads[0].unit_members()) == HEADS  # each unit: the head's q, k and v
    assert all(len(m) == 3 * HIDDEN // HEADS for m in heads[0].unit_members())
    result = onnxprune.prune(model, 0.5, input_shapes={"x": (2, 5, HIDDEN)})
    check_valid(model, result.model)
    assert [(g.units_before, g.units_after) for g in result.report.groups if g.kind == "heads"] == [(HEADS, 2)]
    for shape in ((2, 5, HIDDEN), (3, 7, HIDDEN)) if exporter == "legacy" else ((2, 5, HIDDEN),):
        x = {"x": np.random.default_rng(0).random(shape, dtype=np.float32)}
        reference = run(masked_reference(model, analysis, result.plan), x)[0]
        np.testing.assert_allclose(run(result.model, x)[0], reference, rtol=1e-4,
                                   atol=1e-4 * np.abs(reference).max())

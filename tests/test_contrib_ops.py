"""onnxruntime's contrib ops (rules/contrib.py, executor/ops/contrib.py, model/runtime_ops.py).

Loading: a model whose only checker failure is an op onnxruntime registers in the default
domain (SimplifiedLayerNormalization) loads and prunes; unknown ops and contrib ops that
break onnxruntime's schema are still refused (exit 3, one line).

Each op's rule on a small graph built with onnx.helper (torch exports none of them): the
pruned model is valid, its input untouched, and equals the original with the removed
channels zeroed at their consumers (mask equivalence, 1e-4 of the output scale); where the
hidden size goes (`prune_hidden`) the statistics change, so validity and the sliced
parameters are checked instead. Each graph also runs in the PyTorch executor, against
onnxruntime (1e-5 of the output scale, test_executor.py's figure for single ops).

Last, BERT fused by onnxruntime's transformer optimizer (Attention, SkipLayerNormalization,
BiasGelu, EmbedLayerNormalization) prunes from the command line as its unfused export does.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from onnxprune.errors import UnsupportedModel
from onnxprune.model.load import checked_model
from onnxprune.rules.contrib_attention import KV_WHOLE

from graphs import (
    GraphBuilder,
    attr_of,
    check_valid,
    full_plan,
    group_of,
    io_signature,
    listing,
    nodes_of,
    one_error_line,
    prune_checked,
    rel_err,
    run,
    run_main,
    session,
)

MS = "com.microsoft"
B, S, HIDDEN, HEADS = 2, 5, 16, 4


def _executor_matches_onnxruntime(model: onnx.ModelProto, feeds: dict) -> None:
    torch = pytest.importorskip("torch")
    from onnxprune.executor.module import TorchGraph

    with torch.no_grad():
        got = TorchGraph(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    for want, name in zip(run(model, feeds), [o.name for o in model.graph.output]):
        assert rel_err(want, got[name].numpy()) <= 1e-5, name


# --- loading ------------------------------------------------------------------------------------

def rms_mlp(opset: int = 22) -> onnx.ModelProto:
    """x -> SimplifiedLayerNormalization (onnxruntime's, default domain) -> MatMul -> Relu -> MatMul."""
    b = GraphBuilder(opset)
    x = b.input("x", [B, S, 8])
    scale = b.floats(np.linspace(0.5, 1.5, 8))
    h = b.op("SimplifiedLayerNormalization", [x, scale], name="rms", axis=-1, epsilon=1e-5)
    return b.build(b.matmul(b.op("Relu", [b.matmul(h, 8, 32, name="fc1")]), 32, 8, name="fc2"), check=False)


def test_checker_failure_from_a_runtime_op_is_not_a_refusal(tmp_path, capsys):
    model = rms_mlp()
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for SimplifiedLayerNormalization"):
        onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    code, out, err = run_main(capsys, tmp_path / "m.onnx", "--structured", "0.5", "-o", tmp_path / "p.onnx")
    assert code == 0, err
    assert "1 pruned" in out and (tmp_path / "m.onnx").read_bytes() == before
    pruned = onnx.load(tmp_path / "p.onnx")
    assert nodes_of(pruned, "SimplifiedLayerNormalization")[0].domain == ""  # written as it was read
    assert [t.dims for t in pruned.graph.initializer if t.name.startswith("fc1")] == [[8, 16]]


def test_a_runtime_op_in_a_large_model_is_checked_in_parts(tmp_path, monkeypatch):
    """A large model (simulated: every model counts as large) is checked a weight at a time, the
    graph with its weights as inputs, on loading and in verification's full check of the file."""
    import onnxprune.model.load as load
    import onnxprune.runtime.verify as verify

    monkeypatch.setattr(load, "CHECKED_WHOLE_BYTES", 0)
    monkeypatch.setattr(verify, "CHECKED_WHOLE_BYTES", 0)
    for external in (True, False):
        path = tmp_path / f"m{external}.onnx"
        onnx.save(rms_mlp(), path, save_as_external_data=external, all_tensors_to_one_file=True,
                  location=f"m{external}.data", size_threshold=0)
        assert load.read_model(path).model.graph.node
        verify.check_model_file(path)  # verification's full check of such a file passes too
        broken = onnx.load(path, load_external_data=False)
        nodes_of(broken, "MatMul")[0].input[1] = "nowhere"
        onnx.save(broken, tmp_path / "broken.onnx")
        with pytest.raises(onnxprune.errors.InvalidModel, match="fails onnx.checker"):
            load.read_model(tmp_path / "broken.onnx")
        with pytest.raises(onnxprune.errors.VerificationFailed, match="fails onnx.checker"):
            verify.check_model_file(tmp_path / "broken.onnx")


def test_checking_leaves_the_model_as_it_was():
    model = rms_mlp()
    before = model.SerializeToString()
    checked_model(model)
    assert model.SerializeToString() == before


def test_an_op_no_one_registers_is_still_refused(tmp_path, capsys):
    model = rms_mlp()
    nodes_of(model, "SimplifiedLayerNormalization")[0].op_type = "NoSuchNormalization"
    onnx.save(model, tmp_path / "m.onnx")
    code, _, err = run_main(capsys, tmp_path / "m.onnx", "--structured", "0.5")
    assert code == 3
    assert "fails onnx.checker: No Op registered for NoSuchNormalization" in one_error_line(err)


def test_a_runtime_op_that_breaks_its_schema_is_refused(tmp_path, capsys):
    model = rms_mlp()
    nodes_of(model, "SimplifiedLayerNormalization")[0].input.append(model.graph.node[0].input[1])
    onnx.save(model, tmp_path / "m.onnx")
    code, _, err = run_main(capsys, tmp_path / "m.onnx", "--structured", "0.5")
    assert code == 3
    line = one_error_line(err)
    assert "SimplifiedLayerNormalization" in line and "3 input(s), onnxruntime's schema takes 2 to 2" in line


# --- normalisations over the last axis: channels on another axis pass ---------------------------

def _norm(b, op, a, skip, width):
    """``op`` over the last axis (``width``) of ``a``, with ``skip`` where it takes one."""
    gamma = b.floats(np.linspace(0.5, 1.5, width))
    shift = b.weight((width,), fan_in=4)
    if op == "SkipLayerNormalization":
        return b.op(op, [a, skip, gamma, shift, b.weight((width,), fan_in=4)], domain=MS, name="norm")
    if op == "SkipSimplifiedLayerNormalization":
        return b.op(op, [a, skip, gamma, shift], domain=MS, name="norm")
    return b.op(op, [a, gamma], name="norm", axis=-1, epsilon=1e-5)


NORMS = [("SkipLayerNormalization", 17), ("SkipSimplifiedLayerNormalization", 17),
         ("SimplifiedLayerNormalization", 17), ("RMSNormalization", 23)]


def _conv1d(b, x, cin, cout, name):
    return b.op("Conv", [x, b.weight((cout, cin, 1), f"{name}.W"), b.weight((cout,), f"{name}.B", fan_in=4)],
                name=name, kernel_shape=[1])


@pytest.mark.parametrize("op, opset", NORMS)
def test_norm_over_the_last_axis_passes_channels_on_another_axis(op, opset):
    """(1, channels, length) normalised over the length: the convolutions' channels go through,
    with the skip input's producer coupled in."""
    b = GraphBuilder(opset)
    x = b.input("x", [1, 4, HIDDEN])
    a, skip = _conv1d(b, x, 4, 8, "left"), _conv1d(b, x, 4, 8, "right")
    y = _conv1d(b, _norm(b, op, a, skip if op.startswith("Skip") else None, HIDDEN), 8, 6, "out")
    model = b.build(y, check=False)
    result, analysis, _ = prune_checked(model, 0.5, checker=op != "SimplifiedLayerNormalization")
    assert group_of(analysis, "left").prunable
    if op.startswith("Skip"):
        assert group_of(analysis, "left") is group_of(analysis, "right")
    assert [t.dims for t in result.model.graph.initializer if t.name.startswith("out.W")] == [[6, 4, 1]]
    _executor_matches_onnxruntime(model, {"x": np.random.default_rng(0).standard_normal((1, 4, HIDDEN), np.float32)})


@pytest.mark.parametrize("op, opset", NORMS)
def test_norm_over_the_hidden_size_cuts_only_with_prune_hidden(op, opset):
    b = GraphBuilder(opset)
    x = b.input("x", [B, S, HIDDEN])
    a, skip = b.matmul(x, HIDDEN, 32, name="a"), b.matmul(x, HIDDEN, 32, name="skip")
    y = b.matmul(_norm(b, op, a, skip if op.startswith("Skip") else None, 32), 32, 8, name="out")
    model = b.build(y, check=False)
    held = group_of(onnxprune.analyse(model), "a")
    assert not held.prunable and any("normalises over the channel axis" in r for r in held.blocked)
    analysis = onnxprune.analyse(model, prune_hidden=True)
    group = group_of(analysis, "a")
    assert group.prunable and group.kind == "hidden"
    result = onnxprune.prune(model, 0.5, prune_hidden=True)
    check_valid(model, result.model, checker=op != "SimplifiedLayerNormalization")
    norm = next(n for n in result.model.graph.node if n.name == "norm")
    params = {t.name: t.dims for t in result.model.graph.initializer}
    assert all(params[name] == [16] for name in norm.input[2 if op.startswith("Skip") else 1:] if name)
    feeds = {"x": np.random.default_rng(0).standard_normal((B, S, HIDDEN), np.float32)}
    assert run(result.model, feeds)[0].shape == (B, S, 8)
    _executor_matches_onnxruntime(model, feeds)


def test_skip_norm_statistics_in_use_are_a_barrier():
    b = GraphBuilder(17)
    x = b.input("x", [B, S, HIDDEN])
    a, skip = b.matmul(x, HIDDEN, 32, name="a"), b.matmul(x, HIDDEN, 32, name="skip")
    gamma, beta = b.floats(np.ones(32)), b.floats(np.zeros(32))
    y, mean = b.op("SkipLayerNormalization", [a, skip, gamma, beta], outputs=2, domain=MS, name="norm")
    model = b.build([b.matmul(y, 32, 8, name="out"), mean], check=False)
    group = group_of(onnxprune.analyse(model, prune_hidden=True), "a")
    assert any("mean / inverse-std outputs are used" in r for r in group.blocked)


# --- fused activations ----------------------------------------------------------------------------

@pytest.mark.parametrize("op, with_bias", [("BiasGelu", True), ("FastGelu", True), ("FastGelu", False),
                                           ("QuickGelu", False), ("Gelu", False)])
def test_fused_gelu_is_elementwise_and_its_bias_is_sliced(op, with_bias):
    b = GraphBuilder(17)
    x = b.input("x", [B, S, HIDDEN])
    h = b.matmul(x, HIDDEN, 32, name="fc1")
    inputs = [h, b.weight((32,), "act.bias", fan_in=4)] if with_bias else [h]
    y = b.matmul(b.op(op, inputs, domain=MS, name="act", **({"alpha": 1.5} if op == "QuickGelu" else {})),
                 32, 8, name="fc2")
    model = b.build(y)
    result, analysis, _ = prune_checked(model, 0.5)
    assert group_of(analysis, "fc1").prunable
    if with_bias:
        assert [t.dims for t in result.model.graph.initializer if t.name.startswith("act.bias")] == [[16]]
    _executor_matches_onnxruntime(model, {"x": np.random.default_rng(0).standard_normal((B, S, HIDDEN),
                                                                                        np.float32)})


# --- attention -----------------------------------------------------------------------------------

def packed_attention_model(mask: str | None = None, unidirectional: int = 0):
    """x -> MatMul (source upstream) -> com.microsoft Attention (packed q/k/v) -> MatMul."""
    b = GraphBuilder(17)
    x = b.input("x", [B, S, 8])
    h = b.matmul(x, 8, HIDDEN, name="embed")
    inputs = [h, b.weight((HIDDEN, 3 * HIDDEN), "attn.W", fan_in=HIDDEN), b.weight((3 * HIDDEN,), "attn.B", fan_in=4)]
    if mask:
        b.inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, [B] if mask == "lengths" else [B, S]))
        inputs.append("mask")
    a = b.op("Attention", inputs, domain=MS, name="attn", num_heads=HEADS, unidirectional=unidirectional)
    y = b.matmul(a, HIDDEN, 8, name="proj")
    if not mask:
        return b.build(y)
    # GraphBuilder.build runs the model on float inputs to learn the output's shape: declared here
    graph = helper.make_graph(b.nodes, "attention", b.inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT,
                                                                                             [B, S, 8])], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)],
                             ir_version=10)


def _attention_feeds(model, mask: str | None = None):
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((B, S, 8)).astype(np.float32)}
    if mask == "lengths":
        feeds["mask"] = np.array([S, 3], np.int32)
    elif mask == "raw":
        feeds["mask"] = np.array([[1] * S, [1, 1, 0, 1, 0]], np.int32)
    return feeds


@pytest.mark.parametrize("mask, unidirectional", [(None, 0), ("lengths", 0), ("raw", 0), (None, 1)])
def test_packed_attention_loses_whole_heads(mask, unidirectional):
    model = packed_attention_model(mask, unidirectional)
    feeds = _attention_feeds(model, mask)
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "attn")
    assert heads.kind == "heads" and len(heads.unit_members()) == HEADS
    plan = full_plan(analysis, {heads.id: list(range(4, 8)) + list(range(12, 16))})  # heads 1 and 3
    result, _, _ = prune_checked(model, plan=plan, feeds=feeds)
    attn = nodes_of(result.model, "Attention")[0]
    assert attr_of(attn, "num_heads") == 2
    report = next(g for g in result.report.groups if g.id == heads.id)
    assert (report.units_before, report.units_after) == (HEADS, 2)  # heads, not the output's channels
    dims = {t.name.split("_")[0]: t.dims for t in result.model.graph.initializer}
    assert dims["attn.W"] == [HIDDEN, 24] and dims["attn.B"] == [24]
    _executor_matches_onnxruntime(model, feeds)


def test_packed_attention_weight_rows_follow_the_hidden_channels():
    model = packed_attention_model()
    analysis = onnxprune.analyse(model)
    embed = group_of(analysis, "embed")
    assert embed.prunable and any(s.node.name == "attn" and s.axis == 0 for s in embed.params.values())
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {embed.id: list(range(0, HIDDEN, 2))}))
    assert [t.dims for t in result.model.graph.initializer if t.name.startswith("attn.W")] == [[8, 3 * HIDDEN]]


def test_packed_attention_with_a_cache_is_a_barrier():
    b = GraphBuilder(17)
    x = b.input("x", [B, S, HIDDEN])
    past = b.input("past", [2, B, HEADS, 1, HIDDEN // HEADS])
    w, bias = b.weight((HIDDEN, 3 * HIDDEN), "attn.W"), b.weight((3 * HIDDEN,), "attn.B")
    a, present = b.op("Attention", [x, w, bias, "", past], outputs=2, domain=MS, name="attn", num_heads=HEADS,
                      unidirectional=1)
    model = b.build([b.matmul(a, HIDDEN, 8, name="proj"), present])
    assert any("KV cache" in r for r in group_of(onnxprune.analyse(model), "attn").blocked)
    torch = pytest.importorskip("torch")
    from onnxprune.executor.module import TorchGraph

    feeds = {"x": torch.zeros(B, S, HIDDEN), "past": torch.zeros(2, B, HEADS, 1, HIDDEN // HEADS)}
    with pytest.raises(UnsupportedModel, match="Attention with a KV cache is not implemented in the PyTorch executor"):
        TorchGraph(model).run(feeds)


def separate_qkv_model(op: str):
    """q, k and v from three MatMuls -> MultiHeadAttention (with its packed bias) or the standard
    Attention (opset 23) on (batch, sequence, hidden) -> MatMul."""
    b = GraphBuilder(23 if op == "Attention" else 17)
    x = b.input("x", [B, S, HIDDEN])
    q, k, v = (b.matmul(x, HIDDEN, HIDDEN, name=n) for n in ("q", "k", "v"))
    if op == "MultiHeadAttention":
        a = b.op(op, [q, k, v, b.weight((3 * HIDDEN,), "attn.B", fan_in=4)], domain=MS, name="attn",
                 num_heads=HEADS)
    else:
        a = b.op(op, [q, k, v], name="attn", q_num_heads=HEADS, kv_num_heads=HEADS)
    return b.build(b.matmul(a, HIDDEN, 8, name="proj"))


@pytest.mark.parametrize("op", ["MultiHeadAttention", "Attention"])
def test_attention_on_separate_qkv_loses_whole_heads(op):
    model = separate_qkv_model(op)
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "q")
    assert heads is group_of(analysis, "k") is group_of(analysis, "v")
    assert heads.kind == "heads" and len(heads.unit_members()) == HEADS
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {heads.id: list(range(8))}))
    attn = next(n for n in result.model.graph.node if n.name == "attn")
    names = ("num_heads",) if op == "MultiHeadAttention" else ("q_num_heads", "kv_num_heads")
    assert all(attr_of(attn, n) == 2 for n in names)
    _executor_matches_onnxruntime(model, {"x": np.random.default_rng(2).standard_normal((B, S, HIDDEN),
                                                                                        np.float32)})


def test_attention_bias_per_head_is_a_barrier():
    b = GraphBuilder(17)
    x = b.input("x", [B, S, HIDDEN])
    q, k, v = (b.matmul(x, HIDDEN, HIDDEN, name=n) for n in ("q", "k", "v"))
    bias = b.weight((1, HEADS, S, S), "attn.bias", fan_in=4)
    a = b.op("MultiHeadAttention", [q, k, v, "", "", bias], domain=MS, name="attn", num_heads=HEADS)
    model = b.build(b.matmul(a, HIDDEN, 8, name="proj"))
    assert any("per head" in r for r in group_of(onnxprune.analyse(model), "q").blocked)


def test_standard_attention_on_the_head_axis_loses_whole_heads():
    """(batch, heads, sequence, head size), how the dynamo exporter spells sdpa at opset 23."""
    b = GraphBuilder(23)
    x = b.input("x", [B, S, HIDDEN])
    split = b.ints([B, S, HEADS, HIDDEN // HEADS])
    q, k, v = (b.op("Transpose", [b.op("Reshape", [b.matmul(x, HIDDEN, HIDDEN, name=n), split])],
                    perm=[0, 2, 1, 3]) for n in ("q", "k", "v"))
    a = b.op("Attention", [q, k, v], name="attn", is_causal=1)
    merged = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]), b.ints([B, S, HIDDEN])])
    model = b.build(b.matmul(merged, HIDDEN, 8, name="proj"))
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "q")
    assert heads is group_of(analysis, "v") and heads.prunable
    result, _, _ = prune_checked(model, 0.5)
    assert [t.dims for t in result.model.graph.initializer if t.name.startswith("q.W")] == [[HIDDEN, 8]]
    _executor_matches_onnxruntime(model, {"x": np.random.default_rng(3).standard_normal((B, S, HIDDEN),
                                                                                        np.float32)})


# --- BERT fused by onnxruntime's transformer optimizer --------------------------------------------

def export_and_fuse(folder, model, heads=HEADS, hidden=64):
    """``model`` (ids, mask -> one output) exported to folder/bert.onnx, fused to folder/fused.onnx."""
    torch = pytest.importorskip("torch")
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    names = ["input_ids", "attention_mask"]
    args = (torch.randint(0, 500, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        torch.onnx.export(model, args, str(folder / "bert.onnx"), input_names=names, output_names=["hidden"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in [*names, "hidden"]}, opset_version=17,
                          dynamo=False)
        fused = optimizer.optimize_model(str(folder / "bert.onnx"), model_type="bert", num_heads=heads,
                                         hidden_size=hidden, opt_level=0)
        fused.save_model_to_file(str(folder / "fused.onnx"))
    return folder


def _bert_config(layers: int):
    transformers = pytest.importorskip("transformers")
    return transformers, transformers.BertConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=HEADS,
                                                 intermediate_size=256, vocab_size=500, attn_implementation="eager")


@pytest.fixture(scope="module")
def fused_bert(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from test_transformers import LastHidden

    transformers, config = _bert_config(4)
    torch.manual_seed(0)
    return export_and_fuse(tmp_path_factory.mktemp("fused"), LastHidden(transformers.BertModel(config), False).eval())


@pytest.mark.slow
def test_bert_fused_by_the_optimizer_prunes_like_its_export(fused_bert, capsys):
    fused = onnx.load(fused_bert / "fused.onnx")
    ops = {n.op_type for n in fused.graph.node if n.domain == MS}
    assert {"Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization"} <= ops
    figures = {}
    for name in ("bert", "fused"):
        code, _, err = run_main(capsys, fused_bert / f"{name}.onnx", "--structured", "0.3", "--input-shape",
                                "input_ids:2,16", "--input-shape", "attention_mask:2,16", "-o",
                                fused_bert / f"{name}.pruned.onnx", "--report", fused_bert / f"{name}.json")
        assert code == 0, err
        figures[name] = json.loads((fused_bert / f"{name}.json").read_text())
    params = {k: r["params_before"] / r["params_after"] for k, r in figures.items()}
    macs = {k: r["macs_before"] / r["macs_after"] for k, r in figures.items()}
    assert params["fused"] >= 1.25 and macs["fused"] >= 1.3
    assert params["fused"] == pytest.approx(params["bert"], rel=0.01)
    assert macs["fused"] == pytest.approx(macs["bert"], rel=0.01)
    pruned = onnx.load(fused_bert / "fused.pruned.onnx")
    assert {attr_of(n, "num_heads") for n in nodes_of(pruned, "Attention")} == {HEADS - 1}
    session(pruned)


@pytest.mark.slow
def test_fused_bert_of_bert_base_width_has_1_3x_fewer_weights_at_0_3(tmp_path, capsys):
    """BERT-base's layer shape (hidden 768, 12 heads, MLP 3072; 2 layers, a 500-token vocabulary to
    keep it small): 0.3 of 12 heads is 4 whole heads, so the fused model reaches 1.3x fewer weights
    (the 4-head model above rounds 0.3 of its heads down to 1 and stops at 1.27x)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_transformers import LastHidden

    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=768, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=500, attn_implementation="eager")
    torch.manual_seed(0)
    export_and_fuse(tmp_path, LastHidden(transformers.BertModel(config), False).eval(), heads=12, hidden=768)
    fused = onnx.load(tmp_path / "fused.onnx")
    assert len(nodes_of(fused, "Attention")) == 2
    code, _, err = run_main(capsys, tmp_path / "fused.onnx", "--structured", "0.3", "--input-shape",
                            "input_ids:1,128", "--input-shape", "attention_mask:1,128", "-o",
                            tmp_path / "pruned.onnx", "--report", tmp_path / "report.json")
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params_before"] / report["params_after"] >= 1.3
    pruned = onnx.load(tmp_path / "pruned.onnx")
    assert {attr_of(n, "num_heads") for n in nodes_of(pruned, "Attention")} == {8}
    session(pruned)


@pytest.mark.slow
def test_fused_bert_scores_from_data_and_recovers(fused_bert, capsys):
    """Gradients (taylor), reconstruction and distillation run through the torch contrib ops."""
    rng = np.random.default_rng(0)
    np.savez(fused_bert / "data.npz", input_ids=rng.integers(0, 500, (16, 16)),
             attention_mask=np.ones((16, 16), np.int64))
    code, out, err = run_main(capsys, fused_bert / "fused.onnx", "--structured", "0.3", "--data",
                              fused_bert / "data.npz", "--importance", "taylor", "--distill", "--epochs", "1",
                              "--input-shape", "input_ids:1,16", "--input-shape", "attention_mask:1,16",
                              "-o", fused_bert / "recovered.onnx", "--report", fused_bert / "recovered.json")
    assert code == 0, err
    report = json.loads((fused_bert / "recovered.json").read_text())
    assert report["reconstruction"]["readers"] > 0
    assert report["training"] is not None and report["output_error"] is not None


# --- MatMulNBits ------------------------------------------------------------------------------------

def nbits_mlp(bits: int, symmetric: bool) -> onnx.ModelProto:
    """x -> MatMul(64 -> 96) -> Relu -> MatMul(96 -> 32), quantised by onnxruntime's MatMulNBits
    quantiser in blocks of 32 along K."""
    import logging

    quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    b = GraphBuilder(17)
    x = b.input("x", [B, S, 64])
    model = b.build(b.matmul(b.op("Relu", [b.matmul(x, 64, 96, name="fc1")]), 96, 32, name="fc2"))
    logging.disable(logging.INFO)
    try:
        q = quantizer.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=symmetric, bits=bits)
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    return q.model.model


@pytest.mark.parametrize("bits, symmetric", [(4, True), (8, False)])
def test_matmul_nbits_loses_whole_blocks(bits, symmetric):
    model = nbits_mlp(bits, symmetric)
    assert {n.op_type for n in model.graph.node} == {"MatMulNBits", "Relu"}
    feeds = {"x": np.random.default_rng(4).standard_normal((B, S, 64)).astype(np.float32)}
    analysis = onnxprune.analyse(model)
    fc1 = next(g for g in analysis.groups if g.size == 96)
    assert fc1.prunable and len(fc1.unit_members()) == 3  # fc2's K blocks
    plan = full_plan(analysis, {fc1.id: list(range(32)) + list(range(64, 96))})  # block 1 goes
    before = model.SerializeToString()
    result = onnxprune.prune(model, plan=plan)
    assert model.SerializeToString() == before
    check_valid(model, result.model)
    # the reference: the original with fc2's block 1 scaled by 0 (its dequantised weights are 0)
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    fc2 = next(n for n in reference.graph.node if n.op_type == "MatMulNBits" and n.input[0] != "x")
    scales = next(t for t in reference.graph.initializer if t.name == fc2.input[2])
    values = onnx.numpy_helper.to_array(scales).copy()
    values[:, 1] = 0
    scales.CopyFrom(onnx.numpy_helper.from_array(values, scales.name))
    assert rel_err(run(reference, feeds)[0], run(result.model, feeds)[0]) <= 1e-4
    cut = {n.input[0] == "x": n for n in result.model.graph.node if n.op_type == "MatMulNBits"}
    assert (attr_of(cut[True], "N"), attr_of(cut[False], "K")) == (64, 64)
    _executor_matches_onnxruntime(model, feeds)
    _executor_matches_onnxruntime(result.model, feeds)


def test_matmul_nbits_with_zero_points_packed_two_blocks_a_byte_keeps_k():
    model = nbits_mlp(4, symmetric=False)
    fc1 = next(g for g in onnxprune.analyse(model).groups if g.size == 96)
    assert any("zero points packed several blocks a byte" in r for r in fc1.blocked)
    _executor_matches_onnxruntime(model, {"x": np.random.default_rng(5).standard_normal((B, S, 64), np.float32)})


# --- GroupQueryAttention and RotaryEmbedding --------------------------------------------------------

# onnxruntime's GroupQueryAttention wants head sizes in multiples of 16 (with rotary)
KV_HEADS, HEAD = 2, 16
WIDTH = HEADS * HEAD


def _rotary_caches(b, half: int, positions=16):
    angles = np.outer(np.arange(positions), 1.0 / 100 ** (np.arange(half) / half))
    return b.floats(np.cos(angles)), b.floats(np.sin(angles))


def gqa_model(packed: bool = False, cache: bool = False, sink: bool = False):
    """x -> q (4 heads), k, v (2 heads) projections -> GroupQueryAttention (rotary inside) -> MatMul.
    With ``cache``, past key/value are graph inputs and present key/value graph outputs (one row:
    onnxruntime takes a past with several new tokens for batch 1 only)."""
    batch = 1 if cache else B
    b = GraphBuilder(17)
    x = b.input("x", [batch, S, WIDTH])
    kv = KV_HEADS * HEAD
    if packed:
        qkv = [b.matmul(x, WIDTH, WIDTH + 2 * kv, name="qkv"), "", ""]
    else:
        qkv = [b.matmul(x, WIDTH, WIDTH, name="q"), b.matmul(x, WIDTH, kv, name="k"),
               b.matmul(x, WIDTH, kv, name="v")]
    past = [b.input(n, [batch, KV_HEADS, 1, HEAD]) for n in ("past_key", "past_value")] if cache else ["", ""]
    total = S + (1 if cache else 0)
    lengths, total_length = b.const(np.full(batch, total - 1, np.int32)), b.const(np.array(total, np.int32))
    cos, sin = _rotary_caches(b, HEAD // 2)
    extra = ["", "", b.weight((HEADS,), "attn.sink", fan_in=4)] if sink else []
    outs = b.op("GroupQueryAttention", [*qkv, *past, lengths, total_length, cos, sin, *extra], outputs=3,
                domain=MS, name="attn", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1)
    y = b.matmul(outs[0], WIDTH, 8, name="proj")
    return b.build([y, outs[1], outs[2]] if cache else y)


@pytest.fixture
def whole_kv_groups(monkeypatch):
    """GroupQueryAttention loses whole key/value groups (what the view's prune_kv_groups asks;
    set here so that the tests say which mode they test, whatever a view's default is)."""
    import onnxprune.rules.contrib_attention as rules

    monkeypatch.setattr(rules, "_whole_kv_groups", lambda view: True)


def _gqa_feeds(model):
    rng = np.random.default_rng(6)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


@pytest.mark.parametrize("packed, sink", [(False, False), (True, False), (False, True)])
def test_group_query_attention_loses_a_key_value_head_with_its_query_heads(packed, sink, whole_kv_groups):
    model = gqa_model(packed, sink=sink)
    feeds = _gqa_feeds(model)
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "qkv" if packed else "q")
    if not packed:
        assert heads is group_of(analysis, "k") is group_of(analysis, "v")
    assert heads.kind == "heads" and len(heads.unit_members()) == KV_HEADS
    last = heads.unit_members()[1]
    keep = sorted(set(range(heads.size)) - set(last.tolist()))
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {heads.id: keep}), feeds=feeds)
    attn = nodes_of(result.model, "GroupQueryAttention")[0]
    assert (attr_of(attn, "num_heads"), attr_of(attn, "kv_num_heads")) == (HEADS // KV_HEADS, 1)
    report = next(g for g in result.report.groups if g.id == heads.id)
    assert (report.units_before, report.units_after) == (HEADS, HEADS // 2)  # query heads, not packed columns
    dims = {t.name.split("_")[0]: t.dims for t in result.model.graph.initializer}
    if packed:
        assert dims["qkv.W"] == [WIDTH, (WIDTH + 2 * KV_HEADS * HEAD) // 2]
    else:
        assert (dims["q.W"], dims["k.W"]) == ([WIDTH, WIDTH // 2], [WIDTH, HEAD])
    if sink:
        assert dims["attn.sink"] == [HEADS // 2]
    _executor_matches_onnxruntime(model, feeds)


def test_group_query_attention_cache_changes_only_with_allow_io_change(whole_kv_groups):
    model = gqa_model(cache=True)
    feeds = _gqa_feeds(model)
    held = group_of(onnxprune.analyse(model), "q")
    assert not held.prunable and any("past_key" in r and "allow_io_change" in r for r in held.blocked)
    result = onnxprune.prune(model, 0.5, allow_io_change=True)
    caches = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in result.model.graph.input}
    assert caches["past_key"] == [1, 1, 1, HEAD]
    smaller = {k: (v[:, :1] if k.startswith("past") else v) for k, v in feeds.items()}
    y, present_key, _ = run(result.model, smaller)
    assert y.shape == (1, S, 8) and present_key.shape == (1, 1, S + 1, HEAD)
    _executor_matches_onnxruntime(model, feeds)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_passes_whole_heads(interleaved):
    b = GraphBuilder(17)
    x = b.input("x", [B, S, HIDDEN])
    cos, sin = _rotary_caches(b, HIDDEN // HEADS // 2)
    positions = b.const(np.tile(np.arange(S), (B, 1)).astype(np.int64))
    r = b.op("RotaryEmbedding", [b.matmul(x, HIDDEN, HIDDEN, name="q"), positions, cos, sin], domain=MS,
             name="rope", num_heads=HEADS, interleaved=interleaved)
    model = b.build(b.matmul(r, HIDDEN, 8, name="proj"))
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "q")
    assert heads.kind == "heads" and len(heads.unit_members()) == HEADS
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {heads.id: list(range(4, 12))}))
    assert attr_of(nodes_of(result.model, "RotaryEmbedding")[0], "num_heads") == 2
    _executor_matches_onnxruntime(model, {"x": np.random.default_rng(7).standard_normal((B, S, HIDDEN), np.float32)})


def test_shapes_of_contrib_ops_leave_no_file_behind(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference writes sym_shape_infer_temp.onnx to the current
    directory where a shape stays unknown (as in a GroupQueryAttention without a past): not here."""
    monkeypatch.chdir(tmp_path)
    model = gqa_model()
    onnxprune.prune(model, 0.5)
    assert listing(tmp_path) == set()


# --- a decoder as onnxruntime-genai's model builder writes it ---------------------------------------

LLM_HIDDEN, LLM_FF, VOCAB, PAST = 64, 128, 100, 1


def builder_decoder() -> onnx.ModelProto:
    """One layer as the model builder writes it: SimplifiedLayerNormalization (default domain),
    a packed q/k/v MatMul, GroupQueryAttention with rotary and a cache (past_key_values.0.key/value
    in, present.0.key/value out), SkipSimplifiedLayerNormalization, a SiLU-gated MLP, lm_head;
    seqlens_k is the mask's sum - 1, the total length its width (verification feeds a mask of ones)."""
    b = GraphBuilder(21, name="decoder")
    b.inputs.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, S]))
    b.inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, S + PAST]))
    past = [b.input(f"past_key_values.0.{n}", [1, KV_HEADS, PAST, HEAD]) for n in ("key", "value")]
    h0 = b.op("Gather", [b.weight((VOCAB, LLM_HIDDEN), "embed"), "input_ids"], name="embed_tokens")
    ones = b.op("ReduceSum", ["attention_mask", b.ints([1])], keepdims=0)
    lengths = b.op("Cast", [b.op("Sub", [ones, b.ints([1])])], to=TensorProto.INT32)
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", ["attention_mask"]), b.ints(1)], axis=0)],
                 to=TensorProto.INT32)
    n1 = b.op("SimplifiedLayerNormalization", [h0, b.floats(np.ones(LLM_HIDDEN))], name="input_layernorm",
              axis=-1, epsilon=1e-5)
    qkv = b.matmul(n1, LLM_HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD, name="qkv_proj")
    cos, sin = _rotary_caches(b, HEAD // 2)
    attn, key, value = b.op("GroupQueryAttention", [qkv, "", "", *past, lengths, total, cos, sin], outputs=3,
                            domain=MS, name="attn", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1)
    norm = b.op("SkipSimplifiedLayerNormalization", [b.matmul(attn, WIDTH, LLM_HIDDEN, name="o_proj"), h0,
                                                     b.floats(np.ones(LLM_HIDDEN))], outputs=4, domain=MS,
                name="post_attention_layernorm", epsilon=1e-5)
    gate, up = (b.matmul(norm[0], LLM_HIDDEN, LLM_FF, name=n) for n in ("gate_proj", "up_proj"))
    silu = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
    down = b.matmul(silu, LLM_FF, LLM_HIDDEN, name="down_proj")
    final = b.op("SkipSimplifiedLayerNormalization", [down, norm[3], b.floats(np.ones(LLM_HIDDEN))], outputs=4,
                 domain=MS, name="norm", epsilon=1e-5)
    b.op("MatMul", [final[0], b.weight((LLM_HIDDEN, VOCAB), "lm_head.W")], name="lm_head")
    renamed = {b.nodes[-1].output[0]: "logits", key: "present.0.key", value: "present.0.value"}
    for n in b.nodes:
        n.output[:] = [renamed.get(o, o) for o in n.output]
        if n.op_type == "SkipSimplifiedLayerNormalization":  # unused optional outputs unnamed, as written
            n.output[1] = n.output[2] = ""
            if n.name == "norm":
                n.output[3] = ""
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, S, VOCAB])]
    outputs += [helper.make_tensor_value_info(f"present.0.{n}", TensorProto.FLOAT, [1, KV_HEADS, S + PAST, HEAD])
                for n in ("key", "value")]
    graph = helper.make_graph(b.nodes, "decoder", b.inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)],
                             ir_version=10)


@pytest.mark.parametrize("int4", [False, True])
def test_model_builder_decoder_prunes_from_the_command_line(tmp_path, capsys, int4, whole_kv_groups):
    model = builder_decoder()
    if int4:  # what -p int4 writes: every MatMul as MatMulNBits
        import logging

        quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
        logging.disable(logging.INFO)
        try:
            q = quantizer.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True)
            q.process()
        finally:
            logging.disable(logging.NOTSET)
        model = q.model.model
        assert not nodes_of(model, "MatMul")
    onnx.save(model, tmp_path / "model.onnx")
    code, out, err = run_main(capsys, tmp_path / "model.onnx", "--structured", "0.3", "-o", tmp_path / "mlp.onnx")
    assert code == 0, err
    assert "--allow-io-change lets them change its shape" in out
    mlp = next(line for line in out.splitlines() if "gate_proj" in line and "pruned" in line)
    assert f"128 -> {96 if int4 else 88}" in mlp  # 89.6 asked: a multiple of 8 by default; int4: whole blocks of 32
    code, out, err = run_main(capsys, tmp_path / "model.onnx", "--structured", "0.3", "--allow-io-change",
                              "-o", tmp_path / "heads.onnx")
    assert code == 0, err
    pruned = onnx.load(tmp_path / "heads.onnx")
    attn = nodes_of(pruned, "GroupQueryAttention")[0]
    assert (attr_of(attn, "num_heads"), attr_of(attn, "kv_num_heads")) == (HEADS // KV_HEADS, 1)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in pruned.graph.input}
    assert shapes["past_key_values.0.key"] == [1, 1, PAST, HEAD]


@pytest.mark.slow
def test_fused_bert_classifier_prunes_its_hidden_size_like_its_export(tmp_path, capsys):
    """--prune-hidden through SkipLayerNormalization and EmbedLayerNormalization (tables' columns)."""
    torch = pytest.importorskip("torch")
    from test_transformers import Logits

    transformers, config = _bert_config(2)
    torch.manual_seed(0)
    folder = export_and_fuse(tmp_path, Logits(transformers.BertForSequenceClassification(config)).eval())
    params = {}
    for name in ("bert", "fused"):
        code, out, err = run_main(capsys, folder / f"{name}.onnx", "--structured", "0.5", "--prune-hidden",
                                  "--input-shape", "input_ids:2,16", "--input-shape", "attention_mask:2,16",
                                  "-o", folder / f"{name}.pruned.onnx", "--report", folder / f"{name}.json")
        assert code == 0, err
        report = json.loads((folder / f"{name}.json").read_text())
        params[name] = report["params_before"] / report["params_after"]
    assert params["fused"] >= 2.5 and params["fused"] == pytest.approx(params["bert"], rel=0.01)
    pruned = onnx.load(folder / "fused.pruned.onnx")
    embed = nodes_of(pruned, "EmbedLayerNormalization")[0]
    tables = {t.name: t.dims for t in pruned.graph.initializer}
    assert tables[embed.input[2]] == [500, 32]  # the word embeddings lost half the hidden size


@pytest.mark.slow
def test_dynamo_bert_at_opset_23_prunes_heads_through_the_standard_attention(tmp_path):
    """torch.onnx's dynamo exporter at opset 23 writes sdpa as the ONNX Attention op (on
    (batch, heads, sequence, head size), with the padding mask as a bias)."""
    torch = pytest.importorskip("torch")
    from test_transformers import bert

    torch.manual_seed(0)
    model, names = bert()
    args = (torch.randint(0, 500, (2, 16)), torch.ones(2, 16, dtype=torch.long))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        torch.onnx.export(model.eval(), args, str(tmp_path / "bert.onnx"), input_names=names, output_names=["hidden"],
                          dynamo=True, external_data=False, opset_version=23)
    exported = onnx.load(tmp_path / "bert.onnx")
    assert len(nodes_of(exported, "Attention")) == 4
    result = onnxprune.prune(exported, 0.3)
    check_valid(exported, result.model)
    heads = [g for g in result.report.groups if g.kind == "heads"]
    assert len(heads) == 4 and all(g.channels_after < g.channels_before for g in heads)
    feeds = {"input_ids": np.random.default_rng(8).integers(0, 500, (2, 16)),
             "attention_mask": np.array([[1] * 16, [1] * 10 + [0] * 6], np.int64)}
    _executor_matches_onnxruntime(exported, feeds)


def _int4(model: onnx.ModelProto, exclude=()) -> onnx.ModelProto:
    """The model with its MatMuls as MatMulNBits (4 bits, blocks of 32), as the model builder's
    -p int4 writes them, but for ``exclude``."""
    import logging

    quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    logging.disable(logging.INFO)
    try:
        q = quantizer.MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, nodes_to_exclude=list(exclude))
        q.process()
    finally:
        logging.disable(logging.NOTSET)
    return q.model.model


def _second_query_heads(heads) -> list[int]:
    """The group's channels without its second unit: query heads 1 and 3 (the second of each group)."""
    second = heads.unit_members()[1]
    assert sorted(set(second.tolist())) == [*range(HEAD, 2 * HEAD), *range(3 * HEAD, 4 * HEAD)]
    return sorted(set(range(heads.size)) - set(second.tolist()))


@pytest.mark.parametrize("packed, int4, sink", [(False, False, False), (True, False, False), (False, True, False),
                                                (True, True, False), (True, False, True)])
def test_group_query_attention_loses_query_heads_within_groups_by_default(packed, int4, sink):
    """Without `prune_kv_groups` (the default): the r-th query head of every group is one unit;
    keys, values and the cache stay (of packed q/k/v the key and value columns: they leave the
    projection's group); num_heads is rewritten, kv_num_heads kept; the pruned model equals the
    original with the removed heads' o-projection rows zeroed. The q/k/v projections are MatMul or
    MatMulNBits (N sliced with its packed rows and scales); the o-projection stays a MatMul (the
    rows zeroed for the reference). Head sinks go with their query heads."""
    model = gqa_model(packed, sink=sink)
    if int4:
        model = _int4(model, exclude=["proj"])
    feeds = _gqa_feeds(model)
    analysis = onnxprune.analyse(model)
    suffix = "_Q4" if int4 else ""
    heads = group_of(analysis, ("qkv" if packed else "q") + suffix)
    assert heads.prunable and heads.size == WIDTH and len(heads.unit_members()) == HEADS // KV_HEADS
    if not packed:
        assert any(KV_WHOLE in r for r in group_of(analysis, "k" + suffix).blocked)
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {heads.id: _second_query_heads(heads)}),
                                 feeds=feeds)
    attn = nodes_of(result.model, "GroupQueryAttention")[0]
    assert (attr_of(attn, "num_heads"), attr_of(attn, "kv_num_heads")) == (HEADS // 2, KV_HEADS)
    report = next(g for g in result.report.groups if g.id == heads.id)
    assert (report.units_before, report.units_after) == (HEADS, HEADS // 2)  # heads, not channels
    columns = WIDTH // 2 + (2 * KV_HEADS * HEAD if packed else 0)
    if int4:
        projection = next(n for n in result.model.graph.node if n.name == heads.sources[0])
        assert attr_of(projection, "N") == columns
    else:
        dims = {t.name.split("_")[0]: t.dims for t in result.model.graph.initializer}
        assert dims["qkv.W" if packed else "q.W"] == [WIDTH, columns]
        if sink:
            assert dims["attn.sink"] == [HEADS // 2]
    if not int4:
        _executor_matches_onnxruntime(model, feeds)


def test_group_query_attention_packed_with_a_cache_keeps_the_cache_without_allow_io_change():
    """Query heads within groups leave keys, values and the cache whole: the interface stays."""
    model = gqa_model(packed=True, cache=True)
    result, _, _ = prune_checked(model, 0.5, feeds=_gqa_feeds(model))
    attn = nodes_of(result.model, "GroupQueryAttention")[0]
    assert (attr_of(attn, "num_heads"), attr_of(attn, "kv_num_heads")) == (HEADS // 2, KV_HEADS)
    assert io_signature(result.model) == io_signature(model)


def grouped_standard_attention(head_axis: bool):
    """q (4 heads), k, v (2 heads) projections -> the standard Attention (opset 23) -> MatMul, on
    (batch, sequence, heads x head size) with q_num_heads / kv_num_heads, or on (batch, heads,
    sequence, head size) as the dynamo exporter writes sdpa (Reshape and Transpose around it)."""
    b = GraphBuilder(23)
    x = b.input("x", [B, S, WIDTH])
    projections = [b.matmul(x, WIDTH, heads * HEAD, name=n) for n, heads in (("q", HEADS), ("k", KV_HEADS),
                                                                            ("v", KV_HEADS))]
    if not head_axis:
        a = b.op("Attention", projections, name="attn", q_num_heads=HEADS, kv_num_heads=KV_HEADS, is_causal=1)
        return b.build(b.matmul(a, WIDTH, 8, name="proj"))
    q, k, v = (b.op("Transpose", [b.op("Reshape", [t, b.ints([B, S, heads, HEAD])])], perm=[0, 2, 1, 3])
               for t, heads in zip(projections, (HEADS, KV_HEADS, KV_HEADS)))
    a = b.op("Attention", [q, k, v], name="attn", is_causal=1)
    merged = b.op("Reshape", [b.op("Transpose", [a], perm=[0, 2, 1, 3]), b.ints([B, S, WIDTH])])
    return b.build(b.matmul(merged, WIDTH, 8, name="proj"))


@pytest.mark.parametrize("head_axis", [False, True])
def test_standard_attention_with_fewer_key_value_heads_loses_query_heads_within_groups(head_axis):
    model = grouped_standard_attention(head_axis)
    feeds = {"x": np.random.default_rng(9).standard_normal((B, S, WIDTH), np.float32)}
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "q")
    assert heads.prunable and len(heads.unit_members()) == HEADS // KV_HEADS
    assert any(KV_WHOLE in r for r in group_of(analysis, "k").blocked)
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {heads.id: _second_query_heads(heads)}),
                                 feeds=feeds)
    report = next(g for g in result.report.groups if g.id == heads.id)
    assert (report.units_before, report.units_after) == (HEADS, HEADS // 2)
    attn = next(n for n in result.model.graph.node if n.name == "attn")
    if not head_axis:
        assert (attr_of(attn, "q_num_heads"), attr_of(attn, "kv_num_heads")) == (HEADS // 2, KV_HEADS)
    assert [t.dims for t in result.model.graph.initializer if t.name.startswith("q.W")] == [[WIDTH, WIDTH // 2]]
    _executor_matches_onnxruntime(model, feeds)


@pytest.mark.parametrize("head_axis", [False, True])
def test_standard_attention_with_whole_kv_groups_loses_a_key_value_head_with_its_query_heads(head_axis,
                                                                                          whole_kv_groups):
    model = grouped_standard_attention(head_axis)
    analysis = onnxprune.analyse(model)
    heads = group_of(analysis, "q")
    assert heads is group_of(analysis, "k") is group_of(analysis, "v")
    assert heads.prunable and len(heads.unit_members()) == KV_HEADS
    last = heads.unit_members()[1]
    keep = sorted(set(range(heads.size)) - set(last.tolist()))
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {heads.id: keep}),
                                 feeds={"x": np.random.default_rng(9).standard_normal((B, S, WIDTH), np.float32)})
    dims = {t.name.split("_")[0]: t.dims for t in result.model.graph.initializer}
    assert (dims["q.W"], dims["k.W"]) == ([WIDTH, WIDTH // 2], [WIDTH, HEAD])
    if not head_axis:
        attn = next(n for n in result.model.graph.node if n.name == "attn")
        assert (attr_of(attn, "q_num_heads"), attr_of(attn, "kv_num_heads")) == (HEADS // 2, 1)

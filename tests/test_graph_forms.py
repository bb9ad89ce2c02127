"""Graph forms that real exporters produce: weights as Constant nodes (paddle2onnx), weights
stored in float16 behind a Cast, NHWC graphs with Transposes around convolutions (tf2onnx),
Reshape targets built by Concat, external data, and quantized models (QDQ read; int8 weights
behind a Cast refused cleanly)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import UnsupportedModel

from graphs import GraphBuilder, check_valid, make_feeds, prune_checked, run


def small_cnn(seed=0) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    h = b.op("Relu", [b.conv(h, 8, 8, name="conv2")])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    return b.build(b.gemm(h, 8, 4, name="head"))


def initializers_as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """What paddle2onnx writes: every weight is a Constant node, no initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
                 for t in out.graph.initializer]
    nodes = constants + list(out.graph.node)
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def test_weights_as_constant_nodes_prune_like_initializers():
    model = initializers_as_constant_nodes(small_cnn())
    onnx.checker.check_model(model, full_check=True)
    result, _, _ = prune_checked(model, 0.5)
    assert result.report.macs_after < result.report.macs_before
    assert sum(g.channels_after < g.channels_before for g in result.report.groups) == 2


def fp16_weights_behind_cast() -> onnx.ModelProto:
    b = GraphBuilder(seed=2)
    x = b.input("x", ["N", 3, 8, 8])

    def conv(h, cin, cout, name):
        w = b.const((b.rng.standard_normal((cout, cin, 3, 3)) / 4).astype(np.float16), f"{name}.W16")
        w32 = b.op("Cast", [w], name=f"{name}_cast", to=TensorProto.FLOAT)
        return b.op("Conv", [h, w32], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    h = b.op("Relu", [conv(x, 3, 8, "conv1")])
    return b.build(conv(h, 8, 4, "conv2"))


def test_float16_weights_behind_cast_are_pruned_and_stay_float16():
    model = fp16_weights_behind_cast()
    result = onnxprune.prune(model, 0.5)
    check_valid(model, result.model)
    pruned = {t.name: t for t in result.model.graph.initializer}
    assert all(t.data_type == TensorProto.FLOAT16 for t in pruned.values())
    assert sorted(tuple(t.dims) for t in pruned.values()) == [(4, 3, 3, 3), (4, 4, 3, 3)]
    # conv1 loses 4 filters; the reference zeroes conv2's matching inputs
    removed = np.setdiff1d(np.arange(8), result.plan.keep[next(iter(result.plan.keep))])
    w2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv2.W16")).copy()
    w2[:, removed] = 0
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    for t in reference.graph.initializer:
        if t.name == "conv2.W16":
            t.CopyFrom(numpy_helper.from_array(w2, "conv2.W16"))
    feeds = make_feeds(model)
    np.testing.assert_allclose(run(result.model, feeds)[0], run(reference, feeds)[0], rtol=1e-3, atol=1e-3)


def nhwc_model() -> onnx.ModelProto:
    """tf2onnx's shape of a Keras CNN: NHWC input, Transposes around each Conv, bias added in NHWC."""
    b = GraphBuilder(seed=4)
    x = b.input("x", ["N", 8, 8, 3])

    def conv_nhwc(h, cin, cout, name):
        t = b.op("Transpose", [h], perm=[0, 3, 1, 2])
        c = b.conv(t, cin, cout, bias=False, name=name)
        back = b.op("Transpose", [c], perm=[0, 2, 3, 1])
        return b.op("Relu", [b.op("Add", [back, b.weight((cout,), f"{name}.bias", fan_in=4)])])

    h = conv_nhwc(conv_nhwc(x, 3, 8, "conv1"), 8, 8, "conv2")
    h = b.op("ReduceMean", [h], axes=[1, 2], keepdims=0)
    return b.build(b.matmul(h, 8, 4, name="dense"), check=True)


def test_nhwc_graph_with_transposes_prunes():
    result, _, _ = prune_checked(nhwc_model(), 0.5)
    assert sum(g.channels_after < g.channels_before for g in result.report.groups) == 2


def test_reshape_target_built_by_concat_is_rewritten():
    """Reshape(x, Concat(Shape(x)[0:1], [C, H*W])): the constant piece holding C is recomputed."""
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 4, 4])
    h = b.conv(x, 3, 8, name="conv1")
    batch = b.op("Slice", [b.op("Shape", [h]), b.ints([0]), b.ints([1])])
    target = b.op("Concat", [batch, b.ints([8, 16])], axis=0)
    flat = b.op("Reshape", [h, target])  # (N, 8, 16)
    h = b.op("Transpose", [flat], perm=[0, 2, 1])  # (N, 16, 8)
    model = b.build(b.matmul(h, 8, 4, name="proj"))
    result, _, _ = prune_checked(model, 0.5)
    out = run(result.model, {"x": np.ones((3, 3, 4, 4), np.float32)})[0]
    assert out.shape == (3, 16, 4)  # the batch entry stays computed: other batch sizes run


def attention_with_flattened_key_transpose(from_shape: bool = True) -> onnx.ModelProto:
    """Attention whose k.transpose(-2, -1) is written as the dynamo exporter's sdpa writes it with
    dynamic shapes: Reshape(k, [-1, T, d]) -> Transpose(0, 2, 1) -> Reshape(back, from Shape(k))."""
    b = GraphBuilder()
    x = b.input("x", [2, 5, 16])

    def heads(name):  # (2, 5, 16) -> (2, 4 heads, 5, 4)
        return b.op("Transpose", [b.op("Reshape", [b.matmul(x, 16, 16, name=name), b.ints([2, 5, 4, 4])])],
                    perm=[0, 2, 1, 3])

    q, k, v = heads("q"), heads("k"), heads("v")
    shape = b.op("Shape", [k])
    last = b.op("Slice", [shape, b.ints([-1]), b.ints([2 ** 62])])
    second = b.op("Slice", [shape, b.ints([-2]), b.ints([-1])])
    lead = b.op("Slice", [shape, b.ints([-2 ** 62]), b.ints([-2])]) if from_shape else b.ints([2, 4])
    flat = b.op("Reshape", [k, b.op("Concat", [b.ints([-1]), second, last], axis=0)])
    kt = b.op("Reshape", [b.op("Transpose", [flat], perm=[0, 2, 1]), b.op("Concat", [lead, last, second], axis=0)])
    att = b.op("MatMul", [b.op("Softmax", [b.op("MatMul", [q, kt])], axis=-1), v])
    merged = b.op("Reshape", [b.op("Transpose", [att], perm=[0, 2, 1, 3]), b.ints([2, 5, 16])])
    return b.build(b.matmul(merged, 16, 16, name="out"))


def test_flattened_key_transpose_is_one_transpose_and_heads_prune():
    model = attention_with_flattened_key_transpose()
    heads = next(g for g in onnxprune.analyse(model).groups if "q" in g.sources)
    assert heads.prunable and heads.kind == "heads" and len(heads.unit_members()) == 4
    result, _, _ = prune_checked(model, 0.5)
    ops = [n.op_type for n in result.model.graph.node]
    assert "Shape" not in ops and ops.count("Reshape") == 4  # the sandwich became Transpose(perm 0, 1, 3, 2)
    assert any(n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 1, 3, 2] for n in result.model.graph.node)


def test_flattened_transpose_restored_from_constants_is_left_as_written():
    model = attention_with_flattened_key_transpose(from_shape=False)
    result, _, _ = prune_checked(model, 0.5, macs_drop=False)
    assert sum(n.op_type == "Transpose" for n in result.model.graph.node) == \
        sum(n.op_type == "Transpose" for n in model.graph.node)


def channel_shuffle_model(groups: int = 2) -> onnx.ModelProto:
    """ShuffleNet's channel shuffle: two branches concatenated, Reshape (g, C/g) -> Transpose -> Reshape."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    branches = [b.op("Relu", [b.conv(x, 3, 12 // groups, name=f"branch{k}")]) for k in range(groups)]
    h = b.op("Concat", branches, axis=1)
    h = b.op("Reshape", [h, b.ints([1, groups, 12 // groups, 6, 6])])
    h = b.op("Reshape", [b.op("Transpose", [h], perm=[0, 2, 1, 3, 4]), b.ints([1, 12, 6, 6])])
    return b.build(b.conv(h, 12, 4, name="after"))


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_becomes_a_reordering_and_both_branches_prune(groups):
    model = channel_shuffle_model(groups)
    analysis = onnxprune.analyse(model)
    assert all(next(g for g in analysis.groups if f"branch{k}" in g.sources).prunable for k in range(groups))
    result, _, _ = prune_checked(model, 0.5)
    gathers = [n for n in result.model.graph.node if n.op_type == "Gather"]
    assert len(gathers) == 1 and not any(n.op_type == "Transpose" for n in result.model.graph.node)
    order = numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == gathers[0].input[1]))
    assert sorted(order.tolist()) == list(range(len(order))) and len(order) < 12  # renumbered, still a permutation


def test_gather_of_repeated_channels_is_a_barrier():
    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    h = b.op("Relu", [b.conv(x, 3, 4, name="conv")])
    h = b.op("Gather", [h, b.ints([0, 1, 1, 3])], axis=1)
    model = b.build(b.conv(h, 4, 2, name="after"))
    group = next(g for g in onnxprune.analyse(model).groups if "conv" in g.sources)
    assert any("reads the channels repeatedly" in r for r in group.blocked), group.blocked  # tests/test_gqa.py


def test_external_data_in_and_out(tmp_path, capsys):
    """A model saved with external data (as the dynamo exporter writes it) is read and pruned."""
    path = tmp_path / "ext.onnx"
    onnx.save_model(small_cnn(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    before = (path.read_bytes(), (tmp_path / "ext.onnx.data").read_bytes())
    assert main([str(path), "--structured", "0.5", "-o", str(tmp_path / "out.onnx")]) == 0
    assert (path.read_bytes(), (tmp_path / "ext.onnx.data").read_bytes()) == before
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


# --- quantized models --------------------------------------------------------------------------

def qdq_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=6)
    x = b.input("x", ["N", 3, 8, 8])
    w = b.const(b.rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "w_q")
    wf = b.op("DequantizeLinear", [w, b.floats(0.01), b.const(np.int8(0))], name="dq")
    h = b.op("Conv", [x, wf], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return b.build(h)


def int8_cast_mul_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=7)
    x = b.input("x", ["N", 16])
    w = b.const(b.rng.integers(-100, 100, (16, 8)).astype(np.int8), "w_int8")
    wf = b.op("Mul", [b.op("Cast", [w], to=TensorProto.FLOAT), b.floats(0.02)])
    return b.build(b.op("MatMul", [x, wf]))


def test_int8_weights_dequantized_by_hand_are_refused_with_exit_4(tmp_path, capsys):
    path = tmp_path / "q.onnx"
    onnx.save(int8_cast_mul_model(), path)
    with pytest.raises(UnsupportedModel, match="int8 weights"):
        onnxprune.prune(int8_cast_mul_model(), 0.5)
    code = main([str(path), "--structured", "0.5", "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and len(err) == 1 and "quantized model" in err[0] and "then quantize" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_qdq_model_is_read_not_refused(tmp_path, capsys):
    """QDQ models have rules (tests/test_quantized.py): this one's only conv feeds the graph
    output, so nothing is cut, and the run says so instead of refusing the model."""
    path = tmp_path / "q.onnx"
    onnx.save(qdq_model(), path)
    assert main([str(path), "--structured", "0.5", "-o", str(tmp_path / "out.onnx")]) == 0
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)

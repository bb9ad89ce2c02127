"""Unstructured and N:M sparsity (onnxprune/sparsity.py): which weights become
zero, along which axis, what is left alone and why, and the command line.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import cli
from onnxprune.cut.sparsity import zipped_size

from graphs import GraphBuilder, make_feeds, run, value

# ---------------------------------------------------------------- models

def cnn(scale2: float = 1.0, head: int = 10) -> onnx.ModelProto:
    """conv1 (8->16, 1152 w) -> conv2 (16->32, 4608 w, x scale2) -> GAP -> fc (32->head)."""
    b = GraphBuilder(seed=0)
    x = b.input("x", [1, 8, 6, 6])
    h = b.op("Relu", [b.conv(x, 8, 16, name="conv1")])
    w2 = b.const((scale2 * b.rng.standard_normal((32, 16, 3, 3))).astype(np.float32), "conv2.W")
    h = b.op("Relu", [b.conv(h, 16, 32, name="conv2", w=w2)])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    return b.build(b.gemm(h, 32, head, name="fc", trans_b=1))


WEIGHTS = ["conv1.W", "conv2.W", "fc.W"]  # cnn()'s Conv/Gemm weights (biases: conv1.B, conv2.B, fc.C)


def by_name(report) -> dict:
    return {t.name: t for t in report.tensors}


def runs(array: np.ndarray, axis: int, m: int) -> np.ndarray:
    """Rows of m consecutive elements along ``axis``."""
    return np.moveaxis(array, axis, -1).reshape(-1, m)


def assert_nm(before: np.ndarray, after: np.ndarray, axis: int, n: int, m: int) -> None:
    """Every run along ``axis`` keeps exactly its n largest |w| and zeroes the rest."""
    old, new = runs(before, axis, m), runs(after, axis, m)
    kept = new != 0
    assert (kept.sum(1) == n).all()
    assert np.array_equal(new[kept], old[kept])
    smallest_kept = np.where(kept, np.abs(old), np.inf).min(1)
    largest_dropped = np.where(kept, -np.inf, np.abs(old)).max(1)
    assert (largest_dropped <= smallest_kept).all()


def value_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def single_op(op: str, x_shape, weight: np.ndarray, weight_first: bool = False, **attrs) -> onnx.ModelProto:
    """One node reading input x and a constant weight W (in that order unless ``weight_first``)."""
    inputs = ["W", "x"] if weight_first else ["x", "W"]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], name="node", **attrs)], "one",
        [value_info("x", x_shape)], [value_info("y", None)], [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output[0].CopyFrom(inferred.graph.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model


def rand(*shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- unstructured

def test_unstructured_zeroes_the_exact_fraction_of_each_tensor_smallest_first():
    model = cnn(scale2=10.0, head=40)  # fc: 32x40 = 1280 weights, over the default minimum
    result = onnxprune.sparsify(model, ratio=0.37)
    tensors = by_name(result.report)
    assert sorted(tensors) == ["conv1.W", "conv2.W", "fc.W"]  # biases are never considered
    for name in tensors:
        before, after = value(model, name), value(result.model, name)
        dropped = (after == 0) & (before != 0)
        assert dropped.sum() == round(0.37 * before.size)
        assert np.abs(before[dropped]).max() <= np.abs(before[~dropped]).min()
        assert np.array_equal(after[~dropped], before[~dropped])
        assert tensors[name].zeros_after == dropped.sum()
        assert tensors[name].sparsity == pytest.approx(dropped.sum() / before.size)
        assert tensors[name].pattern == "unstructured" and tensors[name].criterion == "magnitude"
    for bias in ("conv1.B", "conv2.B", "fc.C"):
        assert np.array_equal(value(result.model, bias), value(model, bias))
    assert result.report.ranking == "per-tensor"
    assert result.report.zeros_after == sum(t.zeros_after for t in tensors.values())


def test_global_ranking_zeroes_the_fraction_of_all_weights_together():
    model = cnn(scale2=10.0, head=40)
    result = onnxprune.sparsify(model, ratio=0.3, global_ranking=True)
    before = np.concatenate([value(model, n).ravel() for n in WEIGHTS])
    after = np.concatenate([value(result.model, n).ravel() for n in WEIGHTS])
    dropped = after == 0
    assert dropped.sum() == round(0.3 * before.size)
    assert np.abs(before[dropped]).max() <= np.abs(before[~dropped]).min()
    tensors = by_name(result.report)
    # conv2's weights are 10x larger: ranked together, it keeps almost all of them.
    assert tensors["conv2.W"].sparsity < 0.05 < 0.5 < tensors["conv1.W"].sparsity
    assert result.report.ranking == "global"


def test_ties_go_to_the_earlier_position():
    b = GraphBuilder()
    y = b.op("MatMul", [b.input("x", [2, 64]), b.const(np.ones((64, 32), np.float32), "W")])
    model = b.build(y)
    after = value(onnxprune.sparsify(model, ratio=0.25).model, "W").ravel()
    assert np.array_equal(np.flatnonzero(after == 0), np.arange(round(0.25 * after.size)))


def test_zero_ratio_returns_the_model_itself():
    model = cnn()
    result = onnxprune.sparsify(model, ratio=0.0)
    assert result.model is model
    assert result.report.zeros_after == 0


# ---------------------------------------------------------------- N:M layout

W_CONV = rand(12, 8, 3, 3)
NM_CASES = {
    # name: (model, weight axis, another axis of a multiple-of-4 size)
    "conv": (lambda: single_op("Conv", [1, 8, 5, 5], W_CONV, pads=[1] * 4), 1, 0),
    "grouped-conv": (lambda: single_op("Conv", [1, 16, 5, 5], W_CONV, group=2), 1, 0),
    "conv-transpose-grouped": (lambda: single_op("ConvTranspose", [1, 16, 5, 5], rand(16, 4, 3, 3), group=2), 0, 1),
    "gemm-transB-0": (lambda: single_op("Gemm", [2, 8], rand(8, 12)), 0, 1),
    "gemm-transB-1": (lambda: single_op("Gemm", [2, 8], rand(12, 8), transB=1), 1, 0),
    "gemm-weight-as-A": (lambda: single_op("Gemm", [8, 3], rand(12, 8), weight_first=True), 1, 0),
    "gemm-weight-as-A-transA": (lambda: single_op("Gemm", [8, 3], rand(8, 12), weight_first=True, transA=1), 0, 1),
    "matmul-weight-right": (lambda: single_op("MatMul", [2, 8], rand(8, 12)), 0, 1),
    "matmul-weight-left": (lambda: single_op("MatMul", [8, 3], rand(12, 8), weight_first=True), 1, 0),
    "matmul-batched-right": (lambda: single_op("MatMul", [4, 2, 8], rand(4, 8, 12)), 1, 2),
}


@pytest.mark.parametrize("case", NM_CASES)
def test_nm_pattern_holds_along_the_reduction_axis(case):
    build, axis, other = NM_CASES[case]
    model = build()
    result = onnxprune.sparsify(model, nm="2:4", min_elements=0)
    before, after = value(model, "W"), value(result.model, "W")
    assert_nm(before, after, axis, 2, 4)
    assert ((runs(after, other, 4) != 0).sum(1) > 2).any(), "the pattern must not hold along another axis"
    (report,) = result.report.tensors
    assert report.pattern == f"2:4 along axis {axis}" and report.skipped is None
    assert report.sparsity == 0.5
    run(result.model, make_feeds(result.model))  # still a valid model for onnxruntime


@pytest.mark.parametrize("nm", ["1:4", "3:8", "1:2"])
def test_other_nm_ratios(nm):
    n, m = map(int, nm.split(":"))
    model = single_op("Gemm", [2, 16], rand(24, 16), transB=1)
    result = onnxprune.sparsify(model, nm=nm, min_elements=0)
    assert_nm(value(model, "W"), value(result.model, "W"), 1, n, m)
    assert result.report.pattern == nm


def test_reduction_size_not_a_multiple_of_m_is_skipped():
    model = single_op("Conv", [1, 6, 5, 5], rand(12, 6, 3, 3))
    result = onnxprune.sparsify(model, nm="2:4", min_elements=0)
    assert result.model is model
    (report,) = result.report.tensors
    assert report.skipped == "reduction size 6 (axis 1) is not a multiple of 4"


def test_conv_transpose_runs_do_not_cross_groups():
    # 12 input channels in 2 groups of 6: runs of 4 would straddle the groups.
    model = single_op("ConvTranspose", [1, 12, 5, 5], rand(12, 4, 3, 3), group=2)
    (report,) = onnxprune.sparsify(model, nm="2:4", min_elements=0).report.tensors
    assert "reduction size 6 (axis 0)" in report.skipped


# ---------------------------------------------------------------- scores

def test_scores_override_magnitude():
    model = cnn()
    w = value(model, "conv2.W")
    order = np.arange(w.size, dtype=np.float64).reshape(w.shape)  # keep the last positions
    result = onnxprune.sparsify(model, ratio=0.5, scores={"conv2.W": order})
    after = value(result.model, "conv2.W").ravel()
    assert np.array_equal(np.flatnonzero(after == 0), np.arange(w.size // 2))
    tensors = by_name(result.report)
    assert tensors["conv2.W"].criterion == "scores" and tensors["conv1.W"].criterion == "magnitude"


def test_scores_choose_within_nm_runs():
    w = rand(12, 8)
    position = np.tile(np.arange(8, dtype=np.float64), (12, 1))  # higher along axis 1 = keep
    model = single_op("Gemm", [2, 8], w, transB=1)
    after = value(onnxprune.sparsify(model, nm="2:4", min_elements=0, scores={"W": position}).model, "W")
    expected = w * np.tile([0, 0, 1, 1], 2)
    assert np.array_equal(after, expected)


@pytest.mark.parametrize("scores, message", [
    ({"nope": np.ones(3)}, "not a Conv/ConvTranspose/Gemm/MatMul weight"),
    ({"conv1.B": np.ones(16)}, "not a Conv/ConvTranspose/Gemm/MatMul weight"),
    ({"conv1.W": np.ones(3)}, "shape"),
    ({"conv1.W": np.full((16, 8, 3, 3), np.nan)}, "NaN"),
])
def test_bad_scores_are_usage_errors(scores, message):
    with pytest.raises(onnxprune.UsageError, match=message):
        onnxprune.sparsify(cnn(), ratio=0.5, scores=scores)


def test_global_ranking_needs_scores_for_every_tensor_or_none():
    model = cnn(head=40)
    with pytest.raises(onnxprune.UsageError, match="give scores for all 3"):
        onnxprune.sparsify(model, ratio=0.5, global_ranking=True, scores={"conv1.W": np.ones((16, 8, 3, 3))})


# ---------------------------------------------------------------- which tensors

def test_small_tensors_are_skipped_with_the_reason():
    model = cnn()  # fc: 32x10 = 320 weights
    result = onnxprune.sparsify(model, ratio=0.5)
    fc = by_name(result.report)["fc.W"]
    assert fc.skipped == "320 elements < minimum 1024"
    assert fc.zeros_after == fc.zeros_before == 0 and fc.pattern is None
    assert np.array_equal(value(result.model, "fc.W"), value(model, "fc.W"))
    assert "fc.W" not in [t.name for t in result.report.sparsified]
    assert by_name(onnxprune.sparsify(model, ratio=0.5, min_elements=0).report)["fc.W"].skipped is None


@pytest.mark.parametrize("pattern", ["conv2", "conv2.W", "conv2*"])
def test_ignore_by_node_or_weight_name(pattern):
    model = cnn()
    result = onnxprune.sparsify(model, ratio=0.5, ignore=(pattern,))
    assert by_name(result.report)["conv2.W"].skipped == "ignored (`ignore`)"
    assert np.array_equal(value(result.model, "conv2.W"), value(model, "conv2.W"))
    assert by_name(result.report)["conv1.W"].skipped is None


def test_shared_initializer_is_handled_once():
    b = GraphBuilder()
    w = b.weight((64, 32), "W")
    y1 = b.op("MatMul", [b.input("x1", [2, 64]), w], name="mm1")
    y2 = b.op("MatMul", [b.input("x2", [3, 64]), w], name="mm2")
    model = b.build([y1, y2])
    result = onnxprune.sparsify(model, nm="2:4")
    (report,) = result.report.tensors
    assert report.name == "W" and report.nodes == ["mm1", "mm2"]
    assert [t.name for t in result.model.graph.initializer] == ["W"]
    assert_nm(value(model, "W"), value(result.model, "W"), 0, 2, 4)


def test_tied_embedding_is_left_dense_unless_asked():
    table = rand(128, 32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
         helper.make_node("MatMul", ["h", "E"], ["logits"], name="head")], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2]), value_info("h", [2, 128])],
        [value_info("emb", [2, 32]), value_info("logits", [2, 32])], [numpy_helper.from_array(table, "E")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (report,) = onnxprune.sparsify(model, ratio=0.5).report.tensors
    assert report.skipped == "embedding table (read by Gather embed): left dense by default"
    result = onnxprune.sparsify(model, ratio=0.5, embeddings=True)
    assert (value(result.model, "E") == 0).sum() == table.size // 2
    (report,) = onnxprune.sparsify(model, nm="2:4", embeddings=True).report.tensors
    assert "no reduction axis for N:M" in report.skipped


def test_weight_also_read_as_a_bias_is_skipped():
    b = GraphBuilder()
    w = b.weight((32, 32), "W")
    y = b.op("Add", [b.op("MatMul", [b.input("x", [32, 32]), w], name="mm"), w], name="add")
    result = onnxprune.sparsify(b.build(y), ratio=0.5, min_elements=0)
    assert result.report.tensors[0].skipped == "also read by Add add, not as a weight"


def test_constant_node_and_identity_routed_weights():
    w_const, w_routed = rand(16, 8, 3, 3, seed=2), rand(16, 64, seed=3)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["Wc"], name="const", value=numpy_helper.from_array(w_const, "Wc")),
         helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("Flatten", ["c"], ["f"], name="flat"),
         helper.make_node("Identity", ["Wr"], ["Wr_id"], name="route"),
         helper.make_node("Gemm", ["f", "Wr_id"], ["y"], name="fc", transB=1)], "spelled",
        [value_info("x", [1, 8, 2, 2])], [value_info("y", [1, 16])], [numpy_helper.from_array(w_routed, "Wr")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    result = onnxprune.sparsify(model, nm="2:4")
    assert sorted(t.name for t in result.report.sparsified) == ["Wc", "Wr"]
    assert_nm(w_const, value(result.model, "Wc"), 1, 2, 4)
    assert_nm(w_routed, value(result.model, "Wr"), 1, 2, 4)
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    onnx.checker.check_model(result.model, full_check=True)
    run(result.model, make_feeds(result.model))


# ---------------------------------------------------------------- invariants

@pytest.mark.parametrize("options", [{"ratio": 0.5}, {"nm": "2:4"}, {"ratio": 0.3, "global_ranking": True}])
def test_input_unchanged_and_result_deterministic(options):
    model = cnn(head=40)
    before = model.SerializeToString()
    first = onnxprune.sparsify(model, **options)
    second = onnxprune.sparsify(model, **options)
    assert model.SerializeToString() == before
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert first.report == second.report


def test_zipped_size_matches_deflating_the_file_bytes():
    model = cnn(head=40)
    exact = len(zlib.compress(model.SerializeToString(), 6))
    assert abs(zipped_size(model) - exact) < 0.01 * exact
    report = onnxprune.sparsify(model, ratio=0.5).report
    assert report.zipped_after < 0.75 * report.zipped_before


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1.0}, r"\[0, 1\)"),
    ({"ratio": -0.1}, r"\[0, 1\)"),
    ({"ratio": float("nan")}, r"\[0, 1\)"),
    ({"ratio": "0.5"}, r"\[0, 1\)"),
    ({"nm": "4:2"}, "0 < N < M"),
    ({"nm": "2:2"}, "0 < N < M"),
    ({"nm": "0:4"}, "0 < N < M"),
    ({"nm": "a:b"}, "look like 2:4"),
    ({"nm": "2:4:8"}, "look like 2:4"),
    ({"nm": "2"}, "look like 2:4"),
    ({"ratio": 0.5, "nm": "2:4"}, "exclusive"),
    ({}, "give a sparsity ratio"),
    ({"nm": "2:4", "global_ranking": True}, "global ranking does not apply"),
    ({"ratio": 0.5, "min_elements": -1}, "min_elements"),
])
def test_bad_options_are_usage_errors(kwargs, message):
    with pytest.raises(onnxprune.UsageError, match=message):
        onnxprune.sparsify(cnn(), **kwargs)


# ---------------------------------------------------------------- command line

def run_main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def deflated(path: Path) -> int:
    return len(zlib.compress(Path(path).read_bytes(), 6))


@pytest.fixture
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(cnn(head=40), str(path))
    return path


def test_cli_unstructured_alone(model_path, capsys, tmp_path):
    before = model_path.read_bytes()
    out_path, report_path = tmp_path / "sparse.onnx", tmp_path / "report.json"
    code, out, err = run_main(capsys, model_path, "--unstructured", "0.5", "-o", out_path, "--report", report_path)
    assert code == 0, err
    assert model_path.read_bytes() == before
    assert "sparsity unstructured 0.5 per-tensor: " in out and "(50.0%) in 3 tensor(s), 0 skipped" in out
    assert "groups" not in out  # no structured step
    written = onnx.load(str(out_path))
    onnx.checker.check_model(written, full_check=True)
    for name in WEIGHTS:
        assert (value(written, name) == 0).mean() == pytest.approx(0.5, abs=1e-3)
    outputs = run(written, make_feeds(written))
    assert all(np.isfinite(o).all() for o in outputs)

    data = json.loads(report_path.read_text())
    assert data["schema_version"] == 1 and data["importance"] == "none" and data["ratio"] is None
    sparsity = data["sparsity"]
    assert {"pattern", "ratio", "ranking", "min_elements", "tensors", "elements", "zeros_before", "zeros_after",
            "zipped_before", "zipped_after"} <= set(sparsity)
    assert set(sparsity["tensors"][0]) == {"name", "nodes", "shape", "elements", "zeros_before", "zeros_after",
                                           "sparsity", "pattern", "criterion", "skipped"}
    assert set(data["output_error"]) == {"fc_out"} and math.isfinite(data["output_error"]["fc_out"])
    # The zeros shrink the zipped file, and the report's figure is the file's.
    assert deflated(out_path) < 0.75 * deflated(model_path)
    assert sparsity["zipped_after"] == pytest.approx(deflated(out_path), rel=0.01)
    assert sparsity["zipped_before"] == pytest.approx(deflated(model_path), rel=0.01)


def test_cli_nm_alone_verbose_table(model_path, capsys, tmp_path):
    code, out, err = run_main(capsys, model_path, "--nm", "2:4", "-o", tmp_path / "nm.onnx", "-v",
                              "--min-elements", "2000")
    assert code == 0, err
    lines = out.splitlines()
    row = next(line for line in lines if line.lstrip().startswith("conv2.W"))
    assert "32x16x3x3" in row and "4608" in row and "50.0%" in row and "2:4 along axis 1" in row
    row = next(line for line in lines if line.lstrip().startswith("conv1.W"))
    assert "skipped: 1152 elements < minimum 2000" in row
    assert_nm(value(cnn(head=40), "conv2.W"), value(onnx.load(str(tmp_path / "nm.onnx")), "conv2.W"), 1, 2, 4)


def test_cli_structured_then_nm(model_path, capsys, tmp_path):
    out_path, report_path = tmp_path / "both.onnx", tmp_path / "both.json"
    code, out, err = run_main(capsys, model_path, "--structured", "0.5", "--nm", "2:4", "--min-elements", "0",
                              "-o", out_path, "--report", report_path)
    assert code == 0, err
    data = json.loads(report_path.read_text())
    assert data["params_after"] < data["params_before"]
    assert data["sparsity"]["pattern"] == "2:4"
    written = onnx.load(str(out_path))
    conv2 = value(written, next(n for n in written.graph.node if n.name == "conv2").input[1])
    assert conv2.shape == (16, 8, 3, 3)  # 16 -> 8 input channels and 32 -> 16 filters, then 2:4 along axis 1
    assert ((runs(conv2, 1, 4) != 0).sum(1) == 2).all()
    assert data["output_error"] and all(math.isfinite(e) for e in data["output_error"].values())


def test_cli_unchanged_copy_when_nothing_qualifies(model_path, capsys, tmp_path):
    out_path = tmp_path / "same.onnx"
    code, out, err = run_main(capsys, model_path, "--nm", "2:4", "--min-elements", "100000", "-o", out_path)
    assert code == 0, err
    # the same model (written one initializer at a time, model/publish.py: the bytes may be ordered otherwise)
    assert onnx.load(out_path).SerializeToString() == onnx.load(model_path).SerializeToString()
    assert out_path.stat().st_size == model_path.stat().st_size
    assert "in 0 tensor(s), 3 skipped" in out


@pytest.mark.parametrize("args", [
    pytest.param(["--unstructured", "1"], id="ratio-1"),
    pytest.param(["--unstructured", "nan"], id="ratio-nan"),
    pytest.param(["--unstructured", "-0.5"], id="ratio-negative"),
    pytest.param(["--unstructured", "x"], id="ratio-text"),
    pytest.param(["--nm", "4:2"], id="nm-reversed"),
    pytest.param(["--nm", "2:2"], id="nm-equal"),
    pytest.param(["--nm", "0:4"], id="nm-zero"),
    pytest.param(["--nm", "24"], id="nm-no-colon"),
    pytest.param(["--nm", "2:4", "--unstructured", "0.5"], id="both-patterns"),
    pytest.param(["--nm", "2:4", "--global"], id="nm-global"),
    pytest.param(["--unstructured", "0.5", "--min-elements", "-1"], id="min-elements-negative"),
    pytest.param(["--min-elements", "10"], id="nothing-to-do"),
])
def test_cli_bad_values_exit_2(model_path, capsys, tmp_path, args):
    code, _, err = run_main(capsys, model_path, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_prune_file_api(model_path, tmp_path):
    report = onnxprune.prune_file(model_path, tmp_path / "api.onnx", unstructured=0.5, global_ranking=True)
    assert report.written and report.sparsity.ranking == "global"
    assert report.sparsity.zeros_after == round(0.5 * report.sparsity.elements)


@pytest.mark.parametrize("seed", range(5))
def test_lowest_matches_a_stable_sort(seed):
    from onnxprune.cut.sparsity import lowest

    rng = np.random.default_rng(seed)
    flat = rng.integers(0, 6, size=200).astype(np.float32)  # many ties
    for k in (0, 1, 37, 100, 200):
        expected = np.zeros(flat.size, bool)
        expected[np.argsort(flat, kind="stable")[:k]] = True
        assert np.array_equal(lowest(flat, k), expected)

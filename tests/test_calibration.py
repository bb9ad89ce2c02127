"""Calibration data (--data), the data criteria and bias compensation, on graphs with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.api import analyse, prune
from onnxprune.cli import main
from onnxprune.data import Dataset, load_data
from onnxprune.errors import UsageError
from onnxprune.planning.plan import Plan
from onnxprune.scoring.calibration import activation_stats, read_points

from graphs import GraphBuilder, run

ROOT = Path(__file__).resolve().parent.parent
C = 6  # channels of the middle layer
DEAD, CONSTANT = 1, 4  # a channel that is always 0 after ReLU, one that is always the same positive value


def probe_model() -> onnx.ModelProto:
    """x(N,3,6,6) -> Conv3x3(3->C) -> Relu -> Conv1x1(C->4) -> GAP -> Flatten -> Gemm(4->5).

    Channel DEAD has zero weights and a negative bias (always 0 after ReLU);
    channel CONSTANT has zero weights and a positive bias (always 0.7).
    """
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    w = (b.rng.standard_normal((C, 3, 3, 3)) / 5).astype(np.float32)
    bias = (b.rng.standard_normal(C) / 10).astype(np.float32)
    w[[DEAD, CONSTANT]] = 0
    bias[DEAD], bias[CONSTANT] = -1.0, 0.7
    h = b.op("Relu", [b.conv(x, 3, C, w=b.const(w, "c1.W"), b=b.const(bias, "c1.B"), name="c1")], name="relu")
    h = b.conv(h, C, 4, k=1, name="c2")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], name="gap")], name="flat")
    return b.build(b.gemm(h, 4, 5, name="head"))


def probe_data(n: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 6, 6)).astype(np.float32)
    return Dataset({"x": x}, rng.integers(0, 5, n), "memory")


def c1_group(analysis):
    return next(g for g in analysis.prunable if "c1" in g.sources)


# --- data loading -------------------------------------------------------------------------

def test_npz_with_labels(tmp_path):
    model = probe_model()
    x = np.zeros((10, 3, 6, 6), np.float64)  # float64 is cast to the model's float32
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(10))
    data = load_data(tmp_path / "d.npz", model)
    assert data.inputs["x"].dtype == np.float32 and len(data) == 10 and data.labels.tolist() == list(range(10))


def test_single_unnamed_array_is_the_single_input(tmp_path):
    np.savez(tmp_path / "d.npz", np.zeros((4, 3, 6, 6), np.float32))
    data = load_data(tmp_path / "d.npz", probe_model())
    assert len(data) == 4 and data.notes


def test_folder_of_npz_is_concatenated(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", x=np.full((2, 3, 6, 6), i, np.float32), labels=np.array([i, i]))
    data = load_data(tmp_path, probe_model())
    assert len(data) == 6 and data.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_folder_of_npy_samples(tmp_path):
    for i in range(5):
        np.save(tmp_path / f"s{i}.npy", np.full((3, 6, 6), i, np.float32))  # one sample per file
    data = load_data(tmp_path, probe_model())
    assert data.inputs["x"].shape == (5, 3, 6, 6) and data.labels is None


def test_folder_of_images_with_class_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_data(tmp_path, probe_model(), onnxprune.data.ImageOptions(mean=(0.5, 0.5, 0.5), std=(0.25,) * 3))
    assert data.inputs["x"].shape == (4, 3, 6, 6) and data.labels.tolist() == [0, 0, 1, 1]
    assert -2.01 <= data.inputs["x"].min() and data.inputs["x"].max() <= 2.01


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros((2, 3, 6, 6), np.float32), "z": np.zeros((2, 3, 6, 6), np.float32)},
     "no array for model input 'x'"),
    ({"x": np.zeros((2, 3, 6), np.float32)}, "rank 3"),
    ({"x": np.zeros((2, 4, 6, 6), np.float32)}, "dim 1 is 4, the model expects 3"),
    ({"x": np.zeros((2, 3, 6, 6), np.float32), "labels": np.zeros(3)}, "different numbers of samples"),
    ({"x": np.array([["a"] * 6] * 6 * 3 * 2).reshape(2, 3, 6, 6)}, "not a numeric type"),
    ({"x": np.zeros((0, 3, 6, 6), np.float32)}, "no samples"),
])
def test_bad_data_is_a_one_line_usage_error(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UsageError, match=message) as err:
        load_data(tmp_path / "d.npz", probe_model())
    assert "\n" not in str(err.value)


def test_unreadable_and_missing_data(tmp_path):
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UsageError, match="not a readable .npz"):
        load_data(tmp_path / "junk.npz", probe_model())
    with pytest.raises(UsageError, match="no such file"):
        load_data(tmp_path / "missing.npz", probe_model())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no .npz, .npy or image files"):
        load_data(tmp_path / "empty", probe_model())


def test_sample_is_seeded_and_without_replacement():
    data = probe_data(50)
    a, b, c = data.sample(20, seed=1), data.sample(20, seed=1), data.sample(20, seed=2)
    assert np.array_equal(a.inputs["x"], b.inputs["x"]) and not np.array_equal(a.inputs["x"], c.inputs["x"])
    assert len({x.tobytes() for x in a.inputs["x"]}) == 20


# --- criteria with known answers ---------------------------------------------------------

def test_read_points_are_the_inputs_of_the_weight_readers():
    analysis = analyse(probe_model())
    points = read_points(c1_group(analysis), analysis.view)
    assert [(p.name, p.axis, p.reader) for p in points] == [("relu_out", 1, "c2")]


def test_apoz_of_an_always_zero_channel_is_one():
    model, data = probe_model(), probe_data()
    analysis = analyse(model)
    all_stats = activation_stats(model, analysis.prunable, analysis.view, data)
    stats = all_stats[c1_group(analysis).id]
    assert stats.zeros[DEAD] == 1.0 and stats.zeros[CONSTANT] == 0.0
    scores = onnxprune.scoring.criteria.score_groups(analysis.groups, analysis.view, "apoz", stats=all_stats)
    assert scores[c1_group(analysis).id][DEAD] == 0.0


def test_activation_is_mean_abs_relative_to_the_group():
    model, data = probe_model(), probe_data()
    analysis = analyse(model)
    group = c1_group(analysis)
    stats = activation_stats(model, [group], analysis.view, data)[group.id]
    relu = run_intermediate(model, "relu_out", data.inputs["x"])
    np.testing.assert_allclose(stats.abs_mean, np.abs(relu).mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(stats.mean["relu_out"], relu.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    assert stats.abs_mean[CONSTANT] == pytest.approx(0.7)


def run_intermediate(model, name, x):
    from onnxprune.runtime.session import capture_model

    return run(capture_model(model, [name]), {"x": x})[-1]


def test_apoz_without_relu_falls_back_to_l2_with_a_warning():
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 6, 6])
    model = b.build(b.conv(b.conv(x, 3, 4, name="a"), 4, 2, name="b"))
    result = prune(model, 0.5, importance="apoz", data=Dataset({"x": np.ones((4, 3, 6, 6), np.float32)}))
    assert any("pass no ReLU-like op; used l2" in w for w in result.report.warnings)


@pytest.mark.parametrize("criterion", ["taylor", "fisher"])
def test_channel_with_zero_gradient_scores_zero(criterion):
    """A channel the reader ignores (zero reader weights) has dL/da = 0, so its score is 0."""
    pytest.importorskip("torch")
    model = probe_model()
    reader = next(t for t in model.graph.initializer if t.name == "c2.W")
    w = onnx.numpy_helper.to_array(reader).copy()
    w[:, 2] = 0
    reader.CopyFrom(onnx.numpy_helper.from_array(w, "c2.W"))
    analysis = analyse(model)
    group = c1_group(analysis)
    from onnxprune.scoring.calibration import gradient_stats

    stats = gradient_stats(model, [group], analysis.view, probe_data())[group.id]
    scores = getattr(stats, criterion)
    assert scores[2] == 0.0 and scores[DEAD] == 0.0  # dead channel: a = 0
    assert (np.delete(scores, [2, DEAD]) > 0).all()


def test_taylor_matches_weight_times_gradient_of_the_reader():
    """sum a * dL/da at the read point equals sum w * dL/dw over the reader's weights."""
    torch = pytest.importorskip("torch")
    from onnxprune.executor.module import TorchGraph
    from onnxprune.scoring.calibration import gradient_stats

    model, data = probe_model(), probe_data(16)
    analysis = analyse(model)
    group = c1_group(analysis)
    stats = gradient_stats(model, [group], analysis.view, data)[group.id]
    graph = TorchGraph(model)
    logits = graph(torch.from_numpy(data.inputs["x"]))[0]
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(data.labels), reduction="sum")
    loss.backward()
    weight = graph.parameter("c2.W")
    expected = (weight * weight.grad).sum(dim=(0, 2, 3)).abs().detach().numpy() / len(data)
    np.testing.assert_allclose(stats.taylor, expected, rtol=1e-4, atol=1e-9)


# --- compensation -------------------------------------------------------------------------

def test_compensation_is_exact_for_a_constant_channel():
    """Removing a channel that is always 0.7 loses nothing once 0.7 * W is in the reader's bias."""
    model, data = probe_model(), probe_data()
    analysis = analyse(model)
    group = c1_group(analysis)
    plan = Plan({group.id: [c for c in range(C) if c != CONSTANT]}, {group.id: group.size})
    with_comp = prune(model, plan=plan, data=data, compensate=True)
    without = prune(model, plan=plan)
    x = {"x": data.inputs["x"]}
    expected = run(model, x)[0]
    np.testing.assert_allclose(run(with_comp.model, x)[0], expected, rtol=1e-5, atol=1e-5)
    assert np.abs(run(without.model, x)[0] - expected).max() > 1e-2
    comp = with_comp.report.compensation
    assert comp["readers"] + comp["refitted"] == 1
    assert comp["output_error"]["with"] < 1e-5 < comp["output_error"]["without"]


def test_compensation_adds_a_bias_that_is_cut_with_the_readers_channels():
    """A reader without bias gets one; when the reader's own channels are pruned it is sliced too."""
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.op("Relu", [b.conv(x, 3, 8, name="a")], name="r1")
    h = b.op("Relu", [b.conv(h, 8, 8, k=1, bias=False, name="b")], name="r2")
    model = b.build(b.conv(h, 8, 2, k=1, name="c"))
    result = prune(model, 0.5, data=probe_data_for(model), compensate=True)
    comp = result.report.compensation  # a refit (cut/refit.py) adds the bias as compensation does
    assert comp["readers"] + comp["refitted"] == 2
    onnx.checker.check_model(result.model, full_check=True)
    run(result.model, {"x": np.ones((2, 3, 6, 6), np.float32)})


def probe_data_for(model, n=32):
    return Dataset({"x": np.random.default_rng(0).standard_normal((n, 3, 6, 6)).astype(np.float32)})


def test_compensation_lowers_output_error_on_the_digits_model():
    from tools.digits_arch import load_split

    x_train, _, y_train, _ = load_split()
    data = Dataset({"input": x_train}, y_train)
    result = prune(onnx.load(ROOT / "models" / "digits_cnn.onnx"), 0.2, importance="activation", data=data,
                   calib_samples=256)
    err = result.report.compensation["output_error"]
    assert err["with"] < err["without"]


# --- CLI ------------------------------------------------------------------------------------

def test_cli_data_criterion_end_to_end(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(probe_model(), path)
    data = probe_data()
    np.savez(tmp_path / "d.npz", x=data.inputs["x"], labels=data.labels)
    code = main([str(path), "--structured", "0.5", "--importance", "apoz", "--data", str(tmp_path / "d.npz"),
                 "--calib-samples", "40", "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "o.onnx")])
    assert code == 0
    out = capsys.readouterr().out
    assert "40 calibration samples" in out and "compensation" in out
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    comp = report["compensation"]
    assert report["data"]["samples"] == 40 and comp["readers"] + comp["refitted"] >= 1
    assert report["importance"] == "apoz"


@pytest.mark.parametrize("args, message", [
    (["--importance", "activation"], "measured on data: give --data"),
    (["--compensate"], "give --data"),
    (["--data", "MISSING"], "no such file"),
    (["--importance", "nope"], "invalid choice"),
    (["--calib-samples", "0", "--data", "D"], "must be at least 1"),
])
def test_cli_data_usage_errors(tmp_path, capsys, args, message):
    path = tmp_path / "m.onnx"
    onnx.save(probe_model(), path)
    np.savez(tmp_path / "d.npz", x=probe_data().inputs["x"])
    args = [str(tmp_path / "d.npz") if a == "D" else str(tmp_path / "missing.npz") if a == "MISSING" else a
            for a in args]
    code = main([str(path), "--structured", "0.5", "-o", str(tmp_path / "o.onnx")] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_weight_scores_for_unstructured_sparsity():
    """|w * dL/dw| per weight: weights reading the dead channel (a = 0) get no gradient and score 0."""
    pytest.importorskip("torch")
    from onnxprune.scoring.calibration import weight_scores

    model = probe_model()
    scores = weight_scores(model, probe_data(), "taylor", ["c2.W", "head.W"])
    assert set(scores) == {"c2.W", "head.W"} and scores["c2.W"].shape == (4, C, 1, 1)
    assert (scores["c2.W"][:, DEAD] == 0).all() and (scores["c2.W"][:, CONSTANT] > 0).all()


def test_cli_unstructured_with_taylor_scores(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(probe_model(), path)
    data = probe_data()
    np.savez(tmp_path / "d.npz", x=data.inputs["x"], labels=data.labels)
    code = main([str(path), "--unstructured", "0.5", "--importance", "taylor", "--data", str(tmp_path / "d.npz"),
                 "--min-elements", "1", "--report", str(tmp_path / "r.json"), "-o", str(tmp_path / "o.onnx")])
    assert code == 0, capsys.readouterr().err
    import json

    tensors = json.loads((tmp_path / "r.json").read_text())["sparsity"]["tensors"]
    used = [t for t in tensors if not t["skipped"]]
    assert used and all(t["criterion"] == "scores" for t in used)


# --- a model whose batch size is fixed (> 1) -----------------------------------------------------

@pytest.fixture
def fixed_batch_model(tmp_path):
    b = GraphBuilder()
    x = b.input("x", [4, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="c1")])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [b.op("Relu", [b.conv(h, 8, 8, name="c2")])])])
    path = tmp_path / "fixed4.onnx"
    onnx.save(b.build(b.gemm(h, 8, 3, name="fc")), str(path))
    rng = np.random.default_rng(0)
    for n in (3, 10):
        np.savez(tmp_path / f"data{n}.npz", x=rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
                 labels=np.arange(n) % 3)
    return path


@pytest.mark.parametrize("extra", [["--importance", "taylor"], ["--importance", "activation"],
                                   ["--allocate", "sensitivity"],
                                   ["--distill", "--epochs", "1", "--val-fraction", "0.4", "--max-output-error", "9"]])
def test_fixed_batch_runs_whole_batches_and_says_what_it_left_out(fixed_batch_model, capsys, extra):
    out = fixed_batch_model.parent / "out.onnx"
    code = main([str(fixed_batch_model), "--structured", "0.5", "--data", str(fixed_batch_model.parent / "data10.npz"),
                 "-o", str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("batch size is fixed at 4: 2 of 10 samples are left out") == 1, err


@pytest.mark.parametrize("data, extra, message", [
    ("data3.npz", [], "give at least 4 samples (the data has 3)"),
    ("data10.npz", ["--distill"], "training needs at least 4 samples in the training and in the validation split"),
])
def test_fixed_batch_with_too_few_samples_is_a_usage_error(fixed_batch_model, capsys, data, extra, message):
    code = main([str(fixed_batch_model), "--structured", "0.5", "--data", str(fixed_batch_model.parent / data),
                 "--dry-run", "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") <= 2, err


# --- gradient criteria where the batch is not the first axis -----------------------------------

T, N_TOKENS_IN, HIDDEN, CLASSES = 5, 4, 6, 3


def token_model(layout: str) -> onnx.ModelProto:
    """x(N, T, 4) -> MatMul(4->6) -> Relu -> [layout] -> MatMul(6->3) -> mean over T -> (N, 3) logits.

    ``layout`` says how the second MatMul reads the hidden channels: "batch-first" (N, T, 6);
    "sequence-first" (T, N, 6), as nn.MultiheadAttention's legacy export lays it out; "merged"
    (T x N, 6), the batch merged into the sequence axis, as that export feeds its output projection.
    The networks compute the same function."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((N_TOKENS_IN, HIDDEN)).astype(np.float32)
    w2 = rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([T, -1, HIDDEN], np.int64), "tnh"),
             numpy_helper.from_array(np.array([-1, HIDDEN], np.int64), "flat"),
             numpy_helper.from_array(np.array([T, -1, CLASSES], np.int64), "tnk")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"), helper.make_node("Relu", ["h1"], ["a"])]
    if layout == "batch-first":
        nodes += [helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2"),
                  helper.make_node("ReduceMean", ["y"], ["logits"], axes=[1], keepdims=0)]
    else:
        nodes.append(helper.make_node("Transpose", ["a"], ["a_t"], perm=[1, 0, 2]))
        if layout == "sequence-first":
            nodes.append(helper.make_node("MatMul", ["a_t", "w2"], ["y"], name="mm2"))
        else:
            nodes += [helper.make_node("Reshape", ["a_t", "flat"], ["a_m"]),
                      helper.make_node("MatMul", ["a_m", "w2"], ["y_m"], name="mm2"),
                      helper.make_node("Reshape", ["y_m", "tnk"], ["y"])]
        nodes.append(helper.make_node("ReduceMean", ["y"], ["logits"], axes=[0], keepdims=0))
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("layout", ["sequence-first", "merged"])
def test_gradient_criteria_find_the_samples_where_the_batch_is_not_the_first_axis(layout):
    """Taylor is the same whatever the layout; Fisher is too where the batch has an axis of its own
    (sequence-first). Merged into the sequence, the batch counts as one sample for Fisher (its
    square is the batch's), which still scores every channel finitely."""
    pytest.importorskip("torch")
    from onnxprune.scoring.calibration import gradient_stats

    rng = np.random.default_rng(0)
    data = Dataset({"x": rng.standard_normal((8, T, 4)).astype(np.float32)}, rng.integers(0, CLASSES, 8), "memory")
    stats = {}
    for name in ("batch-first", layout):
        model = token_model(name)
        analysis = analyse(model)
        group = next(g for g in analysis.prunable if "mm1" in g.sources)
        stats[name] = gradient_stats(model, [group], analysis.view, data, batch_size=4)[group.id]
    np.testing.assert_allclose(stats[layout].taylor, stats["batch-first"].taylor, rtol=1e-6, atol=1e-12)
    if layout == "sequence-first":
        np.testing.assert_allclose(stats[layout].fisher, stats["batch-first"].fisher, rtol=1e-6, atol=1e-12)
    else:
        assert np.isfinite(stats[layout].fisher).all() and (stats[layout].fisher > 0).all()


# --- one pass, reused ------------------------------------------------------------------------

def test_means_only_measures_the_same_means_and_nothing_else():
    """Compensation's means alone (no activation criterion): the same means as the full pass."""
    from onnxprune.scoring.calibration import measure

    model, data = probe_model(), probe_data()
    analysis = analyse(model)
    full = measure(model, analysis.prunable, analysis.view, data, gradients=False, activations=True)
    means = measure(model, analysis.prunable, analysis.view, data, gradients=False, activations=True,
                    means_only=True)
    for gid, stats in full.items():
        assert stats.abs_mean is not None and means[gid].abs_mean is None and means[gid].zeros is None
        assert stats.mean.keys() == means[gid].mean.keys() and stats.mean
        for name, value in stats.mean.items():
            np.testing.assert_allclose(means[gid].mean[name], value, rtol=1e-12)


@pytest.mark.parametrize("gradients", [False, True])
def test_reference_reuses_the_outputs_of_the_measuring_pass(gradients):
    """The original's outputs captured by the calibration pass (onnxruntime, or the PyTorch
    executor's under a gradient criterion) make the same reference as a pass of its own."""
    if gradients:
        pytest.importorskip("torch")
    from onnxprune.metrics import OutputCapture, Reference
    from onnxprune.scoring.calibration import measure

    model, data = probe_model(), probe_data(40)
    analysis = analyse(model)
    captured = OutputCapture(model)
    measure(model, analysis.prunable, analysis.view, data, gradients=gradients, activations=True,
            grams=True, batch_size=16, also=(captured,))
    assert [len(next(iter(b.values()))) for b in captured.batches] == [16, 16, 8]
    reused = Reference(model, data, 16, captured=captured)
    fresh = Reference(model, data, 16)
    for got, want in zip(reused.expected, fresh.expected, strict=True):
        for name in fresh.names:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    pruned = prune(model, 0.5).model
    assert reused.measure(pruned).output_error == pytest.approx(fresh.measure(pruned).output_error, rel=1e-5)
    # other batches than the captured ones: the reference runs its own pass
    other = Reference(model, data, 8, captured=captured)
    assert len(other.expected) == 5


def test_compensation_report_matches_a_fresh_reference():
    """The compensation's reported output error, against the reused outputs, is what a reference
    of its own measures."""
    from onnxprune.metrics import Reference

    model, data = probe_model(), probe_data()
    result = prune(model, 0.5, data=data, compensate=True, reconstruct=False)
    fresh = Reference(model, data).measure(result.model).output_error
    assert result.report.compensation["output_error"]["with"] == pytest.approx(fresh, rel=1e-5)

"""Reconstruction after the cut: the executor's walk, the least-squares refits (layer-wise on the
pruned model's activations, and in closed form from Gram matrices), the obs criterion, and the
allocation to a MACs budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from onnxprune.data import Dataset
from onnxprune.metrics import Reference
from onnxprune.planning.plan import Plan
from onnxprune.recovery.reconstruct import Reconstruction

from graphs import GraphBuilder, run

torch = pytest.importorskip("torch")
from onnxprune.executor.module import TorchGraph  # noqa: E402  (needs torch)
from onnxprune.executor.walk import Walk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
C = 8
COPY, SOURCE = 5, 2  # in redundant_model: channel COPY is 2 x channel SOURCE


def redundant_model() -> onnx.ModelProto:
    """x(N,3,6,6) -> Conv3x3(3->C) "c1" -> Conv1x1(C->4) "c2" -> GAP -> Flatten -> Gemm(4->5).

    c1's filter COPY is twice its filter SOURCE (no nonlinearity in between), so c2 can do
    without COPY exactly: half its weight moves to SOURCE. COPY's weights are the largest, so
    magnitude criteria keep it and drop something that cannot be replaced.
    """
    b = GraphBuilder(seed=5)
    x = b.input("x", ["N", 3, 6, 6])
    w = (b.rng.standard_normal((C, 3, 3, 3)) / 5).astype(np.float32)
    bias = (b.rng.standard_normal(C) / 10).astype(np.float32)
    w[COPY], bias[COPY] = 2 * w[SOURCE], 2 * bias[SOURCE]
    h = b.conv(x, 3, C, w=b.const(w, "c1.W"), b=b.const(bias, "c1.B"), name="c1")
    h = b.conv(h, C, 4, k=1, name="c2")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], name="gap")], name="flat")
    return b.build(b.gemm(h, 4, 5, name="head"))


def data_for(model, n=64, seed=0) -> Dataset:
    x = np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)
    return Dataset({"x": x}, np.random.default_rng(seed).integers(0, 5, n), "memory")


def c1(analysis):
    return next(g for g in analysis.prunable if "c1" in g.sources)


def plan_without(model, channels) -> Plan:
    group = c1(onnxprune.analyse(model))
    return Plan({group.id: [c for c in range(group.size) if c not in channels]}, {group.id: group.size})


# --- the walk ---------------------------------------------------------------------------------

def test_walking_all_batches_at_once_computes_what_a_forward_pass_does():
    model = onnx.load(str(MODEL))
    graph = TorchGraph(model, trainable=lambda name: False)
    xs = [torch.from_numpy(np.random.default_rng(i).random((3, 1, 8, 8), dtype=np.float32)) for i in range(2)]
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "expand" in n.name)
    walk = Walk(graph, [[x] for x in xs], wanted=["logits"])
    inputs = walk.before(conv.output[0])  # the inputs of a node in the middle, per batch
    assert len(inputs) == 2 and inputs[0][0].shape[0] == 3
    with torch.no_grad():
        expected = [graph(x)[0] for x in xs]
        got = walk.take("logits")
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)


# --- reconstruction on the pruned model's activations -------------------------------------------

@pytest.mark.parametrize("refit", [False, True], ids=["walk", "gram-refit-then-walk"])
def test_a_removed_channel_that_others_can_stand_in_for_is_restored_exactly(refit):
    model = redundant_model()
    data = data_for(model)
    plan = plan_without(model, [COPY])
    plain = onnxprune.prune(model, plan=plan)
    result = onnxprune.prune(model, plan=plan, data=data, compensate=refit)
    x = {"x": data_for(model, 16, seed=1).inputs["x"]}  # held out: other samples than the fit's
    expected = run(model, x)[0]
    assert np.abs(run(plain.model, x)[0] - expected).max() > 1e-2
    np.testing.assert_allclose(run(result.model, x)[0], expected, rtol=1e-4, atol=1e-4)
    rec = result.report.reconstruction
    assert rec["readers"] >= 1 and rec["output_error"]["after"] < 1e-4
    if refit:  # the closed-form refit already did nearly all of it, the walk only the rest
        assert result.report.compensation["refitted"] == 1
        # not exact: the refit's damping toward the cut weights, chosen on held-out samples,
        # leaves a small residual
        assert rec["output_error"]["before"] < 1e-3


def test_a_consumer_whose_input_did_not_change_keeps_its_weights():
    """Downstream of the cut, a layer whose own input is untouched refits to what it was."""
    from onnxprune.pipeline import steps
    from onnxprune.recovery.reconstruct import reconstruct

    model = redundant_model()
    data = data_for(model)
    analysis = onnxprune.analyse(model)
    cut = steps.cut(model, analysis, plan_without(model, []))  # nothing removed
    refitted, done = reconstruct(model, cut.model, cut.removed, data, downstream=True)
    assert done.readers == []
    for a, b in zip(cut.model.graph.initializer, refitted.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_a_depthwise_convolution_is_refitted_group_by_group_in_one_batch():
    """Every channel of a depthwise Conv is its own least-squares problem: each recovers its
    own filter from its own data, and one the data never excites keeps its cut weights."""
    from onnxprune.recovery.reconstruct import Reader, _refit

    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", C, 7, 7])
    model = b.build(b.conv(x, C, C, group=C, name="dw"))
    true = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    graph = TorchGraph(model, trainable=lambda name: False)
    weight, bias = graph.parameter("dw.W"), graph.parameter("dw.B")
    inputs = torch.from_numpy(np.random.default_rng(0).standard_normal((40, C, 7, 7)).astype(np.float32))
    inputs[:, 0] = 0  # channel 0 carries nothing: its system is singular, its weights stay
    with torch.no_grad():
        targets = graph(inputs)[0]
        weight.add_(0.3)
        bias.add_(0.3)
        cut = weight[0].clone(), bias[0].clone()
        node = next(n for n in model.graph.node if n.op_type == "Conv")
        assert _refit(torch, graph, Reader(node, x, "dw.W", "dw.B", None, 1), [inputs], [targets], 0.01,
                      np.random.default_rng(0)) == ""
    np.testing.assert_allclose(weight[1:].numpy(), true["dw.W"][1:], atol=1e-3)
    np.testing.assert_allclose(bias[1:].numpy(), true["dw.B"][1:], atol=1e-3)
    torch.testing.assert_close(weight[0], cut[0])
    torch.testing.assert_close(bias[0], cut[1])


def test_reconstruction_lowers_the_held_out_error_of_the_trained_digits_model():
    from tools.digits_arch import accuracy_onnx, load_split

    x_train, x_test, y_train, y_test = load_split()
    model = onnx.load(str(MODEL))
    data = Dataset({"input": x_train}, y_train)
    options = dict(data=data, calib_samples=256, compensate=False)
    before = onnxprune.prune(model, 0.4, reconstruct=False, **options)
    after = onnxprune.prune(model, 0.4, **options)
    held_out = Reference(model, Dataset({"input": x_test}, y_test))
    worse, better = held_out.measure(before.model), held_out.measure(after.model)
    assert better.output_error < 0.7 * worse.output_error, (worse, better)
    assert better.accuracy > worse.accuracy + 0.2
    report = after.report.reconstruction
    assert report["samples"] <= 256 and report["seconds"] > 0 and report["readers"] >= 5
    assert report["output_error"]["after"] < report["output_error"]["before"]
    del accuracy_onnx


def test_reconstruction_is_reported_and_can_be_turned_off(tmp_path, capsys):
    from onnxprune.cli import main

    model = redundant_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", x=data_for(model, n=200).inputs["x"])
    assert main([str(path), "--structured", "0.5", "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "a.onnx"),
                 "--report", str(tmp_path / "a.json")]) == 0
    assert "reconstruction" in capsys.readouterr().out
    assert main([str(path), "--structured", "0.5", "--data", str(tmp_path / "d.npz"), "--no-reconstruct",
                 "-o", str(tmp_path / "b.onnx"), "--report", str(tmp_path / "b.json")]) == 0
    import json

    done = json.loads((tmp_path / "a.json").read_text())["reconstruction"]
    assert done["readers"] >= 1 and done["samples"] == 128  # the rest (72) judge the fit
    assert done["held_out"]["samples"] == 72 and isinstance(done["kept"], bool)
    assert done["kept"] == (done["held_out"]["output_error"]["after"] < done["held_out"]["output_error"]["before"])
    assert json.loads((tmp_path / "b.json").read_text())["reconstruction"] is None
    code = main([str(path), "--structured", "0.5", "--reconstruct", "-o", str(tmp_path / "c.onnx")])
    assert code == 2 and "--reconstruct" in capsys.readouterr().err


# --- the obs criterion -----------------------------------------------------------------------------

def test_obs_takes_the_channel_others_can_stand_in_for_first():
    model = redundant_model()
    data = data_for(model)
    scores = {}
    for criterion in ("obs", "l1"):
        result = onnxprune.prune(model, 1 / C, importance=criterion, data=data, reconstruct=False)
        group = c1(result.analysis)
        scores[criterion] = set(range(C)) - set(result.plan.keep[group.id])
    assert scores["obs"] in ({COPY}, {SOURCE})  # either of the pair can go: the other carries it
    assert scores["l1"] != scores["obs"]  # magnitude keeps the big copy and drops another channel


def test_obs_greedy_order_matches_refitting_from_scratch_at_every_step():
    """The greedy removal updates its inverse in place and drops removed rows as it goes
    (scoring/obs.py): each step must still take the channel a from-scratch least-squares refit
    says is cheapest, on a group wide enough to be compacted several times."""
    from onnxprune.options import AnalysisOptions
    from onnxprune.pipeline import steps
    from onnxprune.scoring import obs

    wide = 48
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 6, 6])
    h = b.op("Relu", [b.conv(x, 3, wide, name="c1")], name="r1")
    model = b.build(b.conv(h, wide, 6, k=1, name="c2"))
    analysis = steps.analyse(model, AnalysisOptions())
    group = c1(analysis)
    stats = steps.measure(model, analysis, data_for(model, 96), "obs", True, None)[group.id]
    gram = next(iter(stats.grams.values())).sum(0)  # fitted and held-out samples: what obs uses
    damped = gram + np.eye(len(gram)) * obs.DAMPING * np.diag(gram).mean()
    weight = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c2.W"))
    w = weight.reshape(6, wide).astype(np.float64)
    w = np.concatenate([w, np.zeros((6, 1))], axis=1)  # the ones column (the bias) starts at zero
    kept, order = list(range(wide)), []
    for _ in range(wide):
        k1 = kept + [wide]
        inverse = np.linalg.inv(damped[np.ix_(k1, k1)])
        refit = w @ damped[:, k1] @ inverse  # the original outputs refitted on the kept inputs
        damage = (refit[:, :-1] ** 2).sum(0) / np.diag(inverse)[:-1]
        order.append(kept.pop(int(np.argmin(damage))))
    assert list(np.argsort(stats.obs)) == order


# --- allocation to a budget ------------------------------------------------------------------------

def test_allocation_meets_a_macs_budget_and_reports_it(tmp_path):
    from tools.digits_arch import load_split

    x_train, _, y_train, _ = load_split()
    np.savez(tmp_path / "d.npz", input=x_train[:256], labels=y_train[:256])
    report = onnxprune.prune_file(MODEL, tmp_path / "o.onnx", target=onnxprune.Target("macs", 0.6),
                                  allocate="sensitivity", data=str(tmp_path / "d.npz"), reconstruct=False)
    assert report.macs_after / report.macs_before <= 0.6
    assert report.allocation["unit"] == "macs" and report.target["allocated"]
    ratios = {g["id"]: g["ratio"] for g in report.allocation["groups"]}
    assert len(set(ratios.values())) > 1  # not one ratio for all: the cut goes where it costs least


def test_a_budget_with_data_is_allocated_by_default_and_uniform_on_request(tmp_path):
    from onnxprune.options import PruneOptions, validate

    budget = dict(target=onnxprune.Target("macs", 0.6), data="d.npz")
    assert validate(PruneOptions.from_keywords(**budget)).widths.allocate == "sensitivity"
    assert validate(PruneOptions.from_keywords(**budget, allocate="uniform")).widths.allocate == "uniform"
    # a ratio names each group's fraction, a global ranking decides the amounts itself, no data
    # measures nothing: these stay uniform
    for other in (dict(ratio=0.3, data="d.npz"), dict(**budget, global_ranking=True),
                  dict(target=onnxprune.Target("macs", 0.6))):
        assert validate(PruneOptions.from_keywords(**other)).widths.allocate is None
    again = validate(validate(PruneOptions.from_keywords(**budget)))  # validating twice changes nothing
    assert again.widths.allocate == "sensitivity"

    model = redundant_model()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=data_for(model).inputs["x"])
    report = onnxprune.prune_file(tmp_path / "m.onnx", tmp_path / "u.onnx", target=onnxprune.Target("macs", 0.8),
                                  allocate="uniform", data=str(tmp_path / "d.npz"))
    assert report.allocation is None and not report.target.get("allocated") and report.target["evaluations"]


def test_a_reconstruction_that_does_worse_on_samples_it_did_not_fit_is_discarded(monkeypatch):
    """The model-level check: a reconstruction whose outputs move away from the original's on
    the calibration samples held out of the fit is not kept (the cut model is returned)."""
    from onnxprune.pipeline import prune as pipeline

    model = redundant_model()
    data = data_for(model, n=40)

    def spoiled(original, pruned, removed, fit, batch_size=None, downstream=False, moved=frozenset()):
        bad = onnx.ModelProto()
        bad.CopyFrom(pruned)
        for t in bad.graph.initializer:  # every weight scaled: far from the original's outputs
            values = numpy_helper.to_array(t)
            if values.dtype == np.float32 and values.ndim > 1:
                t.CopyFrom(numpy_helper.from_array(values * 3, t.name))
        assert len(fit) == 30  # 40 samples: a quarter held out to judge the fit
        return bad, Reconstruction(readers=["c2"], samples=len(fit))

    monkeypatch.setattr(pipeline, "reconstruct", spoiled)
    result = onnxprune.prune(model, 0.5, data=data, quiet=True)
    done = result.report.reconstruction
    assert done["kept"] is False and done["held_out"]["samples"] == 10
    assert done["held_out"]["output_error"]["after"] > done["held_out"]["output_error"]["before"]
    plain = onnxprune.prune(model, 0.5, data=data, quiet=True, reconstruct=False).model
    x = data.inputs["x"][:8]
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(plain, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert "discarded" in result.report.summary()

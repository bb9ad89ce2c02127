"""A cut model run from where it differs from the original (runtime/downstream.py): sensitivity's
measurements, the same as running each cut model whole."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune.cut import iochange
from onnxprune.data import Dataset
from onnxprune.metrics import Reference
from onnxprune.options import PruneOptions
from onnxprune.pipeline import steps
from onnxprune.planning.plan import make_plan
from onnxprune.runtime import downstream

from graphs import GraphBuilder, run

C = 8


def chain_model() -> onnx.ModelProto:
    """x(N,3,8,8) -> c1 -> Relu -> c2 -> Relu -> c3, plus c2's output (a residual) -> Relu -> c4 ->
    Relu -> GAP -> Flatten -> Gemm (4 classes). Groups, in order: c1, {c2, c3} (tied by the Add), c4."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, C, name="c1")], name="r1")
    skip = b.conv(h, C, C, name="c2")
    h = b.conv(b.op("Relu", [skip], name="r2"), C, C, name="c3")
    h = b.op("Relu", [b.op("Add", [h, skip], name="add")], name="r3")
    h = b.op("Relu", [b.conv(h, C, C, name="c4")], name="r4")
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h], name="gap")], name="flat")
    return b.build(b.gemm(h, C, 4, name="head"))


def data(model, n=20) -> Dataset:
    x = np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)
    return Dataset({"x": x}, run(model, {"x": x})[0].argmax(1).astype(np.int64), "memory")


def prepared(model):
    options = PruneOptions.from_keywords()
    analysis = steps.analyse(model, options.analysis)
    scores = steps.score(analysis, "l1", 0, None)
    uncut = steps.cut(model, steps.reanalyse(analysis, options.analysis), make_plan([], {}, 0.0)).model
    return options, analysis, scores, uncut


def cut_alone(model, options, analysis, scores, group, ratio):
    plan = make_plan([group], scores, ratio, 1)
    return steps.cut(model, steps.reanalyse(analysis, options.analysis), plan).model


def test_each_cut_measures_as_its_whole_run_and_later_groups_skip_the_upstream_nodes():
    model = chain_model()
    options, analysis, scores, uncut = prepared(model)
    samples = data(model)
    whole = Reference(model, samples, 8)  # batches of 8: the last one smaller (4)
    split = Reference(model, samples, 8, downstream=uncut)
    assert [g.sources[0] for g in analysis.prunable] == ["c1", "c2", "c4"]
    for group in analysis.prunable:
        for ratio in (0.25, 0.5):
            candidate = cut_alone(model, options, analysis, scores, group, ratio)
            expected, got = whole.measure(candidate), split.measure(candidate)
            assert got.output_error == pytest.approx(expected.output_error, rel=1e-5, abs=1e-7)
            assert (got.accuracy, got.agreement) == (expected.accuracy, expected.agreement)
            assert got.divergence == pytest.approx(expected.divergence, rel=1e-4, abs=1e-9)
            assert got.output_error > 0
            if group.sources[0] != "c1":  # c1's cut changes nearly every node: it runs whole
                changed, frontier = split.downstream._split(candidate)
                assert split.downstream.frontier == frontier  # this candidate ran split
                ran = {n.name for n in changed}
                assert "c1" not in ran and "head" in ran
                if group.sources[0] == "c4":  # everything before c4 is the original's: not run
                    assert not ran & {"r1", "c2", "r2", "c3", "add"}


def test_a_later_frontier_is_captured_from_the_previous_one_not_from_the_inputs(monkeypatch):
    model = chain_model()
    options, analysis, scores, uncut = prepared(model)
    reference = Reference(model, data(model), 8, downstream=uncut)
    starts = []
    upstream = downstream.Downstream._upstream

    def recording(self, names, known):
        made, first = upstream(self, names, known)
        starts.append(first)
        return made, first

    monkeypatch.setattr(downstream.Downstream, "_upstream", recording)
    second, third = analysis.prunable[1:]
    reference.measure(cut_alone(model, options, analysis, scores, second, 0.5))
    reference.measure(cut_alone(model, options, analysis, scores, third, 0.5))
    assert starts[0] == ["x"]  # the first capture runs the original from its input
    assert "x" not in starts[1] and starts[1]  # the next from what the first captured


def test_cuts_that_cannot_be_split_run_whole(monkeypatch):
    model = chain_model()
    options, analysis, scores, uncut = prepared(model)
    samples = data(model)
    last = analysis.prunable[-1]
    candidate = cut_alone(model, options, analysis, scores, last, 0.5)
    expected = Reference(model, samples, 8).measure(candidate).output_error

    # a frontier over the capture limit: measured whole, the same
    monkeypatch.setattr(downstream, "MAX_CAPTURE_BYTES", 16)
    small = Reference(model, samples, 8, downstream=uncut)
    assert small.downstream.run(candidate, ["head_out"], small.expected) is None
    assert small.measure(candidate).output_error == pytest.approx(expected, rel=1e-5)
    monkeypatch.undo()

    # reshaped graph inputs or outputs (--allow-io-change) are fed and compared by the whole run
    reshaped = onnx.ModelProto()
    reshaped.CopyFrom(candidate)
    iochange.record(reshaped, [iochange.IOChange("head_out", "output", 1, 4, [0, 1, 2, 3])])
    split = Reference(model, samples, 8, downstream=uncut)
    assert split.downstream.run(reshaped, ["head_out"], split.expected) is None


def test_a_model_with_subgraphs_is_never_split():
    b = GraphBuilder(seed=0)
    b.input("x", ["N", 4])
    branch = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y_in"])], "then", [],
                                    [onnx.helper.make_tensor_value_info("y_in", onnx.TensorProto.FLOAT, None)])
    cond = b.const(np.array(True), "cond")
    y = b.op("If", [cond], then_branch=branch, else_branch=branch, name="if")
    model = b.build(b.op("Relu", [y], name="relu"), check=False)
    assert not downstream.Downstream(model, []).usable

"""LSTM, GRU and RNN (issue 17): the rule (hidden units cut gate by gate, both directions alike,
layouts 0 and 1, the input size through W, hidden_size rewritten), the executor's torch
implementations against onnxruntime, and torch exports of a conv + BiLSTM (CRNN-like) and of a
GRU sequence model, with both exporters, pruned at 0.4; and the executor's Loop and Scan (a Loop
with a conv in its body) against onnxruntime.

Tolerances: single ops 1e-5 of the output scale (test_executor.py's figure), whole models 1e-4.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.rules.recurrent import GATES

from graphs import (
    GraphBuilder,
    attr_of,
    full_plan,
    group_of,
    input_value,
    io_signature,
    make_feeds,
    masked_reference,
    nodes_of,
    prune_checked,
    rel_err,
    run,
    run_main,
    session,
)

torch = pytest.importorskip("torch")
from onnxprune.executor.module import TorchGraph  # noqa: E402  (needs torch)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F32 = TensorProto.FLOAT
T, BATCH = 5, 3


def rng_array(shape, seed, scale=0.5):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --- one recurrent node, for the executor ---------------------------------------------------------

def recurrent_node(op, inputs: dict, outputs: int, **attrs):
    """(model, feeds): one ``op`` node; ``inputs`` maps input position -> (array, fed?)."""
    names, graph_inputs, inits, feeds = [], [], [], {}
    for i in range(max(inputs) + 1):
        if i not in inputs:
            names.append("")
            continue
        value, fed = inputs[i]
        name = f"in{i}"
        names.append(name)
        if fed:
            dtype = TensorProto.INT32 if value.dtype == np.int32 else F32
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, value.shape))
            feeds[name] = value
        else:
            inits.append(numpy_helper.from_array(value, name))
    outs = [f"out{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, name="rnn", **attrs)
    graph = helper.make_graph([node], "one", graph_inputs,
                              [helper.make_value_info(o, onnx.TypeProto()) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model), feeds


def recurrent_inputs(op, hidden=4, features=3, directions=1, layout=0, bias=True, states=True,
                     lengths=None, peepholes=False, seed=0):
    gates = GATES[op]
    x_shape = (BATCH, T, features) if layout else (T, BATCH, features)
    state_shape = (BATCH, directions, hidden) if layout else (directions, BATCH, hidden)
    inputs = {0: (rng_array(x_shape, seed, 1.0), True),
              1: (rng_array((directions, gates * hidden, features), seed + 1), False),
              2: (rng_array((directions, gates * hidden, hidden), seed + 2), False)}
    if bias:
        inputs[3] = (rng_array((directions, 2 * gates * hidden), seed + 3), False)
    if lengths is not None:
        inputs[4] = (np.asarray(lengths, np.int32), True)
    if states:
        inputs[5] = (rng_array(state_shape, seed + 4), True)
        if op == "LSTM":
            inputs[6] = (rng_array(state_shape, seed + 5), True)
    if peepholes:
        inputs[7] = (rng_array((directions, 3 * hidden), seed + 6), False)
    return inputs


def torch_outputs(model, feeds) -> list[np.ndarray]:
    with torch.no_grad():
        got = TorchGraph(model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [v.numpy() for v in got.values()]


def assert_all_close(reference, got, tol):
    assert len(got) == len(reference)
    for i, (r, g) in enumerate(zip(reference, got)):
        assert r.shape == g.shape, f"output {i}: shape {g.shape}, onnxruntime {r.shape}"
        assert rel_err(r, g) <= tol, f"output {i}: relative error {rel_err(r, g):.3g}"


def assert_executor_matches(model, feeds, tol=1e-5):
    assert_all_close(session(model).run(None, feeds), torch_outputs(model, feeds), tol)


def batch_first(inputs: dict) -> dict:
    """Layout 0 inputs in layout 1: X (B, T, I), the states (B, D, H)."""
    return {i: (np.ascontiguousarray(v.swapaxes(0, 1)) if i in (0, 5, 6) else v, fed)
            for i, (v, fed) in inputs.items()}


def time_first(outputs: list) -> list:
    """Layout 1 outputs in layout 0: Y (T, D, B, H), the final states (D, B, H)."""
    return [outputs[0].transpose(1, 2, 0, 3)] + [s.swapaxes(0, 1) for s in outputs[1:]]


EXECUTOR_CASES = {
    "lstm_forward": ("LSTM", {}, {}),
    "lstm_reverse_no_bias_no_states": ("LSTM", dict(bias=False, states=False), dict(direction="reverse")),
    "lstm_bidirectional_lengths_peepholes": ("LSTM", dict(directions=2, lengths=[5, 2, 4], peepholes=True),
                                             dict(direction="bidirectional")),
    "lstm_clip_input_forget": ("LSTM", {}, dict(clip=0.7, input_forget=1)),
    "lstm_activations": ("LSTM", dict(directions=2), dict(
        direction="bidirectional", activations=["HardSigmoid", "LeakyRelu", "Tanh", "Sigmoid", "ScaledTanh", "Affine"],
        activation_alpha=[0.3, 0.05, 0.9, 0.5], activation_beta=[0.4, 1.1, 0.1])),
    "gru_forward": ("GRU", {}, {}),
    "gru_linear_before_reset": ("GRU", {}, dict(linear_before_reset=1)),
    "gru_bidirectional_lengths": ("GRU", dict(directions=2, lengths=[1, 5, 3]),
                                  dict(direction="bidirectional", linear_before_reset=1)),
    "gru_clip": ("GRU", {}, dict(clip=0.5)),
    "rnn_forward": ("RNN", {}, {}),
    "rnn_bidirectional_relu_lengths": ("RNN", dict(directions=2, lengths=[3, 5, 1]),
                                       dict(direction="bidirectional", activations=["Relu", "Tanh"])),
    "rnn_reverse_no_bias": ("RNN", dict(bias=False), dict(direction="reverse")),
}


@pytest.mark.parametrize("case", list(EXECUTOR_CASES))
def test_executor_matches_onnxruntime(case):
    op, shape, attrs = EXECUTOR_CASES[case]
    inputs = recurrent_inputs(op, **shape)
    outputs = 3 if op == "LSTM" else 2
    model, feeds = recurrent_node(op, inputs, outputs, hidden_size=4, **attrs)
    assert_executor_matches(model, feeds)


LAYOUT_CASES = {
    "lstm_bidirectional_lengths_peepholes": ("LSTM", dict(directions=2, lengths=[5, 2, 4], peepholes=True),
                                             dict(direction="bidirectional")),
    "gru_reverse_clip": ("GRU", {}, dict(direction="reverse", clip=0.5, linear_before_reset=1)),
    "rnn_bidirectional": ("RNN", dict(directions=2), dict(direction="bidirectional")),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_layout_1_matches_onnxruntime_on_the_layout_0_twin(case):
    """onnxruntime refuses layout 1 ("batchwise recurrent operations are not supported"): the
    executor's layout 1 is compared with onnxruntime's layout 0 on the same data, transposed."""
    op, shape, attrs = LAYOUT_CASES[case]
    inputs = recurrent_inputs(op, **shape)
    outputs = 3 if op == "LSTM" else 2
    model, feeds = recurrent_node(op, inputs, outputs, hidden_size=4, **attrs)
    twin, twin_feeds = recurrent_node(op, batch_first(inputs), outputs, hidden_size=4, layout=1, **attrs)
    assert_all_close(session(model).run(None, feeds), time_first(torch_outputs(twin, twin_feeds)), 1e-5)


def test_only_the_outputs_asked_for_are_made_and_gradients_reach_the_weights():
    model, feeds = recurrent_node("LSTM", recurrent_inputs("LSTM", directions=2), 1, hidden_size=4,
                                  direction="bidirectional")
    assert_executor_matches(model, feeds)
    tg = TorchGraph(model)
    y = tg.run({k: torch.from_numpy(v) for k, v in feeds.items()})["out0"]
    y.square().sum().backward()
    for name in ("in1", "in2", "in3"):  # W, R and B are trained
        assert tg.parameter(name).grad is not None and tg.parameter(name).grad.abs().sum() > 0


def test_an_unknown_activation_is_a_clear_error():
    model, _ = recurrent_node("RNN", recurrent_inputs("RNN"), 1, hidden_size=4, activations=["Gelu"])
    with pytest.raises(onnxprune.UnsupportedModel, match="RNN: activation Gelu is not implemented"):
        TorchGraph(model)


# --- the rule, on graphs built with onnx.helper -------------------------------------------------------

def stacked(op, directions=2, layout=0, hidden=8, features=6, lengths=False, peepholes=True, states=True,
            seed=0):
    """x -> MatMul+Relu (the input features) -> op -> Y folded to (.., D*H) as exporters do -> MatMul;
    Y_h folded the same way into a second head. Sequence lengths are a graph input."""
    b = GraphBuilder(seed=seed)
    gates = GATES[op]
    x = b.input("x", [BATCH, T, 5] if layout else [T, BATCH, 5])
    h = b.op("Relu", [b.matmul(x, 5, features, name="embed")])
    inputs = [h, b.weight((directions, gates * hidden, features), "rnn.W"),
              b.weight((directions, gates * hidden, hidden), "rnn.R"),
              b.weight((directions, 2 * gates * hidden), "rnn.B", fan_in=4)]
    inputs.append(b.input("lengths", [BATCH], TensorProto.INT32) if lengths else "")
    state = [BATCH, directions, hidden] if layout else [directions, BATCH, hidden]
    if states:
        inputs.append(b.weight(state, "rnn.h0", fan_in=4))
        if op == "LSTM":
            inputs.append(b.weight(state, "rnn.c0", fan_in=4))
    elif op == "LSTM" and peepholes:
        inputs += ["", ""]
    if op == "LSTM" and peepholes:
        inputs.append(b.weight((directions, 3 * hidden), "rnn.P", fan_in=4))
    outs = b.op(op, inputs, outputs=3 if op == "LSTM" else 2, name="rnn", hidden_size=hidden,
                direction="bidirectional" if directions == 2 else "forward", layout=layout)
    y, y_h = outs[0], outs[1]
    if layout:  # (B, T, D, H) -> (B, T, D*H)
        y = b.op("Reshape", [y, b.ints([BATCH, T, directions * hidden])])
        y_h = b.op("Reshape", [y_h, b.ints([BATCH, directions * hidden])])
    else:  # (T, D, B, H) -> (T, B, D, H) -> (T, B, D*H)
        y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.ints([T, BATCH, directions * hidden])])
        y_h = b.op("Reshape", [b.op("Transpose", [y_h], perm=[1, 0, 2]), b.ints([BATCH, directions * hidden])])
    return b.build([b.matmul(y, directions * hidden, 4, name="head"),
                    b.matmul(y_h, directions * hidden, 3, name="last")])


def lengths_feed(model):
    feeds = make_feeds(model)
    if "lengths" in feeds:
        feeds["lengths"] = np.array([5, 2, 4], np.int32)
    return feeds


def prune_checked_in_torch(model, analysis, plan, feeds):
    """prune_checked's checks for a model onnxruntime cannot run (layout 1): valid, same interface,
    input untouched, and mask-equivalent, with the executor (which matches onnxruntime on the
    layout 0 twin: test_layout_1_matches_onnxruntime_on_the_layout_0_twin) running both."""
    before = model.SerializeToString()
    result = onnxprune.prune(model, plan=plan)
    assert model.SerializeToString() == before
    onnx.checker.check_model(result.model, full_check=True)
    assert io_signature(result.model) == io_signature(model)
    reference = torch_outputs(masked_reference(model, analysis, result.plan), feeds)
    assert_all_close(reference, torch_outputs(result.model, feeds), 1e-4)
    return result


def kept_rows(kept, hidden, blocks):
    """Row indices of ``kept`` hidden units in each of ``blocks`` gate blocks."""
    return np.concatenate([np.asarray(kept) + g * hidden for g in range(blocks)])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("layout", [0, 1])
def test_hidden_units_go_gate_by_gate_in_both_directions(op, layout):
    model = stacked(op, layout=layout, lengths=True)
    analysis = onnxprune.analyse(model)
    group = group_of(analysis, "rnn")
    assert group.prunable and group.size == 8
    kept = [0, 2, 3, 6, 7]
    plan = full_plan(analysis, {group.id: kept})
    if layout:  # onnxruntime has no layout 1: the same checks, run by the executor
        result = prune_checked_in_torch(model, analysis, plan, lengths_feed(model))
    else:
        result, _, _ = prune_checked(model, plan=plan, feeds=lengths_feed(model))
    (node,) = nodes_of(result.model, op)
    gates = GATES[op]
    assert attr_of(node, "hidden_size") == len(kept)
    w, r, bias = (input_value(model, "rnn", i) for i in (1, 2, 3))
    rows = kept_rows(kept, 8, gates)
    # the same units in every gate of W, R and B, and in both directions
    np.testing.assert_array_equal(input_value(result.model, "rnn", 1), w[:, rows])
    np.testing.assert_array_equal(input_value(result.model, "rnn", 2), r[:, rows][:, :, kept])
    np.testing.assert_array_equal(input_value(result.model, "rnn", 3), bias[:, kept_rows(kept, 8, 2 * gates)])
    state_axis = 2
    h0 = input_value(model, "rnn", 5)
    np.testing.assert_array_equal(input_value(result.model, "rnn", 5), np.take(h0, kept, state_axis))
    if op == "LSTM":
        np.testing.assert_array_equal(input_value(result.model, "rnn", 7),
                                      input_value(model, "rnn", 7)[:, kept_rows(kept, 8, 3)])
    # the heads read the direction-folded features: the kept units of each direction's half
    head = input_value(result.model, "head", 1)
    assert head.shape == (2 * len(kept), 4)
    np.testing.assert_array_equal(head, input_value(model, "head", 1)[np.concatenate([kept, np.add(kept, 8)])])


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_input_features_are_cut_in_w(op):
    model = stacked(op, directions=1, states=False, peepholes=False)
    analysis = onnxprune.analyse(model)
    group = group_of(analysis, "embed")
    assert group.prunable
    kept = [1, 2, 4]
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {group.id: kept}))
    np.testing.assert_array_equal(input_value(result.model, "rnn", 1), input_value(model, "rnn", 1)[:, :, kept])
    assert attr_of(nodes_of(result.model, op)[0], "hidden_size") == 8


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_ratio_prunes_both_groups_mask_equivalently(op):
    model = stacked(op, lengths=True)
    result, analysis, _ = prune_checked(model, 0.5, feeds=lengths_feed(model))
    assert {g.id for g in analysis.groups if g.prunable} <= set(result.plan.keep)
    assert onnxprune.count_params(result.model) < 0.5 * onnxprune.count_params(model)


def test_a_stacked_bidirectional_layer_reads_both_halves_of_the_first():
    """Two BiLSTM layers: the second's W columns are the first's units in each direction's half."""
    b = GraphBuilder(seed=2)
    x = b.input("x", [T, BATCH, 4])
    hidden = 6

    def bilstm(h, features, name):
        y = b.op("LSTM", [h, b.weight((2, 4 * hidden, features), f"{name}.W"),
                          b.weight((2, 4 * hidden, hidden), f"{name}.R")],
                 outputs=1, name=name, hidden_size=hidden, direction="bidirectional")
        y = b.op("Transpose", [y], perm=[0, 2, 1, 3])
        return b.op("Reshape", [y, b.ints([T, BATCH, 2 * hidden])])

    model = b.build(b.matmul(bilstm(bilstm(x, 4, "l0"), 2 * hidden, "l1"), 2 * hidden, 3, name="head"))
    analysis = onnxprune.analyse(model)
    group = group_of(analysis, "l0")
    kept = [0, 1, 4]
    result, _, _ = prune_checked(model, plan=full_plan(analysis, {group.id: kept}))
    w1 = input_value(result.model, "l1", 1)
    np.testing.assert_array_equal(w1, input_value(model, "l1", 1)[:, :, [0, 1, 4, 6, 7, 10]])


def test_channels_on_the_batch_axis_are_a_barrier():
    """Features unsqueezed into X's batch axis: channels that reach the node there stop."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [T, 3])
    h = b.op("Unsqueeze", [b.matmul(x, 3, 4, name="mix"), b.ints([2])])  # (T, 4, 1): 4 on the batch axis
    y = b.op("GRU", [h, b.weight((1, 12, 1)), b.weight((1, 12, 4))], outputs=1, name="gru", hidden_size=4)
    model = b.build(b.matmul(b.op("Squeeze", [y, b.ints([1])]), 4, 2))
    group = group_of(onnxprune.analyse(model), "mix")
    assert not group.prunable and "GRU gru: channels reach axis 1 of input 0" in group.blocked


def test_computed_weights_are_a_barrier():
    b = GraphBuilder()
    x = b.input("x", [T, BATCH, 3])
    w = b.op("Mul", [b.weight((1, 4, 3)), b.input("s", [1])])
    y = b.op("RNN", [b.op("Relu", [b.matmul(x, 3, 3, name="embed")]), w, b.weight((1, 4, 4))], outputs=1,
             name="rnn", hidden_size=4)
    model = b.build(b.matmul(b.op("Squeeze", [y, b.ints([1])]), 4, 2))
    analysis = onnxprune.analyse(model)
    assert "RNN rnn: weights are computed at run time" in group_of(analysis, "embed").blocked
    assert all("rnn" not in g.sources for g in analysis.groups)  # no hidden units to cut either


def test_a_zero_initial_state_expanded_to_the_batch_is_the_absent_input():
    """The torch exporter's h0: zeros (D, 1, H) expanded to [D, batch, H] read from the input's shape.
    It becomes the absent input (zeros), so the hidden units are prunable, with a dynamic batch."""
    b = GraphBuilder(seed=5)
    x = b.input("x", [T, "N", 3])
    batch = b.op("Gather", [b.op("Shape", [x]), b.ints([1])], axis=0)
    shape = b.op("Concat", [b.ints([1]), batch, b.ints([4])], axis=0)
    h0 = b.op("Expand", [b.floats(np.zeros((1, 1, 4))), shape])
    outs = b.op("GRU", [b.op("Relu", [b.matmul(x, 3, 3, name="embed")]), b.weight((1, 12, 3)), b.weight((1, 12, 4)),
                        "", "", h0], outputs=2, name="gru", hidden_size=4)
    model = b.build(b.matmul(b.op("Squeeze", [outs[0], b.ints([1])]), 4, 2))
    result, analysis, _ = prune_checked(model, 0.5)
    assert group_of(analysis, "gru").prunable
    assert not nodes_of(result.model, "Expand") and nodes_of(result.model, "GRU")[0].input[5] == ""


# --- torch exports: conv + BiLSTM (CRNN-like) and a GRU sequence model -------------------------------

class CRNN(torch.nn.Module):
    """Conv features of a text line -> (width, batch, channels * height) -> BiLSTM -> per-step classes."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d((2, 1)))
        self.rnn = torch.nn.LSTM(64, 32, bidirectional=True)
        self.classes = torch.nn.Linear(64, 11)

    def forward(self, x):
        f = self.features(x)  # (N, 32, 2, W)
        n, c, h, w = f.shape
        y, _ = self.rnn(f.reshape(n, c * h, w).permute(2, 0, 1))
        return self.classes(y)


class GRUModel(torch.nn.Module):
    """Features -> Linear -> two GRU layers (batch first) -> per-step outputs."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 32)
        self.rnn = torch.nn.GRU(32, 48, num_layers=2, batch_first=True)
        self.out = torch.nn.Linear(48, 5)

    def forward(self, x):
        y, _ = self.rnn(torch.relu(self.embed(x)))
        return self.out(y)


EXPORTS = {"crnn": (CRNN, (1, 1, 8, 16)), "gru": (GRUModel, (2, 6, 8))}


def export(tmp_path, name: str, dynamo: bool) -> onnx.ModelProto:
    net, shape = EXPORTS[name]
    torch.manual_seed(0)
    path = tmp_path / f"{name}_{int(dynamo)}.onnx"
    kwargs = dict(dynamo=True, external_data=False) if dynamo else dict(dynamo=False, opset_version=17)
    if dynamo:
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(net().eval(), (torch.randn(*shape),), str(path), **kwargs)
        except Exception as exc:  # an exporter that cannot run here is not what is tested
            pytest.skip(f"torch.onnx.export(dynamo={dynamo}) failed: {type(exc).__name__}: {exc}")
    return onnx.load(str(path))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["crnn", "gru"])
def test_exports_prune_at_0_4_with_1_3x_fewer_weights(tmp_path, name, dynamo, capsys):
    model = export(tmp_path, name, dynamo)
    result, analysis, _ = prune_checked(model, 0.4)
    layers = {n.name for n in model.graph.node if n.op_type in ("LSTM", "GRU")}
    hidden = [g for g in analysis.groups if layers & set(g.sources)]
    assert len(hidden) == len(layers) and all(len(result.plan.keep[g.id]) < g.size for g in hidden)
    before, after = onnxprune.count_params(model), onnxprune.count_params(result.model)
    assert before / after >= 1.3, f"{before} -> {after}"
    # the executor runs the pruned export as onnxruntime does
    feeds = make_feeds(result.model)
    with torch.no_grad():
        got = TorchGraph(result.model).run({k: torch.from_numpy(v) for k, v in feeds.items()})
    assert rel_err(run(result.model, feeds)[0], next(iter(got.values())).numpy()) <= 1e-4
    # and so does the command line, whose summary says how many fewer weights
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    code, out, err = run_main(capsys, path, "--structured", "0.4", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert "rnn" in out and "fewer" in out


def test_distillation_trains_a_pruned_gru_export(tmp_path):
    model = export(tmp_path, "gru", False)
    pruned = onnxprune.prune(model, 0.4).model
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    data = onnxprune.Dataset({name: rng.standard_normal((16, 6, 8)).astype(np.float32)})
    trained, report = onnxprune.distill(pruned, model, data, epochs=2, batch_size=2, lr=0.01)
    assert len(report.epochs) == 2 and all(np.isfinite(e.val_loss) for e in report.epochs)
    onnx.checker.check_model(trained, full_check=True)
    gru = nodes_of(pruned, "GRU")[0].name
    assert not np.array_equal(input_value(trained, gru, 1), input_value(pruned, gru, 1))  # W was trained


def crnn_data(model, samples=8) -> onnxprune.Dataset:
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    rng = np.random.default_rng(1)
    return onnxprune.Dataset({vi.name: rng.standard_normal((samples, *shape[1:])).astype(np.float32)})


def test_compensation_reads_the_means_of_time_first_activations(tmp_path):
    """The BiLSTM's output, which the classifier reads, is (T, B, 2H): the means of its removed
    units are per sample, not per time step (weighting by T made the folded bias T times too big:
    output error 0.42 -> 3.7 on this model)."""
    model = export(tmp_path, "crnn", False)
    analysis = onnxprune.analyse(model)
    layer = next(n.name for n in model.graph.node if n.op_type == "LSTM")
    group = group_of(analysis, layer)
    plan = full_plan(analysis, {group.id: list(range(0, group.size, 2))})
    result = onnxprune.prune(model, plan=plan, data=crnn_data(model), compensate=True, reconstruct=False)
    errors = result.report.compensation["output_error"]
    assert result.report.compensation["readers"] == 1 and errors["with"] < errors["without"]


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_importance_from_data_scores_the_hidden_units(tmp_path, importance):
    """taylor takes gradients through the executor's LSTM; activation measures in onnxruntime."""
    model = export(tmp_path, "crnn", False)
    result = onnxprune.prune(model, 0.4, data=crnn_data(model), importance=importance, compensate=False)
    layer = next(n.name for n in model.graph.node if n.op_type == "LSTM")
    (node,) = nodes_of(result.model, "LSTM")
    assert attr_of(node, "hidden_size") < 32 and node.name == layer


# --- Loop and Scan in the executor --------------------------------------------------------------------

def vi(name, dtype=F32, shape=None):
    return helper.make_tensor_value_info(name, dtype, shape)


def control_model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "control", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def loop_with_a_conv(trip=3):
    """h <- relu(conv(h)) ``trip`` times (the conv's weights read from the outer scope); the
    iterates are stacked as a scan output."""
    body = helper.make_graph(
        [helper.make_node("Conv", ["h", "conv.W", "conv.B"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["h_next"]),
         helper.make_node("Identity", ["cond"], ["cond_next"]),
         helper.make_node("Identity", ["h_next"], ["h_seen"])],
        "body", [vi("i", TensorProto.INT64, []), vi("cond", TensorProto.BOOL, []), vi("h", F32, [1, 3, 6, 6])],
        [vi("cond_next", TensorProto.BOOL, []), vi("h_next", F32, [1, 3, 6, 6]), vi("h_seen", F32, [1, 3, 6, 6])])
    inits = [numpy_helper.from_array(rng_array((3, 3, 3, 3), 1), "conv.W"),
             numpy_helper.from_array(rng_array((3,), 2), "conv.B"),
             numpy_helper.from_array(np.array(trip, np.int64), "trip"),
             numpy_helper.from_array(np.array(True), "go")]
    loop = helper.make_node("Loop", ["trip", "go", "x"], ["h_final", "h_all"], name="loop", body=body)
    return control_model([loop], [vi("x", F32, [1, 3, 6, 6])],
                         [vi("h_final", F32, [1, 3, 6, 6]), vi("h_all", F32, [trip, 1, 3, 6, 6])], inits)


def test_a_loop_with_a_conv_in_its_body_runs_as_in_onnxruntime_and_trains():
    model = loop_with_a_conv()
    feeds = {"x": rng_array((1, 3, 6, 6), 0, 1.0)}
    assert_executor_matches(model, feeds)
    tg = TorchGraph(model)
    final, stacked = tg(torch.from_numpy(feeds["x"]))
    assert stacked.shape == (3, 1, 3, 6, 6)
    final.sum().backward()
    assert tg.parameter("conv.W").grad.abs().sum() > 0  # through every iteration


def test_a_loop_ends_when_its_body_says_so():
    """No trip count: the body's condition (iteration < 3) ends it; s doubles each time."""
    body = helper.make_graph(
        [helper.make_node("Less", ["i", "three"], ["cond_next"]),
         helper.make_node("Add", ["s", "s"], ["s_next"]),
         helper.make_node("Cast", ["i"], ["i_float"], to=F32),
         helper.make_node("Mul", ["s_next", "i_float"], ["seen"])],
        "body", [vi("i", TensorProto.INT64, []), vi("cond", TensorProto.BOOL, []), vi("s", F32, [2])],
        [vi("cond_next", TensorProto.BOOL, []), vi("s_next", F32, [2]), vi("seen", F32, [2])])
    inits = [numpy_helper.from_array(np.array(3, np.int64), "three"),
             numpy_helper.from_array(np.array(True), "go")]
    loop = helper.make_node("Loop", ["", "go", "s0"], ["s", "all"], name="loop", body=body)
    model = control_model([loop], [vi("s0", F32, [2])], [vi("s", F32, [2]), vi("all", F32, ["n", 2])], inits)
    assert_executor_matches(model, {"s0": np.array([1.0, -2.0], np.float32)})


@pytest.mark.parametrize("axes", [dict(), dict(scan_input_axes=[1], scan_input_directions=[1],
                                                scan_output_axes=[1], scan_output_directions=[1])])
def test_scan_runs_as_in_onnxruntime(axes):
    """A running sum s <- s + x_t with y_t = tanh(s) W, along either axis and direction."""
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "x_t"], ["s_next"]), helper.make_node("Tanh", ["s_next"], ["t"]),
         helper.make_node("MatMul", ["t", "w"], ["y_t"])],
        "body", [vi("s", F32, [2, 3]), vi("x_t", F32, [2, 3])], [vi("s_next", F32, [2, 3]), vi("y_t", F32, [2, 4])])
    scan = helper.make_node("Scan", ["s0", "xs"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1, **axes)
    xs_shape = (2, 5, 3) if axes else (5, 2, 3)
    ys_shape = [2, 5, 4] if axes else [5, 2, 4]
    model = control_model([scan], [vi("s0", F32, [2, 3]), vi("xs", F32, list(xs_shape))],
                          [vi("s", F32, [2, 3]), vi("ys", F32, ys_shape)],
                          [numpy_helper.from_array(rng_array((3, 4), 3), "w")])
    assert_executor_matches(model, {"s0": rng_array((2, 3), 4), "xs": rng_array(xs_shape, 5, 1.0)})

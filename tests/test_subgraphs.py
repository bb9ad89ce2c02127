"""Channels in subgraphs (issue 17, point 3): groups inside If branches and Loop bodies, channels of
an outer tensor flowing into the bodies that read it, through an If's results, round a Loop's
carried values and through a Scan, and barriers that name the subgraph; graphs built with
onnx.helper (and a torch.cond export), checked for validity and mask equivalence with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune

from graphs import all_nodes, group_of, prune_checked, run, run_main

F32 = TensorProto.FLOAT
X = [1, 3, 8, 8]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weight(shape, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)


def conv(name, x, out, w, b=None):
    inputs = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", inputs, [out], name=name, pads=[1, 1, 1, 1])


def vi(name, shape=None, dtype=F32):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name, shape, seed):
    return numpy_helper.from_array(weight(shape, seed), name)


def model_of(nodes, inputs, outputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def branch(prefix, source, out_channels, inits, seed, cin=None):
    """source -> conv(->8) -> relu -> conv(->out_channels): a prunable 8-channel group inside."""
    nodes = [conv(f"{prefix}.conv1", source, f"{prefix}.h", f"{prefix}.W1", f"{prefix}.B1"),
             helper.make_node("Relu", [f"{prefix}.h"], [f"{prefix}.r"], name=f"{prefix}.relu"),
             conv(f"{prefix}.conv2", f"{prefix}.r", f"{prefix}.out", f"{prefix}.W2")]
    cin = cin or (3 if source == "x" else 8)
    inits += [init(f"{prefix}.W1", (8, cin, 3, 3), seed), init(f"{prefix}.B1", (8,), seed + 1),
              init(f"{prefix}.W2", (out_channels, 8, 3, 3), seed + 2)]
    return nodes


def if_with_convs_in_both_branches(source="x"):
    """y = If(cond, then: conv-relu-conv(source), else: the same with other weights). The then
    branch keeps its weights in the outer graph, the else branch in its own initializers."""
    outer, own = [], []
    then = helper.make_graph(branch("then", source, 4, outer, 1), "then", [], [vi("then.out", [1, 4, 8, 8])])
    els = helper.make_graph(branch("else", source, 4, own, 7), "else", [], [vi("else.out", [1, 4, 8, 8])], own)
    nodes = [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then, else_branch=els)]
    if source != "x":  # an outer conv whose channels the branches read
        nodes.insert(0, conv("outer", "x", "outer.h", "outer.W", "outer.B"))
        nodes.insert(1, helper.make_node("Relu", ["outer.h"], [source], name="outer.relu"))
        outer += [init("outer.W", (8, 3, 3, 3), 20), init("outer.B", (8,), 21)]
    return model_of(nodes, [vi("x", X), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 4, 8, 8])], outer)


def feeds_with(cond: bool) -> dict:
    return {"x": np.random.default_rng(0).standard_normal(X).astype(np.float32), "cond": np.array(cond)}


def body_weight(model, node_name: str, index: int) -> np.ndarray:
    """The constant input ``index`` of a node anywhere in the model (outer or subgraph initializer)."""
    found = next(n for n in all_nodes(model.graph) if n.name == node_name)
    name = found.input[index]
    graphs = [model.graph] + [a.g for n in all_nodes(model.graph) for a in n.attribute
                              if a.type == onnx.AttributeProto.GRAPH]
    return next(numpy_helper.to_array(t) for g in graphs for t in g.initializer if t.name == name)


@pytest.mark.parametrize("cond", [True, False])
def test_convs_inside_both_if_branches_are_pruned(cond):
    model = if_with_convs_in_both_branches()
    analysis = onnxprune.analyse(model)
    assert group_of(analysis, "then.conv1").prunable and group_of(analysis, "else.conv1").prunable
    result, _, _ = prune_checked(model, 0.5, feeds=feeds_with(cond), macs_drop=False)
    for prefix in ("then", "else"):
        assert body_weight(result.model, f"{prefix}.conv1", 1).shape[0] == 4
        assert body_weight(result.model, f"{prefix}.conv2", 1).shape[1] == 4
    assert onnxprune.count_params(result.model) < onnxprune.count_params(model)


@pytest.mark.parametrize("cond", [True, False])
def test_an_outer_tensor_leads_its_channels_into_both_branches(cond):
    """The outer conv's channels are read by the first conv of each branch: one group, whose cut
    takes the same input channels out of both."""
    model = if_with_convs_in_both_branches(source="outer.r")
    group = group_of(onnxprune.analyse(model), "outer")
    assert group.prunable and {"then.conv1", "else.conv1"} <= set(group.nodes)
    result, _, _ = prune_checked(model, 0.5, feeds=feeds_with(cond), macs_drop=False)
    widths = {body_weight(result.model, f"{prefix}.conv1", 1).shape[1] for prefix in ("then", "else")}
    assert widths == {4}


def test_a_barrier_in_a_branch_names_the_subgraph():
    model = if_with_convs_in_both_branches(source="outer.r")
    then = next(a.g for a in model.graph.node[-1].attribute if a.name == "then_branch")
    then.node.insert(0, helper.make_node("LRN", ["outer.r"], ["then.lrn"], name="then.lrn", size=3))
    then.node[1].input[0] = "then.lrn"
    onnx.checker.check_model(model, full_check=True)
    group = group_of(onnxprune.analyse(model), "outer")
    assert "LRN then.lrn: no pruning rule for this op (in then_branch of If if)" in group.blocked


def if_choosing_a_conv():
    """h = If(cond, then: conv_a(x), else: conv_b(x)); y = head(relu(h))."""
    then = helper.make_graph([conv("then.conv", "x", "then.out", "then.W", "then.B")], "then", [],
                             [vi("then.out", [1, 8, 8, 8])])
    els = helper.make_graph([conv("else.conv", "x", "else.out", "else.W")], "else", [], [vi("else.out", [1, 8, 8, 8])])
    return model_of([helper.make_node("If", ["cond"], ["h"], name="if", then_branch=then, else_branch=els),
                     helper.make_node("Relu", ["h"], ["r"], name="relu"), conv("head", "r", "y", "head.W")],
                    [vi("x", X), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 2, 8, 8])],
                    [init("then.W", (8, 3, 3, 3), 1), init("then.B", (8,), 4), init("else.W", (8, 3, 3, 3), 2),
                     init("head.W", (2, 8, 3, 3), 3)])


@pytest.mark.parametrize("cond", [True, False])
def test_channels_cross_an_if_result_into_both_branches(cond):
    """The If's result is either branch's output: one group with both branch convs as sources,
    cut alike, and the head reading the result."""
    model = if_choosing_a_conv()
    group = group_of(onnxprune.analyse(model), "then.conv")
    assert group.prunable and set(group.sources) == {"then.conv", "else.conv"}
    result, _, _ = prune_checked(model, 0.5, feeds=feeds_with(cond), macs_drop=False)
    assert body_weight(result.model, "then.conv", 1).shape[0] == body_weight(result.model, "else.conv", 1).shape[0] == 4
    assert body_weight(result.model, "then.conv", 2).shape == (4,)
    assert body_weight(result.model, "head", 1).shape[1] == 4


def test_a_branch_whose_result_cannot_be_cut_blocks_both():
    """The else branch's result comes through an LRN (no rule): the then branch's conv, whose
    channels are the same result's, keeps its width too."""
    model = if_choosing_a_conv()
    els = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    els.node[0].output[0] = "else.h"
    els.node.append(helper.make_node("LRN", ["else.h"], ["else.out"], name="else.lrn", size=3))
    onnx.checker.check_model(model, full_check=True)
    group = group_of(onnxprune.analyse(model), "then.conv")
    assert not group.prunable
    assert "LRN else.lrn: no pruning rule for this op (in else_branch of If if)" in group.blocked


def loop_with_convs(trip=3):
    """h <- h + conv2(relu(conv1(h))) ``trip`` times: an 8-channel group inside the body."""
    inits = []
    nodes = branch("body", "h", 3, inits, 3, cin=3)
    nodes += [helper.make_node("Add", ["h", "body.out"], ["h_next"], name="body.add"),
              helper.make_node("Identity", ["cond"], ["cond_next"], name="body.cond")]
    body = helper.make_graph(nodes, "body", [vi("i", [], TensorProto.INT64), vi("cond", [], TensorProto.BOOL),
                                             vi("h", X)],
                             [vi("cond_next", [], TensorProto.BOOL), vi("h_next", X)])
    inits += [numpy_helper.from_array(np.array(trip, np.int64), "trip"), numpy_helper.from_array(np.array(True), "go")]
    loop = helper.make_node("Loop", ["trip", "go", "x"], ["y"], name="loop", body=body)
    return model_of([loop], [vi("x", X)], [vi("y", X)], inits)


def test_a_conv_in_a_loop_body_is_pruned():
    model = loop_with_convs()
    group = group_of(onnxprune.analyse(model), "body.conv1")
    assert group.prunable and group.size == 8
    result, _, _ = prune_checked(model, 0.5, macs_drop=False)
    assert body_weight(result.model, "body.conv1", 1).shape[0] == 4
    assert body_weight(result.model, "body.conv2", 1).shape[1] == 4
    # the carried value starts as the graph input: its channels (conv2's filters) stay
    carried = group_of(onnxprune.analyse(model), "body.conv2")
    assert ("h", 1) in carried.dims and "reaches graph input x" in carried.blocked
    assert run(result.model, {"x": np.ones(X, np.float32)})[0].shape == tuple(X)


def test_data_criteria_score_groups_inside_a_body_by_l2_with_a_warning():
    model = loop_with_convs()
    data = onnxprune.Dataset({"x": np.random.default_rng(1).standard_normal((4, *X[1:])).astype(np.float32)})
    result = onnxprune.prune(model, 0.5, data=data, importance="activation")
    assert any("importance 'activation': 1 group(s) cannot be measured this way; used l2" in w
               for w in result.report.warnings)
    assert body_weight(result.model, "body.conv1", 1).shape[0] == 4


def test_the_command_line_prunes_inside_both_branches(tmp_path, capsys):
    """Verification feeds the If's boolean condition as an array (a numpy scalar was refused)."""
    path, out = tmp_path / "if.onnx", tmp_path / "out.onnx"
    onnx.save(if_with_convs_in_both_branches(), str(path))
    code, printed, err = run_main(capsys, path, "--structured", "0.5", "-o", out)
    assert code == 0, err
    assert "then.conv1" in printed and "else.conv1" in printed and "(2.00x fewer)" in printed
    onnx.checker.check_model(str(out), full_check=True)


def test_recovery_trains_the_weights_of_a_loop_body():
    """After the cut the body's sliced weights live in the body: the executor trains them too and
    writes them back there."""
    model = loop_with_convs()
    pruned = onnxprune.prune(model, 0.5).model
    data = onnxprune.Dataset({"x": np.random.default_rng(2).standard_normal((4, *X[1:])).astype(np.float32)})
    trained, report = onnxprune.distill(pruned, model, data, epochs=1, batch_size=1, lr=0.01, val_fraction=0.25)
    assert len(report.epochs) == 1
    onnx.checker.check_model(trained, full_check=True)
    for name in ("body.conv1", "body.conv2"):
        before, after = body_weight(pruned, name, 1), body_weight(trained, name, 1)
        assert before.shape == after.shape and not np.array_equal(before, after)


@pytest.mark.parametrize("make", [if_with_convs_in_both_branches, if_choosing_a_conv, loop_with_convs],
                         ids=["if", "if_result", "loop"])
def test_shapes_recorded_inside_subgraphs_are_not_left_stale(make):
    """Exporters (and shape inference) record the shapes of body tensors and outputs: after the
    cut they would contradict the sliced convs (the full check fails), so they are inferred again."""
    model = onnx.shape_inference.infer_shapes(make())
    bodies = [a.g for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    assert all(len(g.value_info) or g.output[0].type.tensor_type.HasField("shape") for g in bodies)
    feeds = feeds_with(True) if len(model.graph.input) > 1 else {"x": feeds_with(True)["x"]}
    prune_checked(model, 0.5, feeds=feeds, macs_drop=False)


@pytest.mark.slow  # the dynamo export: about 10 s on a loaded machine
def test_a_torch_cond_export_prunes_inside_both_branches(tmp_path):
    """torch.cond exported by the dynamo exporter (the TorchScript exporter cannot export it): an
    If whose branches hold conv-relu-conv with weights of their own."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")

    class Branches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a1, self.a2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)
            self.b1, self.b2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return torch.cond(x.mean() > 0, lambda x: self.a2(torch.relu(self.a1(x))),
                              lambda x: self.b2(torch.relu(self.b1(x))), (x,))

    torch.manual_seed(0)
    path = tmp_path / "cond.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(Branches().eval(), (torch.randn(*X),), str(path), dynamo=True, external_data=False)
        except Exception as exc:  # an exporter that cannot run here is not what is tested
            pytest.skip(f"torch.onnx.export(dynamo=True) failed: {type(exc).__name__}: {exc}")
    model = onnx.load(str(path))
    x = np.abs(np.random.default_rng(0).standard_normal(X)).astype(np.float32)
    for sign in (1, -1):  # the mean's sign picks the branch
        result, analysis, _ = prune_checked(model, 0.5, feeds={model.graph.input[0].name: sign * x}, macs_drop=False)
    inner = [g for g in analysis.groups if g.prunable]
    assert len(inner) == 2 and all(len(result.plan.keep[g.id]) == 4 for g in inner)
    assert onnxprune.count_params(result.model) < onnxprune.count_params(model)


# --- channels through Loop and Scan bodies ---------------------------------------------------------

def loop_carrying_conv_features(trip=3):
    """h0 = conv0(x); h <- h + conv2(relu(conv1(h))) ``trip`` times, each h stacked; y = head(h_final),
    s = head2(mean of the stacked h over the iterations)."""
    inits = [init("conv0.W", (6, 3, 3, 3), 30), init("head.W", (2, 6, 3, 3), 31), init("head2.W", (2, 6, 3, 3), 32)]
    nodes = branch("body", "h", 6, inits, 3, cin=6)
    nodes += [helper.make_node("Add", ["h", "body.out"], ["h_next"], name="body.add"),
              helper.make_node("Identity", ["cond"], ["cond_next"], name="body.cond"),
              helper.make_node("Identity", ["h_next"], ["h_seen"], name="body.seen")]
    shape = [1, 6, 8, 8]
    body = helper.make_graph(nodes, "body", [vi("i", [], TensorProto.INT64), vi("cond", [], TensorProto.BOOL),
                                             vi("h", shape)],
                             [vi("cond_next", [], TensorProto.BOOL), vi("h_next", shape), vi("h_seen", shape)])
    inits += [numpy_helper.from_array(np.array(trip, np.int64), "trip"), numpy_helper.from_array(np.array(True), "go")]
    outer = [conv("conv0", "x", "h0", "conv0.W"),
             helper.make_node("Loop", ["trip", "go", "h0"], ["h_final", "h_all"], name="loop", body=body),
             conv("head", "h_final", "y", "head.W"),
             helper.make_node("ReduceMean", ["h_all"], ["h_mean"], name="mean", axes=[0], keepdims=0),
             conv("head2", "h_mean", "s", "head2.W")]
    return model_of(outer, [vi("x", X)], [vi("y", [1, 2, 8, 8]), vi("s", [1, 2, 8, 8])], inits)


def test_channels_go_round_a_loop():
    """The carried features are one group: conv0's filters (the initial value), conv2's (added in
    the body), conv1's inputs, and the heads reading the final value and the stacked iterates."""
    model = loop_carrying_conv_features()
    analysis = onnxprune.analyse(model)
    carried = group_of(analysis, "conv0")
    assert carried.prunable and set(carried.sources) == {"conv0", "body.conv2"}
    assert group_of(analysis, "body.conv1").prunable
    result, _, _ = prune_checked(model, 0.5, macs_drop=False)
    assert body_weight(result.model, "conv0", 1).shape[0] == body_weight(result.model, "body.conv2", 1).shape[0] == 3
    assert body_weight(result.model, "body.conv1", 1).shape == (4, 3, 3, 3)
    assert body_weight(result.model, "head", 1).shape[1] == body_weight(result.model, "head2", 1).shape[1] == 3


@pytest.mark.parametrize("axes", [{}, dict(scan_input_axes=[1], scan_output_axes=[1])])
def test_channels_go_through_a_scan(axes):
    """xs = embed(x) (features on the last axis) scanned over time: s <- s + relu(x_t) W_s (a state
    from a constant), y_t = relu(x_t) W_y; the outer head reads the stacked y."""
    x_shape = [2, 5, 4] if axes else [5, 2, 4]
    body = helper.make_graph(
        [helper.make_node("Relu", ["x_t"], ["r_t"], name="body.relu"),
         helper.make_node("MatMul", ["r_t", "ws"], ["d_t"], name="body.state"),
         helper.make_node("Add", ["s", "d_t"], ["s_next"], name="body.add"),
         helper.make_node("MatMul", ["r_t", "wy"], ["y_t"], name="body.out")],
        "body", [vi("s", [2, 6]), vi("x_t", [2, 6])], [vi("s_next", [2, 6]), vi("y_t", [2, 3])])
    y_shape = [2, 5, 3] if axes else [5, 2, 3]
    nodes = [helper.make_node("MatMul", ["x", "embed.W"], ["xs"], name="embed"),
             helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], name="scan", body=body, num_scan_inputs=1,
                              **axes),
             helper.make_node("MatMul", ["ys", "head.W"], ["y"], name="head"),
             helper.make_node("MatMul", ["s_final", "last.W"], ["z"], name="last")]
    inits = [init("embed.W", (4, 6), 40), init("ws", (6, 6), 41), init("wy", (6, 3), 42), init("head.W", (3, 2), 43),
             init("last.W", (6, 2), 44), numpy_helper.from_array(np.zeros((2, 6), np.float32), "s0")]
    model = model_of(nodes, [vi("x", x_shape)], [vi("y", y_shape[:2] + [2]), vi("z", [2, 2])], inits)
    analysis = onnxprune.analyse(model)
    for source in ("embed", "body.out", "body.state"):
        assert group_of(analysis, source).prunable, source
    result, _, _ = prune_checked(model, 0.5, macs_drop=False)
    assert body_weight(result.model, "embed", 1).shape == (4, 3)
    assert body_weight(result.model, "body.out", 1).shape == (3, 2)
    assert body_weight(result.model, "head", 1).shape == (2, 2)
    assert body_weight(result.model, "last", 1).shape == (3, 2) and body_weight(result.model, "scan", 0).shape == (2, 3)


def test_ignore_leaves_a_branch_node_alone():
    model = if_with_convs_in_both_branches()
    analysis = onnxprune.analyse(model, ignore=("then.conv1",))
    assert not group_of(analysis, "then.conv1").prunable and group_of(analysis, "else.conv1").prunable

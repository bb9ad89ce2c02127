"""Depth pruning: residual blocks found from the graph (analysis/blocks.py), removed whole (cut/depth.py).

The properties (issue 14, point 7): removing a CNN or pre-norm block equals
the original with that branch's output zeroed; removing a post-norm layer
equals the original with that layer replaced by the identity.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnxprune
from onnxprune.analysis.blocks import POST_NORM, RESIDUAL, find_blocks
from onnxprune.analysis.stats import count_macs
from onnxprune.cut import iochange
from onnxprune.cut.depth import remove_blocks
from onnxprune.graph.shapes import analyse_shapes
from onnxprune.runtime.session import capture_model
from onnxprune.scoring.blocks import block_scores, weight_scores

from graphs import GraphBuilder, assert_close, check_valid, make_feeds, one_error_line, run, run_main, session


def blocks_of(model):
    return find_blocks(model, analyse_shapes(model, None).static)


# --- generated residual graphs ----------------------------------------------------------------

def resnet_like(blocks: int = 3, c: int = 8, seed: int = 0, projection: bool = False) -> onnx.ModelProto:
    """stem conv -> ``blocks`` basic blocks (conv-relu-conv + x, relu) -> [a projection block] -> pool -> fc."""
    b = GraphBuilder(seed=seed, name="resnet_like")
    h = b.op("Relu", [b.conv(b.input("x", [2, 3, 8, 8]), 3, c, name="stem")])
    for i in range(blocks):
        f = b.conv(b.op("Relu", [b.conv(h, c, c, name=f"b{i}.conv1")]), c, c, name=f"b{i}.conv2")
        h = b.op("Relu", [b.op("Add", [h, f], name=f"b{i}.add")])
    if projection:  # a downsampling block: its skip is computed, so it is no identity residual
        f = b.conv(b.op("Relu", [b.conv(h, c, 2 * c, stride=2, name="down.conv1")]), 2 * c, 2 * c,
                   name="down.conv2")
        h = b.op("Add", [b.conv(h, c, 2 * c, k=1, stride=2, name="down.proj"), f], name="down.add")
        c *= 2
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    return b.build(b.gemm(h, c, 5, name="fc"))


def _layernorm(b: GraphBuilder, x, d: int, name: str):
    return b.op("LayerNormalization", [x, b.weight((d,), f"{name}.g", offset=1.0), b.weight((d,), f"{name}.b")],
                name=name, axis=-1, epsilon=1e-5)


def _mlp(b: GraphBuilder, x, d: int, name: str):
    h = b.op("Relu", [b.matmul(x, d, 2 * d, name=f"{name}.fc1")])
    return b.matmul(h, 2 * d, d, name=f"{name}.fc2")


def _mixer(b: GraphBuilder, x, d: int, t: int, name: str):
    """A token mixer standing in for attention: softmax(x Wq (x Wk)^T) x Wv, over a (t, d) sequence."""
    q, k, v = (b.matmul(x, d, d, name=f"{name}.{w}") for w in "qkv")
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
    return b.matmul(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v]), d, d, name=f"{name}.out")


def pre_norm(layers: int = 2, d: int = 8, t: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x + mixer(LN(x)), then + MLP(LN(.)), per layer; a final LN and a head."""
    b = GraphBuilder(seed=seed, name="pre_norm")
    h = b.input("x", [2, t, d])
    for i in range(layers):
        h = b.op("Add", [h, _mixer(b, _layernorm(b, h, d, f"l{i}.ln1"), d, t, f"l{i}.attn")], name=f"l{i}.add1")
        h = b.op("Add", [h, _mlp(b, _layernorm(b, h, d, f"l{i}.ln2"), d, f"l{i}.mlp")], name=f"l{i}.add2")
    return b.build(b.matmul(_layernorm(b, h, d, "ln_f"), d, 3, name="head"))


def post_norm(layers: int = 2, d: int = 8, t: int = 4, seed: int = 0) -> onnx.ModelProto:
    """BERT-style: LN(x + mixer(x)), then LN(h + MLP(h)), per layer, after an embedding LN."""
    b = GraphBuilder(seed=seed, name="post_norm")
    h = _layernorm(b, b.input("x", [2, t, d]), d, "emb.ln")
    for i in range(layers):
        h = _layernorm(b, b.op("Add", [h, _mixer(b, h, d, t, f"l{i}.attn")], name=f"l{i}.add1"), d, f"l{i}.ln1")
        h = _layernorm(b, b.op("Add", [h, _mlp(b, h, d, f"l{i}.mlp")], name=f"l{i}.add2"), d, f"l{i}.ln2")
    return b.build(b.matmul(h, d, 3, name="head"))


# --- references -------------------------------------------------------------------------------

def branch_zeroed(model: onnx.ModelProto, add_name: str, skip: str) -> onnx.ModelProto:
    """The original with the residual Add ``add_name``'s branch operand (the one not ``skip``) times 0."""
    zeroed = copy.deepcopy(model)
    zero, out = f"{add_name}/zero", f"{add_name}/zeroed_branch"
    zeroed.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), zero))
    add = next(n for n in zeroed.graph.node if n.name == add_name)
    branch = 1 - list(add.input).index(skip)
    zeroed.graph.node.append(helper.make_node("Mul", [add.input[branch], zero], [out]))
    add.input[branch] = out
    return _sorted(zeroed)


def layer_bypassed(model: onnx.ModelProto, x: str, y: str) -> onnx.ModelProto:
    """The original with every reader of ``y`` reading ``x`` (the layer's nodes left in, unread); a
    graph output ``y`` becomes Identity(x), the layer's last node writing elsewhere."""
    bypassed = copy.deepcopy(model)
    returned = y in {o.name for o in bypassed.graph.output}
    for node in list(bypassed.graph.node):
        for i, name in enumerate(node.input):
            if name == y:
                node.input[i] = x
        if returned and y in node.output:
            node.output[list(node.output).index(y)] = f"{y}/bypassed"
    if returned:
        bypassed.graph.node.append(helper.make_node("Identity", [x], [y]))
    return bypassed


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order again (a node appended at the end may feed an earlier one)."""
    nodes, ready = list(model.graph.node), {i.name for i in model.graph.input} | \
        {t.name for t in model.graph.initializer}
    order = []
    while nodes:
        for n in nodes:
            if all(not i or i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
                nodes.remove(n)
                break
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model


# --- discovery --------------------------------------------------------------------------------

def test_resnet_blocks_found_and_a_projection_listed_with_its_reason():
    blocks = blocks_of(resnet_like(3, projection=True))
    assert [b.id for b in blocks] == ["block:0", "block:1", "block:2", "block:3"]
    assert [b.output for b in blocks] == ["b0.add_out", "b1.add_out", "b2.add_out", "down.add_out"]
    assert blocks[3].reason == "its skip is computed (Conv down.proj): a projection, not the identity"
    blocks = blocks[:3]
    assert all(b.kind == RESIDUAL and b.removable for b in blocks)
    # conv1, relu, conv2 and the Add; the two convs' weights and biases
    assert [len(b.nodes) for b in blocks] == [4, 4, 4] and all(len(b.weights) == 4 for b in blocks)
    assert all(b.macs == 2 * 8 * 8 * 9 * 64 * 2 for b in blocks)  # two 3x3 8->8 convs at 8x8, batch 2


def test_pre_norm_sub_blocks_count_separately():
    blocks = blocks_of(pre_norm(2))
    assert [b.output for b in blocks] == ["l0.add1_out", "l0.add2_out", "l1.add1_out", "l1.add2_out"]
    assert all(b.kind == RESIDUAL and b.removable for b in blocks)
    ln = [n for n in blocks[0].node_names if n.endswith("ln1")]
    assert ln == ["l0.ln1"]  # the pre-norm LayerNorm belongs to its sub-block


def test_post_norm_layers_are_whole_units():
    blocks = blocks_of(post_norm(2))
    assert [(b.kind, b.input, b.output) for b in blocks] == [
        (POST_NORM, "emb.ln_out", "l0.ln2_out"), (POST_NORM, "l0.ln2_out", "l1.ln2_out")]
    assert all(b.removable for b in blocks)
    assert {"l0.ln1", "l0.ln2", "l0.add1", "l0.add2"} <= set(blocks[0].node_names)


def test_a_lone_post_norm_sub_block_is_listed_with_its_reason():
    b = GraphBuilder(name="lone")
    h = _layernorm(b, b.input("x", [2, 4, 8]), 8, "emb.ln")
    h = _layernorm(b, b.op("Add", [h, _mlp(b, h, 8, "mlp")]), 8, "ln")
    blocks = blocks_of(b.build(b.matmul(h, 8, 3, name="head")))
    assert len(blocks) == 1 and not blocks[0].removable
    assert "LayerNorm(x), not x" in blocks[0].reason


def test_a_branch_read_outside_or_returned_is_not_removable():
    b = GraphBuilder(name="leaky")
    x = b.op("Relu", [b.conv(b.input("x", [1, 4, 6, 6]), 4, 4, name="stem")])
    mid = b.op("Relu", [b.conv(x, 4, 4, name="conv1")], name="mid")
    y = b.op("Add", [x, b.conv(mid, 4, 4, name="conv2")], name="add")
    model = b.build([y, mid])
    (block,) = blocks_of(model)
    assert block.reason == "its tensor mid_out is a graph output"
    with pytest.raises(ValueError, match="not removable"):
        remove_blocks(model, [block])


def test_a_broadcast_sum_is_no_block():
    """x + F(x) where F widens x (how an attention mask meets the scores): no residual."""
    b = GraphBuilder(name="broadcast")
    x = b.input("x", [2, 1, 8])
    f = b.matmul(b.op("Expand", [x, b.ints([2, 4, 8])]), 8, 8, name="fc")
    assert blocks_of(b.build(b.op("Add", [x, f], name="add"))) == []


def test_shape_arithmetic_on_the_branch_goes_with_it_and_on_the_input_stays():
    """A Reshape whose target is read off a branch tensor (Shape -> Reshape) goes with the branch;
    a Shape of x read beyond the block (the legacy exporter's mask) does not tie it."""
    b = GraphBuilder(name="shapes")
    x = b.op("Relu", [b.matmul(b.input("x", [2, 4, 8]), 8, 8, name="stem")], name="stem_relu")
    size = b.op("Shape", [x], name="x_shape")  # read by the head after the block
    h = b.matmul(x, 8, 8, name="fc1")
    h = b.op("Reshape", [b.op("Relu", [h]), b.op("Shape", [h], name="h_shape")], name="reshape")
    y = b.op("Add", [x, b.matmul(h, 8, 8, name="fc2")], name="add")
    out = b.op("Reshape", [b.matmul(y, 8, 3, name="head"), b.op("Concat", [b.op("Slice", [
        size, b.ints([0]), b.ints([2])]), b.ints([3])], axis=0)])
    model = b.build(out)
    (block,) = blocks_of(model)
    assert block.removable and "h_shape" in block.node_names and "x_shape" not in block.node_names
    pruned = remove_blocks(model, [block])
    check_valid(model, pruned)
    feeds = make_feeds(model)
    assert_close(run(branch_zeroed(model, "add", x), feeds), run(pruned, feeds), tol=1e-6)


def test_module_paths_name_blocks():
    model = pre_norm(1)
    for node in model.graph.node:  # as the dynamo exporter records them: l0.attn.q -> h.0.attn
        layer, _, rest = node.name.partition(".")
        if layer.startswith("l") and layer[1:].isdigit():
            part = rest.split(".")[0].replace("add1", "").replace("add2", "").replace("ln1", "attn")
            path = f"h.{layer[1:]}" + (f".{part.replace('ln2', 'mlp')}" if part else "")
            node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", *_prefixes(path), "op"]))
    assert [b.id for b in blocks_of(model)] == ["h.0.attn", "h.0.mlp"]


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


# --- the cut: point 7's properties ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_removing_a_cnn_block_equals_zeroing_its_branch(seed):
    model = resnet_like(3, seed=seed, projection=seed == 2)
    feeds = make_feeds(model, seed)
    blocks = blocks_of(model)
    blocks = [b for b in blocks if b.removable]
    for chosen in ([blocks[seed]], blocks[:2], blocks):
        pruned = remove_blocks(model, chosen)
        check_valid(model, pruned)
        reference = model
        for block in chosen:
            reference = branch_zeroed(reference, block.output.removesuffix("_out"), block.input)
        assert_close(run(reference, feeds), run(pruned, feeds), tol=1e-5)
        assert len(pruned.graph.initializer) == len(model.graph.initializer) - 4 * len(chosen)


@pytest.mark.parametrize("seed", range(2))
def test_removing_pre_norm_sub_blocks_equals_zeroing_them(seed):
    model = pre_norm(2, seed=seed)
    feeds = make_feeds(model, seed)
    blocks = blocks_of(model)
    for chosen in ([blocks[1]], [blocks[0], blocks[3]], blocks[1:3]):
        pruned = remove_blocks(model, chosen)
        check_valid(model, pruned)
        reference = model
        for block in chosen:
            reference = branch_zeroed(reference, block.output.removesuffix("_out"), block.input)
        assert_close(run(reference, feeds), run(pruned, feeds), tol=1e-5)
        assert not {n.name for n in pruned.graph.node} & {n for b in chosen for n in b.node_names}


@pytest.mark.parametrize("which", [[0], [1], [0, 1]])
def test_removing_a_post_norm_layer_equals_the_identity(which):
    model = post_norm(2)
    feeds = make_feeds(model)
    blocks = blocks_of(model)
    chosen = [blocks[i] for i in which]
    pruned = remove_blocks(model, chosen)
    check_valid(model, pruned)
    reference = model
    for block in reversed(chosen):  # the later layer first: its input is still the earlier one's output
        reference = layer_bypassed(reference, block.input, block.output)
    assert_close(run(reference, feeds), run(pruned, feeds), tol=1e-5)
    expected = model.graph.initializer
    assert len(pruned.graph.initializer) == len(expected) - sum(len(b.weights) for b in chosen)


def test_a_removed_block_that_was_a_graph_output_keeps_its_name():
    model = resnet_like(1)
    b = GraphBuilder(name="last")
    x = b.op("Relu", [b.conv(b.input("x", [1, 4, 6, 6]), 4, 4, name="stem")])
    y = b.op("Add", [x, b.conv(b.op("Relu", [b.conv(x, 4, 4)]), 4, 4)], name="add")
    model = b.build(y)
    pruned = remove_blocks(model, blocks_of(model))
    check_valid(model, pruned)
    feeds = make_feeds(model)
    assert_close(run(pruned, feeds), run(branch_zeroed(model, "add", x), feeds), tol=1e-6)


# --- the command line ---------------------------------------------------------------------------

def _saved(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_info_lists_blocks_with_ids_and_reasons(tmp_path, capsys):
    path = _saved(tmp_path, resnet_like(3, projection=True))
    code, out, _ = run_main(capsys, "info", path, "--json", tmp_path / "info.json")
    assert code == 0
    assert "3 removable block(s) (--depth, --drop-blocks), 1 not removable" in out
    assert "block:3" in out and "a projection, not the identity" in out
    listed = json.loads((tmp_path / "info.json").read_text())["blocks"]
    assert [b["id"] for b in listed if "reason" not in b] == ["block:0", "block:1", "block:2"]


def test_depth_removes_the_fraction_by_weights_and_records_it(tmp_path, capsys):
    model = resnet_like(4)
    path = _saved(tmp_path, model)
    out_path, plan, report = tmp_path / "out.onnx", tmp_path / "plan.json", tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.5", "-o", out_path, "--plan-out", plan, "--report", report)
    assert code == 0, out
    assert "depth   2 of 4 removable block(s) removed by weights" in out
    pruned = onnx.load(out_path)
    check_valid(model, pruned)
    record = json.loads(report.read_text())
    weights = weight_scores(model, blocks_of(model))
    lowest = sorted(weights, key=weights.get)[:2]
    assert sorted(b["id"] for b in record["depth"]["removed"]) == sorted(lowest)
    assert sorted(json.loads(plan.read_text())["blocks"]) == sorted(lowest)
    assert record["macs_after"] < record["macs_before"] == count_macs(model)
    # the plan, applied again, removes the same blocks: the same model
    again = tmp_path / "again.onnx"
    assert run_main(capsys, path, "--plan-in", plan, "-o", again)[0] == 0
    feeds = make_feeds(model)
    assert_close(run(pruned, feeds), run(onnx.load(again), feeds), tol=0)


def test_drop_blocks_by_glob_with_structured(tmp_path, capsys):
    model = resnet_like(3)
    path = _saved(tmp_path, model)
    out_path, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--drop-blocks", "block:1", "--structured", "0.5", "-o", out_path,
                            "--report", report)
    assert code == 0, out
    record = json.loads(report.read_text())
    assert [b["id"] for b in record["depth"]["removed"]] == ["block:1"]
    assert any(g["channels_after"] < g["channels_before"] for g in record["groups"])
    pruned = onnx.load(out_path)
    check_valid(model, pruned)
    assert record["macs_before"] == count_macs(model) and count_macs(pruned) == record["macs_after"]
    assert not {n.name for n in pruned.graph.node} & {"b1.conv1", "b1.conv2"}


@pytest.mark.parametrize("args,message", [
    (["--drop-blocks", "nope*"], "--drop-blocks 'nope*' matches no block (blocks: block:0, block:1, block:2"),
    (["--drop-blocks", "block:3"], "block block:3 cannot be removed: its skip is computed"),
    (["--depth", "0.5", "--block-importance", "removal"], "--block-importance removal measures on data: give --data"),
    (["--block-importance", "weights", "--structured", "0.2"], "--block-importance scores blocks for --depth R"),
    (["--depth", "0.3", "--plan-in", "plan.json"], "--plan-in and --depth/--drop-blocks are exclusive"),
])
def test_depth_errors_are_one_line(tmp_path, capsys, args, message):
    path = _saved(tmp_path, resnet_like(3, projection=True))
    (tmp_path / "plan.json").write_text(json.dumps({"schema_version": 1, "groups": []}))
    args = [str(tmp_path / a) if a == "plan.json" else a for a in args]
    code, _, err = run_main(capsys, path, *args, "-o", tmp_path / "out.onnx")
    assert code == 2 and message in one_error_line(err)
    assert not (tmp_path / "out.onnx").exists()


def _calibration(tmp_path, model, samples=16):
    feeds = [make_feeds(model, seed) for seed in range(samples)]
    path = tmp_path / "calib.npz"
    np.savez(path, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    return path


@pytest.mark.parametrize("criterion", ["removal", "influence"])
def test_data_criteria_score_blocks(tmp_path, criterion):
    model = resnet_like(4)
    data = onnxprune.load_data(_calibration(tmp_path, model), model)
    blocks = blocks_of(model)
    scores = block_scores(model, blocks, criterion, data)
    assert set(scores) == {b.id for b in blocks} and all(s > 0 for s in scores.values())
    if criterion == "removal":  # each score is the relative RMS output error with that block alone removed
        batches = [{"x": data.inputs["x"][i:i + 2]} for i in range(0, len(data), 2)]  # batch fixed at 2
        want = np.concatenate([run(model, f)[0] for f in batches]).astype(np.float64)
        got = np.concatenate([run(remove_blocks(model, [blocks[2]]), f)[0] for f in batches]).astype(np.float64)
        assert scores["block:2"] == pytest.approx(float(np.linalg.norm(want - got) / np.linalg.norm(want)), rel=1e-5)
    else:  # 1 - cos(x_in, x_out), by hand on the whole calibration set
        names = [blocks[1].input, blocks[1].output]
        sess = session(capture_model(model, names))
        ran = [sess.run(names, {"x": data.inputs["x"][i:i + 2]}) for i in range(0, len(data), 2)]  # batch fixed at 2
        a, b = (np.concatenate([r[k] for r in ran]).reshape(len(data), -1).astype(np.float64) for k in (0, 1))
        cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert scores["block:1"] == pytest.approx(float(np.mean(1 - cos)), rel=1e-6)


@pytest.mark.slow
def test_depth_with_data_and_distillation_recovers(tmp_path, capsys):
    """Recovery after a depth cut alone: the student is the smaller graph, the teacher the input."""
    model = resnet_like(3)
    path, data = _saved(tmp_path, model), _calibration(tmp_path, model, 32)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.34", "--data", data, "--distill", "--epochs", "2",
                            "--lr", "1e-3", "-o", tmp_path / "out.onnx", "--report", report)
    assert code == 0, out
    record = json.loads(report.read_text())
    assert record["depth"]["criterion"] == "removal" and len(record["depth"]["removed"]) == 1
    # The loss after one block of a random net goes is already small, so the second epoch may sit at
    # the floor the first reached: recovery means the best epoch beats the untrained pruned model.
    training = record["training"]
    assert len(training["epochs"]) == 2
    assert min(e["val_loss"] for e in training["epochs"]) < training["before"]["val_loss"]
    check_valid(model, onnx.load(tmp_path / "out.onnx"))


# --- point 6's targets: real exports ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_bert_4_layers_at_depth_half_loses_2_whole_layers(tmp_path, capsys, exporter):
    pytest.importorskip("transformers")
    from test_transformers import LAYERS, bert, export, feeds_for

    model = export(bert, exporter, tmp_path / "bert.onnx")
    blocks = blocks_of(model)
    assert [b.kind for b in blocks] == [POST_NORM] * LAYERS and all(b.removable for b in blocks)
    assert [b.id for b in blocks] == [f"model.encoder.layer.{i}" for i in range(LAYERS)]
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, tmp_path / "bert.onnx", "--depth", "0.5", "-o", tmp_path / "out.onnx",
                            "--report", report)
    assert code == 0, out
    removed = json.loads(report.read_text())["depth"]["removed"]
    assert len(removed) == 2 and all(b["kind"] == POST_NORM for b in removed)
    pruned = onnx.load(tmp_path / "out.onnx")
    check_valid(model, pruned)
    reference = model
    for b in reversed(removed):
        reference = layer_bypassed(reference, b["input"], b["output"])
    feeds = feeds_for(model)
    assert_close(run(reference, feeds), run(pruned, feeds), tol=1e-5)
    assert count_macs(pruned, {n: (2, 16) for n in feeds}) == count_macs(model, {n: (2, 16) for n in feeds}) // 2


@pytest.mark.slow
def test_resnet50_at_depth_quarter(tmp_path, capsys):
    pytest.importorskip("torchvision")
    from tools import zoo

    path = zoo.export("resnet50", "legacy")
    model = onnx.load(path)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.25", "-o", tmp_path / "out.onnx", "--report", report)
    assert code == 0, out
    record = json.loads(report.read_text())
    depth = record["depth"]
    assert depth["removable"] == 12 and len(depth["not_removable"]) == 4 and len(depth["removed"]) == 3
    pruned = onnx.load(tmp_path / "out.onnx")
    check_valid(model, pruned)
    feeds = make_feeds(model)
    reference = model
    for b in depth["removed"]:
        add = next(n for n in reference.graph.node if n.output[0] == b["output"])
        reference = branch_zeroed(reference, add.name, b["input"])
    assert_close(run(reference, feeds), run(pruned, feeds), tol=1e-4)
    assert record["macs_after"] == count_macs(pruned) < record["macs_before"] == count_macs(model)


# --- a decoder's KV cache (point 3) ---------------------------------------------------------------

def cached_decoder(layers: int = 2, d: int = 8, t: int = 3, past: int = 2) -> onnx.ModelProto:
    """Pre-norm layers whose attention concatenates a past cache input with its keys and returns
    the result as a present output: the shape of a decoder exported with its cache."""
    b = GraphBuilder(name="cached")
    h = b.input("x", [1, t, d])
    presents = []
    for i in range(layers):
        ln = _layernorm(b, h, d, f"l{i}.ln1")
        k = b.op("Concat", [b.input(f"past_{i}", [1, past, d]), b.matmul(ln, d, d, name=f"l{i}.k")], axis=1)
        presents.append(b.op("Identity", [k], name=f"present_{i}"))
        scores = b.op("MatMul", [b.matmul(ln, d, d, name=f"l{i}.q"), b.op("Transpose", [k], perm=[0, 2, 1])])
        attn = b.matmul(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), k]), d, d, name=f"l{i}.out")
        h = b.op("Add", [h, attn], name=f"l{i}.add1")
        h = b.op("Add", [h, _mlp(b, _layernorm(b, h, d, f"l{i}.ln2"), d, f"l{i}.mlp")], name=f"l{i}.add2")
    return b.build([h, *presents])


def test_an_attention_block_with_its_cache_goes_only_with_allow_io_change(tmp_path, capsys):
    model = cached_decoder()
    blocks = blocks_of(model)
    assert "a cache it reads from past_0: `allow_io_change` removes both" in blocks[0].reason
    allowed = find_blocks(model, analyse_shapes(model, None).static, allow_io_change=True)
    assert allowed[2].removable and allowed[2].io_outputs == ["present_1_out"]
    assert allowed[2].io_inputs == {"past_1": [1, 2, 8]}
    path = _saved(tmp_path, model)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--allow-io-change", "--drop-blocks", "block:2", "-o", tmp_path / "o.onnx",
                            "--report", report)
    assert code == 0, out
    assert "output  present_1_out [1, 5, 8] removed" in out and "input   past_1 [1, 2, 8] removed" in out
    pruned = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == ["x", "past_0"]  # the others keep their names
    assert [o.name for o in pruned.graph.output] == [model.graph.output[0].name, "present_0_out"]
    assert {(c.name, c.role) for c in iochange.read(pruned)} == {("present_1_out", "output"), ("past_1", "input")}
    feeds = make_feeds(model)
    want = run(branch_zeroed(model, "l1.add1", "l0.add2_out"), feeds)
    got = run(pruned, {k: v for k, v in feeds.items() if k != "past_1"})
    assert_close(want[:2], got, tol=1e-5)
    assert [c["name"] for c in json.loads(report.read_text())["io_changes"]] == ["present_1_out", "past_1"]


@pytest.mark.slow
def test_gpt2_with_its_cache_loses_the_removed_layers_cache(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_iochange import LAYERS, export_gpt2_with_cache

    model = export_gpt2_with_cache(tmp_path / "gpt2.onnx", "dynamo", "eager")
    code, out, _ = run_main(capsys, tmp_path / "gpt2.onnx", "--allow-io-change", "--depth", "0.5",
                            "--input-shape", "input_ids:1,2", "-o", tmp_path / "o.onnx", "--report",
                            tmp_path / "r.json")
    assert code == 0, out
    record = json.loads((tmp_path / "r.json").read_text())
    removed = [b["id"] for b in record["depth"]["removed"]]
    assert record["depth"]["removable"] == 2 * LAYERS and len(removed) == LAYERS  # attention and MLP per layer
    assert any(b.endswith(".attn") for b in removed)
    pruned = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    gone = {c["name"] for c in record["io_changes"]}
    for block in (b for b in record["depth"]["removed"] if b["id"].endswith(".attn")):
        layer = block["id"].split(".")[-2]
        assert {f"present_key_{layer}", f"present_value_{layer}"} <= gone
    kept = [o.name for o in pruned.graph.output]
    assert kept == [o.name for o in model.graph.output if o.name not in gone]


def test_steps_remove_blocks_in_rounds_scored_again(tmp_path, capsys):
    """--steps 2: half the blocks in each round, scored again on what the first round left; the ids
    stay those of the input model (block:N does not count again from 0)."""
    model = resnet_like(4)
    path, data = _saved(tmp_path, model), _calibration(tmp_path, model, 8)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.75", "--steps", "2", "--data", data, "-o",
                            tmp_path / "out.onnx", "--report", report, "--no-reconstruct")
    assert code == 0, out
    depth = json.loads(report.read_text())["depth"]
    assert [len(r["removed"]) for r in depth["rounds"]] == [2, 1]
    first = onnxprune.load_data(data, model)
    scores = block_scores(model, blocks_of(model), "removal", first)
    assert sorted(depth["rounds"][0]["removed"]) == sorted(sorted(scores, key=scores.get)[:2])
    rest = remove_blocks(model, [b for b in blocks_of(model) if b.id in depth["rounds"][0]["removed"]])
    again = {b["id"]: b["score"] for b in depth["kept"]} | {b["id"]: b["score"] for b in depth["removed"]
                                                             if b["id"] in depth["rounds"][1]["removed"]}
    assert set(again) == {b.id for b in blocks_of(model)} - set(depth["rounds"][0]["removed"])
    assert depth["rounds"][1]["removed"] == [min(again, key=again.get)]
    check_valid(model, onnx.load(tmp_path / "out.onnx"))
    assert len(blocks_of(rest)) == 2


def test_python_api_prune_file_takes_depth_and_prune_refuses_it(tmp_path):
    model = resnet_like(4)
    path = _saved(tmp_path, model)
    report = onnxprune.prune_file(path, tmp_path / "out.onnx", depth=0.5, drop_blocks=("block:0",))
    assert "block:0" in [b["id"] for b in report.depth["removed"]] and len(report.depth["removed"]) == 2
    with pytest.raises(onnxprune.UsageError, match="use prune_file, not prune"):
        onnxprune.prune(model, 0.2, options=onnxprune.PruneOptions(depth=onnxprune.DepthOptions(depth=0.5)))


def test_reconstruction_after_depth_and_channels(tmp_path, capsys):
    """With data, the channel cut on the model the depth step left is reconstructed as any other."""
    model = resnet_like(3)
    path, data = _saved(tmp_path, model), _calibration(tmp_path, model, 8)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.34", "--structured", "0.25", "--data", data,
                            "--block-importance", "influence", "-o", tmp_path / "out.onnx", "--report", report)
    assert code == 0, out
    record = json.loads(report.read_text())
    assert record["depth"]["criterion"] == "influence" and len(record["depth"]["removed"]) == 1
    assert record["reconstruction"]["readers"] > 0
    assert record["depth"]["reconstruction"]["readers"] > 0  # the depth cut's, refitted first
    assert record["macs_before"] == count_macs(model) > record["macs_after"]
    check_valid(model, onnx.load(tmp_path / "out.onnx"))


def test_reconstruction_after_a_depth_cut_alone_refits_the_layers_after_it(tmp_path, capsys):
    """--depth with --data and no channel cut: the first linear node after a removed block (through
    its Relu) and every one after it are refitted to the original's outputs, whose names they keep;
    kept because the output error falls on samples the fit did not see. The nodes before it stay.
    The model records no intermediate shapes (as the legacy exporter's): the readers' ranks are inferred."""
    model = resnet_like(4)
    del model.graph.value_info[:]
    path, data = _saved(tmp_path, model), _calibration(tmp_path, model, 16)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, err = run_main(capsys, path, "--depth", "0.5", "--drop-blocks", "block:0", "--data", data,
                            "-o", out, "--report", report)
    assert code == 0, err
    record = json.loads(report.read_text())
    recon = record["reconstruction"]
    assert recon["readers"] > 0 and recon["kept"]
    assert not [why for why in recon["skipped"].values() if "-D convolution" in why]
    assert recon["held_out"]["output_error"]["after"] < recon["held_out"]["output_error"]["before"]
    pruned = onnx.load(out)
    check_valid(model, pruned)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stem = next(n for n in pruned.graph.node if n.name == "stem")
    assert np.array_equal(numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == stem.input[1])),
                          weights[stem.input[1]])  # before the first removed block: untouched
    # without --data nothing is refitted
    code, _, _ = run_main(capsys, path, "--drop-blocks", "block:0", "-o", tmp_path / "plain.onnx",
                          "--report", tmp_path / "plain.json")
    assert code == 0 and json.loads((tmp_path / "plain.json").read_text())["reconstruction"] is None


def test_depth_on_a_model_without_blocks_warns_and_a_foreign_plan_is_refused(tmp_path, capsys):
    from graphs import small_cnn

    plain = _saved(tmp_path, small_cnn(), "plain.onnx")
    code, out, err = run_main(capsys, plain, "--depth", "0.5", "-o", tmp_path / "out.onnx")
    assert code == 0 and "warning: --depth 0.5 removed no block: it has no residual block" in err
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "groups": [], "blocks": ["layer9.9"]}))
    code, _, err = run_main(capsys, plain, "--plan-in", plan, "-o", tmp_path / "o2.onnx")
    assert code == 2 and "plan block 'layer9.9' does not exist in this model" in one_error_line(err)
    assert not (tmp_path / "o2.onnx").exists()


@pytest.mark.parametrize("budget", ["0.8", "0.4"])
def test_a_macs_budget_takes_the_blocks_first_and_the_channels_meet_the_rest(tmp_path, capsys, budget):
    """--depth 0.25 of 4 blocks removes 1 (about a quarter of the MACs): a budget of 0.8 is met by that
    alone, 0.4 by the channels on top of it; both relative to the input model."""
    model = resnet_like(4)
    path = _saved(tmp_path, model)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.25", "--target-macs", budget, "-o", tmp_path / "o.onnx",
                            "--report", report)
    assert code == 0, out
    record = json.loads(report.read_text())
    assert len(record["depth"]["removed"]) == 1
    kept = count_macs(onnx.load(tmp_path / "o.onnx")) / count_macs(model)
    assert kept <= float(budget) and record["macs_after"] / record["macs_before"] == pytest.approx(kept)
    channels_cut = any(g["channels_after"] < g["channels_before"] for g in record["groups"])
    assert channels_cut == (budget == "0.4")


def test_with_data_a_budget_chooses_how_many_blocks_by_output_error(tmp_path, capsys):
    """--depth 0.5 --target-macs 0.6 --data: 0, 1 and 2 of the 2 chosen blocks are tried, the channels
    meeting the rest each time; the share with the least output error is the one cut."""
    model = resnet_like(4)
    path, data = _saved(tmp_path, model), _calibration(tmp_path, model, 8)
    report = tmp_path / "report.json"
    code, out, _ = run_main(capsys, path, "--depth", "0.5", "--target-macs", "0.6", "--data", data,
                            "--allocate", "uniform", "--no-reconstruct", "--no-compensate", "-o",
                            tmp_path / "o.onnx", "--report", report)
    assert code == 0, out
    record = json.loads(report.read_text())
    budget = record["depth"]["budget"]
    assert [t["blocks"] for t in budget["tried"]] == [0, 1, 2]
    measured = [t for t in budget["tried"] if t["output_error"] is not None]
    assert budget["blocks"] == min(measured, key=lambda t: t["output_error"])["blocks"]
    assert len(record["depth"]["removed"]) == budget["blocks"]
    assert count_macs(onnx.load(tmp_path / "o.onnx")) / count_macs(model) <= 0.6

"""Depth pruning of sub-blocks whose residual sum is fused into a Skip*Norm node (analysis/skipblocks.py,
cut/skipnorm.py): onnxruntime-genai's builder graphs and onnxruntime's optimizer-fused ones.

The property (issue 14): removing a sub-block equals the original evaluated with that branch's result
zeroed, the Skip*Norm node it enters kept; the builder's Llama loses a layer and still generates.
"""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from test_depth import _mlp, branch_zeroed

from onnxprune.analysis.blocks import find_blocks
from onnxprune.cut.depth import remove_blocks
from onnxprune.graph.shapes import analyse_shapes

from graphs import GraphBuilder, assert_close, make_feeds, run, run_main

MS = "com.microsoft"
SIMPLIFIED, FULL = "SkipSimplifiedLayerNormalization", "SkipLayerNormalization"


def skip_fused(layers: int = 2, op: str = SIMPLIFIED, bias: bool = False, swap: bool = False, d: int = 8,
               t: int = 3, past: int = 2, seed: int = 0, stats_read: bool = False) -> onnx.ModelProto:
    """A pre-norm decoder as the builder fuses it: per layer an attention with a past/present cache and
    an MLP, each entering a Skip*Norm node (``swap``: the branch as its input, the stream as its skip;
    ``bias``: the optional bias input) whose sum output carries the stream; a first plain norm and a
    final Skip*Norm without a sum output. ``stats_read``: layer 0's second node returns its inv_std_var."""
    b = GraphBuilder(seed=seed, name="skip_fused")
    plain = "LayerNormalization" if op == FULL else "SimplifiedLayerNormalization"

    def params(name):
        gamma = [b.weight((d,), f"{name}.g", offset=1.0)]
        return gamma + ([b.weight((d,), f"{name}.beta")] if op == FULL else [])

    def skip(stream, f, name, outputs=4):
        operands = [f, stream] if swap else [stream, f]
        extra = [b.weight((d,), f"{name}.bias", fan_in=4)] if bias else []
        return b.op(op, [*operands, *params(name), *extra], outputs, name=name, domain=MS, epsilon=1e-5)

    stream = b.input("x", [1, t, d])
    h = b.op(plain, [stream, *params("l0.ln1")], name="l0.ln1", axis=-1, epsilon=1e-5)
    presents, extra_outputs = [], []
    for i in range(layers):
        k = b.op("Concat", [b.input(f"past_{i}", [1, past, d]), b.matmul(h, d, d, name=f"l{i}.k")], axis=1)
        presents.append(b.op("Identity", [k], name=f"present_{i}"))
        scores = b.op("MatMul", [b.matmul(h, d, d, name=f"l{i}.q"), b.op("Transpose", [k], perm=[0, 2, 1])])
        attn = b.matmul(b.op("MatMul", [b.op("Softmax", [scores], axis=-1), k]), d, d, name=f"l{i}.o")
        h, _, inv_std, stream = skip(stream, attn, f"l{i}.ln2")
        if stats_read and i == 0:
            extra_outputs.append(inv_std)
        mlp = _mlp(b, h, d, f"l{i}.mlp")
        if i == layers - 1:
            h = skip(stream, mlp, "ln_f", outputs=1)
        else:
            h, _, _, stream = skip(stream, mlp, f"l{i + 1}.ln1")
    return b.build([b.matmul(h, d, 5, name="head"), *presents, *extra_outputs], check=False)


def blocks_of(model, allow_io_change=True):
    return find_blocks(model, analyse_shapes(model, None).static, allow_io_change)


def _entering(block) -> str:
    """The name of the Skip*Norm node a block's branch enters (the builder's outputs are ``<name>_out0``)."""
    return block.skip_norm.removesuffix("_out0").removesuffix("_out")


def test_each_layers_attention_and_mlp_are_found_and_a_cache_needs_allow_io_change():
    model = skip_fused()
    blocks = blocks_of(model, allow_io_change=False)
    assert [_entering(b) for b in blocks] == ["l0.ln2", "l1.ln1", "l1.ln2", "ln_f"]
    assert [b.removable for b in blocks] == [False, True, False, True]
    assert "a cache it reads from past_0: `allow_io_change` removes both" in blocks[0].reason
    allowed = blocks_of(model)
    assert all(b.removable for b in allowed)
    assert allowed[2].io_inputs == {"past_1": [1, 2, 8]} and allowed[2].io_outputs == ["present_1_out"]
    assert allowed[1].input == "l0.ln2_out3" and allowed[1].output == "l1.ln1_out3"
    assert [b.macs for b in allowed] == [b.macs for b in blocks] and allowed[1].macs == 3 * 8 * 16 * 2


@pytest.mark.parametrize("op,bias,swap", [(SIMPLIFIED, False, False), (SIMPLIFIED, True, True),
                                          (FULL, False, True), (FULL, True, False)])
def test_removing_skip_fused_sub_blocks_equals_zeroing_their_branch(op, bias, swap):
    model = skip_fused(op=op, bias=bias, swap=swap)
    feeds = make_feeds(model)
    blocks = blocks_of(model)
    names = [o.name for o in model.graph.output]
    for chosen in ([blocks[2]], [blocks[1]], blocks[2:], [blocks[1], blocks[2]], blocks):
        pruned = remove_blocks(model, chosen)
        reference = model
        for block in chosen:
            reference = branch_zeroed(reference, _entering(block), block.input)
        gone = {o for b in chosen for o in b.io_outputs}
        want = [v for n, v in zip(names, run(reference, feeds)) if n not in gone]
        got = run(pruned, {n: v for n, v in feeds.items() if n not in {i for b in chosen for i in b.io_inputs}})
        assert [o.name for o in pruned.graph.output] == [n for n in names if n not in gone]
        assert_close(want, got, tol=1e-5)
        assert not {n.name for n in pruned.graph.node} & {n for b in chosen for n in b.node_names}
        kept = {n.op_type for n in pruned.graph.node}
        assert (op in kept) == (len(chosen) < len(blocks))  # every Skip node entered by a removed branch went


def test_a_read_mean_or_inv_std_keeps_the_block_with_its_reason():
    blocks = blocks_of(skip_fused(stats_read=True))
    assert blocks[0].reason == f"the mean / inv_std_var output of {SIMPLIFIED} l0.ln2 is read"
    assert all(b.removable for b in blocks[1:])


def test_a_branch_read_elsewhere_is_not_removable():
    model = skip_fused()
    mlp_hidden = next(n for n in model.graph.node if n.name.startswith("Relu")).output[0]
    model.graph.output.append(onnx.helper.make_tensor_value_info(mlp_hidden, onnx.TensorProto.FLOAT, None))
    blocks = blocks_of(model)
    assert blocks[1].reason == f"its tensor {mlp_hidden} is a graph output"


def test_info_and_drop_blocks_on_a_skip_fused_graph(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    model = skip_fused()
    onnx.save(model, path)
    code, out, _ = run_main(capsys, "info", path, "--allow-io-change")
    assert code == 0 and "4 removable block(s)" in out, out
    # the removed layer's cache pinned too: its shape goes with it (pipeline/run.py)
    code, out, _ = run_main(capsys, path, "--allow-io-change", "--drop-blocks", "block:1,block:2",
                            "--input-shape", "past_1:1,2,8", "-o", tmp_path / "o.onnx")
    assert code == 0, out
    assert "removed block:1 (residual)" in out and "input   past_1 [1, 2, 8] removed" in out
    pruned = onnx.load(tmp_path / "o.onnx")
    assert [n.op_type for n in pruned.graph.node].count(SIMPLIFIED) == 2  # l0.ln2, ln_f stay fused


# --- onnxruntime-genai: the builder's tiny Llama loses layer 1 through the block finder ----------------------

@pytest.mark.slow
def test_builder_llama_loses_layer_1_renumbered_and_generates(tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the test/genai extra)")
    pytest.importorskip("transformers", reason="transformers builds the tiny model")
    import tools.bench_genai as bench

    layers = 4
    original = bench.LAYERS
    bench.LAYERS = layers  # build_folder and cache_shapes read it
    try:
        built = bench.build_folder(tmp_path, "fp32", 64)
        shapes = bench.cache_shapes(64)
    finally:
        bench.LAYERS = original
    listed = subprocess.run([sys.executable, "-m", "onnxprune", "info", str(built / "model.onnx"), *shapes,
                             "--allow-io-change"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert f"{2 * layers} removable block(s)" in listed.stdout
    assert "model.layers.1.attn" in listed.stdout and "model.layers.1.mlp" in listed.stdout
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "onnxprune", str(built / "model.onnx"), *shapes, "--allow-io-change",
               "--renumber-cache", "--drop-blocks", "model.layers.1.attn,model.layers.1.mlp",
               "-o", str(out / "model.onnx"), "--report", str(tmp_path / "r.json")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"config  genai_config.json: num_hidden_layers {layers} -> {layers - 1}" in done.stdout
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_hidden_layers"] == layers - 1
    pruned = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in pruned.graph.input if i.name.startswith("past")] == \
        [f"past_key_values.{n}.{kv}" for kv in ("key", "value") for n in range(layers - 1)]
    # of layer 1 only the node that sums layer 0's MLP into the stream is left (the sum layer 2 reads)
    left = [n.name for n in pruned.graph.node if "layers.1/" in n.name]
    assert left == ["/model/layers.1/input_layernorm/SkipLayerNorm"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["macs_after"] < report["macs_before"]
    # the builder's quirk (tests/test_configs.py): lm_head reads layer 0's output, so the logits are the
    # original's; layer 2's cache now follows layer 0's MLP output, so it differs
    assert report["output_error"]["logits"] == 0.0
    assert bench.generates_8_tokens(out)  # onnxruntime-genai finds the renumbered cache and the config agree

"""Depth pruning of a post-norm BERT fused by onnxruntime's transformer optimizer (analysis/postnorm_skip.py).

The fused layer ``h = SkipNorm(Attn(x), x); y = SkipNorm(MLP(h), h)`` is one unit, as the unfused
export's layer is. The property: removing any set of layers from the fused model equals the
unfused export (the same weights) with the same layers removed by the depth cut, in onnxruntime,
up to the fused kernels' last bits; the scores agree with the unfused export's too.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_contrib_ops import _bert_config, export_and_fuse

import onnxprune
from onnxprune.analysis.blocks import POST_NORM, find_blocks
from onnxprune.cut.depth import remove_blocks
from onnxprune.graph.shapes import analyse_shapes
from onnxprune.scoring.blocks import block_scores

from graphs import check_valid, io_signature, rel_err, run, run_main

PINS = ["--input-shape", "input_ids:2,16", "--input-shape", "attention_mask:2,16"]
DIMS = {"input_ids": [2, 16], "attention_mask": [2, 16]}
TOL = 1e-4  # fused kernels against the decomposed ops: relative RMS, measured 3e-7 at most


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """(folder, unfused export, fused model) of a 4-layer hidden-64 BertModel with random weights."""
    torch = pytest.importorskip("torch")
    from test_transformers import LastHidden

    transformers, config = _bert_config(4)
    torch.manual_seed(0)
    folder = export_and_fuse(tmp_path_factory.mktemp("postnorm"),
                             LastHidden(transformers.BertModel(config), False).eval())
    return folder, onnx.load(folder / "bert.onnx"), onnx.load(folder / "fused.onnx")


def blocks_of(model: onnx.ModelProto):
    return find_blocks(model, analyse_shapes(model, DIMS).static)


def feeds(seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, 16), np.int64)
    mask[-1, 11:] = 0  # padding: the mask reaches every attention
    return {"input_ids": rng.integers(0, 500, (batch, 16)), "attention_mask": mask}


def test_fused_layers_are_found_as_the_unfused_ones(bert_pair):
    _, bert, fused = bert_pair
    found, want = blocks_of(fused), blocks_of(bert)
    assert [b.id for b in found] == [b.id for b in want] == [f"model.encoder.layer.{i}" for i in range(4)]
    assert all(b.kind == POST_NORM and b.removable for b in found)
    assert [b.macs for b in found] == [b.macs for b in want]
    skip = [n.output[0] for n in fused.graph.node if n.op_type == "SkipLayerNormalization"]
    assert [b.output for b in found] == skip[1::2]  # each layer ends in its second Skip node
    assert found[0].input == next(n.output[0] for n in fused.graph.node if n.op_type == "EmbedLayerNormalization")


def test_removing_fused_layers_equals_removing_them_unfused(bert_pair):
    _, bert, fused = bert_pair
    found, want = blocks_of(fused), blocks_of(bert)
    x = feeds()
    assert rel_err(run(bert, x)[0], run(fused, x)[0]) < TOL
    for count in range(1, 5):
        for chosen in itertools.combinations(range(4), count):
            cut = remove_blocks(fused, [found[i] for i in chosen])
            reference = remove_blocks(bert, [want[i] for i in chosen])
            assert io_signature(cut) == io_signature(fused)
            assert rel_err(run(reference, x)[0], run(cut, x)[0]) < TOL, chosen


def test_fused_layer_scores_agree_with_the_unfused_export(bert_pair):
    folder, bert, fused = bert_pair
    found, want = blocks_of(fused), blocks_of(bert)
    # the same MatMul weights write into the stream: the attention output and MLP output projections
    assert block_scores(fused, found, "weights") == block_scores(bert, want, "weights")
    batches = [feeds(seed) for seed in range(4)]
    np.savez(folder / "calib.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    for criterion in ("removal", "influence"):
        data = onnxprune.load_data(folder / "calib.npz", fused)
        got, expected = block_scores(fused, found, criterion, data), block_scores(bert, want, criterion, data)
        assert set(got) == set(expected) and all(v > 0 for v in got.values())
        assert all(got[k] == pytest.approx(expected[k], rel=1e-3) for k in got), (criterion, got, expected)


def test_info_lists_the_fused_layers(bert_pair, capsys):
    folder, _, _ = bert_pair
    code, out, err = run_main(capsys, "info", folder / "fused.onnx", *PINS)
    assert code == 0, err
    assert "4 removable block(s) (--depth, --drop-blocks), 0 not removable" in out
    assert out.count("post-norm layer") == 4


def test_half_the_depth_of_the_fused_bert(bert_pair, capsys):
    folder, _, fused = bert_pair
    code, _, err = run_main(capsys, folder / "fused.onnx", "--depth", "0.5", *PINS, "-o", folder / "half.onnx",
                            "--report", folder / "half.json")
    assert code == 0, err
    report = json.loads((folder / "half.json").read_text())
    assert len(report["depth"]["removed"]) == 2 and report["depth"]["removable"] == 4
    assert report["macs_after"] < report["macs_before"]
    pruned = onnx.load(folder / "half.onnx")
    check_valid(fused, pruned)
    assert sum(n.op_type == "Attention" for n in pruned.graph.node) == 2


def test_drop_blocks_by_id_on_the_fused_bert(bert_pair, capsys):
    folder, bert, fused = bert_pair
    code, _, err = run_main(capsys, folder / "fused.onnx", "--drop-blocks", "model.encoder.layer.3", *PINS,
                            "-o", folder / "drop3.onnx", "--report", folder / "drop3.json")
    assert code == 0, err
    report = json.loads((folder / "drop3.json").read_text())
    assert [b["id"] for b in report["depth"]["removed"]] == ["model.encoder.layer.3"]
    pruned = onnx.load(folder / "drop3.onnx")
    assert io_signature(pruned) == io_signature(fused)  # its output was the graph output: an Identity keeps it
    reference = remove_blocks(bert, [blocks_of(bert)[3]])
    assert rel_err(run(reference, feeds(1))[0], run(pruned, feeds(1))[0]) < TOL


@pytest.mark.parametrize("output, what", [(3, "pre-norm sum"), (1, "mean")])
def test_a_skip_node_whose_extra_output_is_read_is_not_removable(bert_pair, output, what):
    _, _, fused = bert_pair
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    node = [n for n in model.graph.node if n.op_type == "SkipLayerNormalization"][2]  # layer 1's first
    outputs = list(node.output) + [""] * (4 - len(node.output))
    outputs[output] = "extra"
    del node.output[:]
    node.output.extend(outputs[:output + 1])
    model.graph.node.append(helper.make_node("ReduceMean", ["extra"], ["extra_mean"], keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("extra_mean", TensorProto.FLOAT, None))
    blocks = blocks_of(model)
    assert [b.removable for b in blocks] == [True, False, True, True]
    assert blocks[1].reason == f"the {what} output of SkipLayerNormalization {node.name} is read"


def test_half_the_depth_of_the_fused_bert_with_data_reconstructs(bert_pair, capsys):
    """With data: scored by removal, then the layers after each removed one refitted (reconstruction)."""
    folder, _, fused = bert_pair
    batches = [feeds(seed) for seed in range(8)]
    np.savez(folder / "data.npz", **{k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    code, _, err = run_main(capsys, folder / "fused.onnx", "--depth", "0.5", "--data", folder / "data.npz", *PINS,
                            "-o", folder / "half_data.onnx", "--report", folder / "half_data.json")
    assert code == 0, err
    report = json.loads((folder / "half_data.json").read_text())
    assert report["depth"]["criterion"] == "removal" and len(report["depth"]["removed"]) == 2
    assert report["reconstruction"]["readers"] > 0
    check_valid(fused, onnx.load(folder / "half_data.onnx"))

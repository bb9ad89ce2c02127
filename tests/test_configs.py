"""The configs beside a decoder, updated to the pruned graph (onnxprune/model/configs.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import UsageError
from onnxprune.model.configs import pruned_shape, updated_configs
from tools.bench_genai import build_folder, cache_shapes, generates_8_tokens


def _decoder(heads=(2, 2), kv=(1, 1), widths=(6, 6), layers=(0, 1)) -> onnx.ModelProto:
    """A graph with what the writer reads: GQA attributes, cache inputs, down projections."""
    nodes, inits = [], []
    for i, (h, k, w) in enumerate(zip(heads, kv, widths)):
        nodes.append(helper.make_node("GroupQueryAttention", [f"x{i}"], [f"a{i}"], name=f"/model/layers.{i}/attn/GQA",
                                      domain="com.microsoft", num_heads=h, kv_num_heads=k))
        inits.append(numpy_helper.from_array(np.zeros((w, 4), np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"a{i}", f"w{i}"], [f"y{i}"],
                                      name=f"/model/layers.{i}/mlp/down_proj/MatMul"))
    inputs = [helper.make_tensor_value_info(f"past_key_values.{n}.{kv}", TensorProto.FLOAT, [1, 1, 1, 4])
              for n in layers for kv in ("key", "value")]
    graph = helper.make_graph(nodes, "d", inputs, [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)],
                              initializer=inits)
    return helper.make_model(graph)


def _folder(tmp_path, hf=None) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    genai = {"model": {"decoder": {"filename": "model.onnx", "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "num_hidden_layers": 2, "head_size": 8, "hidden_size": 32}}}
    (folder / "genai_config.json").write_text(json.dumps(genai))
    (folder / "config.json").write_text(json.dumps(hf or {"num_attention_heads": 4, "num_key_value_heads": 2,
                                                         "num_hidden_layers": 2, "hidden_size": 32,
                                                         "intermediate_size": 8}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_configs_follow_the_pruned_graph(tmp_path):
    folder = _folder(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    files, changes = updated_configs(folder / "model.onnx", tmp_path / "out" / "pruned.onnx", _decoder())
    written = {p.name: data for p, data in files}
    assert set(written) == {"genai_config.json", "config.json", "tokenizer.json"}
    decoder = json.loads(written["genai_config.json"])["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (2, 1)
    assert decoder["filename"] == "pruned.onnx"
    assert decoder["head_size"] == 8  # whole heads go: the head size stays
    hf = json.loads(written["config.json"])
    assert (hf["num_attention_heads"], hf["intermediate_size"], hf["head_dim"]) == (2, 6, 8)
    assert changes[0]["changes"]["num_attention_heads"] == [4, 2]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the input folder is untouched


def test_removed_layers_set_the_layer_count_and_gaps_fail(tmp_path):
    assert pruned_shape(_decoder(heads=(2,), kv=(1,), widths=(6,), layers=(0,)))["num_hidden_layers"] == 1
    with pytest.raises(UsageError, match="expect 0..1"):
        pruned_shape(_decoder(layers=(0, 2)))


def test_uneven_heads_or_per_layer_lists_fail(tmp_path):
    with pytest.raises(UsageError, match="num_attention_heads differs across attention layers"):
        pruned_shape(_decoder(heads=(2, 4)))
    hf = {"num_hidden_layers": 2, "layer_types": ["full", "full"]}
    one_layer = _decoder(heads=(2,), kv=(1,), widths=(6,), layers=(0,))
    with pytest.raises(UsageError, match="layer_types"):
        updated_configs(_folder(tmp_path, hf) / "model.onnx", tmp_path / "o" / "m.onnx", one_layer)


def test_no_config_or_same_folder_writes_none(tmp_path):
    assert updated_configs(tmp_path / "model.onnx", tmp_path / "o" / "m.onnx", _decoder()) == ([], [])
    folder = _folder(tmp_path)
    assert updated_configs(folder / "model.onnx", folder / "pruned.onnx", _decoder()) == ([], [])


def _built(tmp_path, precision: str, hidden: int) -> Path:
    """The tiny Llama's folder as onnxruntime-genai's model builder writes it (tools/bench_genai.py)."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the test/genai extra)")
    pytest.importorskip("transformers", reason="transformers builds the tiny model")
    return build_folder(tmp_path, precision, hidden)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_folder_prunes_loads_and_generates(tmp_path, precision):
    built = _built(tmp_path, precision, hidden=64)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "onnxprune", str(built / "model.onnx"), "--structured", "0.3",
                          "--prune-kv-groups", "--allow-io-change", *cache_shapes(64), "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = "config  genai_config.json: num_attention_heads 4 -> 2, num_key_value_heads 2 -> 1"
    assert summary in run.stdout + run.stderr
    assert "(4 -> 2 heads)" in run.stdout + run.stderr  # query heads, not the packed projection's columns
    decoder = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (2, 1)
    assert (out.parent / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()
    assert generates_8_tokens(out.parent)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_genai_folder_prunes_query_heads_within_groups_by_default(tmp_path, precision):
    """Without --prune-kv-groups the builder's packed q/k/v loses query heads, as many in every key/value
    group: num_attention_heads 4 -> 2, the key/value heads and the cache stay. Head size 32 (hidden
    128): int4's o-projection cuts its input channels in whole blocks of 32, so a query head must fill
    blocks (with head size 16 a block would hold query heads of two different units: they stay)."""
    built = _built(tmp_path, precision, hidden=128)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    run = subprocess.run([sys.executable, "-m", "onnxprune", str(built / "model.onnx"), "--structured", "0.3",
                          "--allow-io-change", *cache_shapes(128), "-o", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "config  genai_config.json: num_attention_heads 4 -> 2\n" in run.stdout + run.stderr
    assert "(4 -> 2 heads)" in run.stdout + run.stderr  # heads counted in heads
    decoder = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (2, 2)
    pruned = onnx.load(out)
    attention = [n for n in pruned.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    for node in attention:
        heads = {a.name: a.i for a in node.attribute}
        assert (heads["num_heads"], heads["kv_num_heads"]) == (2, 2)
    original = onnx.load(built / "model.onnx", load_external_data=False)
    assert [i.type for i in pruned.graph.input] == [i.type for i in original.graph.input]  # the cache stays
    assert generates_8_tokens(out.parent)

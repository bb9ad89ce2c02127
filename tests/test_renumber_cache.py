"""``--renumber-cache`` (issue 14, point 3): a decoder's remaining KV cache numbered 0..n-1 again
after a depth cut removed layers (onnxprune/cut/renumber.py), recorded and fed by the name map."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from test_depth import cached_decoder

from onnxprune.cut import iochange
from onnxprune.cut.renumber import cache_template, new_cache_names, renumber_cache
from onnxprune.errors import UsageError
from onnxprune.report.records import SCHEMA_FILE

from graphs import make_feeds, one_error_line, run, run_main


def _saved(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name,found", [
    ("past_key_values.12.key", ("past_key_values.%d.key", 12)),  # onnxruntime-genai's builder, optimum
    ("present.3.value", ("present.%d.value", 3)),
    ("past_key_0", ("past_key_%d", 0)),  # the GPT-2 exports of tests/test_iochange.py (legacy and dynamo)
    ("present_value_7", ("present_value_%d", 7)),
    ("present_1_out", ("present_%d_out", 1)),  # tests/test_depth.py's cached decoder
    ("key_cache.2", ("key_cache.%d", 2)),
    ("input_ids", None), ("attention_mask", None), ("logits_0", None),  # no number, or not a cache
    ("layers.1.past.2", None), ("past_01", None),  # two numbers; a number that does not print back as itself
])
def test_a_cache_name_gives_its_template_and_layer(name, found):
    assert cache_template(name) == found


def _genai(n, kv):  # onnxruntime-genai's builder
    return f"past_key_values.{n}.{kv}", f"present.{n}.{kv}"


def _gpt2(n, kv):  # the legacy and dynamo GPT-2 exports of tests/test_iochange.py (tools/bench_decoder.py)
    return f"past_{kv}_{n}", f"present_{kv}_{n}"


def _flat_cache(layers, names=_genai, extra=()) -> onnx.ModelProto:
    """x -> per layer and key/value: present = Concat(past, x * w): a cache as a decoder keeps it.
    ``names(layer, "key"/"value")``: (past, present)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4])]
    outputs, nodes, inits = [], [], []
    for n in layers:
        for kv in ("key", "value"):
            past, present = names(n, kv)
            w = f"w{n}{kv}"
            inits.append(helper.make_tensor(w, TensorProto.FLOAT, [1], [float(n + 1) * (2 if kv == "key" else 3)]))
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, [1, 3, 4]))
            nodes.append(helper.make_node("Mul", ["x", w], [f"new{n}{kv}"]))
            nodes.append(helper.make_node("Concat", [past, f"new{n}{kv}"], [present], axis=1))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, [1, 5, 4]))
    inputs += [helper.make_tensor_value_info(e, TensorProto.FLOAT, [1, 2, 4]) for e in extra]
    nodes += [helper.make_node("Identity", [e], [f"{e}_copy"]) for e in extra]
    outputs += [helper.make_tensor_value_info(f"{e}_copy", TensorProto.FLOAT, [1, 2, 4]) for e in extra]
    model = helper.make_model(helper.make_graph(nodes, "cache", inputs, outputs, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("names", [_genai, _gpt2])
def test_the_remaining_layers_are_renumbered_in_order_and_fed_by_the_map(names):
    model = _flat_cache([0, 2, 3], names, extra=["past_length_hint"])  # an input outside the cache stays
    renamed = renumber_cache(model)
    onnx.checker.check_model(renamed, full_check=True)
    pairs = [(kv, n) for n in (0, 1, 2) for kv in ("key", "value")]
    assert [i.name for i in renamed.graph.input] == ["x"] + [names(n, kv)[0] for kv, n in pairs] + ["past_length_hint"]
    assert [o.name for o in renamed.graph.output] == [names(n, kv)[1] for kv, n in pairs] + ["past_length_hint_copy"]
    changes = iochange.read(renamed)
    assert {(c.name, c.role, c.renamed) for c in changes} == \
        {(names(old, kv)[i], role, names(new, kv)[i]) for i, role in enumerate(("input", "output"))
         for old, new in ((2, 1), (3, 2)) for kv in ("key", "value")}
    feeds = make_feeds(model)
    want = iochange.comparable_outputs(dict(zip([o.name for o in model.graph.output], run(model, feeds))), changes)
    got = dict(zip([o.name for o in renamed.graph.output], run(renamed, iochange.candidate_feeds(feeds, changes))))
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert renumber_cache(renamed) is renamed  # already 0..n-1: nothing to do
    assert names(2, "key")[0] in {i.name for i in model.graph.input}  # the input model is left as it was
    in_place = renumber_cache(model, copy=False)  # a model the caller owns: renamed itself, not copied
    assert in_place is model and in_place.SerializeToString() == renamed.SerializeToString()


def test_a_layer_one_template_lacks_is_a_one_line_error():
    model = _flat_cache([0, 1, 2])
    model.graph.input.remove(next(i for i in model.graph.input if i.name == "past_key_values.1.key"))
    with pytest.raises(UsageError, match="past_key_values.1.value has no past_key_values.1.key beside it"):
        new_cache_names(model)
    with pytest.raises(UsageError, match="nothing to renumber"):
        new_cache_names(helper.make_model(helper.make_graph([], "g", [], [])))


def test_a_new_name_taken_by_another_tensor_is_refused():
    model = _flat_cache([0, 2])
    model.graph.node[0].output[0] = "present.1.key"  # an inner tensor with a cache name
    model.graph.node[1].input[1] = "present.1.key"
    with pytest.raises(UsageError, match="already has a tensor named present.1.key"):
        renumber_cache(model)


def _three_layers(tmp_path):
    return _saved(tmp_path, cached_decoder(layers=3))


def test_dropping_a_middle_layer_renumbers_its_cache(tmp_path, capsys):
    """block:2 is layer 1's attention: its cache goes, layer 2's takes number 1; the renumbered model
    equals the model the same cut leaves without renumbering, fed under the mapped names."""
    path = _three_layers(tmp_path)
    cut = ["--allow-io-change", "--drop-blocks", "block:2"]
    code, out, _ = run_main(capsys, path, *cut, "-o", tmp_path / "plain.onnx", "--report", tmp_path / "plain.json")
    assert code == 0, out
    code, out, _ = run_main(capsys, path, *cut, "--renumber-cache", "-o", tmp_path / "renamed.onnx",
                            "--report", tmp_path / "renamed.json")
    assert code == 0, out
    assert "input   past_2 [1, 2, 8] renamed past_1" in out
    assert "output  present_2_out [1, 5, 8] renamed present_1_out" in out
    plain, renamed = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "renamed.onnx")
    onnx.checker.check_model(renamed, full_check=True)
    assert [i.name for i in plain.graph.input] == ["x", "past_0", "past_2"]
    assert [i.name for i in renamed.graph.input] == ["x", "past_0", "past_1"]
    assert [o.name for o in renamed.graph.output] == ["l2.add2_out", "present_0_out", "present_1_out"]
    # the metadata: the removal, then the map old -> new
    changes = iochange.read(renamed)
    assert {(c.name, c.role, c.renamed) for c in changes if c.is_rename} == \
        {("past_2", "input", "past_1"), ("present_2_out", "output", "present_1_out")}
    assert {(c.name, c.role) for c in changes if c.removed} == {("past_1", "input"), ("present_1_out", "output")}
    feeds = {k: v for k, v in make_feeds(plain).items()}
    want = run(plain, feeds)
    got = run(renamed, {"x": feeds["x"], "past_0": feeds["past_0"], "past_1": feeds["past_2"]})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    # the report: each renamed tensor's entry names it as the original does and gives its new name
    report = json.loads((tmp_path / "renamed.json").read_text())
    entries = {c["name"]: c for c in report["io_changes"]}
    assert entries["past_2"]["renamed"] == "past_1" and entries["present_2_out"]["renamed"] == "present_1_out"
    assert entries["past_1"]["shape_after"] is None and "renamed" not in entries["past_1"]
    # verification fed the renamed model under the map: the same errors as the plain cut's, per output
    plain_errors = json.loads((tmp_path / "plain.json").read_text())["output_error"]
    assert report["output_error"] == {"l2.add2_out": plain_errors["l2.add2_out"],
                                      "present_0_out": plain_errors["present_0_out"],
                                      "present_1_out": plain_errors["present_2_out"]}
    assert report["recipe"]["renumber-cache"] is True
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))


def test_a_removed_layers_input_read_for_its_shape_goes_and_the_shape_is_read_off_a_kept_one(tmp_path, capsys):
    """As the dynamo export of GPT-2 reads the past length off layer 0's past_value: with layer 0's
    attention removed, the Shape reads the kept layer 1's input (declared alike), so past_0 goes too
    and the remaining cache can be numbered 0..n-1."""
    from test_depth import branch_zeroed

    model = cached_decoder(layers=3)
    model.graph.node.append(helper.make_node("Shape", ["past_0"], ["past_length"], start=1, end=2))
    model.graph.output.append(helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]))
    path = _saved(tmp_path, model)
    code, out, _ = run_main(capsys, path, "--allow-io-change", "--drop-blocks", "block:0", "--renumber-cache",
                            "-o", tmp_path / "o.onnx")
    assert code == 0, out
    assert "input   past_0 [1, 2, 8] removed" in out
    pruned = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == ["x", "past_0", "past_1"]  # were past_1 and past_2
    feeds = make_feeds(model)
    names = [o.name for o in model.graph.output]
    want = dict(zip(names, run(branch_zeroed(model, "l0.add1", "x"), feeds)))
    changes = iochange.read(pruned)
    want = iochange.comparable_outputs(want, changes)
    got = dict(zip([o.name for o in pruned.graph.output], run(pruned, iochange.candidate_feeds(feeds, changes))))
    assert list(got) == list(want) == ["l2.add2_out", "present_0_out", "present_1_out", "past_length"]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert got["past_length"].tolist() == [2]


def test_renumbering_a_model_cut_elsewhere_is_exact(tmp_path, capsys):
    path = _three_layers(tmp_path)
    run_main(capsys, path, "--allow-io-change", "--drop-blocks", "block:2", "-o", tmp_path / "plain.onnx")
    code, out, _ = run_main(capsys, tmp_path / "plain.onnx", "--allow-io-change", "--renumber-cache",
                            "-o", tmp_path / "renamed.onnx", "--report", tmp_path / "r.json")
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_error"] == {"l2.add2_out": 0.0, "present_0_out": 0.0, "present_1_out": 0.0}
    # relative to this run's input: the earlier run's removal is not this run's change
    assert [(c["name"], c.get("renamed")) for c in report["io_changes"]] == \
        [("past_2", "past_1"), ("present_2_out", "present_1_out")]


def test_a_quality_gate_measures_the_renamed_outputs(tmp_path, capsys):
    path = _three_layers(tmp_path)
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, **{i.name: rng.standard_normal((8, *[d.dim_value for d in i.type.tensor_type.shape.dim][1:]))
                      .astype(np.float32) for i in model.graph.input})
    code, out, err = run_main(capsys, path, "--allow-io-change", "--drop-blocks", "block:2", "--renumber-cache",
                              "--data", data, "--max-output-error", "100", "-o", tmp_path / "o.onnx",
                              "--report", tmp_path / "r.json")
    assert code == 0, out + err
    gate = json.loads((tmp_path / "r.json").read_text())["gate"]
    assert gate["samples"] > 0 and np.isfinite(gate["output_error"])


def test_renumbering_needs_allow_io_change_and_a_cache(tmp_path, capsys):
    path = _three_layers(tmp_path)
    code, _, err = run_main(capsys, path, "--drop-blocks", "block:2", "--renumber-cache", "-o", tmp_path / "o.onnx")
    assert code == 2 and "--renumber-cache renames the cache inputs and outputs: it needs --allow-io-change" \
        in one_error_line(err)
    assert not (tmp_path / "o.onnx").exists()
    from test_depth import pre_norm

    plain = _saved(tmp_path, pre_norm(), "plain.onnx")
    code, _, err = run_main(capsys, plain, "--allow-io-change", "--depth", "0.5", "--renumber-cache",
                            "-o", tmp_path / "o.onnx")
    assert code == 2 and "nothing to renumber" in one_error_line(err)
    assert not (tmp_path / "o.onnx").exists()


def _genai_folder(tmp_path, model_path):
    """A genai_config.json beside ``model_path`` whose cache templates are the cached decoder's names."""
    config = {"model": {"type": "llama", "decoder": {
        "filename": model_path.name, "num_hidden_layers": 3, "num_attention_heads": 1, "num_key_value_heads": 1,
        "inputs": {"past_key_names": "past_%d"}, "outputs": {"present_key_names": "present_%d_out"}}}}
    (model_path.parent / "genai_config.json").write_text(json.dumps(config))
    (model_path.parent / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "hidden_size": 8}))


def test_configs_follow_a_renumbered_cut_and_gaps_still_fail_without_it(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    path = _saved(folder, cached_decoder(layers=3))
    _genai_folder(tmp_path, path)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    cut = ["--allow-io-change", "--drop-blocks", "block:2"]
    code, _, err = run_main(capsys, path, *cut, "-o", out)
    assert code == 2 and "layers 0, 2: onnxruntime-genai and config.json expect 0..1 (--renumber-cache renumbers" \
        in one_error_line(err)
    assert not list(out.parent.iterdir())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code, out_text, _ = run_main(capsys, path, *cut, "--renumber-cache", "-o", out)
    assert code == 0, out_text
    decoder = json.loads((out.parent / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 2
    assert json.loads((out.parent / "config.json").read_text())["num_hidden_layers"] == 2
    names = {i.name for i in onnx.load(out).graph.input}
    assert {decoder["inputs"]["past_key_names"] % n for n in range(2)} <= names  # the templates name the cache
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the input folder is untouched


@pytest.mark.slow
@pytest.mark.parametrize("exporter,layer", [("legacy", 1), ("dynamo", 1), ("dynamo", 0)])
def test_gpt2_heads_and_a_layer_renumbered_equal_the_plain_cut(tmp_path, capsys, exporter, layer):
    """Heads pruned and one layer's attention removed from a 3-layer GPT-2 (both exporters' names,
    past_key_N; dynamo reads layer 0's past_value for its shape): the renumbered model is the plain
    cut's, under the map, head positions and all."""
    transformers = pytest.importorskip("transformers")
    from tools.bench_decoder import export_gpt2_with_cache

    config = transformers.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=64)
    config._attn_implementation = "eager"
    export_gpt2_with_cache(tmp_path / "gpt2.onnx", config, exporter, past=3, new=2)
    cut = [tmp_path / "gpt2.onnx", "--allow-io-change", "--structured", "0.5", "--drop-blocks", f"model.h.{layer}.attn",
           "--input-shape", "input_ids:1,2"]
    assert run_main(capsys, *cut, "-o", tmp_path / "plain.onnx")[0] == 0
    code, out, _ = run_main(capsys, *cut, "--renumber-cache", "-o", tmp_path / "renamed.onnx")
    assert code == 0, out
    plain, renamed = onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "renamed.onnx")
    onnx.checker.check_model(renamed, full_check=True)
    cache = [f"past_{kv}_{n}" for n in range(2) for kv in ("key", "value")]
    assert [i.name for i in renamed.graph.input] == ["input_ids", *cache]
    assert [o.name for o in renamed.graph.output] == ["hidden", *(n.replace("past", "present") for n in cache)]
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 100, (1, 2))}
    feeds |= {i.name: rng.standard_normal((1, 2, 3, 16)).astype(np.float32) for i in plain.graph.input[1:]}
    kept = [n for n in range(3) if n != layer]
    rename = {f"past_{kv}_{old}": f"past_{kv}_{new}" for new, old in enumerate(kept) for kv in ("key", "value")}
    assert [i.name for i in plain.graph.input[1:]] == list(rename)  # the removed layer's cache went whole
    want = run(plain, feeds)
    got = run(renamed, {rename.get(k, k): v for k, v in feeds.items()})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w, g)
    heads = {c.name: c.kept for c in iochange.read(renamed) if c.axis == 1}
    assert heads == {c.name: c.kept for c in iochange.read(plain) if c.axis == 1}  # positions: original names


# --- onnxruntime-genai: the builder's tiny Llama, a middle layer gone, renumbered, loads and generates ---

def _without_layer(model: onnx.ModelProto, layer: int) -> onnx.ModelProto:
    """The builder's graph with one decoder layer cut out as a depth cut leaves it (the cache of the
    others keeps its names), made here by a graph edit so that the renaming is tested apart from the block
    finder (tests/test_skip_depth.py cuts it with --drop-blocks): the next layer's
    input norm reads what this layer's input norm read (its MLP output and residual), and what only the
    layer computed goes, its cache inputs and outputs with it."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    this = nodes[f"/model/layers.{layer}/input_layernorm/SkipLayerNorm"]
    following = nodes[f"/model/layers.{layer + 1}/input_layernorm/SkipLayerNorm"]
    following.input[0], following.input[1] = this.input[0], this.input[1]
    for tensors, names in ((graph.input, "past_key_values.%d.%s"), (graph.output, "present.%d.%s")):
        for kv in ("key", "value"):
            tensors.remove(next(t for t in tensors if t.name == names % (layer, kv)))
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # topological order: a node's readers come after it
        if any(o in needed for o in node.output if o):  # "": an optional input or output left out
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)
    # the builder's recorded shapes go, as onnxprune's export drops them: one of them (a Constant of
    # shape [1] recorded as a scalar) fails onnx's full check, which verification runs on the output
    del graph.value_info[:]
    return model


def _generate(og, folder, prompt=(1, 5, 6, 7), tokens=8) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(list(prompt))
    for _ in range(tokens):
        generator.generate_next_token()
    return list(generator.get_sequence(0))


@pytest.mark.slow
def test_genai_folder_without_a_middle_layer_renumbered_loads_and_generates(tmp_path):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (the test/genai extra)")
    transformers = pytest.importorskip("transformers", reason="transformers builds the tiny model")
    import torch

    from tools.bench_genai import tiny_tokenizer

    layers = 4
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tiny_tokenizer(transformers).save_pretrained(tmp_path / "hf")
    built = tmp_path / "built"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tmp_path / "hf"),
                    "-o", str(built), "-p", "fp32", "-e", "cpu", "-c", str(tmp_path / "cache")],
                   check=True, capture_output=True)
    cut = tmp_path / "cut"  # layer 1 of 0..3 removed: the cache is layers 0, 2, 3
    cut.mkdir()
    for f in built.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, cut / f.name)
    onnx.save(_without_layer(onnx.load(str(built / "model.onnx")), 1), str(cut / "model.onnx"))
    shapes = ["--input-shape", "input_ids:1,4", "--input-shape", "attention_mask:1,8"]
    for layer in (0, 2, 3):
        for kv in ("key", "value"):
            shapes += ["--input-shape", f"past_key_values.{layer}.{kv}:1,2,4,16"]
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    command = [sys.executable, "-m", "onnxprune", str(cut / "model.onnx"), "--allow-io-change", "--renumber-cache",
               *shapes, "-o", str(out), "--report", str(tmp_path / "r.json")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "config  genai_config.json: num_hidden_layers 4 -> 3" in done.stdout + done.stderr
    renamed = onnx.load(str(out))
    assert [i.name for i in renamed.graph.input if i.name.startswith("past")] == \
        [f"past_key_values.{n}.key" for n in range(3)] + [f"past_key_values.{n}.value" for n in range(3)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["output_error"].values()) == {0.0}  # the renamed model is the cut one, fed by the map
    assert {c["name"]: c["renamed"] for c in report["io_changes"]}["present.3.value"] == "present.2.value"
    sequence = _generate(og, out.parent)
    assert len(sequence) == 12
    # the builder's quirk (tests/test_configs.py, docs/deployment.md): lm_head reads layer 0's output,
    # so the logits do not depend on layer 1 and the folder without it generates the same tokens,
    # which it can only do if genai finds layer 0's cache under its name and the others under theirs
    if "layers.0/" in next(n for n in renamed.graph.node if n.name == "/lm_head/MatMul").input[0]:
        assert sequence == _generate(og, built)

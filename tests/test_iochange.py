"""Decoders with a KV cache: attention heads meet the graph inputs and outputs.

Without --allow-io-change the cache heads are a barrier (the MLP still prunes);
with it, the head axis of every past/present tensor shrinks with the heads,
the report and the model's metadata say which heads were kept, and everything
that compares the pruned model with the original (verification, output
errors, distillation, sensitivity, benchmarks) feeds it the kept heads.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.cut import iochange
from onnxprune.pipeline.sensitivity import measure_sensitivity

from graphs import masked_reference, run

torch = pytest.importorskip("torch")

HEADS, HIDDEN, PAST, NEW = 4, 64, 3, 2
HEAD_DIM = HIDDEN // HEADS
LAYERS = 2


class CachedBlock(torch.nn.Module):
    """A GPT-style block whose attention reads past keys/values and returns the new ones."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(HIDDEN, 3 * HIDDEN), torch.nn.Linear(HIDDEN, HIDDEN)
        self.up, self.down = torch.nn.Linear(HIDDEN, 4 * HIDDEN), torch.nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x, past_k, past_v):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(HIDDEN, dim=2)
        q, k, v = (z.reshape(b, t, HEADS, HEAD_DIM).transpose(1, 2) for z in (q, k, v))
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        att = torch.softmax(q @ k.transpose(2, 3) / HEAD_DIM ** 0.5, dim=-1) @ v
        h = x + self.out(att.transpose(1, 2).reshape(b, t, -1))
        return h + self.down(torch.nn.functional.gelu(self.up(h))), k, v


class CachedDecoder(torch.nn.Module):
    """``LAYERS`` cached blocks: inputs x, past_key_i, past_value_i; outputs y, present_key_i, present_value_i."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(CachedBlock() for _ in range(LAYERS))

    def forward(self, x, *past):
        presents = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (x, *presents)


CACHE_INPUTS = [f"past_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")]
CACHE_OUTPUTS = [f"present_{kv}_{i}" for i in range(LAYERS) for kv in ("key", "value")]


def export_decoder(path, exporter: str) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = CachedDecoder().eval()
    args = (torch.rand(1, NEW, HIDDEN),) + tuple(torch.rand(1, HEADS, PAST, HEAD_DIM) for _ in CACHE_INPUTS)
    names = {"input_names": ["x"] + CACHE_INPUTS, "output_names": ["y"] + CACHE_OUTPUTS}
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter == "legacy":  # the past length dynamic, as real decoders export it
            dynamic = {n: {2: "past"} for n in CACHE_INPUTS} | {n: {2: "total"} for n in CACHE_OUTPUTS}
            torch.onnx.export(model, args, str(path), opset_version=17, dynamo=False, dynamic_axes=dynamic, **names)
        else:
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, **names)
    return onnx.load(str(path))


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def decoder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / f"decoder-{request.param}.onnx"
    return export_decoder(path, request.param), path


def cache_feeds(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((1, NEW, HIDDEN)).astype(np.float32)}
    feeds |= {n: rng.standard_normal((1, HEADS, PAST, HEAD_DIM)).astype(np.float32) for n in CACHE_INPUTS}
    return feeds


def declared(model: onnx.ModelProto) -> dict:
    return {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
            for vi in (*model.graph.input, *model.graph.output)}


def head_groups(analysis):
    return [g for g in analysis.groups if g.kind == "heads"]


def test_without_the_flag_cache_heads_are_a_barrier_that_names_it(decoder):
    model, _ = decoder
    analysis = onnxprune.analyse(model)
    heads = head_groups(analysis)
    assert len(heads) == LAYERS and all(g.blocked for g in heads)
    assert all("`allow_io_change`" in g.blocked[0] for g in heads)
    result = onnxprune.prune(model, 0.5)
    assert declared(result.model) == declared(model)
    assert [g.channels_before for g in result.report.groups if g.channels_after < g.channels_before] == \
        [4 * HIDDEN] * LAYERS  # only the MLPs
    assert not result.report.io_changes and not iochange.read(result.model)


def test_allow_io_change_prunes_cache_heads_exactly(decoder):
    model, _ = decoder
    before = model.SerializeToString()
    analysis = onnxprune.analyse(model, allow_io_change=True)
    assert [g.blocked for g in head_groups(analysis)] == [[]] * LAYERS
    residual = [g for g in analysis.groups if g.kind != "heads" and g.blocked]
    assert residual and all("graph" in g.blocked[0] for g in residual)  # only heads may change the IO

    result = onnxprune.prune(model, 0.5, allow_io_change=True)
    assert model.SerializeToString() == before
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert [g.units_after for g in result.report.groups if g.kind == "heads"] == [HEADS // 2] * LAYERS

    # Names and dtypes stay; only the head axis (1) of the cache tensors changes, to the kept heads.
    changes = iochange.read(pruned)
    assert sorted({c.name for c in changes}) == sorted(CACHE_INPUTS + CACHE_OUTPUTS)
    assert {(c.axis, c.size_before, c.size_after) for c in changes} == {(1, HEADS, HEADS // 2)}
    want, got = declared(model), declared(pruned)
    assert list(got) == list(want)
    for name in want:
        expected = list(want[name])
        if name in CACHE_INPUTS + CACHE_OUTPUTS:
            expected[1] = HEADS // 2
        assert got[name] == expected, name
    reported = {c["name"]: c for c in result.report.io_changes}
    assert reported["past_key_0"]["shape_after"][1] == HEADS // 2
    kept = {c.name: c.kept for c in changes}
    assert kept["past_key_0"] == kept["present_value_0"] == reported["past_key_0"]["kept"]["1"]

    # Mask equivalence: y equals the original with the removed heads zeroed at the output projection,
    # and the new cache equals the original's cache at the kept heads.
    feeds = cache_feeds()
    pruned_out = dict(zip(["y"] + CACHE_OUTPUTS, run(pruned, iochange.candidate_feeds(feeds, changes))))
    reference = dict(zip(["y"] + CACHE_OUTPUTS, run(masked_reference(model, analysis, result.plan), feeds)))
    reference = iochange.comparable_outputs(reference, changes)
    for name, value in pruned_out.items():
        np.testing.assert_allclose(value, reference[name], rtol=1e-4, atol=1e-4 * np.abs(reference[name]).max())


def test_a_head_group_only_changes_its_own_layer(decoder):
    model, _ = decoder
    analysis = onnxprune.analyse(model, allow_io_change=True)
    first = head_groups(analysis)[0]
    result = onnxprune.prune(model, None, ratios={first.id: 0.5}, allow_io_change=True)
    assert sorted(c.name for c in iochange.read(result.model)) == sorted(
        n for n in CACHE_INPUTS + CACHE_OUTPUTS if n.endswith("_0"))


def test_cli_writes_verified_model_and_reports_new_cache_shapes(decoder, tmp_path):
    _, path = decoder
    out, report = tmp_path / "pruned.onnx", tmp_path / "report.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main([str(path), "--structured", "0.5", "--allow-io-change", "-o", str(out), "--report", str(report)])
    assert code == 0
    summary = text.getvalue()
    assert "past_key_0" in summary and "[1, 2," in summary and "axis 1 keeps" in summary
    data = json.loads(report.read_text())
    assert {c["name"] for c in data["io_changes"]} == set(CACHE_INPUTS + CACHE_OUTPUTS)
    # Verification fed the kept heads of the original's cache, and compared the kept heads of its outputs:
    # the first layer's new cache is exact (it depends on x only).
    assert data["output_error"]["present_key_0"] < 1e-5 and data["output_error"]["present_value_0"] < 1e-5
    written = onnx.load(str(out))
    assert [c.name for c in iochange.read(written)] == [c["name"] for c in data["io_changes"]
                                                       for _ in c["kept"]]


def test_info_shows_cache_heads_as_prunable_with_the_flag(decoder, tmp_path):
    _, path = decoder
    without, with_flag = tmp_path / "without.json", tmp_path / "with.json"
    assert main(["info", str(path), "-q", "--json", str(without)]) == 0
    assert main(["info", str(path), "-q", "--allow-io-change", "--json", str(with_flag)]) == 0
    kinds = lambda p: [g["kind"] for g in json.loads(p.read_text())["prunable"]]  # noqa: E731
    assert "heads" not in kinds(without) and kinds(with_flag).count("heads") == LAYERS


@pytest.fixture(scope="module")
def cache_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("kvdata") / "cache.npz"
    arrays = {"x": rng.standard_normal((24, NEW, HIDDEN)).astype(np.float32)}
    arrays |= {n: rng.standard_normal((24, HEADS, PAST, HEAD_DIM)).astype(np.float32) for n in CACHE_INPUTS}
    np.savez(path, **arrays)
    return path


def test_data_features_compare_the_kept_heads(decoder, cache_data, tmp_path):
    """Compensation, a data criterion, sensitivity allocation, distillation, two rounds and the quality
    gate all run the reshaped model on the original's data."""
    model, path = decoder
    data = onnxprune.load_data(cache_data, model)
    result = onnxprune.prune(model, 0.5, allow_io_change=True, data=data, importance="taylor")
    assert result.report.compensation["output_error"]["with"] >= 0
    sensitivity = measure_sensitivity(model, data, [0.5], allow_io_change=True)
    heads = {g.id for g in head_groups(onnxprune.analyse(model, allow_io_change=True))}
    measured = [g for g in sensitivity.groups if g.id in heads]
    assert len(measured) == LAYERS and all(0 < g.error[0] < 10 for g in measured)

    out, report = tmp_path / "trained.onnx", tmp_path / "trained.json"
    code = main([str(path), "--structured", "0.5", "--allow-io-change", "--data", str(cache_data), "--distill",
                 "--epochs", "1", "--batch-size", "8", "--steps", "2", "--max-output-error", "10",
                 "-o", str(out), "--report", str(report), "-q"])
    assert code == 0
    data_report = json.loads(report.read_text())
    assert len(data_report["rounds"]) == 2 and data_report["gate"]["output_error"] < 10
    # Two rounds compose: the record is relative to the input model, with the heads the second round kept.
    changes = iochange.read(onnx.load(str(out)))
    assert all(c.size_before == HEADS and 1 <= c.size_after < HEADS for c in changes)
    shapes = {c["name"]: c["shape_after"] for c in data_report["io_changes"]}
    assert all(shapes[c.name][1] == c.size_after for c in changes)


def test_bench_feeds_each_model_its_own_cache_shape(decoder, tmp_path):
    _, path = decoder
    out = tmp_path / "pruned.onnx"
    assert main([str(path), "--structured", "0.5", "--allow-io-change", "-o", str(out), "-q"]) == 0
    from onnxprune.runtime.bench import bench

    result = bench([str(path), str(out)], [1], warmup=1, iters=3,
                                   input_shapes={n: (1, HEADS, PAST, HEAD_DIM) for n in CACHE_INPUTS})
    assert len(result.timings) == 2
    # the pruned model's error, on the kept heads of the original's cache: as verification measures it
    # on the same inputs (the same seed and shapes), not left out because its inputs changed
    report = tmp_path / "r.json"
    assert main([str(path), "--structured", "0.5", "--allow-io-change", "-o", str(out), "--force", "-q",
                 "--report", str(report)]
                + [a for n in CACHE_INPUTS for a in ("--input-shape", f"{n}:1,{HEADS},{PAST},{HEAD_DIM}")]) == 0
    verified = max(json.loads(report.read_text())["output_error"].values())
    benched = bench([str(path), str(out)], [1], warmup=1, iters=3,
                    input_shapes={n: (1, HEADS, PAST, HEAD_DIM) for n in CACHE_INPUTS}).output_error
    assert benched[str(path)] == 0.0 and 0 < benched[str(out)] == pytest.approx(verified, rel=1e-6)


def test_compose_shrink_and_grow():
    first = [iochange.IOChange("past", "input", 1, 8, [0, 2, 3, 5, 7])]
    second = [iochange.IOChange("past", "input", 1, 5, [1, 4]), iochange.IOChange("other", "output", 2, 4, [0])]
    composed = {c.name: c for c in iochange.compose(first, second)}
    assert composed["past"].kept == [2, 7] and composed["past"].size_before == 8
    assert composed["other"].kept == [0]
    shapes = {"past": (1, 8, 3, 16), "x": (1, 2)}
    small = iochange.shrink_shapes(shapes, first)
    assert small == {"past": (1, 5, 3, 16), "x": (1, 2)}
    assert iochange.shrink_shapes(small, first) == small  # already the changed model's shape
    assert iochange.grow_shapes(small, first) == shapes
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    iochange.record(model, first)
    assert iochange.read(model) == first
    iochange.record(model, [])
    assert iochange.read(model) == [] and not model.metadata_props


# --- a Hugging Face decoder exported with its cache ------------------------------------------

def export_gpt2_with_cache(path, exporter: str, attention: str) -> onnx.ModelProto:
    transformers = pytest.importorskip("transformers")
    from tools.bench_decoder import (
        export_gpt2_with_cache as export,  # the benchmark's recipe (tools/)
    )

    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=100, n_positions=64)
    config._attn_implementation = attention
    export(path, config, exporter, past=PAST, new=NEW)
    return onnx.load(str(path))


@pytest.mark.parametrize("exporter,attention", [("legacy", "eager"), ("legacy", "sdpa"), ("dynamo", "eager"),
                                               ("dynamo", "sdpa")])
def test_gpt2_exported_with_its_cache_prunes_heads_with_the_flag(tmp_path, exporter, attention):
    """Both exporters, dynamic batch/sequence/past: the head count is recomputed, the cache's head axis
    shrinks, the rest of every shape stays dynamic, and the result is exact up to the removed heads."""
    model = export_gpt2_with_cache(tmp_path / "gpt2.onnx", exporter, attention)
    analysis = onnxprune.analyse(model, allow_io_change=True)
    result = onnxprune.prune(model, 0.5, allow_io_change=True)
    onnx.checker.check_model(result.model, full_check=True)
    assert [(g.units_before, g.units_after) for g in result.report.groups if g.kind == "heads"] == \
        [(HEADS, HEADS // 2)] * LAYERS
    changes = iochange.read(result.model)
    assert sorted({c.name for c in changes}) == sorted(CACHE_INPUTS + CACHE_OUTPUTS)
    assert all(isinstance(d, str) for d in declared(result.model)["past_key_0"][::2])  # batch, past: dynamic

    rng = np.random.default_rng(0)  # other sizes than at export: batch 2, past 5, 3 new tokens
    feeds = {"input_ids": rng.integers(0, 100, (2, 3))}
    feeds |= {n: rng.standard_normal((2, HEADS, 5, HEAD_DIM)).astype(np.float32) for n in CACHE_INPUTS}
    names = ["hidden"] + CACHE_OUTPUTS
    got = dict(zip(names, run(result.model, iochange.candidate_feeds(feeds, changes))))
    want = iochange.comparable_outputs(dict(zip(names, run(masked_reference(model, analysis, result.plan), feeds))),
                                       changes)
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4 * np.abs(want[name]).max(),
                                   err_msg=name)

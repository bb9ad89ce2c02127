"""What real exporters write, read as they mean it: paddle2onnx's -1 for a dynamic dim, and the
module paths the torch dynamo exporter records in each node's metadata (nodes named
``node_conv2d_3`` are shown as ``features.3``); ``--ignore`` globs that match nothing warn."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

import onnxprune
from onnxprune.graph.names import NAME_SCOPES, module_path
from onnxprune.report.text import labelled_reason, node_labels

from graphs import GraphBuilder, run, run_main


def cnn(batch="N") -> onnx.ModelProto:
    b = GraphBuilder(seed=3)
    x = b.input("x", [batch, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    h = b.op("Relu", [b.conv(h, 8, 8, name="conv2")])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])])
    return b.build(b.gemm(h, 8, 4, name="head"))


def with_negative_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """paddle2onnx's form: the dynamic batch of the input and the output declared as dim_value -1."""
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = -1
    onnx.checker.check_model(model, full_check=True)  # the checker accepts it, as onnxruntime does
    return model


def batch_of(batch: int) -> dict:
    return {"x": np.random.default_rng(batch).standard_normal((batch, 3, 8, 8)).astype(np.float32)}


def declared(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


# --- paddle2onnx: dim_value -1 -------------------------------------------------------------------

@pytest.fixture
def paddle_model(tmp_path):
    path = tmp_path / "paddle.onnx"
    onnx.save(with_negative_batch(cnn()), str(path))
    return path


def test_a_negative_dim_prunes_without_input_shape_and_stays_dynamic(paddle_model, capsys, tmp_path):
    out_path = tmp_path / "out.onnx"
    code, out, err = run_main(capsys, paddle_model, "--structured", "0.5", "-o", out_path,
                              "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "conflicts" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["macs_after"] < report["macs_before"]
    assert sum(g["channels_after"] < g["channels_before"] for g in report["groups"]) == 2
    pruned = onnx.load(str(out_path))
    onnx.checker.check_model(pruned, full_check=True)
    # declared dynamic by name, each dim its own name (-1 says nothing about two dims being equal)
    assert declared(pruned.graph.input[0]) == ["x_dim0", 3, 8, 8]
    assert declared(pruned.graph.output[0]) == ["head_out_dim0", 4]
    original = onnx.load(str(paddle_model))
    for batch in (1, 3):  # the pruned model runs at any batch, as the original does
        feeds = batch_of(batch)
        assert run(pruned, feeds)[0].shape == run(original, feeds)[0].shape == (batch, 4)


def test_info_and_bench_read_a_negative_dim_as_dynamic(paddle_model, capsys, tmp_path):
    code, out, err = run_main(capsys, "info", paddle_model, "--json", tmp_path / "info.json")
    assert code == 0, err
    assert "at x:1,3,8,8" in out and "2 prunable group(s), 16 channels" in out
    assert json.loads((tmp_path / "info.json").read_text())["inputs"] == {"x": [1, 3, 8, 8]}
    code, out, err = run_main(capsys, "info", paddle_model, "--input-shape", "x:4,3,8,8")
    assert code == 0, err
    assert "at x:4,3,8,8" in out
    code, out, err = run_main(capsys, "bench", paddle_model, "--batch", "1,2", "--iters", "2", "--warmup", "1",
                              "--json", tmp_path / "bench.json")
    assert code == 0, err
    assert {t["batch"] for t in json.loads((tmp_path / "bench.json").read_text())["timings"]} == {1, 2}


def test_a_negative_dim_given_in_memory_is_analysed_as_dynamic():
    """onnxprune.analyse on a proto that still declares -1: shape inference must not carry -1 on as a
    size (the batch axis is dynamic, as it is for the same model with a dim_param)."""
    model = with_negative_batch(cnn())
    analysis = onnxprune.analyse(model)
    named = onnxprune.analyse(cnn())
    assert analysis.shapes.dynamic["conv1_out"] == named.shapes.dynamic["conv1_out"] == {0}
    assert analysis.shapes.static["conv1_out"] == (1, 8, 8, 8)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # not modified
    result = onnxprune.prune(model, 0.5)
    assert result.report.macs_after < result.report.macs_before
    assert run(result.model, batch_of(2))[0].shape == (2, 4)


def test_a_fixed_dim_still_conflicts_with_a_pinned_one(capsys, tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(cnn(batch=2), str(path))
    code, _, err = run_main(capsys, "info", path, "--input-shape", "x:3,3,8,8")
    assert code == 2
    assert "conflicts with the model's fixed dim 2" in err and "Traceback" not in err


# --- --ignore globs that match nothing -----------------------------------------------------------

@pytest.fixture
def cnn_file(tmp_path):
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn(), str(path))
    return path


def ignore_warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if "--ignore" in line and "matches no" in line]


def test_an_ignore_glob_that_matches_nothing_warns_with_the_closest_names(cnn_file, capsys, tmp_path):
    code, out, err = run_main(capsys, cnn_file, "--structured", "0.5", "--ignore", "conv_1*", "--ignore", "conv2",
                              "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    (warned,) = ignore_warnings(err)  # the glob that matched (conv2) gives none
    assert "'conv_1*'" in warned and "closest names: conv1" in warned
    report = json.loads((tmp_path / "r.json").read_text())
    assert [w for w in report["warnings"] if "matches no" in w] == [
        "`ignore` 'conv_1*' matches no node, module or weight name: it leaves nothing alone; "
        "closest names: conv1, conv2"]
    # conv2 was ignored as asked: conv1's group (read by conv2) and conv2's are both left whole
    assert report["groups"] == [] and sum("ignore" in b["reason"] for b in report["blocked"]) == 2


def test_matching_globs_warn_nothing(cnn_file, capsys, tmp_path):
    # by node name, and by the name of a weight (conv2's: it blocks conv2's group and conv1's)
    for glob in ("head", "conv2.W*"):
        code, _, err = run_main(capsys, cnn_file, "--structured", "0.5", "--ignore", glob, "--dry-run",
                                "--report", tmp_path / f"{glob}.json")
        assert code == 0, err
        report = json.loads((tmp_path / f"{glob}.json").read_text())
        assert not ignore_warnings(err) and not [w for w in report["warnings"] if "matches no" in w]
        assert any("ignored" in b["reason"] for b in report["blocked"])


def test_info_and_sparsity_alone_warn_about_a_glob_that_matches_nothing(cnn_file, capsys, tmp_path):
    code, _, err = run_main(capsys, "info", cnn_file, "--ignore", "nothing_here", "--json", tmp_path / "i.json")
    assert code == 0, err
    assert len(ignore_warnings(err)) == 1
    assert json.loads((tmp_path / "i.json").read_text())["warnings"][0].startswith("`ignore` 'nothing_here'")
    code, _, err = run_main(capsys, cnn_file, "--unstructured", "0.5", "--min-elements", "1", "--ignore", "zzz",
                            "--dry-run")
    assert code == 0, err
    assert len(ignore_warnings(err)) == 1 and "'zzz'" in err


# --- the dynamo exporter's node names -------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamo_cnn(tmp_path_factory):
    """A small CNN exported by torch.onnx.export(dynamo=True): nodes node_conv2d, node_linear_1, ...,
    the module path of each in its metadata_props."""
    torch = pytest.importorskip("torch", reason="the dynamo exporter needs torch")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    import contextlib
    import io
    import warnings

    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3), keepdim=True))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dynamo") / "cnn.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=True,
                              external_data=False, input_names=["x"])
        except Exception as exc:  # an exporter that cannot run here is a skip, not a failure
            pytest.skip(f"torch.onnx.export(dynamo=True) failed: {type(exc).__name__}: {exc}")
    model = onnx.load(str(path))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not any(p.key == NAME_SCOPES for p in convs[0].metadata_props):
        pytest.skip(f"this torch ({torch.__version__}) writes no {NAME_SCOPES} metadata")
    return path


def gemm_weights(path) -> dict[str, tuple]:
    model = onnx.load(str(path))
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {module_path(n): inits[n.input[1]] for n in model.graph.node if n.op_type == "Gemm"}


def test_dynamo_nodes_are_shown_by_module_path(dynamo_cnn, capsys, tmp_path):
    model = onnx.load(str(dynamo_cnn))
    assert {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")} == \
        {"node_conv2d", "node_conv2d_1", "node_linear", "node_linear_1"}  # what the exporter names them
    code, out, err = run_main(capsys, "info", dynamo_cnn, "--json", tmp_path / "i.json")
    assert code == 0, err
    assert "features.0\n" in out and "features.2\n" in out and "classifier.1\n" in out
    assert "classifier.3: reaches graph output" in out and "node_" not in out
    info = json.loads((tmp_path / "i.json").read_text())
    assert [(g["sources"], g["modules"]) for g in info["prunable"]] == [
        (["node_conv2d"], ["features.0"]), (["node_conv2d_1"], ["features.2"]), (["node_linear"], ["classifier.1"])]

    code, out, err = run_main(capsys, dynamo_cnn, "--structured", "0.5", "-v", "-o", tmp_path / "o.onnx",
                              "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "pruned      8 -> 4     features.0" in out and "classifier.1" in out and "node_" not in out
    report = json.loads((tmp_path / "r.json").read_text())
    # ids and sources stay the ONNX names (plans and --ratios files name groups by them)
    assert [(g["id"], g["sources"], g["modules"]) for g in report["groups"]] == [
        ("conv2d", ["node_conv2d"], ["features.0"]), ("conv2d_1", ["node_conv2d_1"], ["features.2"]),
        ("linear", ["node_linear"], ["classifier.1"])]
    assert report["modules"] == {"node_conv2d": "features.0", "node_conv2d_1": "features.2",
                                 "node_linear": "classifier.1", "node_linear_1": "classifier.3"}
    written = onnx.load(str(tmp_path / "o.onnx"))  # the exporter's metadata stays on the nodes
    assert [module_path(n) for n in written.graph.node if n.op_type == "Conv"] == ["features.0", "features.2"]


def test_ignore_by_module_path_leaves_that_module_whole(dynamo_cnn, capsys, tmp_path):
    before = gemm_weights(dynamo_cnn)
    code, out, err = run_main(capsys, dynamo_cnn, "--structured", "0.5", "--ignore", "classifier.1",
                              "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert not ignore_warnings(err)
    assert "Gemm classifier.1: ignored (--ignore)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [g["modules"] for g in report["groups"]] == [["features.0"]]  # features.2 feeds classifier.1
    assert {tuple(b["modules"]) for b in report["blocked"] if "ignore" in b["reason"]} == \
        {("features.2",), ("classifier.1",)}
    after = gemm_weights(tmp_path / "o.onnx")
    assert after["classifier.1"] == before["classifier.1"] == (12, 16)


def test_ignore_by_module_path_holds_in_every_round(dynamo_cnn, capsys, tmp_path):
    """--steps 2: the second round analyses the first round's cut, which keeps the metadata."""
    code, _, err = run_main(capsys, dynamo_cnn, "--structured", "0.5", "--steps", "2", "--ignore", "classifier*",
                            "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert not ignore_warnings(err)
    assert gemm_weights(tmp_path / "o.onnx") == gemm_weights(dynamo_cnn)
    conv1 = next(t for t in onnx.load(str(tmp_path / "o.onnx")).graph.initializer if len(t.dims) == 4)
    assert conv1.dims[0] < 8  # features.0 was pruned in both rounds


def node_with(name: str, **props) -> onnx.NodeProto:
    node = helper.make_node("Relu", ["a"], ["b"], name=name)
    for key, value in props.items():
        node.metadata_props.add(key=key, value=value)
    return node


def test_module_path_from_either_record_and_labels_for_shared_paths():
    scopes = node_with("n1", **{NAME_SCOPES: "['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']"})
    assert module_path(scopes) == "layer1.0.conv1"
    namespace = node_with("n2", namespace=": __main__.Net/blocks: torch.nn.modules.container.Sequential/"
                                           "blocks.2: Block/add_3: aten.add.Tensor")
    assert module_path(namespace) == "blocks.2"
    assert module_path(node_with("n3", **{NAME_SCOPES: "['', 'flatten']"})) is None  # the root module's forward
    assert module_path(node_with("n4", **{NAME_SCOPES: "not a list"})) is None
    assert module_path(node_with("n5")) is None
    # two nodes of one module (a forward calling two convs) keep their names beside the path
    assert node_labels({"node_conv2d": "stem", "node_conv2d_1": "block", "node_conv2d_2": "block"}) == {
        "node_conv2d": "stem", "node_conv2d_1": "block (node_conv2d_1)", "node_conv2d_2": "block (node_conv2d_2)"}
    labels = {"node_linear_1": "classifier.3"}
    assert labelled_reason("reaches graph output y; Gemm node_linear_1: ignored (`ignore`)", labels) == \
        "reaches graph output y; Gemm classifier.3: ignored (`ignore`)"


def test_ratios_globs_match_module_paths(dynamo_cnn, capsys, tmp_path):
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps({"features.*": 0.5}))
    code, _, err = run_main(capsys, dynamo_cnn, "--ratios", ratios, "--dry-run", "--report", tmp_path / "r.json")
    assert code == 0, err
    groups = json.loads((tmp_path / "r.json").read_text())["groups"]
    cut = {g["modules"][0]: (g["channels_before"], g["channels_after"]) for g in groups}
    assert cut == {"features.0": (8, 4), "features.2": (16, 8), "classifier.1": (12, 12)}

"""The command line: exit codes, one-line errors, files written (and not written).

Most tests call ``onnxprune.cli.main`` in-process on tiny models built with
onnx.helper; a few run the installed ``onnxprune`` script in a subprocess to
check the real exit status and stderr.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import cli

SCRIPT = Path(sys.executable).with_name("onnxprune")


# ---------------------------------------------------------------- models

def tiny_cnn(opset: int = 17, seed: int = 0, scale2: float = 1.0) -> onnx.ModelProto:
    """conv1 (3->16) -> Relu -> conv2 (16->32) -> Relu -> GAP -> Flatten -> fc (32->10).

    Two prunable groups (conv1: 16, conv2: 32); fc's output is a graph output (blocked).
    """
    rng = np.random.default_rng(seed)

    def arr(shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    inits = [
        numpy_helper.from_array(arr((16, 3, 3, 3)), "conv1.weight"),
        numpy_helper.from_array(arr(16), "conv1.bias"),
        numpy_helper.from_array(arr((32, 16, 3, 3), scale2), "conv2.weight"),
        numpy_helper.from_array(arr(32), "conv2.bias"),
        numpy_helper.from_array(arr((10, 32)), "fc.weight"),
        numpy_helper.from_array(arr(10), "fc.bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["output"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def nothing_prunable() -> onnx.ModelProto:
    """A single Conv whose output is the graph output: its only group is blocked."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["output"], name="relu")],
        "flat", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 4, 4])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


MODIFIES_INPUT: set[str] = set()  # no test may: -o MODEL is refused even with --force (issue 18)


@pytest.fixture
def model(tmp_path, request):
    """tiny_cnn() saved as tmp_path/model.onnx; after the test, its bytes must be unchanged."""
    m = tiny_cnn()
    onnx.checker.check_model(m, full_check=True)
    path = save(m, tmp_path / "model.onnx")
    before = digest(path)
    yield path
    if request.node.originalname not in MODIFIES_INPUT:
        assert digest(path) == before, "the input model was modified"


@pytest.fixture(scope="session")
def torch_model(tmp_path_factory) -> Path:
    """A small torch CNN (Conv+BN folded by the exporter, residual Add, Linear), legacy exporter."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.BatchNorm2d(24),
                                            torch.nn.ReLU())
            self.block = torch.nn.Sequential(torch.nn.Conv2d(24, 40, 3, padding=1), torch.nn.BatchNorm2d(40),
                                             torch.nn.ReLU(), torch.nn.Conv2d(40, 24, 3, padding=1))
            self.head = torch.nn.Linear(24, 5)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("torch") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"])
    return path


# ---------------------------------------------------------------- helpers

def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(directory: Path) -> set[str]:
    return {p.name for p in Path(directory).iterdir()}


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, code: int) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("onnxprune: error: "), lines[0]
    assert "Traceback" not in err
    assert code not in (0, 1), f"exit {code} for a user error: {err!r}"


def initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def weights(path: Path) -> dict[str, np.ndarray]:
    """Constant inputs by the node that reads them: {"conv1.weight": ..., "conv1.bias": ...}.

    (The pruner may rename the initializers it cuts; node names stay.)
    """
    m = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {}
    for node in m.graph.node:
        for slot, name in zip(("input", "weight", "bias"), node.input):
            if name in inits:
                out[f"{node.name}.{slot}"] = inits[name]
    return out


def io_signature(path: Path):
    m = onnx.load(str(path))

    def sig(vis):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in vis]

    inits = {t.name for t in m.graph.initializer}
    return sig([i for i in m.graph.input if i.name not in inits]), sig(m.graph.output)


def run_ort(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sess.get_inputs()}
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def assert_valid_pruned(original: Path, pruned: Path) -> None:
    onnx.checker.check_model(str(pruned), full_check=True)
    assert io_signature(pruned) == io_signature(original)
    before, after = run_ort(original), run_ort(pruned)
    assert list(after) == list(before)
    for name in before:
        assert after[name].shape == before[name].shape
        assert np.isfinite(after[name]).all()


# ---------------------------------------------------------------- success paths

def test_prune_writes_default_output_beside_input(model, capsys, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the default is beside the input, not in the cwd
    before = digest(model)
    code, out, err = run_main(capsys, model, "--structured", "0.4")
    assert code == 0, err
    expected = tmp_path / "model.pruned.onnx"
    assert expected.exists()
    assert listing(elsewhere) == set()
    assert listing(tmp_path) == {"model.onnx", "model.pruned.onnx", "cwd"}  # no temp files
    assert digest(model) == before
    assert "wrote" in out and str(expected) in out
    assert_valid_pruned(model, expected)
    w = weights(expected)
    assert w["conv1.weight"].shape[0] < 16 and w["conv2.weight"].shape[0] < 32
    assert w["conv2.weight"].shape[1] == w["conv1.weight"].shape[0]  # consumer cut with its producer
    assert w["fc.weight"].shape == (10, w["conv2.weight"].shape[0])


def test_output_flag_and_quiet(model, capsys, tmp_path):
    out_path = tmp_path / "small.onnx"
    code, out, err = run_main(capsys, model, "--structured", "0.25", "-o", out_path, "-q")
    assert code == 0, err
    assert out == "" and err == ""
    assert_valid_pruned(model, out_path)
    assert listing(tmp_path) == {"model.onnx", "small.onnx"}


def test_output_is_not_world_unreadable(model, capsys, tmp_path):
    """A pruned model is an ordinary file: its mode follows the umask like the input's did."""
    out_path = tmp_path / "small.onnx"
    old = os.umask(0o022)
    try:
        code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", out_path)
    finally:
        os.umask(old)
    assert code == 0, err
    assert out_path.stat().st_mode & 0o777 == 0o644


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out.strip() == f"onnxprune {onnxprune.__version__}"


def test_dry_run_writes_no_model(model, capsys, tmp_path):
    before = listing(tmp_path)
    code, out, err = run_main(capsys, model, "--structured", "0.4", "--dry-run", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert listing(tmp_path) == before | {"r.json"}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["written"] is False and report["output"] is None
    assert report["macs_after"] < report["macs_before"]  # it planned a real cut
    assert "dry run" in out


def test_dry_run_with_output_is_a_usage_error(model, capsys, tmp_path):
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--dry-run", "-o", tmp_path / "x.onnx")
    assert code == 2
    assert_one_line_error(err, code)
    assert not (tmp_path / "x.onnx").exists()


def test_report_json_schema(model, capsys, tmp_path):
    out_path, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", out_path, "--report", report_path)
    assert code == 0, err
    r = json.loads(report_path.read_text())
    assert r["schema_version"] == 1
    for key in ("params_before", "params_after", "macs_before", "macs_after"):
        assert isinstance(r[key], int) and r[key] > 0, key
    assert r["params_after"] < r["params_before"] and r["macs_after"] < r["macs_before"]
    assert r["params_before"] == onnxprune.count_params(onnx.load(str(model)))
    assert r["params_after"] == onnxprune.count_params(onnx.load(str(out_path)))
    assert r["macs_after"] == onnxprune.count_macs(onnx.load(str(out_path)))
    assert isinstance(r["seconds"], float) and 0 < r["seconds"] < 60
    assert len(r["groups"]) == 2
    w = weights(out_path)
    widths = {"conv1": w["conv1.weight"].shape[0], "conv2": w["conv2.weight"].shape[0]}
    for g in r["groups"]:
        assert {"id", "nodes", "channels_before", "channels_after", "importance"} <= set(g)
        assert isinstance(g["id"], str) and g["nodes"]
        assert g["channels_after"] < g["channels_before"]
        assert g["importance"]["criterion"] == "l1"
        source = "conv1" if "conv1" in g["nodes"] and g["channels_before"] == 16 else "conv2"
        assert g["channels_after"] == widths[source]
    assert sorted(g["channels_before"] for g in r["groups"]) == [16, 32]
    assert len(r["blocked"]) == 1 and "graph output" in r["blocked"][0]["reason"]
    assert set(r["output_error"]) == {"output"}


@pytest.mark.parametrize("round_to", [1, 8])
def test_round_to(model, capsys, tmp_path, round_to):
    out_path = tmp_path / "out.onnx"
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--round-to", round_to, "-o", out_path)
    assert code == 0, err
    w = weights(out_path)
    kept = [w["conv1.weight"].shape[0], w["conv2.weight"].shape[0]]
    if round_to == 8:
        assert all(k % 8 == 0 and k > 0 for k in kept), kept
        assert kept == [8, 16]
    else:
        assert kept == [10, 19]  # 60% of 16 and 32, rounded to the nearest channel
    assert_valid_pruned(model, out_path)


def test_global_ranking(tmp_path, capsys):
    # conv2's weights are 100x smaller: ranked together, conv2 loses more than conv1.
    path = save(tiny_cnn(scale2=0.01), tmp_path / "model.onnx")
    code, _, err = run_main(capsys, path, "--structured", "0.4", "--global", "-o", tmp_path / "g.onnx",
                            "--report", tmp_path / "g.json")
    assert code == 0, err
    assert_valid_pruned(path, tmp_path / "g.onnx")
    report = json.loads((tmp_path / "g.json").read_text())
    groups = {g["channels_before"]: g["channels_after"] for g in report["groups"]}
    removed = sum(b - a for b, a in groups.items())
    assert math.floor(0.4 * 48) <= removed <= math.ceil(0.4 * 48) + 1
    assert groups[32] < 32 * 0.6 - 1  # more than its local share
    assert groups[16] > 16 * 0.6  # less than its local share
    assert groups[32] >= math.ceil(32 * 0.1)  # --max-group-ratio 0.9 floor

    code, _, err = run_main(capsys, path, "--structured", "0.4", "-o", tmp_path / "l.onnx",
                            "--report", tmp_path / "l.json")
    assert code == 0, err
    local = {g["channels_before"]: g["channels_after"] for g in json.loads((tmp_path / "l.json").read_text())["groups"]}
    assert local == {16: 10, 32: 20} != groups  # 9.6 and 19.2, rounded by default (2s and 4s: within 12.5%)


def test_ignore_blocks_the_matched_group(model, capsys, tmp_path):
    out_path, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, out, err = run_main(capsys, model, "--structured", "0.4", "--ignore", "conv1*", "-o", out_path,
                              "--report", report_path)
    assert code == 0, err
    r = json.loads(report_path.read_text())
    ignored = [b for b in r["blocked"] if "ignore" in b["reason"]]
    assert len(ignored) == 1 and ignored[0]["channels"] == 16
    assert [g["channels_before"] for g in r["groups"]] == [32]
    w = weights(out_path)
    assert w["conv1.weight"].shape == (16, 3, 3, 3)  # left alone
    assert w["conv2.weight"].shape[0] < 32
    assert "--ignore" in out


def test_ignore_by_weight_name(model, capsys, tmp_path):
    # fc reads conv2's channels: leaving fc.weight alone blocks conv2's group, not conv1's.
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--ignore", "fc.w*", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    w = weights(tmp_path / "o.onnx")
    assert w["fc.weight"].shape == (10, 32) and w["conv2.weight"].shape[0] == 32
    assert w["conv1.weight"].shape[0] < 16


def test_ignore_a_consumer_blocks_its_producer_group(model, capsys, tmp_path):
    # conv2 left alone keeps its input width too, so conv1 cannot shrink: nothing is prunable.
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--ignore", "conv2", "-o", tmp_path / "o.onnx",
                            "--report", tmp_path / "r.json")
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["groups"] == [] and sum("ignore" in b["reason"] for b in r["blocked"]) == 2
    w = weights(tmp_path / "o.onnx")
    assert w["conv1.weight"].shape[0] == 16 and w["conv2.weight"].shape[0] == 32


def test_info_prints_groups_and_blocked_reasons(model, capsys, tmp_path):
    before = digest(model)
    code, out, err = run_main(capsys, "info", model, "--json", tmp_path / "info.json")
    assert code == 0, err
    assert "2 prunable group(s), 48 channels" in out
    assert "1 blocked group(s)" in out
    assert "graph output" in out
    assert "conv1" in out and "conv2" in out
    info = json.loads((tmp_path / "info.json").read_text())
    assert sorted(g["channels"] for g in info["prunable"]) == [16, 32]
    assert info["blocked"][0]["channels"] == 10 and "graph output" in info["blocked"][0]["reason"]
    assert info["params"] == onnxprune.count_params(onnx.load(str(model)))
    assert digest(model) == before
    assert listing(tmp_path) == {"model.onnx", "info.json"}

    code, out, err = run_main(capsys, "info", model, "--ignore", "fc")
    assert code == 0, err
    assert "1 prunable group(s), 16 channels" in out and "ignored" in out


def test_plan_out_then_plan_in_reproduces_the_model(torch_model, capsys, tmp_path):
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    code, _, err = run_main(capsys, torch_model, "--structured", "0.4", "--importance", "l2",
                            "--round-to", "4", "-o", first, "--plan-out", plan)
    assert code == 0, err
    data = json.loads(plan.read_text())
    assert data["schema_version"] == 1 and data["groups"]
    code, _, err = run_main(capsys, torch_model, "--plan-in", plan, "-o", second)
    assert code == 0, err
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(a[n].shape != v.shape for n, v in weights(torch_model).items())  # really pruned
    assert_valid_pruned(torch_model, second)


def test_nothing_prunable_writes_unchanged_copy(tmp_path, capsys):
    path = save(nothing_prunable(), tmp_path / "flat.onnx")
    code, out, err = run_main(capsys, path, "--structured", "0.5")
    assert code == 0, err
    copy = tmp_path / "flat.pruned.onnx"
    assert copy.exists()
    assert onnx.load(str(copy)).SerializeToString() == onnx.load(str(path)).SerializeToString()
    assert listing(tmp_path) == {"flat.onnx", "flat.pruned.onnx"}


def test_zero_ratio_keeps_outputs(model, capsys, tmp_path):
    code, _, err = run_main(capsys, model, "--structured", "0", "-o", tmp_path / "same.onnx")
    assert code == 0, err
    before, after = run_ort(model), run_ort(tmp_path / "same.onnx")
    np.testing.assert_allclose(after["output"], before["output"], rtol=1e-5, atol=1e-5)


def test_force_overwrites_existing_output(model, capsys, tmp_path):
    out_path = tmp_path / "out.onnx"
    out_path.write_bytes(b"old")
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", out_path, "--force")
    assert code == 0, err
    assert_valid_pruned(model, out_path)


def test_force_onto_input_is_refused(model, capsys, tmp_path):
    """--force replaces an existing output file, never a file the run reads."""
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", model, "--force")
    assert code == 2
    assert_one_line_error(err, code)
    assert "would overwrite the input model" in err
    assert listing(tmp_path) == {"model.onnx"}


def _garbage(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.onnx"
    if kind == "directory":
        d = tmp_path / "dir.onnx"
        d.mkdir()
        return d
    path = tmp_path / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an onnx model\nsecond line\n")
    elif kind == "truncated":
        data = tiny_cnn().SerializeToString()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no_graph":
        path.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    elif kind == "checker_fails":  # a node reading a tensor nobody produces
        m = tiny_cnn()
        m.graph.node[1].input[0] = "nowhere"
        path.write_bytes(m.SerializeToString())
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "truncated", "no_graph", "checker_fails"])
@pytest.mark.parametrize("command", ["prune", "info"])
def test_invalid_input_exit_3(tmp_path, capsys, kind, command):
    path = _garbage(tmp_path, kind)
    before = listing(tmp_path)
    content = path.read_bytes() if path.is_file() else None
    args = ["info", path] if command == "info" else [path, "--structured", "0.4"]
    code, out, err = run_main(capsys, *args)
    assert code == 3, err
    assert_one_line_error(err, code)
    assert listing(tmp_path) == before  # no output, no temp files
    if content is not None:
        assert path.read_bytes() == content


def test_opset_below_7_exit_4(tmp_path, capsys):
    """Opsets 7 to 10 are converted on load (tests/test_old_opsets.py); older ones are refused."""
    path = save(tiny_cnn(opset=6), tmp_path / "old.onnx")
    before = digest(path)
    code, _, err = run_main(capsys, path, "--structured", "0.4")
    assert code == 4
    assert_one_line_error(err, code)
    assert "opset 6 is older than 7" in err
    assert listing(tmp_path) == {"old.onnx"}
    assert digest(path) == before


@pytest.mark.parametrize("ratio", ["1", "1.0", "1.5", "-0.1", "nan", "NaN", "inf", "abc", ""])
def test_bad_ratio_exit_2(model, capsys, tmp_path, ratio):
    code, _, err = run_main(capsys, model, "--structured", ratio)
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx"}


@pytest.mark.parametrize("args", [
    pytest.param(["--importance", "nonsense"], id="unknown-importance"),
    pytest.param([], id="nothing-to-do"),
    pytest.param(["--round-to", "0"], id="round-to-0"),
    pytest.param(["--round-to", "x"], id="round-to-x"),
    pytest.param(["--min-channels", "0"], id="min-channels-0"),
    pytest.param(["--no-such-flag"], id="unknown-flag"),
    pytest.param(["--input-shape", "input:1,3,x,8"], id="bad-input-shape"),
    pytest.param(["--input-shape", "nope:1,3,8,8"], id="unknown-input"),
])
def test_usage_errors_exit_2(model, capsys, tmp_path, args):
    if args:
        args = ["--structured", "0.4"] + args
    before = digest(model)
    code, _, err = run_main(capsys, model, *args)
    assert code == 2, err
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx"}
    assert digest(model) == before


def test_missing_model_argument_exit_2(capsys):
    code, _, err = run_main(capsys, "--structured", "0.4")
    assert code == 2
    assert_one_line_error(err, code)


def test_plan_in_with_structured_exit_2(model, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--dry-run", "--plan-out", plan)
    assert code == 0, err
    assert plan.exists()
    for extra in (["--structured", "0.4"], ["--importance", "l2"], ["--global"]):
        code, _, err = run_main(capsys, model, "--plan-in", plan, *extra)
        assert code == 2, extra
        assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx", "plan.json"}


@pytest.mark.parametrize("content", [
    pytest.param("not json", id="not-json"),
    pytest.param('{"schema_version": 99, "groups": []}', id="wrong-schema"),
    pytest.param('{"schema_version": 1, "groups": [{"id": "no-such-group", "channels": 4, "keep": [0]}]}',
                 id="unknown-group"),
])
def test_bad_plan_exit_2(model, capsys, tmp_path, content):
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    code, _, err = run_main(capsys, model, "--plan-in", plan)
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx", "plan.json"}


def test_plan_for_another_width_exit_2(model, capsys, tmp_path):
    plan = tmp_path / "plan.json"
    run_main(capsys, model, "--structured", "0.4", "--dry-run", "--plan-out", plan)
    data = json.loads(plan.read_text())
    data["groups"][0]["channels"] += 1
    plan.write_text(json.dumps(data))
    code, _, err = run_main(capsys, model, "--plan-in", plan)
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx", "plan.json"}


def test_output_equal_to_input_needs_force(model, capsys, tmp_path):
    before = digest(model)
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", model)
    assert code == 2
    assert_one_line_error(err, code)
    assert "--force" in err
    assert digest(model) == before
    assert listing(tmp_path) == {"model.onnx"}


def test_existing_output_needs_force(model, capsys, tmp_path):
    out_path = tmp_path / "model.pruned.onnx"  # the default output
    out_path.write_bytes(b"precious")
    code, _, err = run_main(capsys, model, "--structured", "0.4")
    assert code == 2
    assert_one_line_error(err, code)
    assert out_path.read_bytes() == b"precious"
    assert listing(tmp_path) == {"model.onnx", "model.pruned.onnx"}


def test_output_is_a_directory_exit_2(model, capsys, tmp_path):
    (tmp_path / "d").mkdir()
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", tmp_path / "d", "--force")
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(tmp_path / "d") == set()


def test_output_dir_missing_exit_2(model, capsys, tmp_path):
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", tmp_path / "no" / "out.onnx")
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only-mode directories")
def test_unwritable_output_dir_exit_2(model, capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", locked / "out.onnx")
    finally:
        locked.chmod(0o755)
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(locked) == set()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs a read-only sysfs")
def test_unwritable_output_location_exit_2(model, capsys):
    """sysfs refuses new files even to root, where the os.access pre-check passes."""
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", "/sys/onnxprune-test-out.onnx")
    assert not os.path.exists("/sys/onnxprune-test-out.onnx")
    assert code == 2, err
    assert_one_line_error(err, code)


def test_output_symlink_to_input_needs_force(model, capsys, tmp_path):
    (tmp_path / "link.onnx").symlink_to(model)
    before = digest(model)
    code, _, err = run_main(capsys, model, "--structured", "0.4", "-o", tmp_path / "link.onnx")
    assert code == 2
    assert_one_line_error(err, code)
    assert digest(model) == before and (tmp_path / "link.onnx").is_symlink()


def test_missing_plan_file_exit_2(model, capsys, tmp_path):
    code, _, err = run_main(capsys, model, "--plan-in", tmp_path / "absent.json")
    assert code == 2
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx"}


@pytest.mark.parametrize("flag", ["--report", "--plan-out"])
@pytest.mark.parametrize("where", ["missing-dir", "is-a-dir"])
def test_unwritable_side_file_exit_2_and_nothing_written(model, capsys, tmp_path, flag, where):
    target = tmp_path / "no" / "side.json"
    if where == "is-a-dir":
        target = tmp_path / "side.json"
        target.mkdir()
    code, _, err = run_main(capsys, model, "--structured", "0.4", flag, target)
    assert code == 2, err
    assert_one_line_error(err, code)
    assert not (tmp_path / "model.pruned.onnx").exists()


def test_info_json_unwritable_exit_2(model, capsys, tmp_path):
    code, _, err = run_main(capsys, "info", model, "--json", tmp_path / "no" / "info.json")
    assert code == 2, err
    assert_one_line_error(err, code)


def test_info_opset_below_7_exit_4(tmp_path, capsys):
    path = save(tiny_cnn(opset=6), tmp_path / "old.onnx")
    code, _, err = run_main(capsys, "info", path)
    assert code == 4
    assert_one_line_error(err, code)
    assert "opset 6" in err


def test_verification_failure_exit_5_leaves_nothing(model, capsys, tmp_path, monkeypatch):
    import onnxprune.pipeline.run as run

    def failing(path, feeds, reference, checked=False):
        assert Path(path).exists()  # it verifies the written temp file
        raise onnxprune.VerificationFailed("simulated: pruned model rejected")

    monkeypatch.setattr(run, "verify_file", failing)
    before = digest(model)
    code, _, err = run_main(capsys, model, "--structured", "0.4", "--report", tmp_path / "r.json")
    assert code == 5
    assert_one_line_error(err, code)
    assert listing(tmp_path) == {"model.onnx"}  # no model, no temp file, no report
    assert digest(model) == before


def _raise_in_surgery(monkeypatch, message):
    import onnxprune.pipeline.steps as steps

    def boom(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(steps, "apply_plan", boom)


def test_internal_error_is_one_line(model, capsys, tmp_path, monkeypatch):
    _raise_in_surgery(monkeypatch, "simulated bug")
    code, _, err = run_main(capsys, model, "--structured", "0.4")
    assert code == 1
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "internal error" in err and "simulated bug" in err and "--debug" in err
    assert listing(tmp_path) == {"model.onnx"}

    code, _, err = run_main(capsys, model, "--structured", "0.4", "--debug")
    assert code == 1 and "Traceback" in err


def test_internal_error_with_multiline_message_is_one_line(model, capsys, monkeypatch):
    _raise_in_surgery(monkeypatch, "simulated bug\nwith a second line")
    code, _, err = run_main(capsys, model, "--structured", "0.4")
    assert code == 1
    assert err.strip().count("\n") == 0, err


# ---------------------------------------------------------------- the installed script

def _script(*args, cwd=None):
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.mark.skipif(not SCRIPT.exists(), reason="onnxprune script not installed next to this python")
def test_script_end_to_end(torch_model, tmp_path):
    model = tmp_path / "net.onnx"
    model.write_bytes(torch_model.read_bytes())
    before = digest(model)

    r = _script("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"onnxprune {onnxprune.__version__}"

    r = _script(model, "--structured", "0.4", "--round-to", "8")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "MACs" in r.stdout and "fewer" in r.stdout
    pruned = tmp_path / "net.pruned.onnx"
    assert_valid_pruned(model, pruned)
    widths = [v.shape[0] for n, v in weights(pruned).items() if v.ndim == 4]
    assert widths and all(w % 8 == 0 for w in widths)
    assert digest(model) == before

    r = _script(model, "--structured", "0.4")  # output exists now
    assert r.returncode == 2
    assert_one_line_error(r.stderr, 2)

    r = _script(tmp_path / "absent.onnx", "--structured", "0.4")
    assert r.returncode == 3
    assert_one_line_error(r.stderr, 3)

    r = _script(model, "--structured", "nan")
    assert r.returncode == 2
    assert_one_line_error(r.stderr, 2)

    r = _script("info", model)
    assert r.returncode == 0 and "prunable group(s)" in r.stdout
    assert listing(tmp_path) == {"net.onnx", "net.pruned.onnx"}
    assert digest(model) == before

"""Opsets 7 to 10 are upgraded to 11 in memory with onnx.version_converter on load: the summary,
the JSON report and ``info`` say so, the pruned model is written at opset 11 and runs like the
original. Older opsets, and models the converter cannot upgrade, are refused (exit 4) with one
line that gives the reason; nothing is written and the input is untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxprune
from onnxprune.model import load

from graphs import GraphBuilder, listing, make_feeds, one_error_line, run, run_main


def old_cnn(opset: int) -> onnx.ModelProto:
    """conv -> BatchNormalization -> Relu -> conv -> Relu -> MaxPool -> GAP -> Flatten -> Gemm, at ``opset``."""
    b = GraphBuilder(opset, seed=4, name="old_cnn")
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.bn(b.conv(x, 3, 16, name="conv1"), 16, name="bn1")])
    h = b.op("Relu", [b.conv(h, 16, 24, name="conv2")])
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    return b.build(b.gemm(h, 24, 5, name="fc"))


def scan_with_sequence_lens() -> onnx.ModelProto:
    """A valid opset-8 Scan with its ``sequence_lens`` input, which the converter's Scan 8 -> 9
    adapter does not support."""
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [helper.make_node("Add", ["s", "x"], ["s2"]), helper.make_node("Identity", ["s2"], ["y"])], "body",
        [helper.make_tensor_value_info("s", f, [2]), helper.make_tensor_value_info("x", f, [2])],
        [helper.make_tensor_value_info("s2", f, [2]), helper.make_tensor_value_info("y", f, [2])])
    scan = helper.make_node("Scan", ["lens", "init", "xs"], ["final", "ys"], name="scan", body=body,
                            num_scan_inputs=1)
    graph = helper.make_graph(
        [scan], "scan8",
        [helper.make_tensor_value_info("lens", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("init", f, [1, 2]), helper.make_tensor_value_info("xs", f, [1, 3, 2])],
        [helper.make_tensor_value_info("final", f, [1, 2]), helper.make_tensor_value_info("ys", f, [1, 3, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()








# ---------------------------------------------------------------- converted

@pytest.mark.parametrize("opset", [7, 9, 10])
def test_old_opset_is_converted_pruned_and_written_at_11(tmp_path, capsys, opset):
    original = old_cnn(opset)
    path, out, report = save(original, tmp_path / "old.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    before = digest(path)
    code, stdout, err = run_main(capsys, path, "--structured", "0.5", "-o", out, "--report", report)
    assert code == 0, err
    assert f"converted opset {opset} -> 11 (onnx.version_converter)" in stdout.splitlines()
    assert json.loads(report.read_text())["conversion"] == {"from_opset": opset, "to_opset": 11,
                                                            "tool": "onnx.version_converter"}
    assert digest(path) == before  # converted in memory only
    pruned = onnx.load(str(out))
    assert onnxprune.model.proto.opset_of(pruned) == 11
    onnx.checker.check_model(pruned, full_check=True)
    assert onnxprune.count_macs(pruned) < onnxprune.count_macs(load.load_model(path))
    feeds = make_feeds(original)
    (reference,), (result,) = run(original, feeds), run(pruned, feeds)
    assert result.shape == reference.shape == (1, 5)
    assert np.isfinite(result).all()


def test_conversion_keeps_the_outputs(tmp_path):
    """Nothing cut: the converted model computes what the original does."""
    original = old_cnn(8)
    path = save(original, tmp_path / "old.onnx")
    result = onnxprune.prune(path, 0.0)
    assert result.report.conversion == {"from_opset": 8, "to_opset": 11, "tool": "onnx.version_converter"}
    assert onnxprune.model.proto.opset_of(result.model) == 11
    feeds = make_feeds(original)
    np.testing.assert_allclose(run(result.model, feeds)[0], run(original, feeds)[0], rtol=1e-5, atol=1e-6)


def test_prune_file_reports_the_conversion(tmp_path):
    path, out = save(old_cnn(10), tmp_path / "old.onnx"), tmp_path / "out.onnx"
    report = onnxprune.prune_file(path, out, 0.5)
    assert report.conversion["from_opset"] == 10 and report.conversion["to_opset"] == 11
    assert report.summary().splitlines()[0] == "converted opset 10 -> 11 (onnx.version_converter)"
    assert onnxprune.model.proto.opset_of(onnx.load(str(out))) == 11


def test_info_says_the_model_was_converted(tmp_path, capsys):
    path = save(old_cnn(9), tmp_path / "old.onnx")
    code, stdout, err = run_main(capsys, "info", path, "--json", tmp_path / "info.json")
    assert code == 0, err
    assert stdout.splitlines()[0] == "converted opset 9 -> 11 (onnx.version_converter)"
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["conversion"] == {"from_opset": 9, "to_opset": 11, "tool": "onnx.version_converter"}
    assert len(info["prunable"]) == 2


def test_bench_takes_an_old_opset(tmp_path, capsys):
    path = save(old_cnn(10), tmp_path / "old.onnx")
    code, stdout, err = run_main(capsys, "bench", path, "--warmup", "0", "--iters", "2")
    assert code == 0, err
    assert str(path) in stdout


def test_current_opsets_are_not_converted(tmp_path, monkeypatch):
    """Loading a model of opset 11 or newer never calls the converter."""
    from onnx import version_converter

    def must_not_run(*args, **kwargs):
        raise AssertionError("the converter ran on a current opset")

    monkeypatch.setattr(version_converter, "convert_version", must_not_run)
    for opset in (11, 17):
        loaded = load.read_model(save(old_cnn(opset), tmp_path / f"m{opset}.onnx"))
        assert loaded.conversion is None
        assert onnxprune.model.proto.opset_of(loaded.model) == opset


# ---------------------------------------------------------------- refused

@pytest.mark.parametrize("command", ["prune", "info"])
def test_opset_6_is_refused(tmp_path, capsys, command):
    path = save(old_cnn(6), tmp_path / "six.onnx")
    before = digest(path)
    args = [path, "--structured", "0.5", "--report", tmp_path / "r.json"] if command == "prune" else ["info", path]
    code, _, err = run_main(capsys, *args)
    assert code == 4
    line = one_error_line(err)
    assert "opset 6 is older than 7" in line
    assert listing(tmp_path) == {"six.onnx"}
    assert digest(path) == before


def test_model_the_converter_cannot_upgrade_is_refused_with_its_reason(tmp_path, capsys):
    path = save(scan_with_sequence_lens(), tmp_path / "scan.onnx")
    before = digest(path)
    code, _, err = run_main(capsys, path, "--structured", "0.5", "--report", tmp_path / "r.json")
    assert code == 4
    line = one_error_line(err)
    assert "opset 8 cannot be converted to 11 by onnx.version_converter" in line
    assert "Unsupported conversion to opset 9" in line  # the converter's own reason
    assert ".h:" not in line  # without the C++ source location it starts with
    assert listing(tmp_path) == {"scan.onnx"}
    assert digest(path) == before

"""A run that removes less than the user needs is visible: a structured prune that lowers the
MACs by less than 1.05x warns, naming the barriers that held the most MACs and the flag that
lifts each; ``--min-reduction X`` fails (exit 7, nothing written) unless original MACs / pruned
MACs reaches X. The barriers of hand-written LayerNorms and GRNs name ``--prune-hidden``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.errors import EXIT_CODES, ReductionTooSmall, UsageError

from graphs import GraphBuilder, listing, one_error_line, run_main

ROOT = Path(__file__).resolve().parents[1]


def cnn() -> onnx.ModelProto:
    """conv1 (3 -> 16) -> Relu -> conv2 (16 -> 16) -> Relu -> GAP -> Flatten -> Gemm: two prunable groups."""
    b = GraphBuilder(seed=1, name="cnn")
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 16, name="conv1")])
    h = b.op("Relu", [b.conv(h, 16, 16, name="conv2")])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    return b.build(b.gemm(h, 16, 4, name="fc"))


def layernorm_mlp() -> onnx.ModelProto:
    """fc1 (16 -> 32) -> Relu -> a LayerNorm written out (ReduceMean over the 32 features) -> fc2 (32 -> 8).

    fc1's features reach the ReduceMeans, fc2's the graph output: no group is prunable."""
    b = GraphBuilder(seed=3, name="layernorm_mlp")
    x = b.input("x", [2, 16])
    h = b.op("Relu", [b.op("Add", [b.matmul(x, 16, 32, name="fc1"), b.weight((32,), "fc1.b", fan_in=4)])])
    d = b.op("Sub", [h, b.op("ReduceMean", [h], axes=[-1], name="ln_mean")])
    var = b.op("ReduceMean", [b.op("Mul", [d, d])], axes=[-1], name="ln_var")
    n = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, b.floats([1e-5])])])])
    n = b.op("Add", [b.op("Mul", [n, b.weight((32,), "ln.gamma", offset=1.0)]), b.weight((32,), "ln.beta")])
    return b.build(b.matmul(n, 32, 8, name="fc2"))


def grn_cnn() -> onnx.ModelProto:
    """conv1 -> Relu -> ConvNeXt V2's global response normalisation (ReduceL2 over H, W; ReduceMean
    over the channels) -> conv2: conv1's channels stop at the ReduceMean."""
    b = GraphBuilder(seed=5, name="grn_cnn")
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 16, name="conv1")])
    gx = b.op("ReduceL2", [h], axes=[2, 3], keepdims=1)
    mean = b.op("ReduceMean", [gx], axes=[1], keepdims=1, name="grn_mean")
    nx = b.op("Div", [gx, b.op("Add", [mean, b.floats([1e-6])])])
    g = b.op("Mul", [b.op("Mul", [h, nx]), b.weight((1, 16, 1, 1), "grn.gamma")])
    h = b.op("Add", [b.op("Add", [g, b.weight((1, 16, 1, 1), "grn.beta")]), h])
    return b.build(b.conv(h, 16, 4, name="conv2"))


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path








def weak_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "lowered MACs only" in line]


def achieved(model: onnx.ModelProto, ratio: float) -> float:
    return onnxprune.prune(model, ratio).report.macs_ratio


# ---------------------------------------------------------------- --min-reduction

def test_min_reduction_met_writes_the_model(tmp_path, capsys):
    path, out, report = save(cnn(), tmp_path / "m.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    needed = achieved(cnn(), 0.5) * 0.99
    assert needed > 1.5  # a real requirement, not one any prune meets
    code, _, err = run_main(capsys, path, "--structured", "0.5", "--min-reduction", needed, "-o", out,
                            "--report", report)
    assert code == 0, err
    assert out.exists() and json.loads(report.read_text())["macs_ratio"] >= needed
    assert not weak_warnings(err)


def test_min_reduction_missed_exits_7_and_writes_nothing(tmp_path, capsys):
    path = save(cnn(), tmp_path / "m.onnx")
    before = path.read_bytes()
    ratio = achieved(cnn(), 0.5)
    code, _, err = run_main(capsys, path, "--structured", "0.5", "--min-reduction", "3.5", "-o", tmp_path / "out.onnx",
                            "--report", tmp_path / "r.json", "--plan-out", tmp_path / "plan.json")
    assert code == 7 == ReductionTooSmall.exit_code
    line = one_error_line(err)
    assert f"MACs fell {math.floor(ratio * 100) / 100:.2f}x" in line  # the achieved ratio
    assert "less than --min-reduction 3.5" in line  # the required one, as its flag
    assert "nothing written" in line
    assert listing(tmp_path) == {"m.onnx"}  # no model, no report, no plan, no temporary file
    assert path.read_bytes() == before


def test_min_reduction_is_checked_before_recovery_training(tmp_path, capsys, monkeypatch):
    """Training changes no MACs: a cut that misses the requirement fails before it trains."""
    pytest.importorskip("torch")
    import onnxprune.pipeline.rounds as rounds

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained a model that misses --min-reduction")

    monkeypatch.setattr(rounds, "train", must_not_train)
    path = save(cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    code, _, err = run_main(capsys, path, "--structured", "0.5", "--min-reduction", "50", "--data", tmp_path / "d.npz",
                            "--distill", "--no-compensate", "--no-reconstruct", "-o", tmp_path / "out.onnx")
    assert code == 7, err
    assert "less than --min-reduction 50" in one_error_line(err)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "abc", ""])
def test_bad_min_reduction_is_a_usage_error(tmp_path, capsys, value):
    path = save(cnn(), tmp_path / "m.onnx")
    code, _, err = run_main(capsys, path, "--structured", "0.5", "--min-reduction", value)
    assert code == 2
    assert "--min-reduction" in one_error_line(err)
    assert listing(tmp_path) == {"m.onnx"}


@pytest.mark.parametrize("value", [0, -2.0, float("nan"), float("inf"), True, "2"])
def test_library_validates_min_reduction(tmp_path, value):
    path = save(cnn(), tmp_path / "m.onnx")
    with pytest.raises(UsageError, match="`min_reduction`"):
        onnxprune.prune_file(path, tmp_path / "out.onnx", 0.5, min_reduction=value)
    assert listing(tmp_path) == {"m.onnx"}


def test_min_reduction_needs_a_structured_cut(tmp_path, capsys):
    path = save(cnn(), tmp_path / "m.onnx")
    code, _, err = run_main(capsys, path, "--unstructured", "0.5", "--min-reduction", "1.1")
    assert code == 2
    assert "sparsity alone" in one_error_line(err)
    assert listing(tmp_path) == {"m.onnx"}


def test_library_raises_reduction_too_small(tmp_path):
    path = save(cnn(), tmp_path / "m.onnx")
    with pytest.raises(ReductionTooSmall, match="less than `min_reduction` 40"):
        onnxprune.prune_file(path, tmp_path / "out.onnx", 0.5, min_reduction=40)
    assert listing(tmp_path) == {"m.onnx"}


def test_exit_code_7_is_documented():
    assert EXIT_CODES[7].startswith("reduction too small")
    readme = (ROOT / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"| {code} | {meaning} |" in readme, code


# ---------------------------------------------------------------- the < 1.05x warning

def test_blocked_layernorm_warns_and_names_prune_hidden(tmp_path, capsys):
    path, out, report = save(layernorm_mlp(), tmp_path / "m.onnx"), tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = run_main(capsys, path, "--structured", "0.5", "-o", out, "--report", report)
    assert code == 0, err
    assert out.exists()  # a warning, not a failure
    (warning,) = weak_warnings(err)
    assert warning.startswith("onnxprune: warning: structured pruning lowered MACs only 1.00x (less than 1.05x)")
    # the LayerNorm holds all the MACs (fc1 and fc2 are in its group), the graph output only fc2's
    assert warning.index("ReduceMean ln_mean, ln_var: ") < warning.index("reaches graph output")
    assert "--prune-hidden" in warning and "`prune_hidden`" not in warning
    r = json.loads(report.read_text())
    total = r["macs_before"]
    assert [(b["barrier"].split(":")[0], b["macs"], len(b["groups"])) for b in r["barriers"]] == [
        ("ReduceMean", total, 1), (f"reaches graph output {r['blocked'][1]['id']}", 8 * 32 * 2, 1)]
    assert sorted(b["macs"] for b in r["blocked"]) == [8 * 32 * 2, total]
    assert any("lowered MACs only" in w for w in r["warnings"])


def test_prune_hidden_lifts_the_layernorm_barrier(tmp_path, capsys):
    path = save(layernorm_mlp(), tmp_path / "m.onnx")
    code, _, err = run_main(capsys, path, "--structured", "0.5", "--prune-hidden", "--min-reduction", "1.5",
                            "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert not weak_warnings(err)
    assert onnxprune.count_macs(onnx.load(str(tmp_path / "out.onnx"))) * 1.5 <= onnxprune.count_macs(layernorm_mlp())


def test_no_warning_for_sparsity_alone(tmp_path, capsys):
    path = save(layernorm_mlp(), tmp_path / "m.onnx")
    code, stdout, err = run_main(capsys, path, "--unstructured", "0.5", "--min-elements", "16",
                                 "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert "MACs        1.54K -> 1.54K" in stdout and "sparsity unstructured 0.5" in stdout  # MACs unchanged
    assert (tmp_path / "out.onnx").exists()
    assert not weak_warnings(err)


def test_no_warning_when_nothing_was_asked(tmp_path, capsys):
    path = save(layernorm_mlp(), tmp_path / "m.onnx")
    code, _, err = run_main(capsys, path, "--structured", "0", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert not weak_warnings(err)


def test_no_warning_for_a_real_cut(tmp_path, capsys):
    path = save(cnn(), tmp_path / "m.onnx")
    code, _, err = run_main(capsys, path, "--structured", "0.5", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert not weak_warnings(err)


def test_grn_barrier_names_prune_hidden(tmp_path, capsys):
    model = grn_cnn()
    (conv1,) = [g for g in onnxprune.analyse(model).groups if "conv1" in g.sources]
    assert conv1.blocked and "GRN" in conv1.blocked[0] and "`prune_hidden`" in conv1.blocked[0]
    path = save(model, tmp_path / "m.onnx")
    code, stdout, err = run_main(capsys, path, "--structured", "0.5", "-o", tmp_path / "out.onnx")
    assert code == 0, err
    assert "--prune-hidden" in weak_warnings(err)[0]
    assert "ReduceMean grn_mean: " in weak_warnings(err)[0]
    (conv1,) = [g for g in onnxprune.analyse(model, prune_hidden=True).groups if "conv1" in g.sources]
    assert conv1.prunable  # what the message promises

"""Budget-targeted pruning (--target-*), hardware rounding (--provider), --bench, and the roofline.

Timed runs are few (--bench-iters 3); no test asserts a time it measures itself (a speedup target is
checked as the search reports it; confirming speed is the benchmarks' job, tools/).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
import onnxprune.pipeline.run
from onnxprune import cli
from onnxprune.errors import UsageError
from onnxprune.options import Latency, PruneOptions, Target, validate
from onnxprune.pipeline.target import find_ratio
from onnxprune.planning.plan import nearest_multiple
from onnxprune.runtime.hardware import ROUNDING, round_to_for

ROOT = Path(__file__).resolve().parent.parent


def conv_stack(widths=(48, 40, 24), channels_in=3, hw=8, seed=0) -> onnx.ModelProto:
    """Conv chain channels_in -> widths[0] -> ... (3x3, pad 1, Relu) -> GAP -> Flatten -> Gemm (-> 10 classes).

    One prunable group per conv; the Gemm's output is the graph output.
    """
    rng = np.random.default_rng(seed)
    inits, nodes, x, c_in = [], [], "input", channels_in
    for i, c in enumerate(widths):
        inits += [numpy_helper.from_array(rng.standard_normal((c, c_in, 3, 3)).astype(np.float32) * 0.1, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        x, c_in = f"r{i}", c
    inits += [numpy_helper.from_array(rng.standard_normal((10, c_in)).astype(np.float32), "wf"),
              numpy_helper.from_array(np.zeros(10, np.float32), "bf")]
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "conv_stack",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels_in, hw, hw])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "stack.onnx"
    onnx.save(conv_stack(), str(path))
    return path


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def fraction_at(model, metric: str, ratio: float, **options) -> float:
    report = onnxprune.prune(model, ratio, **options).report
    if metric == "macs":
        return report.macs_after / report.macs_before
    return report.params_after / report.params_before


# ---------------------------------------------------------------- --target-macs / --target-params

@pytest.mark.parametrize("round_to", [1, 8])
def test_target_macs_meets_the_budget_and_no_smaller_ratio_does(model_path, tmp_path, capsys, round_to):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = run_main(capsys, model_path, "--target-macs", "0.5", "--round-to", round_to,
                                 "-o", out, "--report", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    target = report["target"]
    assert target["metric"] == "macs" and target["value"] == 0.5
    assert report["ratio"] == target["ratio"] and 0 < target["ratio"] < 1
    # the written model meets the budget, counted independently of the report
    written = onnxprune.count_macs(onnx.load(str(out)), {"input": (1, 3, 8, 8)})
    assert written / report["macs_before"] <= 0.5
    assert math.isclose(written / report["macs_before"], target["achieved"])
    # tight: the ratio one search step smaller misses the budget
    base = onnx.load(str(model_path))
    assert 0 < target["resolution"] <= 1 / 512
    assert fraction_at(base, "macs", target["ratio"] - target["resolution"], round_to=round_to) > 0.5
    for g in report["groups"]:
        assert g["channels_after"] % round_to == 0 or g["channels_after"] == g["channels_before"]
    assert f"ratio {target['ratio']:.4f} chosen" in stdout and "MACs <= 0.5" in stdout


def test_target_params_in_python_respects_global_ranking(model_path, tmp_path):
    report = onnxprune.prune_file(model_path, tmp_path / "out.onnx", target=Target("params", 0.4),
                                  global_ranking=True)
    assert report.params_after / report.params_before <= 0.4
    chosen = report.target["ratio"]
    base = onnx.load(str(model_path))
    assert fraction_at(base, "params", chosen - report.target["resolution"], global_ranking=True) > 0.4
    assert report.ratio == chosen


def test_find_ratio_in_memory_leaves_the_model_alone():
    model = conv_stack()
    before = model.SerializeToString()
    result = find_ratio(model, Target("macs", 0.3), options=validate(PruneOptions.from_keywords(round_to=4),
                                                                    whole_run=False))
    assert model.SerializeToString() == before
    assert result.achieved <= 0.3
    assert len(result.evaluations) <= 12  # log2(0.99 * 1024) bisection steps + the check at the top
    assert fraction_at(model, "macs", result.ratio - result.resolution, round_to=4) > 0.3


def test_a_budget_the_model_already_meets_prunes_nothing(model_path, tmp_path):
    report = onnxprune.prune_file(model_path, tmp_path / "o.onnx", target=Target("macs", 1.0))
    assert report.target["ratio"] == 0 and report.macs_after == report.macs_before


def test_an_unreachable_budget_is_a_usage_error(model_path, tmp_path, capsys):
    # every group is ignored: nothing can be cut
    code, out, err = run_main(capsys, model_path, "--target-macs", "0.5", "--ignore", "conv*",
                              "-o", tmp_path / "o.onnx")
    assert code == 2 and "cannot be met" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("extra, message", [
    (["--target-macs", "0.5", "--structured", "0.3"], "exclusive"),
    (["--target-params", "0.5", "--plan-in", "PLAN"], "exclusive"),
    (["--target-macs", "0.5", "--target-params", "0.5"], "exclusive"),
    (["--target-macs", "0.5", "--steps", "2"], "--steps"),
    (["--target-speedup", "1.5"], "--provider"),
    (["--target-macs", "0"], "(0, 1]"),
    (["--target-macs", "1.5"], "(0, 1]"),
    (["--structured", "0.3", "--bench-batch", "1,8"], "--bench-batch applies"),
    (["--structured", "0.3", "--bench", "cpu", "--dry-run"], "--dry-run"),
    (["--structured", "0.3", "--provider", "tpu"], "--provider tpu"),
])
def test_usage_errors_are_one_line_and_write_nothing(model_path, tmp_path, capsys, extra, message):
    plan = tmp_path / "plan.json"
    onnxprune.prune(onnx.load(str(model_path)), 0.2).plan.save(plan)
    out = tmp_path / "o.onnx"
    args = [a if a != "PLAN" else plan for a in extra]
    if "--dry-run" not in extra:
        args += ["-o", out]
    code, stdout, err = run_main(capsys, model_path, *args)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------- --bench

def test_bench_prints_the_table_and_reports_it(model_path, tmp_path, capsys):
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = run_main(capsys, model_path, "--structured", "0.5", "-o", out, "--report", report_path,
                                 "--bench", "cpu", "--bench-batch", "1,2", "--bench-iters", "3", "--threads", "1")
    assert code == 0, err
    assert "CPUExecutionProvider, threads 1" in stdout
    rows = [line.split() for line in stdout.splitlines() if line.startswith((str(model_path), str(out)))]
    assert [(r[0], r[1]) for r in rows] == [(str(model_path), "1"), (str(out), "1"),
                                          (str(model_path), "2"), (str(out), "2")]
    data = json.loads(report_path.read_text())["bench"]
    assert data["provider"] == "CPUExecutionProvider" and data["iters"] == 3 and data["threads"] == 1
    assert [(t["model"], t["batch"]) for t in data["timings"]] == [(str(model_path), 1), (str(out), 1),
                                                                  (str(model_path), 2), (str(out), 2)]
    assert all(t["median_ms"] > 0 and math.isfinite(t["speedup"]) for t in data["timings"])


@pytest.mark.parametrize("provider", ["NoSuchExecutionProvider", "cuda-typo"])
def test_unavailable_bench_provider_fails_before_any_work(model_path, tmp_path, capsys, monkeypatch, provider):
    def must_not_run(*args, **kwargs):
        raise AssertionError("pruned although the provider is unavailable")

    monkeypatch.setattr(onnxprune.pipeline.run, "prune_rounds", must_not_run)
    monkeypatch.setattr(onnxprune.pipeline.run, "read_model", must_not_run)
    out = tmp_path / "o.onnx"
    code, stdout, err = run_main(capsys, model_path, "--structured", "0.3", "-o", out, "--bench", provider)
    assert code == 2 and "not available" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------- --provider: hardware rounding

def kept_widths(report_path: Path) -> list[int]:
    return [g["channels_after"] for g in json.loads(report_path.read_text())["groups"]]


@pytest.mark.parametrize("provider", ["cpu", "cuda", "CPUExecutionProvider"])
def test_provider_sets_the_rounding_from_the_table(model_path, tmp_path, capsys, provider):
    report_path = tmp_path / "r.json"
    code, _, err = run_main(capsys, model_path, "--structured", "0.4", "--provider", provider, "--dry-run",
                            "--report", report_path)
    assert code == 0, err
    multiple = round_to_for(provider)
    assert multiple == ROUNDING[provider.lower().replace("executionprovider", "")]["round_to"]
    # widths 48, 40, 24 keep the multiple of the table's value nearest to 60% of each
    assert kept_widths(report_path) == [nearest_multiple(w * 0.6, multiple, multiple, w) or w for w in (48, 40, 24)]


def test_explicit_round_to_wins_over_the_provider(model_path, tmp_path, capsys):
    report_path = tmp_path / "r.json"
    code, _, err = run_main(capsys, model_path, "--structured", "0.4", "--provider", "cpu", "--round-to", "4",
                            "--dry-run", "--report", report_path)
    assert code == 0, err
    assert kept_widths(report_path) == [nearest_multiple(w * 0.6, 4, 4, w) for w in (48, 40, 24)]


def test_every_table_entry_says_where_it_comes_from():
    for entry in ROUNDING.values():
        assert entry["round_to"] >= 1 and entry["source"]
        assert isinstance(entry["measured"], bool)
    with pytest.raises(UsageError, match="no rounding table"):
        round_to_for("tpu")


# ---------------------------------------------------------------- roofline (tools/bench_latency.py)

def test_roofline_of_a_tiny_model_matches_the_hand_count():
    from tools.bench_latency import roofline, roofline_seconds

    model = conv_stack(widths=(4,), channels_in=3, hw=8)
    layers = roofline(model, {"input": (2, 3, 8, 8)}, peak_flops=1e6, bandwidth=1e4)
    conv, fc = layers
    # conv: 2 x 4 x 8 x 8 outputs, 3 x 3 x 3 MACs each
    assert conv.op == "Conv" and conv.flops == 2 * (2 * 4 * 8 * 8) * 27
    # input 2x3x8x8 + weight 4x3x3x3 + bias 4 + output 2x4x8x8, float32
    assert conv.bytes == 4 * (384 + 108 + 4 + 512)
    assert conv.compute_s == conv.flops / 1e6 and conv.memory_s == conv.bytes / 1e4
    assert conv.bound == "memory" and conv.seconds == conv.memory_s
    # Gemm (2, 4) x (10, 4)^T + bias 10 -> (2, 10)
    assert fc.op == "Gemm" and fc.flops == 2 * 2 * 10 * 4
    assert fc.bytes == 4 * (8 + 40 + 10 + 20)
    assert roofline_seconds(layers) == conv.seconds + fc.seconds
    compute_bound = roofline(model, {"input": (2, 3, 8, 8)}, peak_flops=1.0, bandwidth=1e12)
    assert compute_bound[0].bound == "compute" and compute_bound[0].seconds == conv.flops


# ---------------------------------------------------------------- --target-speedup

def test_target_speedup_reaches_a_modest_target_on_a_wide_model(tmp_path, capsys):
    # 64 channels at 32x32: latency falls steadily with the width on a CPU (a few ms per run)
    path, out, report_path = tmp_path / "wide.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(conv_stack(widths=(64, 64, 64), channels_in=16, hw=32), str(path))
    code, stdout, err = run_main(capsys, path, "--target-speedup", "1.2", "--provider", "cpu",
                                 "--bench-iters", "15", "-o", out, "--report", report_path)
    assert code == 0, err
    target = json.loads(report_path.read_text())["target"]
    assert target["metric"] == "speedup" and target["provider"] == "CPUExecutionProvider" and target["batch"] == 1
    assert 0 < target["ratio"] < 0.9 and target["achieved"] >= 1.2
    assert sum(not e["cached"] for e in target["evaluations"]) <= 8
    assert "speedup >= 1.2x" in stdout
    # the written model is the one the search measured (a re-timing here would be a timed unit test: on 2
    # shared cores a 0.5 ms model's speedup drifts below 1, and speed is the benchmarks' job, tools/)
    report = json.loads(report_path.read_text())
    written = onnxprune.count_macs(onnx.load(str(out)))
    assert written == report["macs_after"] < onnxprune.count_macs(onnx.load(str(path)))


def test_target_speedup_on_an_unavailable_provider_fails_early(model_path, tmp_path):
    with pytest.raises(UsageError, match="not available"):
        onnxprune.prune_file(model_path, tmp_path / "o.onnx",
                             target=Target("speedup", 1.5, Latency("NoSuchExecutionProvider")))
    assert not (tmp_path / "o.onnx").exists()

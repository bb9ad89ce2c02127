"""`onnxprune bench`: table, JSON, speedup reference, usage errors.

Runs are few (--iters 3 --warmup 1); no timing value is asserted beyond being
positive and finite.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import cli
from onnxprune.runtime.bench import BenchResult, Timing, batch_shapes, format_table, time_interleaved


def conv_gemm(width: int, batch: int | str = "N", seed: int = 0, hw=(8, 8)) -> onnx.ModelProto:
    """Conv (3->width) -> Relu -> GAP -> Flatten -> Gemm (width->10); input [batch, 3, *hw]."""
    rng = np.random.default_rng(seed)

    def arr(shape):
        return rng.standard_normal(shape).astype(np.float32)

    inits = [
        numpy_helper.from_array(arr((width, 3, 3, 3)), "w1"),
        numpy_helper.from_array(arr((width,)), "b1"),
        numpy_helper.from_array(arr((10, width)), "wf"),
        numpy_helper.from_array(arr((10,)), "bf"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["output"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, f"w{width}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, *hw])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def pair(tmp_path):
    wide, narrow = tmp_path / "wide.onnx", tmp_path / "narrow.onnx"
    onnx.save(conv_gemm(32), str(wide))
    onnx.save(conv_gemm(8, seed=1), str(narrow))
    return str(wide), str(narrow)


def run_main(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


FAST = ("--iters", "3", "--warmup", "1")


def test_bench_table_and_json(pair, capsys, tmp_path):
    wide, narrow = pair
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, "bench", wide, narrow, "--batch", "1,4", "--threads", "1",
                              "--json", out_json, *FAST)
    assert code == 0, err
    assert err == ""
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [(wide, "1"), (narrow, "1"), (wide, "4"), (narrow, "4")]
    assert "CPUExecutionProvider" in out.splitlines()[0]

    data = json.loads(out_json.read_text())
    assert data["provider"] == "CPUExecutionProvider" and data["iters"] == 3 and data["threads"] == 1
    timings = {(t["model"], t["batch"]): t for t in data["timings"]}
    assert set(timings) == {(m, b) for m in (wide, narrow) for b in (1, 4)}
    for t in timings.values():
        for key in ("median_ms", "p90_ms", "p99_ms", "speedup"):
            assert math.isfinite(t[key]) and t[key] > 0, (key, t)
        assert t["median_ms"] <= t["p90_ms"] <= t["p99_ms"]
        assert t["runs"] == 3
    assert timings[(wide, 1)]["speedup"] == 1.0 and timings[(wide, 4)]["speedup"] == 1.0
    ratio = timings[(wide, 4)]["median_ms"] / timings[(narrow, 4)]["median_ms"]
    assert timings[(narrow, 4)]["speedup"] == pytest.approx(ratio)


def test_bench_quiet_and_provider_alias(pair, capsys):
    code, out, err = run_main(capsys, "bench", pair[0], "--provider", "CPUExecutionProvider", "-q", *FAST)
    assert (code, out, err) == (0, "", "")


def test_bench_unknown_provider_exit_2(pair, capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = run_main(capsys, "bench", *pair, "--provider", "nosuch", "--json", out_json, *FAST)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "nosuch" in err and "CPUExecutionProvider" in err  # lists the available ones
    assert not out_json.exists()


def test_bench_batch_conflicts_with_fixed_dim_exit_2(tmp_path, capsys):
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_gemm(8, batch=1), str(fixed))
    code, out, err = run_main(capsys, "bench", fixed, "--batch", "1,8", *FAST)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "fixed batch dim 1" in err
    code, _, err = run_main(capsys, "bench", fixed, "--batch", "1", *FAST)
    assert code == 0, err


@pytest.mark.parametrize("flags, words", [
    (("--batch", "0"), "at least 1"),
    (("--batch", "1,x"), "integers"),
    (("--iters", "0"), "at least 1"),
    (("--input-shape", "nosuch:1,3,8,8"), "unknown input"),
])
def test_bench_bad_flags_exit_2(pair, capsys, flags, words):
    code, _, err = run_main(capsys, "bench", *pair, *flags)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_bench_input_shape_pins_other_dims(tmp_path, capsys):
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(conv_gemm(8, hw=("H", "W")), str(dynamic))
    out_json = tmp_path / "b.json"
    code, _, err = run_main(capsys, "bench", dynamic, "--input-shape", "input:1,3,16,12", "--batch", "2",
                            "--json", out_json, *FAST)
    assert code == 0, err
    model = conv_gemm(8, hw=("H", "W"))
    assert batch_shapes(model, "m", 2, {"input": (1, 3, 16, 12)}) == {"input": (2, 3, 16, 12)}  # dim 0 from --batch
    assert batch_shapes(model, "m", 4, {}) == {"input": (4, 3, 224, 224)}  # H, W: model/dynamic.py's image size
    assert len(json.loads(out_json.read_text())["timings"]) == 1
    # a pin that conflicts with a fixed dim is still refused
    fixed = tmp_path / "fixed.onnx"
    onnx.save(conv_gemm(8), str(fixed))
    code, _, err = run_main(capsys, "bench", fixed, "--input-shape", "input:1,3,16,16", *FAST)
    assert code == 2 and "conflicts" in err


def test_bench_missing_model_exit_3(tmp_path, capsys):
    code, _, err = run_main(capsys, "bench", tmp_path / "nope.onnx", *FAST)
    assert code == 3 and len(err.strip().splitlines()) == 1


def test_time_interleaved_runs_round_robin():
    calls = []
    runners = [lambda i=i: calls.append(i) for i in range(3)]
    times = time_interleaved(runners, warmup=1, iters=2)
    assert calls[:3] == [0, 1, 2]  # warm-up
    assert calls[3:] == [0, 1, 2, 1, 2, 0]  # one run of each per round, start rotated
    assert [len(t) for t in times] == [2, 2, 2]


def test_format_table_lists_every_timing():
    result = BenchResult("CPUExecutionProvider", None, 1, 2, [
        Timing("a.onnx", 1, 2.0, 3.0, 4.0, 1.0, 2), Timing("b.onnx", 1, 1.0, 1.5, 2.0, 2.0, 2)])
    text = format_table(result)
    assert "threads default" in text and "2.00x" in text and "b.onnx" in text

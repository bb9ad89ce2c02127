"""`--target-speedup` with depth pruning (pipeline/budget_depth.py): every share of the blocks tried,
the channels meeting the measured speedup on what each leaves, the share chosen by output error
(with data) or by the MACs kept (without).

No test asserts a time it measures itself (as in test_target.py): the choice is checked with the
timer replaced by a deterministic one (speedup = the input's MACs over the candidate's), and one
test on the real timer checks only what the run records and writes.
"""

from __future__ import annotations

import json

import onnx
import pytest
from test_depth import _calibration, _saved, resnet_like

from onnxprune.analysis.stats import count_macs
from onnxprune.options import Latency
from onnxprune.runtime.bench import BenchResult, Timing

from graphs import check_valid, one_error_line, run_main

SPEEDUP = ["--provider", "cpu", "--bench-batch", "2", "--bench-iters", "5"]
# the CPU multiple (8) would leave these 8-channel groups whole: the shares need channels to cut
ROUND = ["--round-to", "1"]


@pytest.fixture
def macs_timer(monkeypatch):
    """Latency.time replaced: each model 'runs' in time proportional to its MACs. Returns the list of
    the path lists it was asked to time."""
    calls = []

    def fake_time(self, paths, input_shapes=None, batches=None, labels=None):
        calls.append([str(p) for p in paths])
        macs = [count_macs(onnx.load(str(p))) for p in paths]
        result = BenchResult("CPUExecutionProvider", None, 0, 1)
        result.timings = [Timing(str(p), 2, m / 1e6, m / 1e6, m / 1e6, macs[0] / m, 1) for p, m in zip(paths, macs)]
        return result

    monkeypatch.setattr(Latency, "time", fake_time)
    return calls


def _run(tmp_path, capsys, *args):
    model = resnet_like(4)
    path = _saved(tmp_path, model)
    out, report = tmp_path / "o.onnx", tmp_path / "report.json"
    code, stdout, err = run_main(capsys, path, *args, *SPEEDUP, "-o", out, "--report", report)
    assert code == 0, err
    return model, path, onnx.load(out), json.loads(report.read_text()), stdout


def test_without_data_the_share_that_keeps_the_most_macs_is_taken(tmp_path, capsys, macs_timer):
    model, path, pruned, record, stdout = _run(tmp_path, capsys, "--depth", "0.5", "--target-speedup", "1.5", *ROUND)
    budget = record["depth"]["budget"]
    assert [t["blocks"] for t in budget["tried"]] == [0, 1, 2] and budget["chosen_by"] == "macs_kept"
    met = [t for t in budget["tried"] if t["ratio"] is not None]
    assert all(t["speedup"] >= 1.5 and t["output_error"] is None for t in met)
    best = max(met, key=lambda t: t["macs"])
    assert budget["blocks"] == best["blocks"] == len(record["depth"]["removed"])
    # the written model is the measured candidate: its MACs are the ones the share recorded
    check_valid(model, pruned)
    assert count_macs(pruned) / count_macs(model) == pytest.approx(best["macs"])
    assert record["target"]["ratio"] == best["ratio"] and record["target"]["achieved"] == best["speedup"]
    # every speedup is the input's latency over a candidate's, the depth cuts' included
    assert all(paths[0] == str(path) for paths in macs_timer)
    assert "block(s) taken (most MACs kept)" in stdout


def test_with_data_the_share_with_the_least_output_error_is_taken(tmp_path, capsys, macs_timer):
    data = _calibration(tmp_path, resnet_like(4), 8)
    model, _, pruned, record, _ = _run(tmp_path, capsys, "--depth", "0.5", "--target-speedup", "1.5", "--data", data,
                                       "--no-reconstruct", "--no-compensate", *ROUND)
    budget = record["depth"]["budget"]
    assert [t["blocks"] for t in budget["tried"]] == [0, 1, 2] and budget["chosen_by"] == "output_error"
    met = [t for t in budget["tried"] if t["ratio"] is not None]
    assert all(t["output_error"] is not None for t in met)
    best = min(met, key=lambda t: t["output_error"])
    assert budget["blocks"] == best["blocks"] == len(record["depth"]["removed"])
    assert count_macs(pruned) / count_macs(model) == pytest.approx(best["macs"])
    assert record["target"]["ratio"] == best["ratio"]


def test_blocks_that_alone_meet_the_speedup_leave_the_channels_whole(tmp_path, capsys, macs_timer):
    """Two named blocks of four halve the MACs: a 1.5x target is met by them, timed at ratio 0."""
    _, _, pruned, record, _ = _run(tmp_path, capsys, "--drop-blocks", "block:1,block:2", "--target-speedup", "1.5")
    assert sorted(b["id"] for b in record["depth"]["removed"]) == ["block:1", "block:2"]
    target = record["target"]
    assert target["ratio"] == 0.0 and target["achieved"] >= 1.5
    assert [e["ratio"] for e in target["evaluations"]] == [0.0]
    assert all(g["channels_after"] == g["channels_before"] for g in record["groups"])


def test_named_blocks_and_the_channels_meet_the_rest(tmp_path, capsys, macs_timer):
    _, _, pruned, record, _ = _run(tmp_path, capsys, "--drop-blocks", "block:0", "--target-speedup", "2", *ROUND)
    target = record["target"]
    assert target["evaluations"][0]["ratio"] == 0.0 and target["evaluations"][0]["achieved"] < 2
    assert target["ratio"] > 0 and target["achieved"] >= 2
    assert record["macs_before"] / record["macs_after"] == pytest.approx(target["achieved"])
    assert "budget" not in record["depth"]  # the blocks were named: no share to choose


def test_on_the_real_timer_the_written_model_is_a_measured_share(tmp_path, capsys):
    """Timed for real (few runs): only what is recorded and written is checked, not how fast it is."""
    model = resnet_like(4, c=64)
    path = _saved(tmp_path, model)
    out, report = tmp_path / "o.onnx", tmp_path / "report.json"
    code, _, err = run_main(capsys, path, "--depth", "0.5", "--target-speedup", "1.2", *SPEEDUP, "-o", out,
                            "--report", report)
    assert code == 0, err
    record = json.loads(report.read_text())
    budget = record["depth"]["budget"]
    assert [t["blocks"] for t in budget["tried"]] == [0, 1, 2]
    chosen = next(t for t in budget["tried"] if t["blocks"] == budget["blocks"])
    assert chosen["speedup"] >= 1.2 and record["target"]["achieved"] == chosen["speedup"]
    pruned = onnx.load(out)
    check_valid(model, pruned)
    assert count_macs(pruned) / count_macs(model) == pytest.approx(chosen["macs"])


def test_a_timing_that_cannot_run_is_its_own_error_not_an_unmet_budget(tmp_path, capsys):
    path = _saved(tmp_path, resnet_like(4))  # its batch dim is fixed to 2
    code, _, err = run_main(capsys, path, "--depth", "0.5", "--target-speedup", "1.5", "--provider", "cpu",
                            "-o", tmp_path / "o.onnx")
    assert code == 2 and "has a fixed batch dim 2" in one_error_line(err)
    assert not (tmp_path / "o.onnx").exists()

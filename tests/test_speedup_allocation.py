"""`--target-speedup` with data (pipeline/speedup_allocation.py): the channels allocated by measured
sensitivity, the MACs the allocation removes searched until the cut is fast enough.

As in test_depth_budget.py, no test asserts a time it measures itself: the timer is replaced by a
deterministic one (speedup = the input's MACs over the candidate's), so the search's choices can be
checked exactly.
"""

from __future__ import annotations

import json

import onnx
import pytest
from test_depth import _calibration, _saved, resnet_like
from test_depth_budget import macs_timer  # noqa: F401 (a fixture)

from onnxprune.analysis.stats import count_macs

from graphs import check_valid, one_error_line, run_main

SPEEDUP = ["--provider", "cpu", "--bench-batch", "2", "--bench-iters", "5", "--round-to", "1"]


def _run(tmp_path, capsys, *args, model=None):
    model = model or resnet_like(4, c=16)
    path = _saved(tmp_path, model)
    data = _calibration(tmp_path, model, 16)
    out, report = tmp_path / "o.onnx", tmp_path / "report.json"
    code, stdout, err = run_main(capsys, path, "--data", data, *args, *SPEEDUP, "-o", out, "--report", report,
                                 "--force")
    assert code == 0, err
    return model, onnx.load(out), json.loads(report.read_text()), stdout


def test_with_data_a_speedup_is_allocated_and_the_smallest_goal_that_meets_it_is_taken(tmp_path, capsys,
                                                                                       macs_timer):  # noqa: F811
    model, pruned, record, stdout = _run(tmp_path, capsys, "--target-speedup", "1.4")
    target, allocation = record["target"], record["allocation"]
    assert allocation["method"] == "sensitivity" and allocation["unit"] == "macs"
    assert target["metric"] == "speedup" and target["allocated"] and target["achieved"] >= 1.4
    # the written model is the candidate the search timed (the fake timer: speedup = MACs ratio)
    check_valid(model, pruned)
    assert count_macs(model) / count_macs(pruned) == pytest.approx(target["achieved"])
    assert record["macs_before"] / record["macs_after"] == pytest.approx(target["achieved"])
    # the goal chosen is the smallest that met the budget, and the one below it by the resolution missed
    evaluations = target["evaluations"]
    met = [e["ratio"] for e in evaluations if e["achieved"] >= 1.4]
    assert target["ratio"] == min(met)
    assert any(e["achieved"] < 1.4 and target["ratio"] - e["ratio"] <= target["resolution"] + 1e-9
               for e in evaluations)
    assert sum(not e["cached"] for e in evaluations) <= 8
    # each group's ratio comes from the allocation, not one ratio everywhere
    assert len({g["ratio"] for g in allocation["groups"]}) > 1
    assert "speedup >= 1.4x" in stdout and "allocated by sensitivity" in stdout


def test_the_allocation_measures_less_damage_than_one_ratio_at_the_same_speedup(tmp_path, capsys,
                                                                                macs_timer):  # noqa: F811
    _, _, allocated, _ = _run(tmp_path, capsys, "--target-speedup", "1.4", "--no-reconstruct")
    _, _, uniform, _ = _run(tmp_path, capsys, "--target-speedup", "1.4", "--no-reconstruct",
                            "--allocate", "uniform")
    assert uniform["allocation"] is None and uniform["target"].get("allocated") is None
    assert 0 < uniform["target"]["ratio"] < 0.9
    assert allocated["target"]["achieved"] >= 1.4 and uniform["target"]["achieved"] >= 1.4
    # report.output_error: per graph output, against the original on the calibration data
    error = {name: max(r["output_error"].values()) for name, r in (("allocated", allocated), ("uniform", uniform))}
    assert error["allocated"] < error["uniform"], error


def test_an_unreachable_speedup_is_one_line_and_writes_nothing(tmp_path, capsys, macs_timer):  # noqa: F811
    model = resnet_like(4, c=16)
    path = _saved(tmp_path, model)
    data = _calibration(tmp_path, model, 16)
    out = tmp_path / "o.onnx"
    code, _, err = run_main(capsys, path, "--data", data, "--target-speedup", "50", *SPEEDUP, "-o", out)
    assert code == 2 and one_error_line(err) and "cannot be met: MACs removed" in err
    assert not out.exists()


def test_allocation_with_depth_and_a_speedup_is_refused(tmp_path, capsys):
    model = resnet_like(4, c=16)
    path = _saved(tmp_path, model)
    data = _calibration(tmp_path, model, 16)
    out = tmp_path / "o.onnx"
    code, _, err = run_main(capsys, path, "--data", data, "--depth", "0.5", "--target-speedup", "1.3",
                            "--allocate", "sensitivity", *SPEEDUP, "-o", out)
    assert code == 2 and one_error_line(err) and "shares of blocks" in err
    assert not out.exists()

"""`onnxprune sweep`: the prune command at several ratios, each point what prune itself writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune.data import load_data
from onnxprune.metrics import evaluate
from tests.graphs import listing, one_error_line, run_main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits_train.npz"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep with data at two ratios, shared by the tests that read its JSON."""
    folder = tmp_path_factory.mktemp("sweep")
    from onnxprune.cli import main

    code = main(["sweep", str(MODEL), "--data", str(DATA), "--calib-samples", "200", "--ratios-to-try", "0.2,0.5",
                 "--json", str(folder / "sweep.json"), "-q"])
    assert code == 0
    return folder, json.loads((folder / "sweep.json").read_text())


def test_each_point_is_what_the_prune_command_writes_measured_on_the_validation_split(swept, tmp_path, capsys):
    folder, record = swept
    assert record["schema_version"] == 1 and record["command"][:2] == ["onnxprune", "sweep"]
    assert [p["ratio"] for p in record["points"]] == [0.2, 0.5]
    point = record["points"][1]
    code, _, err = run_main(capsys, MODEL, "--structured", "0.5", "--data", DATA, "--calib-samples", "200",
                            "-o", tmp_path / "p.onnx", "-q")
    assert code == 0, err
    pruned = onnx.load(str(tmp_path / "p.onnx"))
    original = onnx.load(str(MODEL))
    from onnxprune.analysis.stats import count_macs, count_params

    assert point["params"] == count_params(pruned) and point["macs"] == count_macs(pruned)
    _, val = load_data(DATA, original).split(0.1, 0)
    measured = evaluate(pruned, original, val)
    assert record["samples"] == measured["samples"] == len(val)
    assert point["output_error"] == pytest.approx(measured["output_error"], rel=1e-6)
    assert point["accuracy"] == pytest.approx(measured["accuracy"]) and point["agreement"] == pytest.approx(
        measured["agreement"])
    assert record["accuracy"] == pytest.approx(measured["original_accuracy"])
    assert listing(folder) == {"sweep.json"}  # no model, no temporary folder left beside the outputs


def test_fewer_channels_at_a_higher_ratio_and_the_table_lists_every_ratio(swept, capsys):
    _, record = swept
    low, high = record["points"]
    assert record["params"] > low["params"] > high["params"]
    assert record["macs"] > low["macs"] > high["macs"]
    assert 0 < low["output_error"] < high["output_error"]
    code, out, _ = run_main(capsys, "sweep", MODEL, "--ratios-to-try", "0.3")
    assert code == 0
    rows = [line.split()[0] for line in out.splitlines()]
    assert rows[:3] == ["ratio", "original", "0.3"]
    assert "top-1" not in out and "latency" not in out  # nothing measured without data or --bench


def test_a_ratio_that_fails_is_listed_and_the_others_still_measured(tmp_path, capsys):
    # the gate is measured on the same validation split: 0.2 passes it, 0.8 cannot
    code, out, _ = run_main(capsys, "sweep", MODEL, "--data", DATA, "--calib-samples", "200",
                            "--ratios-to-try", "0.2,0.8", "--max-output-error", "0.3", "--json", tmp_path / "s.json")
    assert code == 0
    points = json.loads((tmp_path / "s.json").read_text())["points"]
    assert points[0]["failed"] is None and points[0]["params"]
    assert points[1]["failed"].startswith("exit 6: output error") and points[1]["params"] is None
    assert "ratio 0.8: exit 6: output error" in out


def test_a_sweep_where_every_ratio_fails_exits_as_its_first_failure(capsys):
    code, out, err = run_main(capsys, "sweep", MODEL, "--data", DATA, "--calib-samples", "200",
                              "--ratios-to-try", "0.5,0.8", "--max-output-error", "0.001", "--no-reconstruct")
    assert code == 6 and out == ""
    assert "exceeds --max-output-error 0.001" in one_error_line(err)


@pytest.mark.parametrize("flag", [["-o", "x.onnx"], ["--structured", "0.3"], ["--report", "r.json"],
                                  ["--target-macs", "0.5"], ["--plan-in", "p.json"]])
def test_flags_of_one_run_are_refused(flag, capsys):
    code, out, err = run_main(capsys, "sweep", MODEL, *flag)
    assert code == 2 and out == ""
    assert f"{flag[0]} does not apply to sweep" in one_error_line(err)


def test_outputs_may_not_overwrite_an_input(capsys):
    code, _, err = run_main(capsys, "sweep", MODEL, "--data", DATA, "--json", DATA)
    assert code == 2 and "--json would overwrite" in one_error_line(err)
    assert np.load(DATA)["input"].shape[0] > 0  # still the data


def test_bench_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, out, err = run_main(capsys, "sweep", MODEL, "--ratios-to-try", "0.5", "--bench", "cpu",
                              "--bench-iters", "3", "--plot", tmp_path / "s.png", "--json", tmp_path / "s.json")
    assert code == 0, err
    record = json.loads((tmp_path / "s.json").read_text())
    point = record["points"][0]
    assert point["speedup"] > 0 and point["latency_ms"] > 0 and point["input_ms"] > 0
    assert record["bench"]["iters"] == 3 and record["latency_ms"] == point["input_ms"]
    assert "speedup" in out.splitlines()[0]
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

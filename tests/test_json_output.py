"""JSON for pipelines: `--report -` / `--json -` put the JSON alone on stdout (the summary on
stderr), only after success; every JSON names its schema version, the versions it ran with and
the command line; the report matches the JSON Schema shipped in the package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxprune.report.records import SCHEMA_FILE
from tests.graphs import one_error_line, run_main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits_train.npz"


def _stamped(record: dict, command: str) -> None:
    assert record["schema_version"] == 1
    assert {"onnxprune", "python", "onnx", "onnxruntime"} <= set(record["environment"])
    assert record["command"][:2] == ["onnxprune", command] or (command == "prune" and record["command"][0] ==
                                                               "onnxprune")


def test_report_to_stdout_is_the_json_alone_and_matches_the_schema(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    code, out, err = run_main(capsys, MODEL, "--structured", "0.3", "--data", DATA, "--calib-samples", "64",
                              "-o", tmp_path / "m.onnx", "--report", "-")
    assert code == 0, err
    report = json.loads(out)  # nothing else on stdout
    _stamped(report, "prune")
    assert report["command"] == ["onnxprune", str(MODEL), "--structured", "0.3", "--data", str(DATA),
                                 "--calib-samples", "64", "-o", str(tmp_path / "m.onnx"), "--report", "-"]
    assert [s["stage"] for s in report["stages"]][:2] == ["load", "analyse"] and "verify" in [
        s["stage"] for s in report["stages"]]
    assert "params" in err and "wrote" in err  # the summary moved to stderr
    assert not (tmp_path / "-").exists()
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))


def test_a_report_file_is_stamped_too_and_a_dry_run_matches_the_schema(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    code, _, err = run_main(capsys, MODEL, "--structured", "0.3", "--dry-run", "--report", tmp_path / "r.json", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    _stamped(report, "prune")
    assert report["output"] is None and report["written"] is False
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))


def test_a_failed_run_prints_nothing_on_stdout(tmp_path, capsys):
    code, out, err = run_main(capsys, MODEL, "--structured", "0.1", "--min-reduction", "100",
                              "-o", tmp_path / "m.onnx", "--report", "-")
    assert code == 7 and out == ""
    one_error_line(err)
    assert not (tmp_path / "m.onnx").exists()


def test_only_one_output_may_be_stdout(tmp_path, capsys):
    code, out, err = run_main(capsys, MODEL, "--structured", "0.3", "--report", "-", "--plan-out", "-")
    assert code == 2 and out == "" and "cannot both be written to standard output" in one_error_line(err)


@pytest.mark.parametrize("command, args", [
    ("info", []),
    ("bench", [MODEL, "--iters", "3", "--warmup", "1"]),
    ("sensitivity", ["--data", DATA, "--calib-samples", "32", "--ratios-to-try", "0.5"]),
    ("sweep", ["--ratios-to-try", "0.5"]),
])
def test_every_command_writes_stamped_json_to_stdout(command, args, capsys):
    code, out, err = run_main(capsys, command, MODEL, *args, "--json", "-")
    assert code == 0, err
    record = json.loads(out)
    _stamped(record, command)
    assert record["command"] == ["onnxprune", command, str(MODEL), *map(str, args), "--json", "-"]
    assert err.strip()  # the human table went to stderr


def test_reports_are_strict_json_without_nan_or_infinity(tmp_path, capsys):
    """The untrained 'before' row has no training loss: null, not NaN (which strict parsers refuse)."""
    code, out, err = run_main(capsys, MODEL, "--structured", "0.3", "--data", DATA, "--calib-samples", "64",
                              "--distill", "--epochs", "1", "-o", tmp_path / "m.onnx", "--report", "-", "-q")
    assert code == 0, err
    assert "NaN" not in out and "Infinity" not in out
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["training"]["before"]["train_loss"] is None

"""`--config RECIPE`: prune options from a file, the command line overriding them, and the
effective recipe stored in the report and the model so that a run can be reproduced."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tests.graphs import one_error_line, run_main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits_train.npz"


def _recipe_of(model_path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    return json.loads(props["onnxprune.recipe"])


def test_a_recipe_sets_options_the_command_line_overrides_and_its_report_reruns_the_same_model(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"structured: 0.3\ndata: {DATA}\ncalib-samples: 64\nreconstruct: false\n"
                      "ignore: ['/stem/*']\nround_to: 2\n")
    code, _, err = run_main(capsys, MODEL, "--config", recipe, "--structured", "0.4", "-o", tmp_path / "a.onnx",
                            "--report", tmp_path / "a.json", "-q")
    assert code == 0, err
    report = json.loads((tmp_path / "a.json").read_text())
    expected = {"structured": 0.4, "data": str(DATA), "calib-samples": 64, "reconstruct": False,
                "ignore": ["/stem/*"], "round-to": 2}
    assert report["recipe"] == expected and report["ratio"] == 0.4  # the command line won
    assert report["data"]["samples"] == 64 and report["reconstruction"] is None  # the recipe applied
    assert any("/stem/stem.0/Conv" in b["sources"] and "ignore" in b["reason"] for b in report["blocked"])
    assert all(g["channels_after"] % 2 == 0 for g in report["groups"])
    assert _recipe_of(tmp_path / "a.onnx") == expected
    # the report is itself a recipe: the same options, the same bytes
    code, _, err = run_main(capsys, MODEL, "--config", tmp_path / "a.json", "-o", tmp_path / "b.onnx", "-q")
    assert code == 0, err
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_without_a_recipe_the_effective_options_are_still_recorded_and_outputs_are_not(tmp_path, capsys):
    code, _, err = run_main(capsys, MODEL, "--structured", "0.25", "--ignore", "/stem/*", "--ignore", "/se/*",
                            "-o", tmp_path / "m.onnx", "--force", "--report", tmp_path / "m.json", "-q")
    assert code == 0, err
    assert _recipe_of(tmp_path / "m.onnx") == {"structured": 0.25, "ignore": ["/stem/*", "/se/*"]}


def test_a_repeatable_flag_on_the_command_line_replaces_the_recipes_values(tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"structured": 0.3, "ignore": ["/stem/*"]}))
    code, _, err = run_main(capsys, MODEL, "--config", recipe, "--ignore", "/se/*", "--dry-run",
                            "--report", tmp_path / "r.report.json", "-q")
    assert code == 0, err
    assert json.loads((tmp_path / "r.report.json").read_text())["recipe"] == {"structured": 0.3, "ignore": ["/se/*"]}


@pytest.mark.parametrize("text, message", [
    ("structured: 2\n", "argument --structured: must be in [0, 1)"),
    ("no-such-flag: 1\n", "unknown option 'no-such-flag'"),
    ("distill: yes please\n", "'distill' is a switch: give true or false"),
    ("structured: [0.1, {a: 1}]\n", "'structured' needs a single value"),
    ("- structured\n", "expected a mapping of flag names to values"),
    ("structured: [\n", "not valid YAML"),
])
def test_a_bad_recipe_is_a_one_line_usage_error_naming_the_file(text, message, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    code, out, err = run_main(capsys, MODEL, "--config", recipe, "-o", tmp_path / "x.onnx")
    line = one_error_line(err)
    assert code == 2 and out == "" and f"--config {recipe}" in line and message in line, line
    assert not (tmp_path / "x.onnx").exists()


def test_a_missing_recipe_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_main(capsys, MODEL, "--config", tmp_path / "none.yaml")
    assert code == 2 and "cannot read" in one_error_line(err)


def test_sweep_takes_a_recipe_and_refuses_a_single_runs_flag_from_it(tmp_path, capsys):
    recipe = tmp_path / "s.yaml"
    recipe.write_text("round-to: 4\nratios-to-try: 0.25,0.5\n")
    code, _, err = run_main(capsys, "sweep", MODEL, "--config", recipe, "--json", tmp_path / "s.json", "-q")
    assert code == 0, err
    record = json.loads((tmp_path / "s.json").read_text())
    assert [p["ratio"] for p in record["points"]] == [0.25, 0.5]
    assert record["recipe"] == {"round-to": 4, "ratios-to-try": "0.25,0.5"}
    recipe.write_text("structured: 0.3\n")
    code, _, err = run_main(capsys, "sweep", MODEL, "--config", recipe)
    assert code == 2 and "--structured does not apply to sweep (given here or in --config)" in one_error_line(err)

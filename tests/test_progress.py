"""Stage lines of the command line (progress.py): on a terminal or with -v, never with -q,
none for a run under a second, one line for a whole budget search."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from onnxprune import progress
from tests.graphs import run_main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits_train.npz"
LINE = re.compile(r"^onnxprune: (\S+) +\d+\.\d\d s$")


def _stages(err: str) -> list[str]:
    return [m.group(1) for m in map(LINE.match, err.splitlines()) if m]


@pytest.fixture
def immediate(monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 0.0)  # every run counts as a long one


def test_verbose_runs_list_their_stages_in_order(immediate, tmp_path, capsys):
    code, out, err = run_main(capsys, MODEL, "--structured", "0.3", "--data", DATA, "--calib-samples", "64",
                              "-o", tmp_path / "m.onnx", "-v")
    assert code == 0, err
    assert _stages(err) == ["load", "analyse", "measure", "plan", "cut", "compensate", "reconstruct", "write",
                            "reference", "verify"]
    assert "onnxprune: load" not in out  # stage lines go to stderr, the summary to stdout


def test_a_terminal_shows_stages_without_verbose_and_quiet_shows_none(immediate, tmp_path, capsys, monkeypatch):
    code, _, err = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "a.onnx")
    assert code == 0 and _stages(err) == []  # not a terminal, no -v: a pipeline's log stays clean
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "b.onnx")
    assert code == 0 and _stages(err) == ["load", "analyse", "plan", "cut", "write", "reference", "verify"]
    code, out, err = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "c.onnx", "-q", "-v")
    assert code == 0 and out == "" and err == ""


def test_a_run_under_a_second_prints_no_stage_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER_S", 1e9)
    code, _, err = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "m.onnx", "-v")
    assert code == 0 and _stages(err) == []


def test_a_budget_search_is_one_stage_not_one_per_candidate(immediate, tmp_path, capsys):
    code, _, err = run_main(capsys, MODEL, "--target-macs", "0.5", "-o", tmp_path / "m.onnx", "-v")
    assert code == 0, err
    stages = _stages(err)
    assert stages[:2] == ["load", "search"] and stages.count("analyse") == 1


def test_the_library_prints_no_stage_lines_after_a_command_line_run(immediate, tmp_path, capsys):
    import onnxprune

    code, _, _ = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "m.onnx", "-v")
    assert code == 0
    onnxprune.prune(str(MODEL), 0.3)
    assert _stages(capsys.readouterr().err) == []

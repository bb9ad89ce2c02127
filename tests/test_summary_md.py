"""--summary-md: the run as Markdown for a CI job summary, staged with the other outputs."""

from __future__ import annotations

import json
from pathlib import Path

from onnxprune.report.markdown import _cell
from tests.graphs import listing, one_error_line, run_main

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA = ROOT / "models" / "digits_train.npz"


def test_the_summary_holds_the_reports_figures_and_what_stayed_whole(tmp_path, capsys):
    code, _, err = run_main(capsys, MODEL, "--structured", "0.4", "--data", DATA, "--calib-samples", "100",
                            "--bench", "cpu", "--bench-iters", "3", "-o", tmp_path / "m.onnx",
                            "--report", tmp_path / "r.json", "--summary-md", tmp_path / "s.md", "-q")
    assert code == 0, err
    text = (tmp_path / "s.md").read_text()
    report = json.loads((tmp_path / "r.json").read_text())
    assert text.startswith(f"### onnxprune: `{MODEL}` -> `{tmp_path / 'm.onnx'}`")
    ratio = report["params_before"] / report["params_after"]
    assert f"| params | 32.13K | {report['params_after'] / 1e3:.2f}K | {ratio:.2f}x fewer |" in text
    assert "| latency, batch 1 (CPUExecutionProvider, median) |" in text and "speedup" in text
    assert "held-out calibration samples: cut, reconstructed" in text
    pruned = [g for g in report["groups"] if g["channels_after"] < g["channels_before"]]
    assert f"**Pruned:** {len(pruned)} group(s)" in text
    assert "| 1 | 10 | reaches graph output logits | `/head/Gemm` |" in text
    assert all(line.count("|") >= 4 for line in text.splitlines() if line.startswith("|"))


def test_a_summary_to_stdout_is_alone_there_and_a_failed_run_writes_none(tmp_path, capsys):
    code, out, err = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "m.onnx", "--summary-md", "-")
    assert code == 0, err
    assert out.startswith("### onnxprune:") and "params" in err  # the usual summary went to stderr
    code, out, err = run_main(capsys, MODEL, "--structured", "0.1", "--min-reduction", "50", "-o", tmp_path / "n.onnx",
                              "--summary-md", tmp_path / "n.md")
    assert code == 7 and out == "" and one_error_line(err)
    assert listing(tmp_path) == {"m.onnx"}


def test_only_one_output_on_stdout_and_never_over_an_input(tmp_path, capsys):
    code, _, err = run_main(capsys, MODEL, "--structured", "0.3", "--report", "-", "--summary-md", "-")
    assert code == 2 and "cannot both be written to standard output" in one_error_line(err)
    code, _, err = run_main(capsys, MODEL, "--structured", "0.3", "-o", tmp_path / "m.onnx", "--summary-md", MODEL)
    assert code == 2 and "would overwrite the input model" in one_error_line(err)


def test_names_cannot_break_the_markdown():
    assert _cell("conv|1`x`\nnext") == "conv\\|1'x' next"

"""The bundled demo model (models/digits_cnn.onnx): present, accurate, prunable by the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import count_macs, count_params

pytest.importorskip("sklearn")
from tools.digits_arch import accuracy_onnx, load_split  # noqa: E402  (needs scikit-learn)

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="module")
def split():
    return load_split()


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("onnxprune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "onnxprune"]


def test_bundled_model_is_a_valid_small_onnx_file():
    assert MODEL.exists(), "regenerate with: .venv/bin/python -m tools.make_digits_model"
    assert MODEL.stat().st_size < 1_000_000
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 8, 8]


def test_bundled_model_accuracy_on_held_out_split(split):
    _, x_test, _, y_test = split
    assert len(y_test) == 450
    assert accuracy_onnx(MODEL, x_test, y_test) >= 0.95


def test_cli_prunes_bundled_model(tmp_path, split):
    out = tmp_path / "digits.pruned.onnx"
    before = MODEL.read_bytes()
    proc = subprocess.run(_cli() + [str(MODEL), "--structured", "0.4", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert MODEL.read_bytes() == before  # the input is never modified

    original, pruned = onnx.load(str(MODEL)), onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    shape = {"input": (1, 1, 8, 8)}
    assert count_macs(pruned, shape) < count_macs(original, shape)
    assert count_params(pruned) < count_params(original)

    # Same interface, dynamic batch kept: the whole held-out set in one run.
    import onnxruntime as ort

    _, x_test, _, _ = split
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x_test})[0]
    assert logits.shape == (len(x_test), 10) and np.isfinite(logits).all()


def test_bundled_training_data_is_the_training_split(split):
    x_train, _, y_train, _ = split
    with np.load(ROOT / "models" / "digits_train.npz") as data:
        assert sorted(data.files) == ["input", "labels"]
        np.testing.assert_array_equal(data["input"], x_train)
        np.testing.assert_array_equal(data["labels"], y_train)


def test_quick_start_recovers_held_out_accuracy(tmp_path, split):
    """The README's prune command, run as written (output moved to tmp_path): on the 450 test images
    neither the bundled model nor the recovery trained on, top-1 within 2 points of the original's."""
    import shlex

    text = (ROOT / "README.md").read_text()
    command = next(line[2:] for line in text[text.index("## Quick start"):].splitlines()
                   if line.startswith("$ onnxprune models/"))
    words = shlex.split(command)[1:]
    words[words.index("-o") + 1] = str(tmp_path / "digits.pruned.onnx")
    proc = subprocess.run(_cli() + words, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    _, x_test, _, y_test = split
    original = accuracy_onnx(MODEL, x_test, y_test)
    pruned = accuracy_onnx(tmp_path / "digits.pruned.onnx", x_test, y_test)
    assert pruned >= original - 0.02, (original, pruned)
    shape = {"input": (1, 1, 8, 8)}
    assert count_macs(onnx.load(str(MODEL)), shape) / count_macs(onnx.load(str(tmp_path / "digits.pruned.onnx")),
                                                                 shape) >= 3

"""Verification runs the original beside the full check of the written file (runtime/verify.py):
the same verdicts, in the same order, as one after the other."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest

from onnxprune.errors import UnsupportedModel, VerificationFailed
from onnxprune.runtime import verify

from graphs import small_cnn


def _broken(path):
    """A model file that fails onnx.checker: a node reads a tensor nothing makes."""
    model = small_cnn()
    model.graph.node[0].input[0] = "nowhere"
    onnx.save(model, path)
    return path


def test_reference_outputs_are_those_of_a_plain_run(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(), path)
    feeds, reference = verify.check_beside_original(path, path, {}, {})
    plain_feeds, plain = verify.run_original(path, {}, {})
    assert list(reference) == list(plain)
    for name in plain:
        np.testing.assert_array_equal(reference[name], plain[name])
    for name in plain_feeds:
        np.testing.assert_array_equal(feeds[name], plain_feeds[name])


def test_the_original_runs_in_another_thread_while_the_file_is_checked(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    onnx.save(small_cnn(), path)
    seen = {}
    run_original, check = verify.run_original, verify.check_model_file

    def running(*args):
        seen["run"] = threading.current_thread()
        return run_original(*args)

    def checking(file):
        seen["check"] = threading.current_thread()
        return check(file)

    monkeypatch.setattr(verify, "run_original", running)
    monkeypatch.setattr(verify, "check_model_file", checking)
    verify.check_beside_original(path, path, {}, {})
    assert seen["check"] is threading.main_thread() and seen["run"] is not threading.main_thread()


def test_a_written_file_failing_the_check_is_refused(tmp_path):
    original = tmp_path / "m.onnx"
    onnx.save(small_cnn(), original)
    with pytest.raises(VerificationFailed, match="fails onnx.checker"):
        verify.check_beside_original(_broken(tmp_path / "broken.onnx"), original, {}, {})


def test_an_original_that_cannot_run_is_reported_before_the_check(tmp_path):
    """Both fail: the input model's error, as when the original ran first."""
    original = tmp_path / "m.onnx"
    model = small_cnn()
    model.graph.node[0].op_type = "NoSuchOp"
    onnx.save(model, original)
    with pytest.raises(UnsupportedModel, match="onnxruntime cannot load the input model"):
        verify.check_beside_original(_broken(tmp_path / "broken.onnx"), original, {}, {})

"""Limits: weight dtypes, the opset range, external data, and a model over 2 GB.

- float16 weights prune, stay float16 and verify in onnxruntime.
- bfloat16: onnxruntime's CPU provider has no kernels for it, so the pruned
  model passes onnx.checker's full check and the onnxruntime comparison is
  skipped with a warning.
- Opsets: the loader converts opsets 7 to 10 to 11 (tests/test_old_opsets.py),
  refuses older ones (exit 4, tests/test_cli.py) and those above what
  onnxruntime knows (exit 4, tests/test_reliability.py); 11, 13, 17 and the
  newest opset onnx defines load, prune and verify at their own opset.
- A model whose pruned weights exceed EXTERNAL_DATA_THRESHOLD is written with
  external data (threshold lowered here so a small model gets there).
- Slow: an MLP with more than 2 GB of float32 weights in external data,
  pruned by the CLI in a subprocess; its peak memory is measured against the
  model's size.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto

import onnxprune
import onnxprune.model.proto
from onnxprune import cli
from onnxprune.runtime.session import session

from graphs import retyped, small_cnn, write_mlp


def float_types(model: onnx.ModelProto) -> set[int]:
    """Element types of the model's float weights and of its graph inputs and outputs."""
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    types = {t.data_type for t in model.graph.initializer if t.data_type in floats}
    return types | {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}


def prune_with_warnings(path: Path, out: Path, ratio: float = 0.4):
    """prune_file, with the warnings it raised or put in its report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = onnxprune.prune_file(path, out, ratio)
    return report, [str(w.message) for w in caught] + list(report.warnings)


# ---------------------------------------------------------------- dtypes

def test_float16_model_prunes_stays_float16_and_verifies(tmp_path):
    path, out = tmp_path / "fp16.onnx", tmp_path / "out.onnx"
    onnx.save(retyped(small_cnn(), np.float16), str(path))
    report, messages = prune_with_warnings(path, out)
    assert not messages
    assert report.macs_after < report.macs_before
    assert set(report.output_error) == {"fc_out"} and np.isfinite(report.output_error["fc_out"])
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert float_types(pruned) == {TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float16)
    (y,) = session(out).run(None, {"x": x})
    assert y.dtype == np.float16 and y.shape == (1, 5) and np.isfinite(y).all()


def test_bfloat16_model_is_checked_but_not_run(tmp_path, capsys):
    """bfloat16 needs opset 22 for Conv/MaxPool; onnxruntime's CPU provider cannot run it."""
    path, out = tmp_path / "bf16.onnx", tmp_path / "out.onnx"
    onnx.save(retyped(small_cnn(opset=22), ml_dtypes.bfloat16), str(path))
    report, messages = prune_with_warnings(path, out)
    assert any("bfloat16" in m and "onnx.checker only" in m for m in messages), messages
    assert report.written and report.output_error == {}  # nothing to compare with
    assert report.macs_after < report.macs_before
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    assert float_types(pruned) == {TensorProto.BFLOAT16}
    assert capsys.readouterr().out == ""  # onnx-graphsurgeon's dtype warnings stay quiet

    code = cli.main([str(path), "--structured", "0.4", "-o", str(tmp_path / "cli.onnx"), "-q"])
    assert code == 0
    assert float_types(onnx.load(str(tmp_path / "cli.onnx"))) == {TensorProto.BFLOAT16}


# ---------------------------------------------------------------- opsets

@pytest.mark.parametrize("opset", [11, 13, 17, onnx.defs.onnx_opset_version()])
def test_opsets_load_prune_and_verify(tmp_path, opset):
    path, out = tmp_path / f"opset{opset}.onnx", tmp_path / "out.onnx"
    onnx.save(small_cnn(opset=opset), str(path))
    report, messages = prune_with_warnings(path, out)
    assert not messages
    assert report.macs_after < report.macs_before and np.isfinite(report.output_error["fc_out"])
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert onnxprune.model.proto.opset_of(pruned) == opset


# ---------------------------------------------------------------- external data

def test_large_output_is_written_with_external_data(tmp_path, monkeypatch):
    """Over EXTERNAL_DATA_THRESHOLD (lowered to a few KB here) the weights go to a data file beside the model."""
    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(small_cnn(), str(path))
    monkeypatch.setattr(onnxprune.model.proto, "EXTERNAL_DATA_THRESHOLD", 1024)
    report = onnxprune.prune_file(path, out, 0.4)
    assert np.isfinite(report.output_error["fc_out"])
    (data,) = [p for p in tmp_path.iterdir() if p.name.startswith("out.onnx.") and p.suffix == ".data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", "out.onnx", data.name])
    stored = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in stored.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    loaded = onnx.load(str(out))
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    assert np.isfinite(session(out).run(None, {"x": x})[0]).all()
    assert onnxprune.count_params(loaded) == report.params_after


# ---------------------------------------------------------------- over 2 GB

# Measured on this project's 2-core, 24 GiB machine (8192-wide MLP, 2.15 GB): 3.57x before
# the memory work of issue 7, 2.54x after it, 1.72x after that of issue 20 (2026-12-01),
# whose target this is: at most twice the model and 150 MB.
PEAK_LIMIT = 2.0
PEAK_ALLOWANCE = 150e6


def run_measured(command: list[str]) -> tuple[int, str, int]:
    """Exit status, stderr and peak RSS (bytes) of ``command``, this child alone (wait4)."""
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(command, stdout=devnull, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    proc.stderr.close()
    return proc.returncode, err, usage.ru_maxrss * 1024


@pytest.fixture
def mlp_over_2gb(tmp_path):
    """An MLP with 9 layers of 8192 x 8192 float32 (2.15 GB) in one external data file; removed afterwards."""
    path = tmp_path / "big.onnx"
    size = write_mlp(path, 8192, 9, external=True)
    assert size > 2**31
    yield path, size
    for p in tmp_path.iterdir():  # pytest keeps old tmp dirs: never leave GBs behind
        p.unlink()


@pytest.mark.slow
def test_model_over_2gb_prunes_within_memory_limit(mlp_over_2gb, tmp_path):
    model, size = mlp_over_2gb
    data = model.with_name(model.name + ".data")
    stamps = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (model, data)}
    out = tmp_path / "big.pruned.onnx"
    started = time.perf_counter()
    script = Path(sys.executable).with_name("onnxprune")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "onnxprune"]
    code, err, peak = run_measured(command + [str(model), "--structured", "0.3", "-o", str(out), "-q"])
    seconds = time.perf_counter() - started
    assert code == 0, err
    ratio = peak / size
    print(f"\nmodel {size / 1e9:.2f} GB, CLI peak RSS {peak / 1e9:.2f} GB = {ratio:.2f}x, {seconds:.0f} s")
    assert peak <= PEAK_LIMIT * size + PEAK_ALLOWANCE, \
        f"peak RSS {peak / 1e9:.2f} GB is {ratio:.2f}x the model's {size / 1e9:.2f} GB"
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (model, data)} == stamps  # input untouched
    # The pruned model (about 0.5x: every hidden width at 70%) is under the 1.8 GB
    # external data threshold: one file. Its validity is checked from the path.
    onnx.checker.check_model(str(out), full_check=True)
    pruned = onnx.load(str(out))
    # 8192 x 0.7 = 5734.4 channels asked: 5736, the nearest multiple of 8 (the default rounding)
    assert [t.dims for t in pruned.graph.initializer if t.name.startswith("fc1.W")] == [[5736, 5736]]
    assert onnxprune.count_params(pruned) < 0.55 * size / 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model.name, data.name, out.name])

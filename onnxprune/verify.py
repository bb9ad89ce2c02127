"""Verification of a written model: onnx.checker (full check), an onnxruntime
session, and one run on generated inputs, compared with the original model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import MissingDependency, UnsupportedModel, VerificationFailed
from .errors import first_line

_INT_DTYPES = ("tensor(int64)", "tensor(int32)", "tensor(int16)", "tensor(int8)", "tensor(uint8)")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - packaging guards this
        raise MissingDependency(
            "onnxruntime is not installed (needed to verify the result): "
            "pip install 'onnxprune[cpu]' (or 'onnxprune[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def session(path_or_bytes, threads: int | None = None, providers=("CPUExecutionProvider",)):
    """A session (CPU unless told) with spinning threads off (they distort side-by-side timings)."""
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, options, providers=list(providers))


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """For integer inputs used as Gather indices into a constant table: the table size."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    bounds = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in sizes:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            bounds[node.input[1]] = sizes[node.input[0]][axis]
    return bounds


def make_inputs(sess, shapes: dict[str, tuple[int, ...]], bounds: dict[str, int] | None = None, seed: int = 0):
    """Random inputs: normal floats, integers within index range (default 0..1), bools."""
    rng = np.random.default_rng(seed)
    bounds = bounds or {}
    feeds = {}
    for inp in sess.get_inputs():
        shape = shapes.get(inp.name) or tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
        if inp.type in _INT_DTYPES:
            dtype = np.dtype(inp.type[len("tensor("):-1])
            feeds[inp.name] = rng.integers(0, bounds.get(inp.name, 2), size=shape).astype(dtype)
        elif inp.type == "tensor(bool)":
            feeds[inp.name] = rng.random(shape) > 0.5
        else:
            dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inp.type, np.float32)
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """max |a - b| relative to the reference's scale (max |a|)."""
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    err = float(np.max(np.abs(reference - other))) if reference.size else 0.0
    return err / scale if scale > 0 else err


@dataclass
class Verification:
    output_error: dict[str, float]  # per output, relative to the original's scale


def check_model_file(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationFailed(f"pruned model fails onnx.checker: {first_line(exc)}") from exc


def run_original(model_path: Path, shapes: dict, bounds: dict, seed: int = 0):
    """Inputs and outputs of the input model (the reference for the pruned one)."""
    require_onnxruntime()
    try:
        sess = session(Path(model_path))
    except Exception as exc:
        raise UnsupportedModel(f"onnxruntime cannot load the input model: {first_line(exc)}") from exc
    feeds = make_inputs(sess, shapes, bounds, seed)
    try:
        outputs = sess.run(None, feeds)
    except Exception as exc:
        raise UnsupportedModel(f"onnxruntime cannot run the input model: {first_line(exc)}") from exc
    names = [o.name for o in sess.get_outputs()]
    return feeds, dict(zip(names, outputs))


def verify_file(path: Path, feeds: dict, reference: dict) -> Verification:
    """Full check, session, run; output names and shapes must match the reference."""
    check_model_file(path)
    try:
        sess = session(Path(path))
        outputs = sess.run(None, feeds)
    except Exception as exc:
        raise VerificationFailed(f"onnxruntime rejects the pruned model: {first_line(exc)}") from exc
    names = [o.name for o in sess.get_outputs()]
    if names != list(reference):
        raise VerificationFailed(f"output names changed: {names} != {list(reference)}")
    errors = {}
    for name, value in zip(names, outputs):
        if np.shape(value) != np.shape(reference[name]):
            raise VerificationFailed(
                f"output {name}: shape {np.shape(value)} != original {np.shape(reference[name])}"
            )
        errors[name] = relative_error(reference[name], value)
    return Verification(errors)

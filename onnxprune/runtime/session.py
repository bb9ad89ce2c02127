"""onnxruntime sessions, configured once for every use: spinning threads off, CPU unless told."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import MissingDependency

# onnxruntime's severity for its own log lines ("[W:onnxruntime:...]" on stderr): fatal only
# (4): a failed run it logs as an error is caught and reaches the user as onnxprune's one-line
# error (or is expected: measure_shapes tries a run that may fail); --debug lowers it.
QUIET, VERBOSE = 4, 2  # onnxruntime: 4 fatal only, 2 warnings (its default)
_log_severity = QUIET


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - packaging guards this
        raise MissingDependency(
            "onnxruntime is not installed (needed to verify the result): "
            "pip install 'onnxprune[cpu]' (or 'onnxprune[gpu]' for CUDA)"
        ) from None
    # The default logger prints what happens outside a session's options (a model's loader
    # warnings among them), so it is set too, on every import path that reaches onnxruntime.
    onnxruntime.set_default_logger_severity(_log_severity)
    return onnxruntime


def set_log_severity(level: int) -> None:
    """onnxruntime's log severity for every session opened from now on (QUIET or VERBOSE)."""
    global _log_severity
    _log_severity = level


def log_severity() -> int:
    return _log_severity


def session(path_or_bytes, threads: int | None = None, providers=("CPUExecutionProvider",), prepack: bool = True):
    """A session (CPU unless told) with spinning threads off (they distort side-by-side timings).

    ``prepack=False`` for a session run once: prepacking copies constant
    weights into a GEMM-friendly layout, which pays off over many runs but
    holds a second copy of the weights. Such a session also stops at the
    basic graph optimisations: the extended ones (the CPU's NCHWc layout
    transformation) keep reordered copies of the weights too (measured on
    ResNet-50, 97 MiB: 305 MiB resident after building the session with all
    optimisations, 154 MiB with the basic ones), and verification's two
    sessions set the run's peak memory (issue 20).
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = _log_severity
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, options, providers=list(providers))


def capture_model(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs also include the tensors ``names``."""
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return extended

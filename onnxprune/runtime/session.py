"""onnxruntime sessions, configured once for every use: spinning threads off, CPU unless told."""

from __future__ import annotations

from pathlib import Path

import onnx

from ..errors import MissingDependency


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - packaging guards this
        raise MissingDependency(
            "onnxruntime is not installed (needed to verify the result): "
            "pip install 'onnxprune[cpu]' (or 'onnxprune[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def session(path_or_bytes, threads: int | None = None, providers=("CPUExecutionProvider",), prepack: bool = True):
    """A session (CPU unless told) with spinning threads off (they distort side-by-side timings).

    ``prepack=False`` for a session run once: prepacking copies constant
    weights into a GEMM-friendly layout, which pays off over many runs but
    holds a second copy of the weights.
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
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

"""Verification of a written model: onnx.checker (full check), an onnxruntime
session, and one run on generated inputs, compared with the original model.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import UnsupportedModel, VerificationFailed, first_line
from ..memory import release_freed_memory
from ..model.dynamic import DimChoice, describe_sizes, pin_example
from ..model.inputs import is_mask
from ..model.load import CHECKED_WHOLE_BYTES, check_apart, check_in_parts
from ..model.proto import light_copy
from ..model.runtime_ops import check_runtime_ops, hidden_from_checker, runtime_only_nodes
from ..model.stream import large_initializers, read_model_metadata
from .session import require_onnxruntime, session

_INT_DTYPES = ("tensor(int64)", "tensor(int32)", "tensor(int16)", "tensor(int8)", "tensor(uint8)")


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
    """Random inputs: normal floats, integers within index range (default 0..1), bools; masks
    (``is_mask``) all ones."""
    rng = np.random.default_rng(seed)
    bounds = bounds or {}
    feeds = {}
    for inp in sess.get_inputs():
        shape = shapes.get(inp.name) or tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
        if inp.type in _INT_DTYPES and is_mask(inp.name):
            feeds[inp.name] = np.ones(shape, np.dtype(inp.type[len("tensor("):-1]))
        elif inp.type in _INT_DTYPES:
            dtype = np.dtype(inp.type[len("tensor("):-1])
            feeds[inp.name] = rng.integers(0, bounds.get(inp.name, 2), size=shape).astype(dtype)
        elif inp.type == "tensor(bool)" and is_mask(inp.name):
            feeds[inp.name] = np.ones(shape, bool)
        elif inp.type == "tensor(bool)":
            feeds[inp.name] = np.asarray(rng.random(shape) > 0.5)  # an array also for a scalar (an If's condition)
        else:
            dtype = {"tensor(float16)": np.float16, "tensor(double)": np.float64}.get(inp.type, np.float32)
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """max |a - b| relative to the reference's scale (max |a|), where the reference is finite.

    Where the reference itself is NaN or infinite (a Log of a negative random
    input, weights holding NaN) there is no deviation to measure; a non-finite
    value where the reference is finite is an infinite error.
    """
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    finite = np.isfinite(reference)
    reference, other = reference[finite], other[finite]
    if not np.isfinite(other).all():
        return math.inf
    if not reference.size:
        return 0.0
    with np.errstate(over="ignore"):
        scale = float(np.max(np.abs(reference)))
        err = float(np.max(np.abs(reference - other)))
    return err / scale if scale > 0 else err


@dataclass
class Verification:
    output_error: dict[str, float]  # per output, relative to the original's scale


def check_model_file(path: Path) -> None:
    """The full check (onnx.checker with strict shape inference) of the written model."""
    try:
        _full_check(path, hide_runtime_ops=False)
    except Exception as exc:
        if not _valid_with_runtime_ops(path):
            raise VerificationFailed(f"pruned model fails onnx.checker: {first_line(exc)}") from exc


def _full_check(path: Path, hide_runtime_ops: bool) -> None:
    """The checker on the file; a large one is read and checked a weight at a time (the checker
    reading the file whole holds its encoding and the parsed model at once: a large model's
    peak, twice its size beside the reference outputs). ``hide_runtime_ops``: onnxruntime's
    default-domain contrib ops are checked against its schemas instead (model/runtime_ops.py)."""
    large = path.stat().st_size > CHECKED_WHOLE_BYTES
    if not large and not hide_runtime_ops:
        onnx.checker.check_model(str(path), full_check=True)
        return
    model = read_model_metadata(path) if large else onnx.load(str(path), load_external_data=False)
    with hidden_from_checker(model) if hide_runtime_ops else contextlib.nullcontext():
        if large:
            check_apart(light_copy(model), large_initializers(path), full_check=True)
        else:
            check_in_parts(model, full_check=True)
    if hide_runtime_ops:
        check_runtime_ops(model)


def _valid_with_runtime_ops(path: Path) -> bool:
    """Whether the model at ``path`` passes the full check once onnxruntime's default-domain
    contrib ops are checked against its schemas instead. Only a model that fails the plain
    check is read again for this."""
    try:
        model = read_model_metadata(path)
    except Exception:  # not a model at all (a staged file swapped under us): the plain check's failure stands
        return False
    if not runtime_only_nodes(model):
        return False
    try:
        _full_check(path, hide_runtime_ops=True)
    except Exception:
        return False
    return True


def run_original(model_path: Path, shapes: dict, bounds: dict, seed: int = 0, chosen: list[DimChoice] = ()):
    """Inputs and outputs of the input model (the reference for the pruned one).

    ``chosen``: the sizes picked for dynamic dims (model/dynamic.py) in ``shapes``; a run that
    fails at them says so and how to pin others, since the model may run only at its real size.
    ``(None, None)``, with a warning, for a model of a type onnxruntime's CPU
    provider has no kernels for (bfloat16, float8): such a model is checked
    with onnx.checker only (``verify_file`` with no reference).
    """
    require_onnxruntime()
    release_freed_memory()  # before onnxruntime loads the original's weights once more
    try:
        sess = session(Path(model_path), prepack=False)
    except Exception as exc:
        unrunnable = cpu_unrunnable_types(model_path)
        if unrunnable:
            warnings.warn(
                f"onnxruntime's CPU provider cannot run {'/'.join(unrunnable)} models: "
                "the pruned model was checked with onnx.checker only, not run", stacklevel=2
            )
            return None, None
        raise UnsupportedModel(f"onnxruntime cannot load the input model: {first_line(exc)}") from exc
    feeds = make_inputs(sess, shapes, bounds, seed)
    try:
        outputs = sess.run(None, feeds)
    except Exception as exc:
        raise UnsupportedModel(unrunnable_message(first_line(exc), shapes, list(chosen))) from exc
    names = [o.name for o in sess.get_outputs()]
    return feeds, dict(zip(names, outputs))


def unrunnable_message(error: str, shapes: dict, chosen: list[DimChoice]) -> str:
    """Why the input model did not run: at the sizes chosen for its dynamic dims (naming them, and
    the flag that pins others), else the model itself."""
    if not chosen:
        return f"onnxruntime cannot run the input model: {error}"
    inputs = list(dict.fromkeys(c.input for c in chosen))
    tried = ", ".join(f"{name} {list(shapes[name])}" for name in inputs)
    example = " ".join(f"`input_shapes` {pin_example(name, chosen, shapes, placeholders=False)}" for name in inputs)
    return (f"onnxruntime cannot run the input model at the sizes chosen for its dynamic dims "
            f"({describe_sizes(chosen)}; tried {tried}): give the sizes it runs at, e.g. {example} "
            f"(with your sizes); onnxruntime said: {error}")


# Element types onnxruntime's CPU provider has (next to) no kernels for.
_NO_CPU_KERNELS = {
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ,
}


def cpu_unrunnable_types(model_path: Path) -> list[str]:
    """Names of the element types in the model (inputs, outputs, weights) in ``_NO_CPU_KERNELS``."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    types = {vi.type.tensor_type.elem_type for vi in (*graph.input, *graph.output, *graph.value_info)}
    types |= {t.data_type for t in graph.initializer}
    return sorted(onnx.helper.tensor_dtype_to_string(t).removeprefix("TensorProto.").lower()
                  for t in types & _NO_CPU_KERNELS)


def check_beside_original(path: Path, *original_args) -> tuple[dict | None, dict | None]:
    """``run_original(*original_args)``'s inputs and outputs, computed while the full check of the
    written model at ``path`` runs: onnxruntime releases the GIL while it builds the session and
    runs it, so the two take the longer one's time, not their sum (BERT-base, 2 cores: 0.8 s and
    0.5 s). The check reads the written file a weight at a time (or whole when small), so the peak
    stays the original's session. The original's failure is raised first, as when run one after
    the other; then the check's."""
    with ThreadPoolExecutor(1, thread_name_prefix="onnxprune-reference") as pool:
        original = pool.submit(run_original, *original_args)
        try:
            check_model_file(path)
            failed = None
        except VerificationFailed as exc:
            failed = exc
        feeds, reference = original.result()
    if failed is not None:
        raise failed
    return feeds, reference


def verify_file(path: Path, feeds: dict | None, reference: dict | None, checked: bool = False) -> Verification:
    """Full check (unless ``checked``: ``check_beside_original`` made it), session, run; output
    names and shapes must match the reference.

    With no reference (``run_original`` could not run the input), the full check only.
    """
    release_freed_memory()  # what the original's session held, before the check reads the file
    if not checked:
        check_model_file(path)
    if reference is None:
        return Verification({})
    try:
        sess = session(Path(path), prepack=False)
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

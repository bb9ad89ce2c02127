"""Load, check and save ONNX models; shape inference on a weight-free copy.

Loading accepts external data and keeps the model's opset. Saving is atomic:
external data goes to a fresh file name first, the .onnx is written under a
temporary name and renamed last, so an interrupted run never leaves a
half-written model behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InvalidModel, UnsupportedModel, UsageError

MIN_OPSET = 11
# Above this, the protobuf serialiser cannot hold the model in one message.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Initializers at most this large keep their values in the copy used for
# shape inference (they may be Reshape targets, Slice bounds, ...).
SMALL_CONSTANT = 64


@dataclass
class Shapes:
    """Static shapes of every tensor, as inferred with the pinned input dims.

    ``static[name]`` is a tuple of ints (or None for dims inference could not
    resolve); ``dynamic[name]`` holds the axes that are symbolic in the model
    as given, before pinning (they must stay dynamic, and index mappings that
    depend on them are unsafe).
    """

    static: dict[str, tuple] = field(default_factory=dict)
    dynamic: dict[str, set[int]] = field(default_factory=dict)
    pinned_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise InvalidModel("model declares no default-domain opset")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check a model file; raise InvalidModel/UnsupportedModel with one line."""
    path = Path(path)
    if not path.exists():
        raise InvalidModel(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModel(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise InvalidModel(f"{path}: empty file")
    try:
        model = onnx.load(str(path))
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{path}: not a readable ONNX protobuf ({_first_line(exc)})") from exc
    except OSError as exc:  # external data file missing or unreadable
        raise InvalidModel(f"{path}: cannot read ({_first_line(exc)})") from exc
    except Exception as exc:  # protobuf raises assorted types on garbage input
        raise InvalidModel(f"{path}: not a readable ONNX protobuf ({_first_line(exc)})") from exc
    if not model.HasField("graph") or not model.opset_import or not model.graph.node:
        raise InvalidModel(f"{path}: not an ONNX model (no graph, nodes or opset)")
    try:
        if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:
        raise InvalidModel(f"{path}: fails onnx.checker: {_first_line(exc)}") from exc
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise UnsupportedModel(
            f"{path}: opset {opset} is older than {MIN_OPSET}; "
            "upgrade it with onnx.version_converter first"
        )
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name:d0,d1,...`` strings (the --input-shape flag)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise UsageError(f"--input-shape {spec!r}: expected name:d0,d1,...")
        try:
            values = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise UsageError(f"--input-shape {spec!r}: dims must be integers") from None
        if any(v <= 0 for v in values):
            raise UsageError(f"--input-shape {spec!r}: dims must be positive")
        shapes[name] = values
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (old exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_input_shapes(
    model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: pinned dims, else static dims, else 1."""
    pinned = dict(pinned or {})
    inputs = {i.name: i for i in graph_inputs(model)}
    unknown = sorted(set(pinned) - set(inputs))
    if unknown:
        raise UsageError(
            f"--input-shape names unknown input {unknown[0]!r}; inputs are: {', '.join(inputs)}"
        )
    result = {}
    for name, vi in inputs.items():
        dims = vi.type.tensor_type.shape.dim
        if name in pinned:
            if len(pinned[name]) != len(dims):
                raise UsageError(
                    f"--input-shape {name}: rank {len(pinned[name])} given, model input has rank {len(dims)}"
                )
            for d, v in zip(dims, pinned[name]):
                if d.HasField("dim_value") and d.dim_value != v:
                    raise UsageError(
                        f"--input-shape {name}: dim {v} conflicts with the model's fixed dim {d.dim_value}"
                    )
            result[name] = pinned[name]
        else:
            result[name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
    return result


@contextlib.contextmanager
def _weights_detached(model: onnx.ModelProto):
    """Temporarily replace large initializers by data-free stand-ins (same name, dims, type).

    Shape inference needs only dims and small constants; leaving the weights
    out keeps it fast and lets it work on models over the 2 GB protobuf limit.
    """
    graph = model.graph
    originals = list(graph.initializer)
    light = []
    for t in originals:
        n = 1
        for d in t.dims:
            n *= d
        if n <= SMALL_CONSTANT and t.data_location != onnx.TensorProto.EXTERNAL:
            light.append(t)
        else:
            stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
            light.append(stub)
    del graph.initializer[:]
    graph.initializer.extend(light)
    try:
        yield model
    finally:
        del graph.initializer[:]
        graph.initializer.extend(originals)


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple]:
    """Shapes of all tensors; with ``input_shapes`` the graph inputs are pinned first.

    The model itself is left as it was.
    """
    with _weights_detached(model):
        light = onnx.ModelProto()
        light.CopyFrom(model)
    del light.graph.value_info[:]
    if input_shapes:
        for vi in light.graph.input:
            if vi.name in input_shapes:
                dims = vi.type.tensor_type.shape.dim
                for d, v in zip(dims, input_shapes[vi.name]):
                    d.Clear()
                    d.dim_value = v
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise UnsupportedModel(f"ONNX shape inference failed: {_first_line(exc)}") from exc
    shapes: dict[str, tuple] = {}
    graph = inferred.graph
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            )
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _unresolved(model: onnx.ModelProto, shapes: dict[str, tuple]) -> list[str]:
    return [
        name for node in model.graph.node for name in node.output
        if name and (shapes.get(name) is None or None in shapes[name])
    ]


def measure_shapes(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]], names: list[str]) -> dict[str, tuple]:
    """Shapes of ``names`` observed in one onnxruntime run at the pinned input shapes.

    ONNX shape inference gives up on shape arithmetic (Shape -> Div -> Slice,
    as torch exports ``chunk``); at fixed input shapes the run is exact.
    """
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            shape = inputs.get(i.name, ())
            if "int" in i.type:
                feeds[i.name] = np.zeros(shape, dtype=np.int64 if "64" in i.type else np.int32)
            elif "bool" in i.type:
                feeds[i.name] = np.zeros(shape, dtype=bool)
            else:
                feeds[i.name] = np.zeros(shape, dtype=np.float16 if "16" in i.type else np.float32)
        wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]
        values = sess.run(wanted, feeds)
    except Exception:
        return {}
    return {n: tuple(np.shape(v)) for n, v in zip(wanted, values)}


def static_shapes(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple]:
    """Every tensor's shape at the given input shapes: inferred, else measured."""
    shapes = infer_shapes(model, inputs)
    unresolved = _unresolved(model, shapes)
    if unresolved and model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        shapes.update(measure_shapes(model, inputs, unresolved))
    return shapes


def analyse_shapes(model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None) -> Shapes:
    """Pinned static shapes plus the axes that are dynamic in the model as given."""
    inputs = resolve_input_shapes(model, pinned)
    static = static_shapes(model, inputs)
    free = infer_shapes(model, None)
    dynamic = {name: {a for a, d in enumerate(dims) if d is None} for name, dims in free.items()}
    for name, dims in static.items():
        if name not in free:
            dynamic[name] = set(range(len(dims)))  # unknown without pinning: treat as dynamic
    return Shapes(static=static, dynamic=dynamic, pinned_inputs=inputs)


def refresh_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop all intermediate value_info and infer it again (never leave stale shapes)."""
    del model.graph.value_info[:]
    with _weights_detached(model):
        light = onnx.ModelProto()
        light.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=False)
    except Exception:
        return model  # the checker's full check reports the real problem
    io = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in io)
    return model


def default_output_path(input_path: str | os.PathLike) -> Path:
    p = Path(input_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".pruned.onnx")


def check_output_path(input_path, output_path, force: bool) -> Path:
    """Refuse to overwrite without --force, and fail early on an unwritable location."""
    out = Path(output_path)
    if out.exists() and out.is_dir():
        raise UsageError(f"{out}: is a directory")
    same = out.exists() and Path(input_path).exists() and os.path.samefile(input_path, out)
    if same and not force:
        raise UsageError(f"{out}: output would overwrite the input; pass --force to allow it")
    if out.exists() and not force and not same:
        raise UsageError(f"{out}: exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{out}: directory {parent} is not writable")
    return out


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > EXTERNAL_DATA_THRESHOLD


class AtomicModelWriter:
    """Write a model beside its final path, let the caller verify it, then rename.

    with AtomicModelWriter(out) as w:
        tmp = w.write(model)      # a complete model file under a temporary name
        verify(tmp)               # raise to abandon: nothing is left behind
    # renamed into place here
    """

    def __init__(self, final_path: str | os.PathLike):
        self.final = Path(final_path)
        self.tmp: Path | None = None
        self.data_file: Path | None = None

    def __enter__(self) -> "AtomicModelWriter":
        return self

    def write(self, model: onnx.ModelProto) -> Path:
        directory = self.final.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.name}.", suffix=".tmp", dir=directory)
        os.close(fd)
        self.tmp = Path(tmp)
        if needs_external_data(model):
            # A fresh name: never clobber a data file another model refers to.
            self.data_file = directory / f"{self.final.name}.{uuid.uuid4().hex[:8]}.data"
            onnx.save_model(
                model,
                str(self.tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=self.data_file.name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(self.tmp))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.tmp is not None:
            os.replace(self.tmp, self.final)
            return False
        for p in (self.tmp, self.data_file):
            if p is not None:
                with contextlib.suppress(OSError):
                    p.unlink()
        return False

"""Load, check and save ONNX models; a weight-free copy for shape inference.

Loading accepts external data and keeps the model's opset. Saving is atomic:
external data goes to a fresh file name first, the .onnx is written under a
temporary name and renamed last, so an interrupted run never leaves a
half-written model behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import uuid
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import InvalidModel, UnsupportedModel, UsageError, first_line

MIN_OPSET = 11
# Above this, the protobuf serialiser cannot hold the model in one message.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Initializers at most this large keep their values in the weight-free copy
# used for shape inference (they may be Reshape targets, Slice bounds, ...).
SMALL_CONSTANT = 64


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
        raise InvalidModel(f"{path}: not a readable ONNX protobuf ({first_line(exc)})") from exc
    except OSError as exc:  # external data file missing or unreadable
        raise InvalidModel(f"{path}: cannot read ({first_line(exc)})") from exc
    except onnx.checker.ValidationError as exc:  # external data missing, or outside the model's directory
        raise InvalidModel(f"{path}: cannot read its external data ({first_line(exc)})") from exc
    except Exception as exc:  # protobuf raises assorted types on garbage input
        raise InvalidModel(f"{path}: not a readable ONNX protobuf ({first_line(exc)})") from exc
    validate_model(model, path)
    return model


def validate_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    """Raise InvalidModel/UnsupportedModel (one line) unless onnxprune can analyse ``model``.

    Beyond onnx.checker's structural check, the model must pass type and shape
    inference in strict mode (what ``full_check=True`` adds, run here on a
    weight-free copy so it costs no copy of the weights) and have Conv groups
    that fit its weights (which ONNX inference does not check): the analysis
    trusts attributes and shapes, and a model whose attributes contradict its
    weights (a wrong ``transB``, too few ``pads``, ``group`` 0) would be cut wrong.
    ``path``, where the model came from, names it in messages and lets the
    checker read a model too large to serialise from its file.
    """
    where = f"{path}: " if path is not None else ""
    if not model.HasField("graph") or not model.opset_import or not model.graph.node:
        raise InvalidModel(f"{where}not an ONNX model (no graph, nodes or opset)")
    try:
        if path is None or approx_size(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:
        raise InvalidModel(f"{where}fails onnx.checker: {first_line(exc)}") from exc
    opset = opset_of(model)
    if opset < MIN_OPSET:
        raise UnsupportedModel(
            f"{where}opset {opset} is older than {MIN_OPSET}; upgrade it with onnx.version_converter first"
        )
    check_text(model.graph, where)
    try:
        inferred = onnx.shape_inference.infer_shapes(light_copy(model), check_type=True, strict_mode=True)
    except Exception as exc:
        raise InvalidModel(f"{where}fails onnx.checker's type and shape checks: {first_line(exc)}") from exc
    check_conv_groups(inferred.graph, where)


def check_conv_groups(graph: onnx.GraphProto, where: str = "") -> None:
    """Conv/ConvTranspose ``group`` must fit the weights and input channels (ONNX inference skips this)."""
    weights = {t.name: list(t.dims) for t in graph.initializer}
    channels = {
        vi.name: vi.type.tensor_type.shape.dim[1].dim_value
        for vi in (*graph.input, *graph.value_info)
        if len(vi.type.tensor_type.shape.dim) > 1 and vi.type.tensor_type.shape.dim[1].HasField("dim_value")
    }
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        if w is None or len(w) < 2:
            continue  # weights computed at run time: the analysis treats the node as a barrier
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        problem = _group_problem(node.op_type, group, channels.get(node.input[0]), w)
        if problem:
            raise InvalidModel(f"{where}node {node.name or node.op_type}: {problem} (weight shape {w})")


def _group_problem(op: str, group: int, channels: int | None, w: list[int]) -> str | None:
    if group < 1:
        return f"group {group} is not positive"
    # Conv weights are (M, C / group, k...); ConvTranspose weights (C, M / group, k...).
    if w[0] % group:
        return f"group {group} does not divide the weight's {w[0]} {'filters' if op == 'Conv' else 'channels'}"
    expected = w[1] * group if op == "Conv" else w[0]
    if channels and channels != expected:
        return f"input has {channels} channels, the weights with group {group} expect {expected}"
    return None


def check_text(graph: onnx.GraphProto, where: str = "") -> None:
    """Names must be UTF-8 (protobuf hands others over as bytes); so must string attributes.

    Non-UTF-8 names break the ONNX spec (InvalidModel). Binary string
    attributes (some custom ops carry blobs) are legal but cannot be edited
    here: onnx-graphsurgeon decodes every string attribute (UnsupportedModel).
    """
    named = [*graph.input, *graph.output, *graph.value_info, *graph.initializer]
    for item in named:
        if isinstance(item.name, bytes):
            raise InvalidModel(f"{where}tensor name {item.name!r} is not UTF-8 text")
    for node in graph.node:
        for text in (node.name, node.op_type, node.domain, *node.input, *node.output):
            if isinstance(text, bytes):
                raise InvalidModel(f"{where}node {node.name!r}: name {text!r} is not UTF-8 text")
        for a in node.attribute:
            if isinstance(a.name, bytes):
                raise InvalidModel(f"{where}node {node.name!r}: attribute name {a.name!r} is not UTF-8 text")
            for value in (a.s, *a.strings):
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise UnsupportedModel(
                        f"{where}node {node.name!r}: attribute {a.name} holds binary data, not UTF-8 text"
                    ) from None
            for body in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                check_text(body, where)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its large weights (stand-ins keep name, dims and type).

    Shape inference needs only dims and small constants; leaving the weights
    out keeps it fast and lets it work on models over the 2 GB protobuf limit.
    """
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, source = light.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    for t in source.initializer:
        if math.prod(t.dims) <= SMALL_CONSTANT and t.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(t)
        else:
            graph.initializer.append(onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims))
    return light


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
    return ensure_writable(out)


def check_side_files(model_path, output_path, writes: dict[str, object], reads: dict[str, object] | None = None) -> None:
    """Side files to write (flag -> path, e.g. ``{"--report": ...}``) must be writable and
    overwrite nothing else of the run: the input model, the output model
    (``None`` for a dry run), a file read (``--plan-in``) or each other.
    """
    taken = {"the input model": model_path, "the output model": output_path, **(reads or {})}
    for flag, path in writes.items():
        if not path:
            continue
        ensure_writable(path, flag)
        clash = next((what for what, other in taken.items() if other and _same_path(path, other)), None)
        if clash:
            raise UsageError(f"{path}: {flag} would overwrite {clash}")
        taken[flag] = path


def _same_path(a, b) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also through links
    return a.resolve() == b.resolve()


def ensure_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail before any work when ``path`` cannot be written (probed: os.access lies to root)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path}: {what} path is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: directory {parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UsageError(f"{path}: cannot write in {parent} ({exc.strerror})") from None
    return path


def write_text_file(path: str | os.PathLike, text: str) -> None:
    """Write a side file (report, plan) atomically; an OS failure is a usage error."""
    path = Path(path)
    try:
        with AtomicModelWriter(path) as writer:
            writer.write_bytes(text.encode())
    except OSError as exc:
        raise UsageError(f"{path}: cannot write ({exc.strerror or exc})") from None


def approx_size(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, from their dims (ByteSize() walks every byte)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
        total += math.prod(t.dims) * itemsize
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    return approx_size(model) > EXTERNAL_DATA_THRESHOLD


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

    def _temporary(self) -> Path:
        """A fresh ``.NAME.XXXXXXXX.tmp`` beside the final path (never the final name itself).

        The name is recorded before the file exists (``mkstemp`` would create
        it first): a Ctrl-C at any instant still finds what to remove.
        """
        while True:
            self.tmp = self.final.parent / f".{self.final.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:  # 0o666 less the umask, like any file the user writes
                os.close(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                return self.tmp
            except FileExistsError:
                continue

    def write_bytes(self, data: bytes) -> Path:
        self._temporary().write_bytes(data)
        return self.tmp

    def write(self, model: onnx.ModelProto) -> Path:
        try:
            return self._write(model)
        except OSError as exc:
            raise UsageError(f"{self.final}: cannot write ({exc.strerror or exc})") from None

    def _write(self, model: onnx.ModelProto) -> Path:
        directory = self.final.parent
        self._temporary()
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
            try:
                os.replace(self.tmp, self.final)
                return False
            except OSError as err:
                self.tmp.unlink(missing_ok=True)
                raise UsageError(f"{self.final}: cannot write ({err.strerror})") from None
        for p in (self.tmp, self.data_file):
            if p is not None:
                with contextlib.suppress(OSError):
                    p.unlink()
        return False

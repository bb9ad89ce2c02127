"""Load, check and save ONNX models; a weight-free copy for shape inference.

Loading accepts external data and keeps the model's opset, except that opsets 7 to
10 are upgraded in memory to CONVERTED_OPSET with onnx.version_converter (the file is
not touched; a model written from the result has the new opset). Saving is staged
(model/publish.py): a run's files appear together, and only when it succeeds.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import InvalidModel, UnsupportedModel, first_line, quoted
from ..rules.weights import WEIGHTS, group_problem
from .inputs import declared_dim, name_negative_dims
from .proto import PACKED_4BIT, approx_size, is_stand_in, light_copy, opset_of, weights_as_inputs
from .runtime_ops import check_runtime_ops, hidden_from_checker
from .stream import read_model_file

MIN_OPSET = 11
# The oldest opset converted on load. onnxruntime runs nothing older (opset 6 and below have
# no kernels there), and the converted model is verified against the original run in it.
MIN_CONVERTED_OPSET = 7
# Old opsets are upgraded to the oldest one onnxprune supports, not to the newest: every opset
# step is one more set of rewrites by the converter that can fail or change the graph's form
# (at 13, Softmax's axis changes meaning and Split, Squeeze, Unsqueeze and ReduceSum take
# their sizes and axes as inputs), and the model should change no more than loading needs.
CONVERTED_OPSET = MIN_OPSET
CONVERTER = "onnx.version_converter"


@dataclass
class Conversion:
    """An old opset upgraded in memory on load."""

    from_opset: int
    to_opset: int
    tool: str = CONVERTER

    def to_json(self) -> dict:
        return {"from_opset": self.from_opset, "to_opset": self.to_opset, "tool": self.tool}


@dataclass
class LoadedModel:
    model: onnx.ModelProto  # checked; at CONVERTED_OPSET when ``conversion`` is set
    conversion: Conversion | None = None


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check a model file (``read_model``), for callers that do not report a conversion."""
    return read_model(path).model


def read_model(path: str | os.PathLike) -> LoadedModel:
    """Read and check a model file, upgrading opsets 7 to 10 in memory and declaring negative
    dims (paddle2onnx's -1) as named dynamic dims; raise InvalidModel/UnsupportedModel with one line."""
    path = Path(path)
    if not path.exists():
        raise InvalidModel(f"{path}: no such file")
    if path.is_dir():
        raise InvalidModel(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise InvalidModel(f"{path}: empty file")
    try:
        model = read_model_file(path)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{path}: not a readable ONNX protobuf ({first_line(exc)})") from exc
    except OSError as exc:  # external data file missing or unreadable
        raise InvalidModel(f"{path}: cannot read ({first_line(exc)})") from exc
    except onnx.checker.ValidationError as exc:  # external data missing, or outside the model's directory
        raise InvalidModel(f"{path}: cannot read its external data ({first_line(exc)})") from exc
    except Exception as exc:  # protobuf raises assorted types on garbage input
        raise InvalidModel(f"{path}: not a readable ONNX protobuf ({first_line(exc)})") from exc
    loaded = checked_model(model, path)
    name_negative_dims(loaded.model)  # ours to edit: read from the file just now
    return loaded


def validate_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> None:
    """Raise InvalidModel/UnsupportedModel (one line) unless onnxprune can analyse ``model``
    (that of an opset from 7 to 10 once converted; ``checked_model``)."""
    checked_model(model, path)


def checked_model(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> LoadedModel:
    """``model`` if onnxprune can analyse it, or its conversion to CONVERTED_OPSET for opsets 7 to
    10; else InvalidModel/UnsupportedModel (one line).

    Ops that onnxruntime registers and ONNX does not (its contrib ops) are checked against
    onnxruntime's schemas instead (``runtime_ops``). Beyond onnx.checker's structural
    check, the model must pass type and shape inference in strict mode (what
    ``full_check=True`` adds, run here on a weight-free copy so it costs no copy of the
    weights) and have Conv groups
    that fit its weights (which ONNX inference does not check): the analysis
    trusts attributes and shapes, and a model whose attributes contradict its
    weights (a wrong ``transB``, too few ``pads``, ``group`` 0) would be cut wrong.
    ``path``, where the model came from, names it in messages. A model with more than
    CHECKED_WHOLE_BYTES of weights is checked without serialising it (``check_in_parts``).
    """
    where = f"{path}: " if path is not None else ""
    if not model.HasField("graph") or not model.opset_import or not model.graph.node:
        raise InvalidModel(f"{where}not an ONNX model (no graph, nodes or opset)")
    with hidden_from_checker(model):
        try:
            sized = set()  # the weights whose data size the check settled (not read again below)
            if approx_size(model) <= CHECKED_WHOLE_BYTES:
                onnx.checker.check_model(model)
            else:
                sized = check_in_parts(model)
        except Exception as exc:
            raise InvalidModel(f"{where}fails onnx.checker: {first_line(exc)}") from exc
    check_runtime_ops(model, where)
    conversion = None
    opset = opset_of(model)
    if opset < MIN_OPSET:
        model, conversion = upgrade_opset(model, opset, where)
        sized = set()  # a converted model's weights are its own
    check_text(model.graph, where)
    check_initializer_sizes(model.graph, where, sized)
    try:
        with hidden_from_checker(model):
            light = light_copy(model)
        inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except Exception as exc:
        if conversion is not None:  # the input passed the checker: its conversion is what fails
            raise UnsupportedModel(f"{where}opset {opset} converted to {conversion.to_opset} by {CONVERTER} "
                                   f"fails onnx.checker's type and shape checks: {first_line(exc)}") from exc
        raise InvalidModel(f"{where}fails onnx.checker's type and shape checks: {first_line(exc)}") from exc
    check_conv_groups(inferred.graph, where)
    return LoadedModel(model, conversion)


# onnx.checker.check_model(model) serialises the model and parses it again in C++: two more
# copies of its weights beside the loaded one, the run's peak on a large model (3x its size).
CHECKED_WHOLE_BYTES = 64 << 20


def check_in_parts(model: onnx.ModelProto, full_check: bool = False) -> set[str]:
    """What ``onnx.checker.check_model(model)`` checks, without a copy of the whole model; the
    names of the weights whose data size it checked (``check_apart``)."""
    light = light_copy(model)
    left_out = {t.name for t in light.graph.initializer if is_stand_in(t)}
    # a tensor in an external file is read (and its location checked) by loading, not here
    return check_apart(light, (t for t in model.graph.initializer
                               if t.name in left_out and t.data_location != onnx.TensorProto.EXTERNAL), full_check)


def check_apart(structure: onnx.ModelProto, weights, full_check: bool = False) -> set[str]:
    """onnx.checker on a model given as ``structure`` (a ``light_copy``: the model without
    ``weights``, or with value-less stand-ins for them) and ``weights``, an iterable of its
    initializers: each weight is checked alone (its type, data and layout), then the structure
    with the weights and stand-ins declared as graph inputs of their type and shape (the graph,
    its nodes, types and names). Memory: the structure and one weight's copy at a time. The names
    of the weights whose data size was checked (``check_weight``)."""
    declared, sized = [], set()
    for t in weights:
        if check_weight(t):
            sized.add(t.name)
        declared.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    light = weights_as_inputs(structure)  # light_copy's stand-ins (external tensors among them) as inputs
    listed = {i.name for i in light.graph.input}
    light.graph.input.extend(v for v in declared if v.name not in listed)
    onnx.checker.check_model(light, full_check=full_check)
    return sized


# The value fields a tensor may hold its data in besides raw_data (onnx.TensorProto).
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values())


def check_weight(t: onnx.TensorProto) -> bool:
    """onnx.checker.check_tensor's verdict on ``t``. A tensor held as raw data (nearly every
    weight) is checked here, with its size too: the checker serialises each tensor to parse it
    again in C++, 0.8 s of a 435 MB BERT's run for what a length comparison settles. Any other
    (typed fields, strings, external data, an undefined type) goes to the checker itself. Whether
    its data size was checked (``_size_problem``: then it need not be read again for that)."""
    raw = (t.data_location != onnx.TensorProto.EXTERNAL and t.HasField("raw_data")
           and t.data_type not in (onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING)
           and t.data_type in _KNOWN_TYPES and not any(len(getattr(t, f)) for f in _TYPED_FIELDS))
    if not raw:
        onnx.checker.check_tensor(t)
        return False
    problem = _size_problem(t)
    if problem:
        raise onnx.checker.ValidationError(f"tensor {quoted(t.name)}: {problem}")
    return True


def upgrade_opset(model: onnx.ModelProto, opset: int, where: str = "") -> tuple[onnx.ModelProto, Conversion]:
    """``model`` (opset ``opset`` < MIN_OPSET) converted to CONVERTED_OPSET by onnx.version_converter,
    checked; UnsupportedModel, with the converter's reason, when it cannot be."""
    if opset < MIN_CONVERTED_OPSET:
        raise UnsupportedModel(f"{where}opset {opset} is older than {MIN_CONVERTED_OPSET}, the oldest that "
                               f"onnxruntime runs and onnxprune converts; export the model at opset "
                               f"{MIN_OPSET} or newer")
    from onnx import version_converter  # only old models pay for it

    try:
        converted = version_converter.convert_version(model, CONVERTED_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise UnsupportedModel(f"{where}opset {opset} cannot be converted to {CONVERTED_OPSET} by {CONVERTER}: "
                               f"{_converter_reason(exc)}") from exc
    return converted, Conversion(opset, CONVERTED_OPSET)


def _converter_reason(exc: BaseException) -> str:
    """The converter's message without the C++ source location it starts with
    ("/project/onnx/version_converter/adapters/scan_8_9.h:26: adapt_scan_8_9: ...")."""
    return re.sub(r"^\S+\.(?:h|cc|cpp):\d+: ", "", first_line(exc))


def check_conv_groups(graph: onnx.GraphProto, where: str = "") -> None:
    """Conv/ConvTranspose ``group`` must fit the weights and input channels (ONNX inference skips this)."""
    weights = {t.name: list(t.dims) for t in graph.initializer}
    channels = {
        vi.name: declared_dim(vi.type.tensor_type.shape.dim[1])
        for vi in (*graph.input, *graph.value_info)
        if len(vi.type.tensor_type.shape.dim) > 1
    }
    for node in graph.node:
        entry = WEIGHTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if entry is None or not entry.grouped or len(node.input) < 2:
            continue
        w = weights.get(node.input[1])
        if w is None or len(w) < 2:
            continue  # weights computed at run time: the analysis treats the node as a barrier
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        problem = group_problem(node.op_type, group, channels.get(node.input[0]), w)
        if problem:
            raise InvalidModel(f"{where}node {node.name or node.op_type}: {problem} (weight shape {w})")


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




def check_initializer_sizes(graph: onnx.GraphProto, where: str = "", checked: set[str] = frozenset()) -> None:
    """Every initializer holds exactly the data its dtype and shape say (onnx.checker does not
    check it): a tensor whose raw data is longer or shorter would be cut and counted wrong, or
    read past its end by onnxruntime. Those in ``checked`` were (``check_weight``): reading a
    weight's data size copies it (0.1 s on BERT-base)."""
    for t in graph.initializer:
        problem = None if t.name in checked else _size_problem(t)
        if problem:
            raise InvalidModel(f"{where}initializer {quoted(t.name)}: {problem}")


def _size_problem(t: onnx.TensorProto) -> str | None:
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.UNDEFINED:
        return None  # not loaded here: onnx reads external data with its own checks
    elements = math.prod(t.dims)
    shape = f"shape {list(t.dims)}"
    packed = t.data_type in PACKED_4BIT
    if t.HasField("raw_data"):
        if t.data_type == onnx.TensorProto.STRING:
            return "holds strings as raw data"
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        expected = (elements + 1) // 2 if packed else elements * itemsize
        if len(t.raw_data) != expected:
            return f"{len(t.raw_data)} bytes of data, its dtype and {shape} need {expected}"
        return None
    field = onnx.helper.tensor_dtype_to_field(t.data_type)
    complex_types = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
    expected = (elements + 1) // 2 if packed else elements * (2 if t.data_type in complex_types else 1)
    held = len(getattr(t, field))
    if held != expected and (held or elements):
        return f"{held} values in {field}, its dtype and {shape} need {expected}"
    return None

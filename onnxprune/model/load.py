"""Load, check and save ONNX models; a weight-free copy for shape inference.

Loading accepts external data and keeps the model's opset. Saving is atomic:
external data goes to a fresh file name first, the .onnx is written under a
temporary name and renamed last, so an interrupted run never leaves a
half-written model behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import InvalidModel, UnsupportedModel, first_line
from ..rules.weights import WEIGHTS, group_problem
from .proto import light_copy, needs_external_data, opset_of

MIN_OPSET = 11


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
        if path is None or not needs_external_data(model):
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



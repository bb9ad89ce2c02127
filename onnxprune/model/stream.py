"""Read a model file one initializer at a time, the mirror of ``publish.write_model``.

``onnx.load`` reads the whole file into one bytes object and parses it: the
encoding and the parsed model are both in memory at once, twice the model's
weights (BERT-base: 900 MiB for 415 MB, the run's peak). Here the file's
protobuf encoding is walked field by field (its wire format is a sequence of
tag, length, payload): everything but the graph's initializers is parsed in
one piece, small (nodes, names, metadata), then each initializer is read and
parsed alone, so that the encoding of only one weight is in memory beside the
model. The model is the one ``onnx.load`` gives (the order of repeated entries
is kept; fields of a message may come in any order in an encoding).

A file this walk cannot follow (not protobuf, a wire type ONNX never writes)
is left to ``onnx.load``, whose error then says why.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

MODEL_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
GRAPH_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
# An initializer whose encoding is at most this long holds no weights worth reading
# apart (and a tensor whose values are in an external file is that short).
SMALL_FIELD = 64 << 10

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class NotWalkable(ValueError):
    """The file is not a protobuf encoding this walk follows."""


def read_model_file(path, load_external_data: bool = True) -> onnx.ModelProto:
    """The model in ``path``, as ``onnx.load(path, load_external_data=...)`` reads it."""
    path = Path(path)
    try:
        model = _read(path, skip_large=False)
    except NotWalkable:
        return onnx.load(str(path), load_external_data=load_external_data)
    if load_external_data:
        onnx.load_external_data_for_model(model, str(path.parent))
    return model


def read_model_metadata(path) -> onnx.ModelProto:
    """The model in ``path`` without the initializers that hold their values in the file itself
    (the others, small or external, are kept): what is needed to know which files it names,
    read without its weights."""
    path = Path(path)
    try:
        return _read(path, skip_large=True)
    except NotWalkable:
        return onnx.load(str(path), load_external_data=False)


def large_initializers(path):
    """The graph initializers that ``read_model_metadata`` leaves out, parsed one at a time."""
    path = Path(path)
    with open(path, "rb") as f:
        for start, end in _layout(f)[1]:
            if end - start > SMALL_FIELD:
                yield _parsed(_read_at(f, start, end))


def _parsed(data: bytes) -> onnx.TensorProto:
    try:
        return onnx.TensorProto.FromString(data)
    except Exception as exc:
        raise NotWalkable(str(exc)) from exc


def _layout(f) -> tuple[bytearray, list[tuple[int, int]]]:
    """The model's encoding without the graph's initializers, and where each initializer's
    encoding lies in the file."""
    size = os.fstat(f.fileno()).st_size
    rest, graph, initializers = bytearray(), bytearray(), []
    for field, start, payload, end in _fields(f, 0, size):
        if field != MODEL_GRAPH:
            rest += _read_at(f, start, end)
            continue
        for inner, inner_start, inner_payload, inner_end in _fields(f, payload, end):
            if inner == GRAPH_INITIALIZER:
                initializers.append((inner_payload, inner_end))
            else:
                graph += _read_at(f, inner_start, inner_end)
    if graph or initializers:
        rest += length_key(MODEL_GRAPH, len(graph)) + graph
    return rest, initializers


def _read(path: Path, skip_large: bool) -> onnx.ModelProto:
    with open(path, "rb") as f:
        rest, initializers = _layout(f)
        model = onnx.ModelProto()
        try:
            model.ParseFromString(bytes(rest))
            for start, end in initializers:
                if skip_large and end - start > SMALL_FIELD:
                    continue
                model.graph.initializer.add().ParseFromString(_read_at(f, start, end))
        except Exception as exc:  # protobuf raises its own DecodeError and others on bad payloads
            raise NotWalkable(str(exc)) from exc
    return model


def _fields(f, start: int, end: int):
    """(field number, field start, payload start, field end) of each field in ``[start, end)``."""
    pos = start
    while pos < end:
        field_start = pos
        f.seek(pos)
        key, pos = _varint(f, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise NotWalkable("field number 0")
        if wire == _VARINT:
            payload, (_, payload_end) = pos, _varint(f, pos, end)
        elif wire == _LENGTH:
            length, payload = _varint(f, pos, end)
            payload_end = payload + length
        elif wire in (_FIXED64, _FIXED32):
            payload, payload_end = pos, pos + (8 if wire == _FIXED64 else 4)
        else:  # groups (3, 4) are not written by any ONNX serialiser
            raise NotWalkable(f"wire type {wire}")
        if payload_end > end:
            raise NotWalkable("a field runs past its message")
        yield field, field_start, payload, payload_end
        pos = payload_end


def _varint(f, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` (``f`` is positioned there) and the position after it."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotWalkable("a truncated or overlong varint")
        byte = f.read(1)
        if not byte:
            raise NotWalkable("the file ends inside a field")
        pos += 1
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value, pos
        shift += 7


def _read_at(f, start: int, end: int) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise NotWalkable("the file ends inside a field")
    return data


def length_key(field: int, length: int) -> bytes:
    """The tag of a length-delimited field ``field`` and its length, as protobuf encodes them."""
    return _encoded_varint(field << 3 | _LENGTH) + _encoded_varint(length)


def _encoded_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)

"""What onnxprune reads off a ModelProto without looking at its weights: the opset, a
weight-free copy for shape inference, the size of its weights."""

from __future__ import annotations

import math

import onnx

from ..errors import InvalidModel

# Above this, the protobuf serialiser cannot hold the model in one message.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


# Initializers at most this large keep their values in the weight-free copy
# used for shape inference (they may be Reshape targets, Slice bounds, ...).
SMALL_CONSTANT = 64

# Element types packed two to a byte (and two to an int32_data entry).
PACKED_4BIT = frozenset(getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                        if hasattr(onnx.TensorProto, name))


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise InvalidModel("model declares no default-domain opset")


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


def weights_as_inputs(light: onnx.ModelProto) -> onnx.ModelProto:
    """``light`` (a ``light_copy``) with the weights it left out declared as graph inputs of
    their type and shape instead: a model onnx.checker can check in memory (a stand-in without
    values fails its check of the data; the model proper may be too large to serialise)."""
    kept = [t for t in light.graph.initializer if not is_stand_in(t)]
    listed = {i.name for i in light.graph.input}  # an initializer may be an input's default already
    inputs = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
              for t in light.graph.initializer if is_stand_in(t) and t.name not in listed]
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    light.graph.input.extend(inputs)
    return light


_VALUE_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def is_stand_in(t: onnx.TensorProto) -> bool:
    """A ``light_copy`` stand-in: a tensor with no values, here or in a file."""
    return (not t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL
            and not any(len(getattr(t, f)) for f in _VALUE_FIELDS))


def approx_size(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, from their dims (ByteSize() walks every byte)."""
    total = 0
    for t in model.graph.initializer:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 1
        total += math.prod(t.dims) * itemsize
    return total


def needs_external_data(model: onnx.ModelProto) -> bool:
    return approx_size(model) > EXTERNAL_DATA_THRESHOLD

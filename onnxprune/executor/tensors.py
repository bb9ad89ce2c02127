"""Tensors between ONNX and torch: TensorProto -> torch tensor (``tensor_from_proto``,
``constant_value``) and back into the same TensorProto (``store_tensor``, for write_back)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from ..errors import InvalidModel, UnsupportedModel, UsageError
from .ops import ONNX_TO_TORCH

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE}


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto as a (CPU, writable) torch tensor."""
    if uses_external_data(t) and not t.HasField("raw_data"):
        raise UnsupportedModel(f"tensor {t.name!r} is stored in an external file that was not loaded: "
                               "load the model with onnx.load(path) (external data included)")
    if t.data_type not in ONNX_TO_TORCH:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        raise UnsupportedModel(f"tensor {t.name!r} has type {name}, which the PyTorch executor does not handle")
    array = numpy_helper.to_array(t)
    if t.data_type == onnx.TensorProto.BFLOAT16:  # numpy has no bfloat16: move the bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes, as ONNX raw_data stores them."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _stored_bytes(t: onnx.TensorProto) -> bytes | None:
    """The bytes a TensorProto's values have in raw_data form (None if not in memory)."""
    if uses_external_data(t) and not t.HasField("raw_data"):
        return None
    if t.HasField("raw_data"):
        return t.raw_data
    return tensor_bytes(tensor_from_proto(t))


def store_tensor(proto: onnx.TensorProto, value: torch.Tensor) -> None:
    """Put ``value`` into ``proto`` in place; same name, dtype and shape, bytes untouched if equal."""
    dtype = ONNX_TO_TORCH[proto.data_type]
    if tuple(value.shape) != tuple(proto.dims):
        raise UsageError(f"parameter {proto.name!r} has shape {tuple(value.shape)}, "
                         f"its initializer {tuple(proto.dims)}: write_back cannot change shapes")
    data = tensor_bytes(value.to(dtype))
    if _stored_bytes(proto) == data:
        return
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
        proto.ClearField(name)
    proto.data_location = onnx.TensorProto.DEFAULT
    proto.raw_data = data


def constant_value(node: onnx.NodeProto) -> torch.Tensor:
    """The value of a Constant node, whichever attribute spells it."""
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None:
        raise InvalidModel(f"Constant node {node.name or node.output[0]!r} needs exactly one value attribute")
    if a.name == "value":
        return tensor_from_proto(a.t)
    if a.name in ("value_float", "value_floats"):
        return torch.tensor(helper.get_attribute_value(a), dtype=torch.float32)
    if a.name in ("value_int", "value_ints"):
        return torch.tensor(helper.get_attribute_value(a), dtype=torch.int64)
    raise UnsupportedModel(f"Constant node {node.name or node.output[0]!r}: {a.name} is not supported "
                           "by the PyTorch executor")

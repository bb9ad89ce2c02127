"""The op table's vocabulary: ``OPS``, ``HOST_INPUTS``, ``PREPARE``, the ``@op`` decorator
that fills them, the dtype maps, and the small helpers the families share. The families
(conv.py, pool.py, ...) import this module; ``ops/__init__`` imports the families, so
importing ``onnxprune.executor.ops`` fills the table."""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnx import TensorProto

Tensor = torch.Tensor
OpFn = Callable[[dict, list], "Tensor | tuple"]

OPS: dict[str, OpFn] = {}
HOST_INPUTS: dict[str, frozenset[int]] = {}
PREPARE: dict[str, Callable[[dict], dict]] = {}

ONNX_TO_TORCH = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8, TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64, TensorProto.UINT8: torch.uint8, TensorProto.UINT16: torch.uint16,
    TensorProto.UINT32: torch.uint32, TensorProto.UINT64: torch.uint64, TensorProto.BOOL: torch.bool,
    TensorProto.COMPLEX64: torch.complex64, TensorProto.COMPLEX128: torch.complex128,
}
TORCH_TO_ONNX = {v: k for k, v in ONNX_TO_TORCH.items()}


def op(*names: str, host: tuple[int, ...] = (), prepare: Callable[[dict], dict] | None = None):
    """Register the decorated function as the implementation of ``names``.

    ``host``: input positions the op reads as Python numbers (kept on the CPU);
    ``prepare``: run once per node on its attributes when the executor is built.
    """
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
            if host:
                HOST_INPUTS[name] = frozenset(host)
            if prepare:
                PREPARE[name] = prepare
        return fn
    return register


def opt(inputs: list, i: int):
    """Input ``i``, or None when it is missing (trailing optional inputs may be absent)."""
    return inputs[i] if len(inputs) > i else None


def ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def scalar(t):
    return t.reshape(-1)[0].item()


def axes_of(attrs: dict, inputs: list, position: int) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as an input (newer ones); None if neither."""
    if "axes" in attrs:
        return list(attrs["axes"])
    t = opt(inputs, position)
    return None if t is None else ints(t)


def many(x: Tensor, attrs: dict, *extra: Tensor):
    """``x`` alone for a one-output node, else ``x`` followed by the optional outputs."""
    return x if attrs["_num_outputs"] == 1 else (x, *extra[: attrs["_num_outputs"] - 1])


def torch_pad(begins, ends) -> list[int]:
    """ONNX begin/end pads (first axis first) in F.pad's order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out

"""ONNX operators as torch functions: the executor's op table.

``OPS[op_type](attrs, inputs)`` computes one node: ``attrs`` is the node's
attributes as Python values (strings decoded, tensors as torch tensors) plus
``_opset`` and ``_num_outputs``; ``inputs`` is the list of input tensors,
``None`` for a missing optional one (trailing ones may be absent). It returns
a tensor, or a tuple of tensors for a node with several outputs.

``HOST_INPUTS[op_type]`` names the input positions an op reads as Python
numbers (shapes, axes, pads, scales, ...). The executor keeps those on the CPU,
so reading them never waits for an accelerator.

``PREPARE[op_type](attrs)`` runs once per node when the executor is built: it
checks attributes (``UnsupportedModel`` for what is not implemented) and
precomputes what does not depend on the inputs.

Semantics follow the ONNX operator documents; where a numeric detail is a
choice (pooling windows in ceil mode, Resize coordinates), it follows
onnxruntime, which the tests compare against.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto

from ..errors import UnsupportedModel

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
    """Register the decorated function as the implementation of ``names``."""
    def register(fn: OpFn) -> OpFn:
        for name in names:
            OPS[name] = fn
            if host:
                HOST_INPUTS[name] = frozenset(host)
            if prepare:
                PREPARE[name] = prepare
        return fn
    return register


# --- small helpers ----------------------------------------------------------------------------

def _opt(inputs: list, i: int):
    return inputs[i] if len(inputs) > i else None


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _scalar(t):
    return t.reshape(-1)[0].item()


def _axes(attrs: dict, inputs: list, position: int) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as an input (newer ones); None if neither."""
    if "axes" in attrs:
        return list(attrs["axes"])
    t = _opt(inputs, position)
    return None if t is None else _ints(t)


def _many(x: Tensor, attrs: dict, *extra: Tensor):
    """``x`` alone for a one-output node, else ``x`` followed by the optional outputs."""
    return x if attrs["_num_outputs"] == 1 else (x, *extra[: attrs["_num_outputs"] - 1])


def _torch_pad(begins, ends) -> list[int]:
    """ONNX begin/end pads (first axis first) in F.pad's order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


# --- elementwise ------------------------------------------------------------------------------

def _unary(fn):
    return lambda attrs, inputs: fn(inputs[0])


def _binary(fn):
    return lambda attrs, inputs: fn(inputs[0], inputs[1])


for _name, _fn in {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal,
    "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign,
    "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh,
    "Acosh": torch.acosh, "Atanh": torch.atanh, "IsNaN": torch.isnan, "Not": torch.logical_not,
    "Softsign": F.softsign, "Mish": F.mish, "HardSwish": F.hardswish, "Softplus": F.softplus,
}.items():
    OPS[_name] = _unary(_fn)

for _name, _fn in {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "MatMul": torch.matmul,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}.items():
    OPS[_name] = _binary(_fn)


@op("Div")
def div(attrs, inputs):
    a, b = inputs
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates, like C


@op("Mod")
def mod(attrs, inputs):
    a, b = inputs
    # fmod=1: sign of the dividend (C fmod); fmod=0: sign of the divisor (Python %).
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


@op("Pow")
def pow_(attrs, inputs):
    base, exponent = inputs
    out = torch.pow(base, exponent)
    return out if out.dtype == base.dtype else out.to(base.dtype)  # the result has the base's type


@op("Where")
def where(attrs, inputs):
    return torch.where(inputs[0], inputs[1], inputs[2])


def _nary(fn):
    return lambda attrs, inputs: functools.reduce(fn, inputs)


OPS["Max"] = _nary(torch.maximum)
OPS["Min"] = _nary(torch.minimum)
OPS["Sum"] = _nary(torch.add)


@op("Mean")
def mean(attrs, inputs):
    return functools.reduce(torch.add, inputs) / len(inputs)


@op("IsInf")
def is_inf(attrs, inputs):
    x = inputs[0]
    neg, pos = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    if neg and pos:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    return torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool)


# --- activations with attributes ----------------------------------------------------------------

@op("LeakyRelu")
def leaky_relu(attrs, inputs):
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


@op("PRelu")
def prelu(attrs, inputs):
    x, slope = inputs
    return torch.where(x < 0, x * slope, x)


@op("Elu")
def elu(attrs, inputs):
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


@op("Celu")
def celu(attrs, inputs):
    return F.celu(inputs[0], attrs.get("alpha", 1.0))


@op("Selu")
def selu(attrs, inputs):
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return gamma * F.elu(inputs[0], alpha)


@op("ThresholdedRelu")
def thresholded_relu(attrs, inputs):
    x = inputs[0]
    return torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x))


@op("HardSigmoid")
def hard_sigmoid(attrs, inputs):
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0)


@op("Shrink")
def shrink(attrs, inputs):
    x = inputs[0]
    bias, lambd = attrs.get("bias", 0.0), attrs.get("lambd", 0.5)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@op("Gelu")
def gelu(attrs, inputs):
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


@op("Clip", host=(1, 2))
def clip(attrs, inputs):
    x = inputs[0]
    lo, hi = _opt(inputs, 1), _opt(inputs, 2)
    lo = attrs.get("min") if lo is None else _scalar(lo)  # opset < 11: attributes
    hi = attrs.get("max") if hi is None else _scalar(hi)
    return torch.clamp(x, lo, hi)


def _prepare_softmax(attrs):
    attrs.setdefault("axis", -1 if attrs["_opset"] >= 13 else 1)
    return attrs


def _softmax_like(fn):
    def apply(attrs, inputs):
        x, axis = inputs[0], attrs["axis"]
        if attrs["_opset"] >= 13 or axis % max(x.ndim, 1) == x.ndim - 1:
            return fn(x, axis)
        # Before opset 13 the input is flattened to 2-D at `axis` and normalised over the second part.
        axis %= x.ndim
        return fn(x.reshape(math.prod(x.shape[:axis]), -1), 1).reshape(x.shape)
    return apply


def _hardmax(x, axis):
    return torch.zeros_like(x).scatter_(axis, x.argmax(axis, keepdim=True), 1)


for _name, _fn in {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax, "Hardmax": _hardmax}.items():
    op(_name, prepare=_prepare_softmax)(_softmax_like(_fn))


# --- linear algebra ------------------------------------------------------------------------------

@op("Gemm")
def gemm(attrs, inputs):
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        if alpha == 1.0 and beta == 1.0 and (c is None or c.shape == b.shape[:1]):
            return F.linear(a, b, c)  # the common Linear layer: one fused call
        b = b.t()
    if c is None:
        out = a @ b
        return out if alpha == 1.0 else out * alpha
    return torch.addmm(c, a, b, beta=beta, alpha=alpha)


@op("Einsum")
def einsum(attrs, inputs):
    return torch.einsum(attrs["equation"].replace(" ", ""), *inputs)


# --- convolution ------------------------------------------------------------------------------------

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CONV_T = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


def _window(attrs, n: int):
    """(strides, dilations) of a conv/pool node with ``n`` spatial axes."""
    return list(attrs.get("strides") or [1] * n), list(attrs.get("dilations") or [1] * n)


def _same_pads(sizes, kernel, strides, dilations, lower: bool):
    """auto_pad SAME_*: output size ceil(in / stride); the odd pixel goes last (UPPER) or first (LOWER)."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small = total // 2
        begins.append(total - small if lower else small)
        ends.append(small if lower else total - small)
    return begins, ends


def _pads(attrs, sizes, kernel, strides, dilations):
    """(begins, ends) for the spatial axes, resolving auto_pad."""
    auto = attrs.get("auto_pad", "NOTSET")
    n = len(kernel)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(sizes, kernel, strides, dilations, auto == "SAME_LOWER")
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = list(attrs.get("pads") or [0] * (2 * n))
    return pads[:n], pads[n:]


def _prepare_conv(attrs):
    """Precompute torch arguments when padding does not depend on the input size."""
    kernel = attrs.get("kernel_shape")
    attrs["_static"] = None
    if kernel and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"):
        n = len(kernel)
        strides, dilations = _window(attrs, n)
        begins, ends = _pads(attrs, None, kernel, strides, dilations)
        if begins == ends:
            attrs["_static"] = (strides, begins, dilations, attrs.get("group", 1))
    return attrs


@op("Conv", prepare=_prepare_conv)
def conv(attrs, inputs):
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    static = attrs["_static"]
    if static is not None:
        return _CONV[x.ndim](x, w, b, *static)
    kernel = list(w.shape[2:])
    strides, dilations = _window(attrs, len(kernel))
    begins, ends = _pads(attrs, x.shape[2:], kernel, strides, dilations)
    if begins == ends:
        return _CONV[x.ndim](x, w, b, strides, begins, dilations, attrs.get("group", 1))
    x = F.pad(x, _torch_pad(begins, ends))
    return _CONV[x.ndim](x, w, b, strides, 0, dilations, attrs.get("group", 1))


@op("ConvTranspose")
def conv_transpose(attrs, inputs):
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides, dilations = _window(attrs, n)
    extra = list(attrs.get("output_padding") or [0] * n)
    group = attrs.get("group", 1)
    full = [s * (i - 1) + e + (k - 1) * d + 1
            for i, s, e, k, d in zip(x.shape[2:], strides, extra, kernel, dilations)]
    begins, ends = _transpose_pads(attrs, x.shape[2:], full, strides)
    if begins == ends and all(e < max(s, d) for e, s, d in zip(extra, strides, dilations)):
        return _CONV_T[x.ndim](x, w, b, strides, begins, extra, group, dilations)
    # General case: the full output, `extra` zero rows at the end (they receive only the bias), then crop.
    y = _CONV_T[x.ndim](x, w, None, strides, 0, 0, group, dilations)
    y = F.pad(y, _torch_pad([0] * n, extra))
    y = F.pad(y, _torch_pad([-p for p in begins], [-p for p in ends]))
    return y if b is None else y + b.reshape(1, -1, *[1] * n)


def _transpose_pads(attrs, sizes, full, strides):
    """ConvTranspose pads: explicit, or from output_shape / auto_pad (the odd pixel as onnxruntime puts it)."""
    auto = attrs.get("auto_pad", "NOTSET")
    target = attrs.get("output_shape")
    if target is None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        n = len(full)
        pads = list(attrs.get("pads") or [0] * (2 * n)) if auto != "VALID" else [0] * (2 * n)
        return pads[:n], pads[n:]
    if target is None:
        target = [i * s for i, s in zip(sizes, strides)]
    target = list(target)[-len(full):]
    begins, ends = [], []
    for f, t in zip(full, target):
        total = f - t
        if total < 0:  # a larger output than the kernel covers: zeros (plus bias) at the end
            begins.append(0)
            ends.append(total)
            continue
        small = total // 2
        begins.append(total - small if auto == "SAME_LOWER" else small)
        ends.append(small if auto == "SAME_LOWER" else total - small)
    return begins, ends


# --- pooling ---------------------------------------------------------------------------------------

_MAX_POOL = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}
_AVG_POOL = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}


def _pool_geometry(attrs, x):
    kernel = list(attrs["kernel_shape"])
    strides, dilations = _window(attrs, len(kernel))
    begins, ends = _pads(attrs, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, begins, ends


def _fits_torch(kernel, begins, ends) -> bool:
    """torch pools take symmetric padding of at most half the kernel."""
    return begins == ends and all(2 * p <= k for p, k in zip(begins, kernel))


def _pooled_sizes(sizes, kernel, strides, dilations, begins, ends, ceil: bool) -> list[int]:
    """Output sizes as onnxruntime (and torch) count them: in ceil mode a last window that
    would start beyond the input and its leading pad is dropped."""
    out = []
    for n, k, s, d, b, e in zip(sizes, kernel, strides, dilations, begins, ends):
        span = n + b + e - ((k - 1) * d + 1)
        size = (-(-span // s) if ceil else span // s) + 1
        if ceil and (size - 1) * s >= n + b:
            size -= 1
        out.append(size)
    return out


def _crop(y, sizes):
    """The leading ``sizes`` of y's spatial axes (explicit padding can add a window at the end)."""
    if list(y.shape[2:]) == sizes:
        return y
    return y[(slice(None), slice(None), *[slice(0, n) for n in sizes])]


@op("MaxPool")
def max_pool(attrs, inputs):
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(attrs, x)
    ceil = bool(attrs.get("ceil_mode", 0))
    want_indices = attrs["_num_outputs"] > 1
    if _fits_torch(kernel, begins, ends):
        out = _MAX_POOL[x.ndim](x, kernel, strides, begins, dilations, ceil, return_indices=want_indices)
        if not want_indices:
            return out
        return out[0], _onnx_pool_indices(out[1], x.shape, attrs.get("storage_order", 0))
    padded = F.pad(x, _torch_pad(begins, ends), value=float("-inf"))
    out = _MAX_POOL[x.ndim](padded, kernel, strides, 0, dilations, ceil, return_indices=want_indices)
    sizes = _pooled_sizes(x.shape[2:], kernel, strides, dilations, begins, ends, ceil)
    if not want_indices:
        return _crop(out, sizes)
    values, indices = out
    indices = _unpad_indices(indices, padded.shape[2:], x.shape[2:], begins)
    return _crop(values, sizes), _onnx_pool_indices(_crop(indices, sizes), x.shape, attrs.get("storage_order", 0))


def _unpad_indices(indices, padded_sizes, sizes, begins):
    """Flat spatial indices into the padded input -> flat spatial indices into the input."""
    rest = indices
    coords = []
    for padded in reversed(padded_sizes):
        coords.append(rest % padded)
        rest = rest // padded
    coords.reverse()
    flat = torch.zeros_like(indices)
    for coord, size, begin in zip(coords, sizes, begins):
        flat = flat * size + (coord - begin)
    return flat


def _onnx_pool_indices(indices, shape, storage_order: int):
    """torch's per-channel flat indices -> ONNX's indices into the whole flattened tensor."""
    sizes = list(shape[2:])
    if storage_order:  # column-major over the spatial axes
        coords, rest = [], indices
        for size in reversed(sizes):
            coords.append(rest % size)
            rest = rest // size
        coords.reverse()
        indices = torch.zeros_like(indices)
        for coord, size in zip(reversed(coords), reversed(sizes)):
            indices = indices * size + coord
    plane = math.prod(sizes)
    base = torch.arange(shape[0] * shape[1], device=indices.device).reshape(shape[0], shape[1], *[1] * len(sizes))
    return indices + base * plane


def _prepare_avg_pool(attrs):
    if any(d != 1 for d in attrs.get("dilations") or []):
        raise UnsupportedModel("AveragePool with dilations is not implemented in the PyTorch executor")
    return attrs


@op("AveragePool", prepare=_prepare_avg_pool)
def average_pool(attrs, inputs):
    x = inputs[0]
    kernel, strides, _, begins, ends = _pool_geometry(attrs, x)
    ceil = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))
    pool = _AVG_POOL[x.ndim]
    if _fits_torch(kernel, begins, ends):
        return pool(x, kernel, strides, begins, ceil, include_pad)
    # Pad explicitly; torch then divides by the window's size inside the padded input
    # (which is count_include_pad=1); for count_include_pad=0 rescale by the real share.
    sizes = _pooled_sizes(x.shape[2:], kernel, strides, [1] * len(kernel), begins, ends, ceil)
    out = _crop(pool(F.pad(x, _torch_pad(begins, ends)), kernel, strides, 0, ceil, True), sizes)
    if include_pad:
        return out
    inside = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(begins, ends))
    return out / _crop(pool(inside, kernel, strides, 0, ceil, True), sizes)


@op("GlobalAveragePool")
def global_average_pool(attrs, inputs):
    x = inputs[0]
    return x.mean(tuple(range(2, x.ndim)), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(attrs, inputs):
    x = inputs[0]
    return x.amax(tuple(range(2, x.ndim)), keepdim=True)


# --- normalisation ---------------------------------------------------------------------------------

def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(1, -1, *[1] * (ndim - 2))


@op("BatchNormalization")
def batch_norm(attrs, inputs):
    # Always inference statistics (training_mode is ignored: the executor fine-tunes a fixed graph).
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    if torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad):
        # F.batch_norm has no gradient for the running statistics: spell it out.
        a = scale * torch.rsqrt(var + eps)
        y = torch.addcmul(_channel_view(bias - mean * a, x.ndim), x, _channel_view(a, x.ndim))
    else:
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    return _many(y, attrs, mean, var)


@op("InstanceNormalization")
def instance_norm(attrs, inputs):
    x, scale, bias = inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5))


@op("GroupNormalization")
def group_norm(attrs, inputs):
    x, scale, bias = inputs
    groups = attrs["num_groups"]
    channels = x.shape[1]
    if scale.numel() == groups != channels:  # opset 18: one scale/bias per group
        scale, bias = scale.repeat_interleave(channels // groups), bias.repeat_interleave(channels // groups)
    return F.group_norm(x, groups, scale, bias, attrs.get("epsilon", 1e-5))


@op("LayerNormalization")
def layer_norm(attrs, inputs):
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    axis = attrs.get("axis", -1) % x.ndim
    shape = x.shape[axis:]
    eps = attrs.get("epsilon", 1e-5)
    if scale.shape != shape:
        scale = scale.expand(shape)
    if bias is not None and bias.shape != shape:
        bias = bias.expand(shape)
    y = F.layer_norm(x, shape, scale, bias, eps)
    if attrs["_num_outputs"] == 1:
        return y
    dims = tuple(range(axis, x.ndim))
    var, mu = torch.var_mean(x.float(), dims, correction=0, keepdim=True)
    return y, mu, torch.rsqrt(var + eps)


@op("LRN")
def lrn(attrs, inputs):
    x = inputs[0]
    size = attrs["size"]
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    # Sum of squares over `size` neighbouring channels: floor((size-1)/2) before, ceil after.
    sq = (x * x).reshape(x.shape[0], 1, x.shape[1], -1)
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size // 2))
    sums = F.avg_pool2d(sq, (size, 1), stride=1).reshape(x.shape) * size
    return x / (bias + alpha / size * sums) ** beta


# --- reductions ---------------------------------------------------------------------------------------

def _reduce(fn):
    def apply(attrs, inputs):
        x = inputs[0]
        axes = _axes(attrs, inputs, 1)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        return fn(x, [a % x.ndim for a in axes] if x.ndim else [], keep)
    return apply


def _same_dtype(fn):
    """torch widens integer sums to int64; ONNX keeps the input's type."""
    def apply(x, axes, keep):
        out = fn(x, axes, keep)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    return apply


def _reduce_prod(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = x.prod(a, keepdim=keep)
    return x


def _reduce_mean(x, axes, keep):
    return x.mean(axes, keepdim=keep) if x.is_floating_point() else x.double().mean(axes, keepdim=keep)


for _name, _fn in {
    "ReduceMean": _reduce_mean,
    "ReduceSum": lambda x, a, k: x.sum(a, keepdim=k),
    "ReduceMax": lambda x, a, k: x.amax(a, keepdim=k),
    "ReduceMin": lambda x, a, k: x.amin(a, keepdim=k),
    "ReduceProd": _reduce_prod,
    "ReduceL1": lambda x, a, k: x.abs().sum(a, keepdim=k),
    "ReduceL2": lambda x, a, k: (x * x).sum(a, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, a, k: (x * x).sum(a, keepdim=k),
    "ReduceLogSum": lambda x, a, k: x.sum(a, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, a, k: torch.logsumexp(x, a, keepdim=k),
}.items():
    op(_name, host=(1,))(_reduce(_same_dtype(_fn)))


def _arg(fn):
    def apply(attrs, inputs):
        x = inputs[0]
        axis = attrs.get("axis", 0) % x.ndim
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)
        return fn(x, axis, keepdim=keep)
    return apply


OPS["ArgMax"] = _arg(torch.argmax)
OPS["ArgMin"] = _arg(torch.argmin)


@op("TopK", host=(1,))
def top_k(attrs, inputs):
    x, k = inputs[0], int(_scalar(inputs[1]))
    values, indices = torch.topk(x, k, dim=attrs.get("axis", -1), largest=bool(attrs.get("largest", 1)),
                                 sorted=bool(attrs.get("sorted", 1)))
    return values, indices


@op("CumSum", host=(1,))
def cum_sum(attrs, inputs):
    x, axis = inputs[0], int(_scalar(inputs[1]))
    reverse, exclusive = attrs.get("reverse", 0), attrs.get("exclusive", 0)
    y = x.flip(axis) if reverse else x
    y = y.cumsum(axis, dtype=x.dtype)
    if exclusive:  # shift by one: exact, unlike subtracting x
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if reverse else y


# --- shape and layout --------------------------------------------------------------------------------

@op("Identity", "Dropout")
def identity(attrs, inputs):
    x = inputs[0]  # Dropout: identity, in training too (the graph is fine-tuned as exported)
    if attrs["_num_outputs"] == 1:
        return x
    return x, torch.ones_like(x, dtype=torch.bool)


@op("Shape")
def shape(attrs, inputs):
    # On the host: shape arithmetic stays on the CPU whatever device the data is on.
    dims = inputs[0].shape[attrs.get("start", 0): attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


@op("Size")
def size(attrs, inputs):
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


@op("Reshape", host=(1,))
def reshape(attrs, inputs):
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0) and 0 in shape:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]  # 0 copies the input's dim
    return x.reshape(shape)


@op("Flatten")
def flatten(attrs, inputs):
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Squeeze", host=(1,))
def squeeze(attrs, inputs):
    x = inputs[0]
    axes = _axes(attrs, inputs, 1)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.ndim for a in axes))


@op("Unsqueeze", host=(1,))
def unsqueeze(attrs, inputs):
    x = inputs[0]
    axes = _axes(attrs, inputs, 1)
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


@op("Transpose")
def transpose(attrs, inputs):
    x = inputs[0]
    perm = attrs.get("perm")
    return x.permute(perm if perm is not None else list(reversed(range(x.ndim))))


@op("Expand", host=(1,))
def expand(attrs, inputs):
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(x.shape, tuple(_ints(inputs[1]))))


@op("Tile", host=(1,))
def tile(attrs, inputs):
    return inputs[0].repeat(_ints(inputs[1]))


@op("Concat")
def concat(attrs, inputs):
    return torch.cat([t for t in inputs if t is not None], attrs["axis"])


@op("Split", host=(1,))
def split(attrs, inputs):
    x = inputs[0]
    axis = attrs.get("axis", 0)
    sizes = attrs.get("split")
    if sizes is None and _opt(inputs, 1) is not None:
        sizes = _ints(inputs[1])
    if sizes is None:  # equal parts; with num_outputs (opset 18) the last one may be smaller
        parts = attrs.get("num_outputs", attrs["_num_outputs"])
        sizes = math.ceil(x.shape[axis] / parts)
    return tuple(torch.split(x, sizes, axis))


@op("Slice", host=(1, 2, 3, 4))
def slice_(attrs, inputs):
    x = inputs[0]
    if "starts" in attrs:  # opset < 10: attributes
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = None if _opt(inputs, 3) is None else _ints(inputs[3])
        steps = None if _opt(inputs, 4) is None else _ints(inputs[4])
    axes = list(range(len(starts))) if axes is None else axes
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.ndim
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.ndim
        n = x.shape[axis]
        start = start + n if start < 0 else start
        end = end + n if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), n), min(max(end, 0), n), step)
        else:  # negative step: slice the flipped axis forwards
            start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
            flips.append(axis)
            index[axis] = slice(n - 1 - start, max(n - 1 - end, n - 1 - start), -step)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@op("Gather")
def gather(attrs, inputs):
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.ndim
    if idx.ndim == 0 and idx.device.type == "cpu":
        return x.select(axis, int(idx))
    n = x.shape[axis]
    if axis == 0 and x.ndim == 2 and x.is_floating_point():
        return F.embedding(idx.remainder(n), x)
    out = x.index_select(axis, idx.reshape(-1).remainder(n))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


@op("GatherElements")
def gather_elements(attrs, inputs):
    x, idx = inputs
    axis = attrs.get("axis", 0) % x.ndim
    return torch.gather(x, axis, idx.long().remainder(x.shape[axis]))


def _nd_positions(data_shape, indices, batch_dims: int):
    """GatherND/ScatterND indices -> (flattened batch, flat positions into the indexed dims)."""
    k = indices.shape[-1]
    dims = data_shape[batch_dims: batch_dims + k]
    idx = indices.long()
    flat = torch.zeros(idx.shape[:-1], dtype=torch.int64, device=idx.device)
    for i, n in enumerate(dims):
        flat = flat * n + idx[..., i].remainder(n)
    return flat, math.prod(dims)


@op("GatherND")
def gather_nd(attrs, inputs):
    x, indices = inputs
    b = attrs.get("batch_dims", 0)
    k = indices.shape[-1]
    flat, count = _nd_positions(x.shape, indices, b)
    batch = math.prod(x.shape[:b])
    rest = x.shape[b + k:]
    data = x.reshape(batch, count, *rest)
    pos = flat.reshape(batch, -1)
    out = data[torch.arange(batch, device=x.device).unsqueeze(1), pos]
    return out.reshape(*indices.shape[:-1], *rest)


@op("ScatterND")
def scatter_nd(attrs, inputs):
    x, indices, updates = inputs
    k = indices.shape[-1]
    flat, count = _nd_positions(x.shape, indices, 0)
    rest = x.shape[k:]
    data = x.reshape(count, *rest)
    src = updates.reshape(-1, *rest)
    flat = flat.reshape(-1)
    mode = attrs.get("reduction", "none")
    if mode == "none":
        out = data.index_copy(0, flat, src)
    elif mode == "add":
        out = data.index_add(0, flat, src)
    else:
        index = flat.reshape(-1, *[1] * len(rest)).expand_as(src)
        out = data.scatter_reduce(0, index, src, {"mul": "prod", "max": "amax", "min": "amin"}[mode])
    return out.reshape(x.shape)


@op("ScatterElements", "Scatter")
def scatter_elements(attrs, inputs):
    x, idx, updates = inputs
    axis = attrs.get("axis", 0) % x.ndim
    idx = idx.long().remainder(x.shape[axis])
    mode = attrs.get("reduction", "none")
    if mode == "none":
        return x.scatter(axis, idx, updates)
    return x.scatter_reduce(axis, idx, updates, {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[mode])


@op("OneHot", host=(1,))
def one_hot(attrs, inputs):
    idx, depth, values = inputs
    depth = int(_scalar(depth))
    idx = torch.where(idx < 0, idx + depth, idx)
    rank = idx.ndim + 1
    axis = attrs.get("axis", -1) % rank
    classes = torch.arange(depth, device=idx.device).reshape(depth, *[1] * (rank - 1 - axis))
    hot = idx.unsqueeze(axis) == classes
    return torch.where(hot, values[1], values[0])


@op("NonZero")
def non_zero(attrs, inputs):
    return torch.nonzero(inputs[0]).t().contiguous()


@op("Trilu", host=(1,))
def trilu(attrs, inputs):
    k = 0 if _opt(inputs, 1) is None else int(_scalar(inputs[1]))
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


@op("Pad", host=(1, 2, 3))
def pad(attrs, inputs):
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = _ints(inputs[1])
        value = 0 if _opt(inputs, 2) is None else _scalar(inputs[2])
        axes = None if _opt(inputs, 3) is None else _ints(inputs[3])
    axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in axes]
    n = len(axes)
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for a, b, e in zip(axes, pads[:n], pads[n:]):
        begins[a], ends[a] = b, e
    if mode == "constant":
        return F.pad(x, _torch_pad(begins, ends), value=value)
    for axis, (b, e) in enumerate(zip(begins, ends)):
        if b or e:
            x = x.index_select(axis, _pad_index(mode, x.shape[axis], b, e).to(x.device))
    return x


@functools.lru_cache(maxsize=256)
def _pad_index(mode: str, n: int, begin: int, end: int) -> Tensor:
    """Source positions of a reflect/edge/wrap-padded axis (negative pads crop)."""
    idx = np.arange(-begin, n + end)
    if mode == "edge":
        idx = np.clip(idx, 0, n - 1)
    elif mode == "wrap":
        idx = idx % n
    elif mode == "reflect":
        period = 2 * (n - 1)
        idx = np.zeros_like(idx) if n == 1 else np.abs(idx) % period
        idx = np.where(idx >= n, period - idx, idx)
    else:
        raise UnsupportedModel(f"Pad mode {mode!r} is not implemented in the PyTorch executor")
    return torch.from_numpy(idx.astype(np.int64))


@op("DepthToSpace")
def depth_to_space(attrs, inputs):
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // bs**2, h * bs, w * bs)


@op("SpaceToDepth")
def space_to_depth(attrs, inputs):
    x = inputs[0]
    bs = attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs**2, h // bs, w // bs)


# --- type and constant generation ---------------------------------------------------------------

def _prepare_cast(attrs):
    if attrs["to"] not in ONNX_TO_TORCH:
        name = TensorProto.DataType.Name(attrs["to"])
        raise UnsupportedModel(f"Cast to {name} is not implemented in the PyTorch executor")
    attrs["_dtype"] = ONNX_TO_TORCH[attrs["to"]]
    return attrs


@op("Cast", prepare=_prepare_cast)
def cast(attrs, inputs):
    return inputs[0].to(attrs["_dtype"])


@op("CastLike")
def cast_like(attrs, inputs):
    return inputs[0].to(inputs[1].dtype)


@op("ConstantOfShape", host=(0,))
def constant_of_shape(attrs, inputs):
    value = attrs.get("value")
    shape = _ints(inputs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32)
    return torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype)


@op("Range", host=(0, 1, 2))
def range_(attrs, inputs):
    start, limit, delta = inputs
    return torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype)


# --- Resize / Upsample ------------------------------------------------------------------------------

def _prepare_resize(attrs):
    if attrs.get("antialias", 0):
        raise UnsupportedModel("Resize with antialias=1 is not implemented in the PyTorch executor")
    mode = attrs.get("coordinate_transformation_mode", "half_pixel")
    if mode == "tf_crop_and_resize":
        raise UnsupportedModel("Resize tf_crop_and_resize is not implemented in the PyTorch executor")
    if attrs.get("mode", "nearest") not in ("nearest", "linear", "cubic", "bilinear"):
        raise UnsupportedModel(f"Resize mode {attrs.get('mode')!r} is not implemented in the PyTorch executor")
    return attrs


@op("Resize", host=(1, 2, 3), prepare=_prepare_resize)
def resize(attrs, inputs):
    x = inputs[0]
    if attrs["_opset"] < 11:  # Resize-10: (X, scales)
        scales, sizes = inputs[1], None
    else:
        scales, sizes = _opt(inputs, 2), _opt(inputs, 3)
    scales = None if scales is None or scales.numel() == 0 else [float(s) for s in scales.tolist()]
    sizes = None if sizes is None or sizes.numel() == 0 else _ints(sizes)
    axes = [a % x.ndim for a in attrs.get("axes", range(x.ndim))]
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    out_sizes, out_scales = _resize_target(x.shape, axes, scales, sizes, policy)
    return _resample(x, axes, out_sizes, out_scales, attrs)


@op("Upsample", host=(1,))
def upsample(attrs, inputs):
    x = inputs[0]
    scales = attrs.get("scales") or [float(s) for s in inputs[1].tolist()]
    sizes = [int(math.floor(n * s)) for n, s in zip(x.shape, scales)]
    mode = attrs.get("mode", "nearest")
    settings = {"mode": "linear" if mode in ("linear", "bilinear") else mode,
                "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return _resample(x, list(range(x.ndim)), sizes, scales, settings)


def _resize_target(shape, axes, scales, sizes, policy):
    """(output sizes, scales) for the resized axes."""
    if sizes is None:
        return [int(math.floor(shape[a] * s)) for a, s in zip(axes, scales)], scales
    if policy == "stretch":
        return sizes, [s / shape[a] for a, s in zip(axes, sizes)]
    ratios = [s / shape[a] for a, s in zip(axes, sizes)]
    scale = min(ratios) if policy == "not_larger" else max(ratios)
    return [int(math.floor(shape[a] * scale + 0.5)) for a in axes], [scale] * len(axes)


def _resample(x, axes, sizes, scales, attrs):
    """Separable resampling: one 1-D interpolation per axis whose size or scale changes."""
    mode = attrs.get("mode", "nearest")
    for axis, out, scale in zip(axes, sizes, scales):
        n = x.shape[axis]
        if out == n and scale == 1.0:
            continue
        coords = _source_coords(attrs.get("coordinate_transformation_mode", "half_pixel"), n, out, scale)
        if mode == "nearest":
            idx = _nearest(coords, n, attrs.get("nearest_mode", "round_prefer_floor"))
            x = x.index_select(axis, idx.to(x.device))
        elif mode in ("linear", "bilinear"):
            x = _interpolate(x, axis, *_linear_taps(coords, n))
        else:
            x = _interpolate(x, axis, *_cubic_taps(coords, n, attrs.get("cubic_coeff_a", -0.75),
                                                   bool(attrs.get("exclude_outside", 0))))
    return x


@functools.lru_cache(maxsize=256)
def _source_coords(mode: str, n: int, out: int, scale: float) -> tuple:
    """Input coordinate of each output position along one axis (float64)."""
    i = np.arange(out, dtype=np.float64)
    if mode == "asymmetric":
        c = i / scale
    elif mode == "align_corners":
        c = np.zeros(out) if out == 1 else i * (n - 1) / (out - 1)
    elif mode == "pytorch_half_pixel":
        c = (i + 0.5) / scale - 0.5 if out > 1 else np.zeros(out)
    elif mode == "half_pixel_symmetric":
        adjustment = out / (scale * n)
        c = (n / 2) * (1 - adjustment) + (i + 0.5) / scale - 0.5
    else:  # half_pixel
        c = (i + 0.5) / scale - 0.5
    return tuple(c.tolist())


@functools.lru_cache(maxsize=256)
def _nearest(coords: tuple, n: int, rounding: str) -> Tensor:
    c = np.asarray(coords)
    if rounding == "floor":
        idx = np.floor(c)
    elif rounding == "ceil":
        idx = np.ceil(c)
    elif rounding == "round_prefer_ceil":
        idx = np.floor(c + 0.5)
    else:  # round_prefer_floor
        idx = np.ceil(c - 0.5)
    return torch.from_numpy(np.clip(idx, 0, n - 1).astype(np.int64))


@functools.lru_cache(maxsize=256)
def _linear_taps(coords: tuple, n: int):
    c = np.clip(np.asarray(coords), 0, n - 1)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = c - lo
    return torch.from_numpy(np.stack([lo, hi])), torch.from_numpy(np.stack([1 - frac, frac]))


@functools.lru_cache(maxsize=256)
def _cubic_taps(coords: tuple, n: int, a: float, exclude_outside: bool):
    c = np.asarray(coords)
    base = np.floor(c).astype(np.int64)
    t = c - base
    offsets = np.arange(-1, 3)
    idx = base[None, :] + offsets[:, None]
    dist = np.abs(t[None, :] - offsets[:, None])
    w = np.where(dist <= 1, ((a + 2) * dist - (a + 3)) * dist * dist + 1,
                 np.where(dist < 2, ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a, 0.0))
    if exclude_outside:
        w = np.where((idx < 0) | (idx >= n), 0.0, w)
        w = w / w.sum(0, keepdims=True)
    return torch.from_numpy(np.clip(idx, 0, n - 1)), torch.from_numpy(w)


def _interpolate(x, axis, idx, weights):
    """sum_k weights[k] * x[idx[k]] along ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    idx, weights = idx.to(x.device), weights.to(x.device, x.dtype)
    out = None
    for k in range(idx.shape[0]):
        term = x.index_select(axis, idx[k]) * weights[k].reshape(shape)
        out = term if out is None else out + term
    return out

"""Elementwise ops, unary and n-ary with numpy broadcasting (rules/elementwise.py): arithmetic,
comparisons, logic and bitwise ops, the activations, Cast, Identity and Dropout."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from onnx import TensorProto

from ...errors import UnsupportedModel
from .registry import ONNX_TO_TORCH, OPS, op, opt, scalar


def _unary(fn):
    return lambda attrs, inputs: fn(inputs[0])


def _binary(fn):
    return lambda attrs, inputs: fn(inputs[0], inputs[1])


def _nary(fn):
    return lambda attrs, inputs: functools.reduce(fn, inputs)


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
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}.items():
    OPS[_name] = _binary(_fn)

OPS["Max"] = _nary(torch.maximum)
OPS["Min"] = _nary(torch.minimum)
OPS["Sum"] = _nary(torch.add)


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


# --- bitwise ------------------------------------------------------------------------------------

# torch has no bitwise_not (and, on some devices, no and/or/xor) for the wide unsigned types;
# the same bits viewed as signed integers give the same result bits.
_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _bitwise(fn):
    def apply(attrs, inputs):
        dtype = inputs[0].dtype
        signed = _SIGNED_VIEW.get(dtype)
        if signed is None:
            return fn(*inputs)
        return fn(*(t.view(signed) for t in inputs)).view(dtype)
    return apply


for _name, _fn in {"BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
                   "BitwiseXor": torch.bitwise_xor, "BitwiseNot": torch.bitwise_not}.items():
    OPS[_name] = _bitwise(_fn)


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
    lo, hi = opt(inputs, 1), opt(inputs, 2)
    lo = attrs.get("min") if lo is None else scalar(lo)  # opset < 11: attributes
    hi = attrs.get("max") if hi is None else scalar(hi)
    return torch.clamp(x, lo, hi)


# --- identity and type conversion ----------------------------------------------------------------

@op("Identity", "Dropout")
def identity(attrs, inputs):
    x = inputs[0]  # Dropout: identity, in training too (the graph is fine-tuned as exported)
    if attrs["_num_outputs"] == 1:
        return x
    return x, torch.ones_like(x, dtype=torch.bool)


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

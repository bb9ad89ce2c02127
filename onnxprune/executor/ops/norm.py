"""Normalisation (rules/norm.py): BatchNormalization, InstanceNormalization, GroupNormalization,
LayerNormalization, Softmax/LogSoftmax/Hardmax; and LRN, which has no channel rule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import Tensor, many, op, opt


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
    return many(y, attrs, mean, var)


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
    x, scale, bias = inputs[0], inputs[1], opt(inputs, 2)
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


# --- Softmax, LogSoftmax, Hardmax -----------------------------------------------------------------

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

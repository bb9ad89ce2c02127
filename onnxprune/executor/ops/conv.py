"""Convolution (rules/conv.py): Conv and ConvTranspose, and the window arithmetic
(strides, dilations, explicit and automatic pads) that the pools share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .registry import op, opt, torch_pad

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_CONV_T = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}


def window(attrs, n: int):
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


def spatial_pads(attrs, sizes, kernel, strides, dilations):
    """(begins, ends) for the spatial axes, resolving auto_pad (``sizes`` is needed only for SAME_*)."""
    auto = attrs.get("auto_pad", "NOTSET")
    n = len(kernel)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(sizes, kernel, strides, dilations, auto == "SAME_LOWER")
    if auto == "VALID":
        return [0] * n, [0] * n
    explicit = list(attrs.get("pads") or [0] * (2 * n))
    return explicit[:n], explicit[n:]


def _prepare_conv(attrs):
    """Precompute torch arguments when padding does not depend on the input size."""
    kernel = attrs.get("kernel_shape")
    attrs["_static"] = None
    if kernel and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"):
        n = len(kernel)
        strides, dilations = window(attrs, n)
        begins, ends = spatial_pads(attrs, None, kernel, strides, dilations)
        if begins == ends:
            attrs["_static"] = (strides, begins, dilations, attrs.get("group", 1))
    return attrs


def _depthwise_layout(x, w, group: int):
    """``x`` and ``w`` channels-last for a 2-D depthwise convolution on the CPU, else as they are.

    torch's CPU depthwise kernels are several times faster on channels-last tensors (measured
    2-4x at EfficientNet-Lite's sizes; a training step of the pruned EfficientNet-Lite1, forward
    and backward at batch 16: 13.4-14.6 -> 17.6-17.8 samples/s on 2 cores). The output stays
    channels-last: copying it back measured slower than the ops after it (pads, clips,
    pointwise convolutions) take on it, and they compute the same values whatever the strides."""
    if x.ndim != 4 or group == 1 or group != x.shape[1] or x.device.type != "cpu":
        return x, w
    layout = torch.channels_last
    return x.contiguous(memory_format=layout), w.contiguous(memory_format=layout)


@op("Conv", prepare=_prepare_conv)
def conv(attrs, inputs):
    x, w, b = inputs[0], inputs[1], opt(inputs, 2)
    group = attrs.get("group", 1)
    static = attrs["_static"]
    if static is not None:
        return _CONV[x.ndim](*_depthwise_layout(x, w, group), b, *static)
    kernel = list(w.shape[2:])
    strides, dilations = window(attrs, len(kernel))
    begins, ends = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    if begins != ends:
        x, begins = F.pad(x, torch_pad(begins, ends)), 0
    return _CONV[x.ndim](*_depthwise_layout(x, w, group), b, strides, begins, dilations, group)


@op("ConvTranspose")
def conv_transpose(attrs, inputs):
    x, w, b = inputs[0], inputs[1], opt(inputs, 2)
    kernel = list(w.shape[2:])
    n = len(kernel)
    strides, dilations = window(attrs, n)
    extra = list(attrs.get("output_padding") or [0] * n)
    group = attrs.get("group", 1)
    full = [s * (i - 1) + e + (k - 1) * d + 1
            for i, s, e, k, d in zip(x.shape[2:], strides, extra, kernel, dilations)]
    begins, ends = _transpose_pads(attrs, x.shape[2:], full, strides)
    if begins == ends and all(e < max(s, d) for e, s, d in zip(extra, strides, dilations)):
        return _CONV_T[x.ndim](x, w, b, strides, begins, extra, group, dilations)
    # General case: the full output, `extra` zero rows at the end (they receive only the bias), then crop.
    y = _CONV_T[x.ndim](x, w, None, strides, 0, 0, group, dilations)
    y = F.pad(y, torch_pad([0] * n, extra))
    y = F.pad(y, torch_pad([-p for p in begins], [-p for p in ends]))
    return y if b is None else y + b.reshape(1, -1, *[1] * n)


def _transpose_pads(attrs, sizes, full, strides):
    """ConvTranspose pads: explicit, or from output_shape / auto_pad (the odd pixel as onnxruntime puts it)."""
    auto = attrs.get("auto_pad", "NOTSET")
    target = attrs.get("output_shape")
    if target is None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        n = len(full)
        explicit = list(attrs.get("pads") or [0] * (2 * n)) if auto != "VALID" else [0] * (2 * n)
        return explicit[:n], explicit[n:]
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

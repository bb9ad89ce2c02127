"""Pooling, reductions and Pad (rules/pool.py; Resize and Upsample are in resize.py).

Pool windows follow onnxruntime where ONNX leaves a choice: in ceil mode a last
window that would start beyond the input and its leading pad is dropped.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UnsupportedModel
from .conv import spatial_pads, window
from .registry import Tensor, axes_of, ints, op, opt, scalar, torch_pad

_MAX_POOL = {3: F.max_pool1d, 4: F.max_pool2d, 5: F.max_pool3d}
_AVG_POOL = {3: F.avg_pool1d, 4: F.avg_pool2d, 5: F.avg_pool3d}
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _pool_geometry(attrs, x):
    kernel = list(attrs["kernel_shape"])
    strides, dilations = window(attrs, len(kernel))
    begins, ends = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
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
    padded = F.pad(x, torch_pad(begins, ends), value=float("-inf"))
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
    out = _crop(pool(F.pad(x, torch_pad(begins, ends)), kernel, strides, 0, ceil, True), sizes)
    if include_pad:
        return out
    inside = F.pad(torch.ones_like(x[:1, :1]), torch_pad(begins, ends))
    return out / _crop(pool(inside, kernel, strides, 0, ceil, True), sizes)


@op("GlobalAveragePool")
def global_average_pool(attrs, inputs):
    x = inputs[0]
    return x.mean(tuple(range(2, x.ndim)), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(attrs, inputs):
    x = inputs[0]
    return x.amax(tuple(range(2, x.ndim)), keepdim=True)


# --- Lp pooling: y = (sum over the window of |x|^p)^(1/p), padding counting as zero ----------------

def _abs_pow(x: Tensor, p: int) -> Tensor:
    if p == 1:
        return x.abs()
    return x * x if p == 2 else x.abs().pow(p)


def _root(sums: Tensor, p: int) -> Tensor:
    """``sums ** (1/p)``, with a zero gradient where a window is all zero: the true derivative
    there is infinite, and one such window would turn every gradient it reaches into NaN."""
    if p == 1:
        return sums
    positive = sums > 0
    safe = torch.where(positive, sums, torch.ones_like(sums))
    return torch.where(positive, safe.sqrt() if p == 2 else safe.pow(1.0 / p), torch.zeros_like(sums))


def _window_sums(x: Tensor, kernel, strides, dilations) -> Tensor:
    """Per-channel sums over each (unpadded) window: a depthwise convolution with ones."""
    ones = x.new_ones((x.shape[1], 1, *kernel))
    return _CONV[x.ndim](x, ones, None, strides, 0, dilations, x.shape[1])


@op("LpPool")
def lp_pool(attrs, inputs):
    x = inputs[0]
    p = attrs.get("p", 2)
    kernel, strides, dilations, begins, ends = _pool_geometry(attrs, x)
    sizes = _pooled_sizes(x.shape[2:], kernel, strides, dilations, begins, ends, bool(attrs.get("ceil_mode", 0)))
    # Extend the trailing pad until the last (ceil mode) window fits: zeros add nothing to a sum.
    ends = [max(e, (m - 1) * s + (k - 1) * d + 1 - n - b)
            for n, m, k, s, d, b, e in zip(x.shape[2:], sizes, kernel, strides, dilations, begins, ends)]
    padded = F.pad(_abs_pow(x, p), torch_pad(begins, ends))
    return _root(_crop(_window_sums(padded, kernel, strides, dilations), sizes), p)


@op("GlobalLpPool")
def global_lp_pool(attrs, inputs):
    x = inputs[0]
    p = attrs.get("p", 2)
    return _root(_abs_pow(x, p).sum(tuple(range(2, x.ndim)), keepdim=True), p)


# --- reductions ---------------------------------------------------------------------------------

def _reduce(fn):
    def apply(attrs, inputs):
        x = inputs[0]
        axes = axes_of(attrs, inputs, 1)
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


# --- Pad ----------------------------------------------------------------------------------------

@op("Pad", host=(1, 2, 3))
def pad(attrs, inputs):
    x = inputs[0]
    mode = attrs.get("mode", "constant")
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = ints(inputs[1])
        value = 0 if opt(inputs, 2) is None else scalar(inputs[2])
        axes = None if opt(inputs, 3) is None else ints(inputs[3])
    axes = list(range(x.ndim)) if axes is None else [a % x.ndim for a in axes]
    n = len(axes)
    begins, ends = [0] * x.ndim, [0] * x.ndim
    for a, b, e in zip(axes, pads[:n], pads[n:]):
        begins[a], ends[a] = b, e
    if mode == "constant":
        return F.pad(x, torch_pad(begins, ends), value=value)
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

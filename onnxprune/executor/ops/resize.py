"""Resize and Upsample (rules/pool.py groups them with the pools): separable resampling, one
1-D interpolation per axis. Source coordinates and interpolation taps are computed in float64
with numpy and cached per axis geometry; antialias and tf_crop_and_resize are refused when the
executor is built."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ...errors import UnsupportedModel
from .registry import Tensor, ints, op, opt


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
        scales, sizes = opt(inputs, 2), opt(inputs, 3)
    scales = None if scales is None or scales.numel() == 0 else [float(s) for s in scales.tolist()]
    sizes = None if sizes is None or sizes.numel() == 0 else ints(sizes)
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

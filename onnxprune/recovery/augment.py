"""Augmentation of image training batches: a random resized crop and a horizontal flip.

Images from a folder are already resized to the model's input (data.py), so
the crop is taken from that tensor: a box of 35-100% of its area with an
aspect ratio between 3/4 and 4/3 (log-uniform), drawn as torchvision's
RandomResizedCrop draws it (ten tries, else the whole image), resized back to
the input's size with bilinear interpolation, and flipped left-right with
probability 1/2. Box and resize are one ``grid_sample`` per batch, on the
batch's device. The random numbers come from a numpy generator the trainer
seeds from ``seed`` and the epoch, so runs repeat exactly.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError

SCALE = (0.35, 1.0)       # fraction of the image's area a crop covers
RATIO = (3 / 4, 4 / 3)    # width / height of a crop
TRIES = 10


def image_input(data, inputs: list[str], requested: bool | None) -> tuple[str, str] | None:
    """(input name, layout) of the images to augment; None when not augmenting.

    ``requested`` None: augment data read from a folder of images; True: also arrays, when
    the model takes one rank-4 float input (laid out NHWC when its last axis looks like
    channels and its second does not, as data.py guesses)."""
    if requested is False or (requested is None and data.image_layout is None):
        return None
    arrays = {k: v for k, v in data.inputs.items() if k in inputs}
    name, x = next(iter(arrays.items())) if len(arrays) == 1 else (None, None)
    if x is None or x.ndim != 4 or x.dtype.kind != "f":
        raise UsageError("`augment` needs image data: one rank-4 float input "
                         f"(the data has {', '.join(f'{k} {v.shape}' for k, v in arrays.items())})")
    layout = data.image_layout or ("nhwc" if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3) else "nchw")
    return name, layout


def crop_boxes(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """``count`` boxes (top, left, height, width) in pixels, RandomResizedCrop's way."""
    area = height * width
    scale = rng.uniform(*SCALE, (count, TRIES)) * area
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), (count, TRIES)))
    w = np.rint(np.sqrt(scale * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(scale / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)
    rows = np.arange(count)
    h = np.where(fits.any(1), h[rows, first], height)  # no try fits: the whole image
    w = np.where(fits.any(1), w[rows, first], width)
    top = np.floor(rng.random(count) * (height - h + 1)).astype(np.int64)
    left = np.floor(rng.random(count) * (width - w + 1)).astype(np.int64)
    return np.stack([top, left, h, w], 1)


def augment(torch, x, layout: str, rng: np.random.Generator):
    """``x`` (a batch, NCHW or NHWC) with every sample cropped, resized back and maybe flipped."""
    F = torch.nn.functional
    images = x.permute(0, 3, 1, 2) if layout == "nhwc" else x
    n, _, height, width = images.shape
    boxes = torch.as_tensor(crop_boxes(rng, n, height, width), dtype=torch.float64)
    flip = torch.as_tensor(rng.random(n) < 0.5)
    top, left, h, w = boxes.unbind(1)
    # Output pixel centre u in [-1, 1] (align_corners=False) reads the input at
    # u * w / W + (2 * left + w) / W - 1: the box stretched over the whole output.
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    work = images if images.dtype in (torch.float32, torch.float64) else images.float()  # grid_sample's types
    grid = F.affine_grid(theta.to(device=work.device, dtype=work.dtype), list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False).to(x.dtype)
    return out.permute(0, 2, 3, 1).contiguous() if layout == "nhwc" else out

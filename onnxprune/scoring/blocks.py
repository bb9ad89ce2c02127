"""How much each removable block matters (higher: keep it): one scorer per criterion.

- ``removal`` (data): the model's output error when the block alone is removed
  (metrics.py, relative RMS on the calibration samples): what removing it costs,
  measured; one run of the model per block.
- ``influence`` (data): the block influence 1 - cos(x_in, x_out), per sample
  over the whole tensor, averaged: how much the block turns the stream it
  adds to (a block that leaves its input's direction alone does little).
  One run of the model for all blocks.
- ``weights`` (no data): the RMS of the weight that writes the branch into
  the stream (its last weighted layer: a ResNet block's last conv with its
  folded BatchNorm, a transformer's output projection), averaged over a
  post-norm layer's two sub-blocks. A proxy, for a model without data.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..analysis.blocks import Block
from ..cut.depth import remove_blocks
from ..data import Dataset, model_batches
from ..metrics import Reference
from ..runtime.session import capture_model, session

BLOCK_CRITERIA = ("removal", "influence", "weights")
DATA_CRITERIA = ("removal", "influence")


def block_scores(model: onnx.ModelProto, blocks: list[Block], criterion: str, data: Dataset | None = None,
                 batch_size: int | None = None) -> dict[str, float]:
    """Block id -> score for each of ``blocks`` (removable ones of ``model``)."""
    if criterion == "weights":
        return weight_scores(model, blocks)
    if criterion == "influence":
        return influence_scores(model, blocks, data, batch_size)
    return removal_scores(model, blocks, data, batch_size)


def weight_scores(model: onnx.ModelProto, blocks: list[Block]) -> dict[str, float]:
    weights = {t.name: t for t in model.graph.initializer}

    def rms(name: str) -> float:
        values = numpy_helper.to_array(weights[name]).astype(np.float64)
        return float(np.sqrt(np.mean(values ** 2))) if values.size else 0.0

    return {b.id: float(np.mean([rms(w) for w in b.writers])) if b.writers else 0.0 for b in blocks}


def influence_scores(model: onnx.ModelProto, blocks: list[Block], data: Dataset,
                     batch_size: int | None = None) -> dict[str, float]:
    names = list(dict.fromkeys(n for b in blocks for n in (b.input, b.output)))
    sess = session(capture_model(model, names).SerializeToString(), prepack=False)
    batches, _ = model_batches(data, model, batch_size)
    sums = dict.fromkeys((b.id for b in blocks), 0.0)
    count = 0
    for feeds, _ in batches:
        got = dict(zip(names, sess.run(names, feeds)))
        for b in blocks:
            sums[b.id] += float(np.sum(1.0 - _cosines(got[b.input], got[b.output])))
        count += len(next(iter(feeds.values())))
    return {k: v / max(count, 1) for k, v in sums.items()}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample (axis 0): the cosine of the two tensors' angle, each flattened."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300), 1.0)


def removal_scores(model: onnx.ModelProto, blocks: list[Block], data: Dataset,
                   batch_size: int | None = None) -> dict[str, float]:
    reference = Reference(model, data, batch_size)
    return {b.id: float(reference.measure(remove_blocks(model, [b])).output_error) for b in blocks}

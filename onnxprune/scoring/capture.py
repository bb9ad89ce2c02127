"""One onnxruntime pass over calibration data, its captured tensors handed to every taker.

The statistics a run measures (calibration.Activations, obs.Grams) read the same
tensors batch by batch; one pass feeds them all instead of one pass each.
"""

from __future__ import annotations

import onnx

from ..data import Dataset, model_batches
from ..errors import UnsupportedModel, first_line
from ..progress import progress
from ..runtime.session import capture_model, session


def run_captured(model: onnx.ModelProto, data: Dataset, takers: list, batch_size: int | None, quiet: bool,
                 label: str) -> None:
    """One onnxruntime pass over ``data`` capturing the tensors every taker names, each batch
    handed to every taker's ``add(values, samples)``."""
    names = sorted({n for taker in takers for n in taker.names})
    if not names:
        return
    try:
        sess = session(capture_model(model, names).SerializeToString())
    except Exception as exc:
        raise UnsupportedModel(f"onnxruntime cannot run the model to measure on the calibration data "
                               f"({label}): {first_line(exc)}") from None
    batches, steps = model_batches(data, model, batch_size)
    for feeds, _ in progress(batches, steps, label, quiet):
        values = dict(zip(names, sess.run(names, feeds)))
        samples = len(next(iter(feeds.values())))
        for taker in takers:
            taker.add(values, samples)

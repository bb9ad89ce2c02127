"""How close a pruned model is to the original: output error, top-1 accuracy, teacher agreement.

One definition of each, used by sensitivity, compensation, the quality gate
and recovery's validation:

- **output error**: relative RMS, ||y - y'|| / ||y|| over all compared
  outputs and samples. Positions where the original itself is not finite are
  left out (there is nothing to compare); a non-finite value where the
  original is finite makes the error infinite. RMS rather than the worst
  element: compensation shifts means, so a model is judged on the error over
  all samples, not on its single worst value.
- **accuracy**: top-1 against the data's labels, when they are integer class
  indices (one per sample) and the first output is (batch, classes) logits.
- **agreement**: the fraction of samples where the candidate's top-1 class is
  the original's (needs no labels).
- **divergence**: when the first output is (batch, classes) logits, the mean
  KL(softmax(original) || softmax(candidate)) per sample (needs no labels).
  Unlike the RMS over every logit, it weighs a logit's error by how much it
  moves the predicted distribution, so a group whose cut only disturbs
  classes nobody predicts costs little.

``Reference`` runs the original once on the data and measures any number of
candidates against those outputs with onnxruntime. A candidate whose graph
inputs/outputs were reshaped (--allow-io-change) is fed the kept positions of
the original's inputs and compared at the kept positions of its outputs.
With ``downstream`` (the model the candidates were cut from, as exported), a
candidate runs only its part that differs from it (runtime/downstream.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from .cut import iochange
from .data import Dataset, model_batches


def class_labels(labels) -> bool:
    """Labels are used as classes when they are integer indices, one per sample."""
    return labels is not None and np.ndim(labels) == 1 and np.asarray(labels).dtype.kind in "iu"


def logits(output, samples: int) -> bool:
    """``output`` is (batch, classes) scores for ``samples`` samples."""
    shape = np.shape(output)
    return len(shape) == 2 and shape[0] == samples and shape[1] > 1


class ErrorSum:
    """The relative RMS error, accumulated over batches (float64 sums)."""

    def __init__(self):
        self.squared = 0.0
        self.scale = 0.0
        self.broken = False  # a non-finite value where the reference is finite

    def add(self, expected, got) -> None:
        expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
        finite = np.isfinite(expected)
        reference = expected[finite]
        self.scale += float(np.dot(reference, reference))
        if self.broken:
            return
        candidate = got[finite]
        if not np.isfinite(candidate).all():
            self.broken = True
            return
        diff = reference - candidate
        self.squared += float(np.dot(diff, diff))

    @property
    def value(self) -> float:
        if self.broken:
            return math.inf
        return math.sqrt(self.squared / self.scale) if self.scale > 0 else math.sqrt(self.squared)


@dataclass
class Measured:
    output_error: float
    samples: int
    accuracy: float | None = None  # top-1 with class labels
    agreement: float | None = None  # top-1 equal to the original's
    divergence: float | None = None  # mean KL(original || candidate) per sample, for logits


def kl_divergences(expected, got) -> np.ndarray:
    """KL(softmax(expected) || softmax(got)) of each row of two (batch, classes) logit arrays
    (float64, stable log-softmax; infinite where the candidate is not finite)."""
    expected, got = np.asarray(expected, np.float64), np.asarray(got, np.float64)
    if not np.isfinite(got).all():
        return np.full(len(expected), math.inf)
    p_log = expected - expected.max(1, keepdims=True)
    p_log -= np.log(np.exp(p_log).sum(1, keepdims=True))
    q_log = got - got.max(1, keepdims=True)
    q_log -= np.log(np.exp(q_log).sum(1, keepdims=True))
    return np.sum(np.exp(p_log) * (p_log - q_log), axis=1)


class OutputCapture:
    """The original's graph outputs, batch by batch, kept from a pass that ran for another reason
    (the calibration pass: scoring/capture.py or the gradients'), so that a Reference on the
    same samples and batches runs no pass of its own (ResNet-50, 32 samples: 1.5 s)."""

    def __init__(self, model: onnx.ModelProto):
        self.names = [o.name for o in model.graph.output]
        self.batches: list[dict[str, np.ndarray]] = []

    def add(self, values: dict, samples: int) -> None:
        self.batches.append({n: np.asarray(values[n]) for n in self.names})


class Reference:
    """The original's outputs on ``data``, computed once; candidates are measured against them.

    ``outputs``: the names compared (default: all of the original's outputs). ``captured``: the
    original's outputs on these very batches from an earlier pass, used when every batch is
    there (the PyTorch executor's outputs differ from onnxruntime's in the last float digits).
    """

    def __init__(self, model: onnx.ModelProto, data: Dataset, batch_size: int | None = None,
                 outputs: list[str] | None = None, captured: OutputCapture | None = None,
                 downstream: onnx.ModelProto | None = None):
        from .runtime.downstream import Downstream
        from .runtime.session import session

        self.batches = list(model_batches(data, model, batch_size)[0])
        if captured is not None and _covers(captured, self.batches, outputs):
            self.names = list(outputs) if outputs is not None else list(captured.names)
            self.expected = [{n: b[n] for n in self.names} for b in captured.batches]
        else:
            sess = session(model.SerializeToString())
            self.names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
            self.expected = [dict(zip(self.names, sess.run(self.names, feeds))) for feeds, _ in self.batches]
        self.samples = sum(len(next(iter(feeds.values()))) for feeds, _ in self.batches)
        first = [e[self.names[0]] for e in self.expected]
        sizes = [len(next(iter(feeds.values()))) for feeds, _ in self.batches]
        self.classes = all(logits(f, n) for f, n in zip(first, sizes))
        self.labels = None
        if self.classes and class_labels(data.labels):  # the labels of the samples in the batches
            self.labels = np.concatenate([labels for _, labels in self.batches])
        self.top1 = np.concatenate([np.argmax(f, axis=1) for f in first]) if self.classes else None
        self.accuracy = float(np.mean(self.top1 == self.labels)) if self.labels is not None else None
        # many candidates that each change a part of ``downstream``, the model as they were made
        # from (sensitivity's cuts, compared with the uncut export that folds what they fold): each
        # is run from where it starts to differ, on that model's tensors there
        self.downstream = (Downstream(downstream, [feeds for feeds, _ in self.batches])
                           if downstream is not None else None)

    def measure(self, candidate: onnx.ModelProto) -> Measured:
        """Output error, accuracy and agreement of ``candidate`` on the reference's batches."""
        changes = iochange.read(candidate)
        error, predicted, divergences = ErrorSum(), [], []
        renamed = iochange.new_names(changes, "output")  # the candidate's name of each original output
        names = [renamed.get(n, n) for n in self.names if not any(c.removed and c.name == n for c in changes)]
        first = renamed.get(self.names[0], self.names[0])
        for expected, got in zip(self.expected, self._runs(candidate, names, changes)):
            kept = iochange.comparable_outputs(expected, changes)
            for name in names:
                error.add(kept[name], got[name])
            if self.classes:
                predicted.append(np.argmax(got[first], axis=1))
                divergences.append(kl_divergences(expected[self.names[0]], got[first]))
        result = Measured(error.value, self.samples)
        if predicted:
            predicted = np.concatenate(predicted)
            result.divergence = float(np.mean(np.concatenate(divergences)))
            result.agreement = float(np.mean(predicted == self.top1))
            if self.labels is not None:
                result.accuracy = float(np.mean(predicted == self.labels))
        return result

    def _runs(self, candidate: onnx.ModelProto, names: list[str], changes):
        """The candidate's outputs ``names`` on each batch."""
        from .runtime.session import session

        if self.downstream is not None:
            split = self.downstream.run(candidate, names, self.expected)
            if split is not None:
                return split
        sess = session(candidate.SerializeToString())
        return (dict(zip(names, sess.run(names, iochange.candidate_feeds(feeds, changes))))
                for feeds, _ in self.batches)


def _covers(captured: OutputCapture, batches: list, outputs: list[str] | None) -> bool:
    """Whether ``captured`` holds the outputs of exactly these batches (count and sizes)."""
    wanted = outputs if outputs is not None else captured.names
    if len(captured.batches) != len(batches) or not set(wanted) <= set(captured.names):
        return False
    sizes = [len(next(iter(feeds.values()))) for feeds, _ in batches]
    return all(len(b[captured.names[0]]) == n for b, n in zip(captured.batches, sizes))


def evaluate(model: onnx.ModelProto, reference: onnx.ModelProto, data: Dataset, batch_size: int | None = None) -> dict:
    """``model`` against ``reference`` on ``data``, with onnxruntime, on the first output:
    output error, agreement, and top-1 accuracy of both (with class labels)."""
    original = Reference(reference, data, batch_size, outputs=[reference.graph.output[0].name])
    measured = original.measure(model)
    result = {"output_error": measured.output_error, "samples": measured.samples}
    if measured.agreement is not None:
        result["agreement"] = measured.agreement
    if original.accuracy is not None:
        result.update(accuracy=measured.accuracy, original_accuracy=original.accuracy)
        result["accuracy_drop_points"] = 100.0 * (original.accuracy - measured.accuracy)
    return result

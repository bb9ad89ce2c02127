"""Distillation of language-model logits: (batch, seq, vocab) outputs get KL per token.

``distill_loss="auto"`` used to pick MSE for every output that is not
(batch, classes); for a language model the right loss is the KL between the
teacher's and the student's next-token distributions, per position, averaged
over tokens (tools/bench_text_model.py measures the difference on a trained
byte-level model). A tiny embedding + MLP + head model, built with
onnx.helper, keeps the end-to-end check to a second.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune.data import Dataset
from onnxprune.errors import UsageError
from onnxprune.options import TrainOptions
from onnxprune.recovery import losses
from onnxprune.recovery.train import train

torch = pytest.importorskip("torch")

VOCAB, WIDTH, MLP, SEQ = 11, 8, 16, 6


def reference_kl(student: np.ndarray, teacher: np.ndarray, t: float, axis: int = -1) -> float:
    """T^2 * mean over every position but ``axis`` of KL(softmax(teacher / T) || softmax(student / T))."""
    def log_softmax(x):
        x = x / t - (x / t).max(axis, keepdims=True)
        return x - np.log(np.exp(x).sum(axis, keepdims=True))
    ls, lt = log_softmax(student.astype(np.float64)), log_softmax(teacher.astype(np.float64))
    return float((np.exp(lt) * (lt - ls)).sum(axis).mean() * t * t)


def loss(kind: str, student: np.ndarray, teacher: np.ndarray, t: float = 2.0) -> float:
    return float(losses.distill_loss(torch, kind, t, torch.from_numpy(student), torch.from_numpy(teacher)))


def test_auto_distils_sequence_logits_with_kl_per_token():
    rng = np.random.default_rng(0)
    student, teacher = (rng.normal(size=(3, SEQ, VOCAB)).astype(np.float32) for _ in range(2))
    expected = reference_kl(student, teacher, 2.0)
    assert loss("auto", student, teacher) == pytest.approx(expected, rel=1e-5)
    assert loss("kl", student, teacher) == pytest.approx(expected, rel=1e-5)
    # a mean per token: the same as (batch * seq, vocab) rows of classifier logits, whatever the length
    flat = loss("auto", student.reshape(-1, VOCAB), teacher.reshape(-1, VOCAB))
    assert flat == pytest.approx(expected, rel=1e-5)
    mse = float(np.mean((student - teacher) ** 2) / np.mean(teacher ** 2))
    assert loss("mse", student, teacher) == pytest.approx(mse, rel=1e-5)


def test_auto_keeps_mse_where_there_is_no_class_axis():
    rng = np.random.default_rng(1)
    for shape in [(3, SEQ, 1), (3, 1), (2, 4, 5, 5)]:  # one class (its KL is always 0); a feature map
        student, teacher = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
        mse = float(np.mean((student - teacher) ** 2) / np.mean(teacher ** 2))
        assert loss("auto", student, teacher) == pytest.approx(mse, rel=1e-5), shape
    # asked for, kl on an NCHW map is per pixel over the channel axis (segmentation logits)
    student, teacher = (rng.normal(size=(2, 4, 3, 3)).astype(np.float32) for _ in range(2))
    assert loss("kl", student, teacher) == pytest.approx(reference_kl(student, teacher, 2.0, axis=1), rel=1e-5)
    with pytest.raises(UsageError, match="class axis"):
        loss("kl", student[:, 0, 0, 0], teacher[:, 0, 0, 0])


def tiny_lm(seed: int = 0) -> onnx.ModelProto:
    """input_ids (batch, seq) -> Gather(embedding) -> MatMul, Relu, MatMul (+ residual) -> MatMul -> logits."""
    rng = np.random.default_rng(seed)

    def weight(name, *shape, scale=1.0):
        return numpy_helper.from_array((rng.normal(size=shape) * scale / np.sqrt(shape[0])).astype(np.float32), name)

    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["m"]), helper.make_node("Add", ["x", "m"], ["y"]),
             helper.make_node("MatMul", ["y", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
        [numpy_helper.from_array(rng.normal(size=(VOCAB, WIDTH)).astype(np.float32), "emb"),
         weight("w1", WIDTH, MLP), weight("w2", MLP, WIDTH), weight("head", WIDTH, VOCAB, scale=3.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def outputs(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


def test_distilling_a_language_model_uses_kl_per_token(one_torch_thread):
    teacher = tiny_lm()
    student = onnxprune.prune(teacher, 0.5).model  # half the MLP neurons: the output drifts from the teacher's
    ids = np.random.default_rng(2).integers(0, VOCAB, size=(200, SEQ)).astype(np.int64)
    data = Dataset({"input_ids": ids})
    options = TrainOptions(distill=True, epochs=3, lr=1e-2, batch_size=20, temperature=2.0, quiet=True, seed=0)
    trained, report = train(student, teacher, data, options)
    # the validation loss the report gives is the per-token KL at T = 2 on the validation split
    _, val = data.split(options.val_fraction, options.seed)
    val_ids = val.inputs["input_ids"]
    before = reference_kl(outputs(student, val_ids), outputs(teacher, val_ids), 2.0)
    assert report.before["val_loss"] == pytest.approx(before, rel=1e-3)
    after = reference_kl(outputs(trained, val_ids), outputs(teacher, val_ids), 2.0)
    assert report.epochs[report.best_epoch - 1].val_loss == pytest.approx(after, rel=1e-3)
    assert after < 0.7 * before, (before, after)
    _, kl = train(student, teacher, data, replace(options, distill_loss="kl"))
    assert [e.val_loss for e in kl.epochs] == pytest.approx([e.val_loss for e in report.epochs], rel=1e-6)

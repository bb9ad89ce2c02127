"""Recovery: distillation and fine-tuning through the PyTorch executor, written back into the ONNX model.

Uses the bundled digits model (real data from scikit-learn, no download) at a
ratio where pruning alone loses most of the accuracy, and short trainings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.data import Dataset
from onnxprune.metrics import evaluate
from onnxprune.options import TrainOptions
from onnxprune.recovery.train import train

pytest.importorskip("torch")

from tools.digits_arch import load_split

ROOT = Path(__file__).resolve().parent.parent

MODEL = ROOT / "models" / "digits_cnn.onnx"
FAST = dict(epochs=4, lr=1e-2, batch_size=64, quiet=True)


@pytest.fixture(scope="module")
def digits():
    x_train, x_test, y_train, y_test = load_split()
    return Dataset({"input": x_train}, y_train, "train"), Dataset({"input": x_test}, y_test, "test")


@pytest.fixture(scope="module")
def pruned(digits):
    teacher = onnx.load(MODEL)
    # no reconstruction: a model that training has to recover (reconstruction alone gets digits to 92%)
    return teacher, onnxprune.prune(teacher, 0.5, data=digits[0], calib_samples=256, reconstruct=False).model


def signature(model: onnx.ModelProto):
    return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node], \
        sorted((t.name, tuple(t.dims), t.data_type) for t in model.graph.initializer)


@pytest.mark.parametrize("mode", ["distill", "finetune", "both"])
def test_training_recovers_accuracy_and_keeps_the_graph(digits, pruned, mode):
    teacher, student = pruned
    train_data, test = digits
    before = evaluate(student, teacher, test, 256)
    options = TrainOptions(distill=mode != "finetune", finetune=mode != "distill", **FAST)
    trained, report = train(student, teacher, train_data, options)
    after = evaluate(trained, teacher, test, 256)
    assert after["accuracy"] > before["accuracy"] + 0.2, (before, after)
    assert signature(trained)[0] == signature(student)[0]  # same graph, same initializer names/shapes/dtypes
    assert signature(trained)[1] == signature(student)[1]
    assert report.mode == {"distill": "distill", "finetune": "finetune", "both": "distill+finetune"}[mode]
    assert len(report.epochs) == FAST["epochs"] and 1 <= report.best_epoch <= FAST["epochs"]
    assert report.samples_per_second > 0 and report.val_samples == round(0.1 * len(train_data))


@pytest.mark.parametrize("finetune", [False, True])
def test_the_best_epoch_is_kept(digits, pruned, finetune):
    """Fine-tuning keeps the most accurate epoch; distillation alone uses no labels: the lowest val loss."""
    teacher, student = pruned
    trained, report = train(student, teacher, digits[0], TrainOptions(finetune=finetune, **FAST))
    best = report.epochs[report.best_epoch - 1]
    if finetune:
        assert best.val_accuracy == max(e.val_accuracy for e in report.epochs)
        _, val = digits[0].split(0.1, 0)
        assert evaluate(trained, teacher, val, 256)["accuracy"] == pytest.approx(best.val_accuracy)
    else:
        assert best.val_loss == min(e.val_loss for e in report.epochs)


def test_same_seed_same_weights(digits, pruned):
    teacher, student = pruned
    small = digits[0].sample(300, 1)
    a, _ = train(student, teacher, small, TrainOptions(**{**FAST, "epochs": 1}))
    b, _ = train(student, teacher, small, TrainOptions(**{**FAST, "epochs": 1}))
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("features", [False, True])
def test_teacher_runs_once_and_the_result_is_the_same(digits, pruned, monkeypatch, features):
    """The teacher's outputs (and features) are computed once and carried with their samples:
    training gives the same weights as rerunning the teacher every batch, with fewer teacher runs."""
    import onnxprune.recovery.train as recover
    from onnxprune.executor.module import TorchGraph

    teacher, student = pruned
    small = digits[0].sample(300, 1)
    points = onnxprune.prune_rounds(teacher, 0.5, data=digits[0], calib_samples=256) if features else None
    options = dict(features=recover_features(points)) if features else {}
    calls, original_run = [], TorchGraph.run

    def counted_run(self, *args, **kwargs):
        calls.append(1)
        return original_run(self, *args, **kwargs)

    monkeypatch.setattr(TorchGraph, "run", counted_run)
    model = points.model if features else student
    cached, _ = train(model, teacher, small, TrainOptions(**{**FAST, "epochs": 3}), **options)
    with_cache = len(calls)
    monkeypatch.setattr(recover, "TEACHER_CACHE_BYTES", 0)
    calls.clear()
    rerun, _ = train(model, teacher, small, TrainOptions(**{**FAST, "epochs": 3}), **options)
    assert cached.SerializeToString() == rerun.SerializeToString()
    assert with_cache < len(calls)


def recover_features(result):
    from onnxprune.pipeline.rounds import feature_points

    return feature_points(result)


def test_group_lasso_shrinks_channel_norms(digits):
    """min f(w) + lambda * sum_c ||w_c||: the channels' norms fall (and the trained weights are kept)."""
    teacher = onnx.load(MODEL)
    analysis = onnxprune.analyse(teacher)
    options = TrainOptions(epochs=4, lr=1e-2, batch_size=64, distill=True, sparsity_reg=5e-2)
    sparse, report = train(teacher, teacher, digits[0].sample(512, 0), options, groups=analysis.prunable)

    def norms(model):
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        return sum(np.sqrt((weights[s.tensor.name] ** 2).sum()) for g in analysis.prunable
                   for s in g.params.values() if s.role == "weight")

    assert report.best_epoch >= 1
    assert norms(sparse) < 0.9 * norms(teacher)


def test_feature_distillation_matches_kept_channels(digits):
    teacher = onnx.load(MODEL)
    result = onnxprune.prune_rounds(teacher, 0.5, data=digits[0], calib_samples=256,
                                    train=TrainOptions(feature_weight=1.0, **{**FAST, "epochs": 2}))
    assert result.report.training["epochs"][-1]["val_accuracy"] > 0.5


def test_feature_points_are_the_cut_groups_inputs_and_the_block_outputs_at_the_kept_channels():
    from onnxprune.pipeline.rounds import feature_points
    from onnxprune.runtime.session import capture_model, session

    result = onnxprune.prune(onnx.load(MODEL), 0.5)
    points = feature_points(result)
    residual = next(n for n in result.model.graph.node if n.op_type == "Add").output[0]
    assert residual in {p.name for p in points}
    names = [p.name for p in points]
    assert len(names) == len(set(names))
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    values = session(capture_model(result.model, names).SerializeToString()).run(names, {"input": x})
    for point, value in zip(points, values):  # the student's tensor is the teacher's at the kept channels
        assert value.shape[point.axis] == len(point.kept), point.name
        assert len(point.kept) == len(set(point.kept.tolist()))


def test_steps_prune_in_rounds(digits):
    teacher = onnx.load(MODEL)
    once = onnxprune.prune_rounds(teacher, 0.5, data=digits[0])
    twice = onnxprune.prune_rounds(teacher, 0.5, data=digits[0], steps=2, train=TrainOptions(**{**FAST, "epochs": 1}))
    assert len(twice.report.rounds) == 2 and twice.report.rounds[0]["ratio"] == pytest.approx(1 - 0.5 ** 0.5)
    assert twice.report.params_before == once.report.params_before
    assert abs(twice.report.params_after - once.report.params_after) < 0.15 * once.report.params_after


# --- CLI and the quality gate --------------------------------------------------------------

@pytest.fixture
def npz(tmp_path, digits):
    path = tmp_path / "train.npz"
    np.savez(path, input=digits[0].inputs["input"], labels=digits[0].labels)
    return path


def test_cli_distill_writes_a_verified_model(tmp_path, npz, capsys):
    out, report = tmp_path / "d.onnx", tmp_path / "r.json"
    code = main([str(MODEL), "--structured", "0.5", "--distill", "--data", str(npz), "--epochs", "2", "--lr", "0.01",
                 "-o", str(out), "--report", str(report), "--max-accuracy-drop", "60"])
    assert code == 0, capsys.readouterr().err
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["training"]["mode"] == "distill" and len(data["training"]["epochs"]) == 2
    assert data["gate"]["samples"] == 135 and "accuracy_drop_points" in data["gate"]
    assert "train   distill" in capsys.readouterr().out


def test_gate_failure_exits_6_and_writes_nothing(tmp_path, npz, capsys):
    out = tmp_path / "d.onnx"
    code = main([str(MODEL), "--structured", "0.7", "--data", str(npz), "--max-accuracy-drop", "0.5",
                 "--no-compensate", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 6 and len(err) == 1 and "accuracy dropped" in err[0] and "nothing written" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--distill"], "give --data"),
    (["--finetune", "--data", "NOLABELS"], "needs labels"),
    (["--max-output-error", "0.1"], "give --data"),
    (["--steps", "2", "--plan-in", "PLAN"], "give --structured (not --plan-in)"),
    (["--sparsity-reg", "0.1", "--data", "NPZ"], "add --distill or --finetune"),
    (["--distill", "--data", "NPZ", "--device", "tpu"], "--device must be"),
])
def test_recovery_usage_errors(tmp_path, npz, capsys, args, message):
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, input=np.zeros((20, 1, 8, 8), np.float32))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema_version": 1, "groups": []}))
    swap = {"NPZ": str(npz), "NOLABELS": str(nolabels), "PLAN": str(plan)}
    args = [swap.get(a, a) for a in args]
    structured = [] if "--plan-in" in args else ["--structured", "0.5"]
    code = main([str(MODEL), *structured, *args, "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o.onnx").exists()

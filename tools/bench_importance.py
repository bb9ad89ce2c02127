"""Importance criteria and bias compensation on the bundled digits model, without fine-tuning.

    python -m tools.bench_importance                       # ratio 0.5, 5 calibration seeds
    python -m tools.bench_importance --ratios 0.2,0.5 --calib-samples 256 --json out.json

For each ratio, criterion and calibration seed, ``models/digits_cnn.onnx`` is
pruned with ``onnxprune.prune`` using ``--calib-samples`` training samples
drawn with that seed (the weight criteria do not read data, so their rows
vary only through compensation), with compensation off and on. Reported, as
mean ± std over the seeds: held-out top-1 accuracy (450 samples, never used
for calibration) and the relative RMS output error ||y - y'|| / ||y|| on the
held-out split. The unpruned model's accuracy is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from onnxprune.api import prune
from onnxprune.data import Dataset
from onnxprune.runtime.session import session
from tools.digits_arch import load_split

ROOT = Path(__file__).resolve().parent.parent

CRITERIA = ["l1", "l2", "random", "activation", "apoz", "taylor", "fisher"]


def evaluate(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    logits = session(model.SerializeToString()).run(None, {"input": x})[0]
    error = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))
    return float((logits.argmax(1) == y).mean()), error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", default="0.5", help="comma-separated ratios (default 0.5)")
    p.add_argument("--criteria", default=",".join(CRITERIA))
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    x_train, x_test, y_train, y_test = load_split()
    train = Dataset({"input": x_train}, y_train, "digits train split")
    reference = session(model.SerializeToString()).run(None, {"input": x_test})[0]
    base_acc = float((reference.argmax(1) == y_test).mean())
    print(f"unpruned: held-out accuracy {base_acc:.4f} ({len(y_test)} samples)")
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for criterion in args.criteria.split(","):
            for compensate in (False, True):
                accs, errs = [], []
                for seed in range(args.seeds):
                    result = prune(model, ratio, importance=criterion, data=train, seed=seed,
                                   calib_samples=args.calib_samples, compensate=compensate)
                    acc, err = evaluate(result.model, x_test, y_test, reference)
                    accs.append(acc)
                    errs.append(err)
                row = {"ratio": ratio, "criterion": criterion, "compensate": compensate,
                       "accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
                       "error_mean": float(np.mean(errs)), "error_std": float(np.std(errs))}
                rows.append(row)
                print(f"ratio {ratio:.2f} {criterion:<10} compensate {'on ' if compensate else 'off'} "
                      f"accuracy {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f}   "
                      f"output error {row['error_mean']:.3f} ± {row['error_std']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"unpruned_accuracy": base_acc, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

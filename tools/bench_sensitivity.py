"""Sensitivity allocation against uniform pruning, and what one sensitivity cut costs.

    python -m tools.bench_sensitivity                    # digits: uniform vs --allocate sensitivity
    python -m tools.bench_sensitivity --ratio 0.3 --resnet18   # also time ResNet-18 (zoo cache)

Digits (models/digits_cnn.onnx): calibration data = the training split of
tools/digits_arch.load_split(), held out = its test split. Each row prunes
``--ratio`` without fine-tuning, uniformly (every group loses R) or with
per-group ratios allocated by sensitivity (R of all prunable channels), with
and without bias compensation, and reports held-out top-1 accuracy and the
relative RMS output error against the original.

ResNet-18 (``--resnet18``, legacy export from tools/zoo.py's cache): 64 random
calibration samples, 4 ratios; the total time of the sensitivity run and one
cut taken apart (fresh analysis, surgery + export, session, running the data).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.api import analyse, prune
from onnxprune.data import Dataset
from onnxprune.metrics import evaluate
from onnxprune.pipeline.sensitivity import measure_sensitivity

ROOT = Path(__file__).resolve().parent.parent


def digits(ratio: float) -> None:
    from tools.digits_arch import load_split

    model = onnx.load(str(ROOT / "models" / "digits_cnn.onnx"))
    x_train, x_test, y_train, y_test = load_split()
    calib, held_out = Dataset({"input": x_train}, y_train, "train"), Dataset({"input": x_test}, y_test, "test")
    print(f"digits_cnn, {ratio:g} without fine-tuning; calibration {len(calib)} train samples, "
          f"measured on {len(held_out)} held-out samples")
    print(f"{'method':<12} {'compensation':<13} {'channels removed':>18} {'MACs after':>11} {'top-1':>8} "
          f"{'output error':>12} {'time s':>7}")
    for compensate in (False, True):
        for allocate in (None, "sensitivity"):
            started = time.perf_counter()
            result = prune(model, ratio, data=calib, compensate=compensate, allocate=allocate)
            seconds = time.perf_counter() - started
            measured = evaluate(result.model, model, held_out, 32)
            before = sum(g.channels_before for g in result.report.groups)
            after = sum(g.channels_after for g in result.report.groups)
            print(f"{allocate or 'uniform':<12} {'on' if compensate else 'off':<13} "
                  f"{before - after:>7}/{before} {1 - after / before:>6.1%} {result.report.macs_after:>11,} "
                  f"{measured['accuracy']:>8.2%} {measured['output_error']:>12.3f} {seconds:>7.1f}")
            if allocate:
                chosen = ", ".join(f"{g['sources'][0].split('/')[1]} {g['ratio']:g}"
                                   for g in result.report.allocation["groups"])
                print(f"{'':<12} ratios: {chosen}")
    print(f"original top-1 {measured['original_accuracy']:.2%}")


def resnet18(samples: int = 64, ratios=(0.2, 0.4, 0.6, 0.8)) -> None:
    from onnxprune.cut.export import export
    from onnxprune.cut.surgery import apply_plan
    from onnxprune.planning.plan import make_plan
    from onnxprune.runtime.session import session
    from onnxprune.scoring.criteria import score_groups

    path = ROOT / ".cache" / "zoo" / "resnet18-legacy-v2.onnx"
    if not path.exists():
        sys.exit(f"{path} missing: run python -m tools.zoo --models resnet18 first")
    model = onnx.load(str(path))
    x = np.random.default_rng(0).standard_normal((samples, 3, 224, 224)).astype(np.float32)
    data = Dataset({model.graph.input[0].name: x}, None, "random")
    analysis = analyse(model)
    group = analysis.prunable[len(analysis.prunable) // 2]
    plan = make_plan([group], score_groups(analysis.groups, analysis.view, "l1"), 0.4)
    clock = time.perf_counter()
    fresh = analyse(model)
    t_analyse = time.perf_counter() - clock
    apply_plan(fresh.view, fresh.groups, plan)
    cut = export(fresh.view, model)
    t_cut = time.perf_counter() - clock - t_analyse
    clock = time.perf_counter()
    sess = session(cut.SerializeToString())
    t_session = time.perf_counter() - clock
    clock = time.perf_counter()
    for feeds, _ in data.batches(1):
        sess.run(None, feeds)
    t_run = time.perf_counter() - clock
    print(f"resnet18 one cut: fresh analysis {t_analyse:.2f} s, surgery + export {t_cut:.2f} s, "
          f"session {t_session:.2f} s, {samples} samples {t_run:.2f} s")
    started = time.perf_counter()
    result = measure_sensitivity(model, data, ratios, compensate=False, quiet=False)
    total = time.perf_counter() - started
    cuts = len(result.groups) * len(ratios)
    print(f"resnet18 sensitivity: {len(result.groups)} groups x {len(ratios)} ratios = {cuts} cuts on {samples} "
          f"samples in {total:.0f} s ({total / cuts:.1f} s per cut)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--resnet18", action="store_true", help="also time ResNet-18 from the zoo cache")
    args = parser.parse_args()
    digits(args.ratio)
    if args.resnet18:
        resnet18()


if __name__ == "__main__":
    main()

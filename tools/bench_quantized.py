"""Prune, then quantize: float vs int8 vs pruned vs pruned + int8, on onnxruntime's CPU provider.

    .venv/bin/python -m tools.bench_quantized [--models lite1,resnet50] [--target-macs 0.7]
        [--threads 1,2] [--iters 30] [--json OUT.json] [--reuse]

What is measured
- Models: the ImageNet-pretrained EfficientNet-Lite1 of the real-image
  benchmark (tools/pretrained_lite.py, input 240x240) and torchvision's
  ResNet-50 with random weights (tools/zoo.py's export, input 224x224: no
  pretrained ResNet-50 installs from PyPI without a download at run time, so
  its top-1 is not measured).
- Data: the seeded 250/250 split of the imagenet-500 photos
  (tools/pretrained_lite.py). The 250 calibration photos calibrate the
  quantization and the pruning (--data: reconstruction and compensation);
  ResNet-50 takes their centre 224x224 crop and its first --resnet-samples.
  Top-1 is measured on the 250 held-out photos, which nothing calibrates on.
- Variants, all written by the onnxprune command line (printed):
  float (the export); int8 (--structured 0 --quantize int8
  --quantize-per-channel --data, without reconstruction and compensation:
  static QDQ quantization of the unpruned model); pruned (--target-macs F --data, float, kept with --keep-float);
  pruned + int8 (the same run's output: the pruned model quantized like the
  int8 row).
- Per variant: MACs (onnxprune.count_macs at batch 1), size on disk, median
  latency at batch 1 with 1 and 2 intra-op threads (onnxprune.bench: the four
  variants interleaved round-robin, --iters timed runs each after 10 warm-up
  runs), and held-out top-1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune import count_macs
from onnxprune.runtime.bench import bench
from tools import pretrained_lite as lite
from tools import zoo

ROOT = lite.ROOT
OUT_DIR = ROOT / "build" / "bench_quantized"
VARIANTS = ("float", "int8", "pruned", "pruned + int8")
MODELS = ("lite1", "resnet50")
QUANTIZE = ["--quantize", "int8", "--quantize-per-channel"]
# ResNet-50 has random weights: no accuracy for a sensitivity allocation or a refit to keep, so its
# pruned variant takes one ratio for every group (what MACs, size and latency are measured on).
PRUNE_FLAGS = {"lite1": [], "resnet50": ["--allocate", "uniform", "--no-reconstruct", "--no-compensate"]}


def _shown(path) -> str:
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return str(path)


def run_cli(argv: list) -> float:
    """onnxprune's command line on ``argv`` (printed, with its output); its wall time in seconds."""
    argv = [str(a) for a in argv]
    print(f"\n$ {shlex.join([_shown(sys.executable), '-m', 'onnxprune', *map(_shown, argv)])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxprune", *argv], cwd=ROOT, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"    {line}")
    if proc.returncode != 0:
        raise SystemExit(f"onnxprune exited {proc.returncode}")
    return time.perf_counter() - started


def inputs_for(name: str, split: dict, resnet_samples: int) -> tuple[Path, Path, np.ndarray | None, np.ndarray | None]:
    """(model file, calibration .npz, held-out images, held-out labels) of ``name``."""
    if name == "lite1":
        path, _ = lite.cached_export()
        x, y = split["heldout"]
        return path, split["calib_path"], x, y
    path = zoo.export("resnet50", "legacy")
    crop = slice(8, 8 + 224)  # the centre 224x224 of the 240x240 photos
    calib = OUT_DIR / "resnet50.calib.npz"
    np.savez(calib, input=split["calib"][0][:resnet_samples, :, crop, crop])
    return path, calib, None, None


def variants(name: str, model: Path, calib: Path, budget: float, reuse: bool = False) -> dict[str, Path]:
    """The four variants of ``name``, written by the command line (``reuse``: those already written)."""
    out = {v: OUT_DIR / f"{name}.{v.replace(' + ', '-')}.onnx" for v in VARIANTS}
    out["float"] = model
    if reuse and all(p.exists() for p in out.values()):
        print(f"\n{name}: reusing {', '.join(_shown(p) for p in out.values())}")
        return out
    common = ["--data", calib, "--force"]
    # nothing is cut: no layer to refit or bias to compensate, the data only calibrates
    run_cli([model, "--structured", "0", "-o", out["int8"], *QUANTIZE, "--no-reconstruct", "--no-compensate",
             *common])
    run_cli([model, "--target-macs", budget, *PRUNE_FLAGS[name], "-o", out["pruned + int8"], *QUANTIZE,
             "--keep-float", out["pruned"], *common])
    return out


def top1(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 25) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float(100 * (pred == y).mean())


def measure(name: str, paths: dict[str, Path], x, y, threads: list[int], iters: int) -> list[dict]:
    rows = {v: {"model": name, "variant": v, "file": _shown(p)} for v, p in paths.items()}
    for v, p in paths.items():
        rows[v]["macs"] = count_macs(onnx.load(str(p)))
        rows[v]["top1"] = top1(p, x, y) if x is not None else None
    files = [str(paths[v]) for v in VARIANTS]
    for t in threads:
        result = bench(files, [1], threads=t, iters=iters)
        for v, timing in zip(VARIANTS, result.timings):
            rows[v][f"ms_{t}t"] = timing.median_ms
            rows[v]["size"] = result.sizes[str(paths[v])]
    return [rows[v] for v in VARIANTS]


def table(rows: list[dict], threads: list[int]) -> str:
    head = ["model", "variant", "MACs", "size MB", *(f"batch 1, {t} thread{'s' if t > 1 else ''} ms" for t in threads),
            "held-out top-1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {}
    for r in rows:
        base.setdefault(r["model"], r)
        b = base[r["model"]]
        cells = [r["model"], r["variant"], f"{r['macs'] / 1e9:.3f}G ({b['macs'] / r['macs']:.2f}x fewer)",
                 f"{r['size'] / 1e6:.2f}",
                 *(f"{r[f'ms_{t}t']:.1f} ({b[f'ms_{t}t'] / r[f'ms_{t}t']:.2f}x)" for t in threads),
                 "n/a (random weights)" if r["top1"] is None else f"{r['top1']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--target-macs", type=float, default=0.7, help="the pruned variants' MACs budget (default 0.7)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts to time at (default 1,2)")
    p.add_argument("--iters", type=int, default=30, help="timed runs per variant and thread count (default 30)")
    p.add_argument("--resnet-samples", type=int, default=64, help="calibration photos for ResNet-50 (default 64)")
    p.add_argument("--json", metavar="OUT.json", help="also write the rows as JSON")
    p.add_argument("--data-dir", type=Path, default=lite.DATA_DIR, help=f"default {lite.DATA_DIR}")
    p.add_argument("--reuse", action="store_true", help="measure the variants an earlier run wrote, if all are there")
    args = p.parse_args(argv)
    missing = lite.data_present(args.data_dir)
    if missing:
        print(f"skipped: {missing}")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    threads = [int(t) for t in args.threads.split(",")]
    split = lite.cached_split(args.data_dir)
    rows = []
    for name in args.models.split(","):
        model, calib, x, y = inputs_for(name, split, args.resnet_samples)
        rows += measure(name, variants(name, model, calib, args.target_macs, args.reuse), x, y, threads, args.iters)
    print()
    print(table(rows, threads))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

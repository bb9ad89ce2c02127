"""Core benchmark: ResNet-50 at a 0.4 pruning ratio, onnxprune vs Torch-Pruning vs onnxsim.

    .venv/bin/python -m tools.bench_core [--ratio 0.4] [--json out.json] [--keep DIR]

(``make bench`` installs the ``test`` and ``bench`` extras first.) CPU only.

The model: torchvision ResNet-50, ``weights=None``, torch seed 0, BatchNorm
running statistics randomised with that seed (mean ~ N(0, 0.1^2), var ~
U(0.5, 1.5); a fresh model's zero means/unit variances would make the folded
Conv biases identical, which the exporter then deduplicates). Exported with
the legacy exporter (``dynamo=False``, opset 17, eval mode: BatchNorm folded
into the Convs), input "input" 1x3x224x224.

The tools, all removing 40% of the channels by L1 magnitude, classifier kept:

- onnxprune on the ONNX export: the whole CLI in a subprocess (interpreter
  start, load, check, analyse, prune, verify with onnxruntime, write) and
  ``onnxprune.prune()`` in process on the loaded model (no verification).
- Torch-Pruning 1.6.1 on the torch model: ``MetaPruner(model, example,
  MagnitudeImportance(p=1), pruning_ratio=0.4, ignored_layers=[model.fc])``;
  the time covers building the dependency graph and ``step()``. Its result is
  exported to ONNX exactly like the base model.
- onnxsim 0.8.1 ``onnxsim.pruning.apply_structured_pruning(model,
  sparsity=0.4, importance_norm="l1")`` on the same ONNX export.

Every resulting ONNX model is measured by the same functions:
``onnxprune.analysis.stats.count_macs`` / ``count_params`` (MACs of Conv/Gemm/MatMul
at 1x3x224x224), and validity = ``onnx.checker.check_model(full_check=True)``
plus an onnxruntime (CPU EP) run whose output shape equals the base model's.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx

from onnxprune import __version__ as onnxprune_version
from onnxprune import prune
from onnxprune.analysis.stats import count_macs, count_params

INPUT = "input"
SHAPE = (1, 3, 224, 224)
SEED = 0


# --- the model --------------------------------------------------------------------

def build_resnet50():
    import torch
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.resnet50(weights=None)
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def export_onnx(model, path: Path) -> None:
    import torch

    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is asked for on purpose
        torch.onnx.export(model, (torch.zeros(SHAPE),), str(path), input_names=[INPUT], output_names=["output"],
                          opset_version=17, dynamo=False)


# --- measuring ----------------------------------------------------------------------

def measure(model: onnx.ModelProto | None, base_output_shape) -> dict:
    """MACs, params and validity of one resulting model, the same way for every tool."""
    if model is None:
        return {"macs": None, "params": None, "valid": False}
    out = {"params": count_params(model), "macs": None, "valid": False, "problem": None}
    try:
        out["macs"] = count_macs(model, {INPUT: SHAPE})
    except Exception as exc:  # a model whose shapes do not infer
        out["problem"] = f"count_macs: {_line(exc)}"
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        out["problem"] = f"onnx.checker: {_line(exc)}"
        return out
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(SEED).standard_normal(SHAPE, dtype=np.float32)
        y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    except Exception as exc:
        out["problem"] = f"onnxruntime: {_line(exc)}"
        return out
    if tuple(y.shape) != tuple(base_output_shape):
        out["problem"] = f"output shape {tuple(y.shape)} != {tuple(base_output_shape)}"
    elif not np.isfinite(y).all():
        out["problem"] = "non-finite outputs"
    else:
        out["valid"] = True
    return out


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _timed_median(fn, repeat: int, warmup: int):
    """(last result, median seconds, all timed seconds) of ``warmup`` untimed + ``repeat`` timed calls."""
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(repeat):
        result, seconds = _timed(fn)
        times.append(seconds)
    return result, float(np.median(times)), times


# --- the tools ------------------------------------------------------------------------

def run_onnxprune_cli(base_path: Path, out_path: Path, ratio: float, repeat: int) -> dict:
    cmd = [sys.executable, "-m", "onnxprune", str(base_path), "--structured", str(ratio),
           "-o", str(out_path), "--force"]
    proc, seconds, times = _timed_median(lambda: subprocess.run(cmd, capture_output=True, text=True), repeat, 0)
    row = {"tool": "onnxprune (CLI, subprocess)", "seconds": seconds, "times": times, "rc": proc.returncode,
           "what": "interpreter start + load + check + prune + verify (onnxruntime) + write; each run cold"}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row["model"] = onnx.load(str(out_path))
    row["stdout"] = proc.stdout
    return row


def run_onnxprune_api(base: onnx.ModelProto, ratio: float, repeat: int) -> dict:
    row = {"tool": "onnxprune (prune() in process)", "what": "analyse + score + plan + cut (no load, no verify)"}
    try:
        result, row["seconds"], row["times"] = _timed_median(lambda: prune(base, ratio), repeat, 1)
        row["model"] = result.model
    except Exception as exc:
        row["error"] = _line(exc)
    return row


def run_torch_pruning(torch_model, ratio: float, out_path: Path, repeat: int) -> dict:
    from importlib.metadata import version

    import torch
    import torch_pruning as tp

    # torch_pruning.__version__ of the 1.6.1 wheel still says 1.6.0: name the installed distribution.
    row = {"tool": f"Torch-Pruning {version('torch-pruning')}",
           "what": "MetaPruner(...) dependency graph + step(), on a fresh deepcopy each run (copy not timed)"}
    example = torch.randn(SHAPE)
    try:
        def go(model):
            pruner = tp.pruner.MetaPruner(
                model, example, importance=tp.importance.MagnitudeImportance(p=1),
                pruning_ratio=ratio, ignored_layers=[model.fc],
            )
            pruner.step()
            return model

        times = []
        for i in range(repeat + 1):  # the first run warms torch up and is not counted
            fresh = copy.deepcopy(torch_model)
            model, seconds = _timed(functools.partial(go, fresh))
            if i:
                times.append(seconds)
        row["seconds"], row["times"] = float(np.median(times)), times
        _, row["export_seconds"] = _timed(lambda: export_onnx(model, out_path))
        row["model"] = onnx.load(str(out_path))
    except Exception as exc:
        row["error"] = _line(exc)
    return row


def run_onnxsim(base: onnx.ModelProto, ratio: float, repeat: int) -> dict:
    try:
        from importlib.metadata import version

        import onnxsim.pruning as osp
        name = f"onnxsim {version('onnxsim')}"
    except ImportError as exc:
        return {"tool": "onnxsim", "error": f"not installed ({exc}); pip install onnxsim==0.8.1"}
    row = {"tool": name,
           "what": "apply_structured_pruning(sparsity, importance_norm='l1') (it copies its input itself)"}
    try:
        model, row["seconds"], row["times"] = _timed_median(
            lambda: osp.apply_structured_pruning(base, sparsity=ratio, importance_norm="l1"), repeat, 1)
        row["model"] = model
    except Exception as exc:
        row["error"] = _line(exc)
    return row


# --- report -----------------------------------------------------------------------------

def _fmt(n, unit="") -> str:
    if n is None:
        return "n/a"
    for suffix, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{suffix}{unit}"
    return f"{n}{unit}"


def environment() -> dict:
    import onnxruntime
    import torch
    import torchvision

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "onnxprune": onnxprune_version,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per tool; the median is shown (default 3)")
    p.add_argument("--keep", metavar="DIR", help="keep the ONNX files here (default: a temporary directory)")
    args = p.parse_args(argv)

    env = environment()
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_core_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"ResNet-50 (torchvision, weights=None, BN statistics randomised, seed {SEED}), "
          f"input {INPUT} {'x'.join(map(str, SHAPE))}, ratio {args.ratio}", flush=True)

    torch_model = build_resnet50()
    base_path = workdir / "resnet50.onnx"
    _, export_seconds = _timed(lambda: export_onnx(torch_model, base_path))
    base = onnx.load(str(base_path))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(base_path), providers=["CPUExecutionProvider"])
    base_out = sess.run(None, {INPUT: np.zeros(SHAPE, np.float32)})[0].shape
    del sess
    base_row = {"tool": "base (unpruned export)", **measure(base, base_out), "seconds": None}
    print(f"exported base model in {export_seconds:.1f} s -> {base_path}", flush=True)

    import hashlib

    base_digest = hashlib.sha256(base.SerializeToString()).hexdigest()
    rows = []
    for label, run in (
        ("onnxprune CLI", lambda m: run_onnxprune_cli(base_path, workdir / "onnxprune.onnx", args.ratio, args.repeat)),
        ("onnxprune API", lambda m: run_onnxprune_api(m, args.ratio, args.repeat)),
        ("Torch-Pruning", lambda m: run_torch_pruning(torch_model, args.ratio, workdir / "torch_pruning.onnx",
                                                      args.repeat)),
        ("onnxsim", lambda m: run_onnxsim(m, args.ratio, args.repeat)),
    ):
        print(f"running {label} ...", flush=True)
        try:
            row = run(base)
        except Exception:  # keep going: one tool's crash is a result, not the end of the run
            row = {"tool": label, "error": traceback.format_exc().strip().splitlines()[-1]}
        model = row.pop("model", None)
        row.update(measure(model, base_out) if model is not None else {"macs": None, "params": None, "valid": False})
        if model is not None and label == "onnxsim":
            onnx.save(model, str(workdir / "onnxsim.onnx"))
        if model is not None and label == "onnxprune API":
            onnx.save(model, str(workdir / "onnxprune_api.onnx"))
        rows.append(row)
        if hashlib.sha256(base.SerializeToString()).hexdigest() != base_digest:
            row["problem"] = (row.get("problem") or "") + " modified its input model in place"
            base = onnx.load(str(base_path))
            base_digest = hashlib.sha256(base.SerializeToString()).hexdigest()

    for row in rows:
        row["macs_ratio"] = base_row["macs"] / row["macs"] if row.get("macs") else None
        row["params_ratio"] = base_row["params"] / row["params"] if row.get("params") else None

    print()
    header = f"{'tool':<32} {'MACs':>8} {'MACs ratio':>10} {'params':>8} {'valid':>6} {'pruning s':>10}"
    print(header)
    print("-" * len(header))
    print(f"{base_row['tool']:<32} {_fmt(base_row['macs']):>8} {'1.00x':>10} {_fmt(base_row['params']):>8} "
          f"{'yes' if base_row['valid'] else 'NO':>6} {'-':>10}")
    for r in rows:
        ratio = f"{r['macs_ratio']:.2f}x" if r.get("macs_ratio") else "n/a"
        secs = f"{r['seconds']:.2f}" if r.get("seconds") is not None else "n/a"
        print(f"{r['tool']:<32} {_fmt(r.get('macs')):>8} {ratio:>10} {_fmt(r.get('params')):>8} "
              f"{'yes' if r.get('valid') else 'NO':>6} {secs:>10}")
    for r in rows:
        for key in ("error", "problem"):
            if r.get(key):
                print(f"  {r['tool']}: {key}: {r[key]}")
    print()
    print("How this was measured:")
    print(f"  machine: {env['cpu']}, {env['cores']} cores, 1-min load average {env['load_average_1m']:.2f} at start"
          " (timings are indicative when other processes share the CPU)")
    print(f"  python {env['python']}, onnxprune {env['onnxprune']}, onnx {env['onnx']}, onnxruntime "
          f"{env['onnxruntime']}, torch {env['torch']} ({env['torch_threads']} threads), "
          f"torchvision {env['torchvision']}")
    print("  MACs/params: onnxprune.analysis.stats.count_macs/count_params on each resulting ONNX model "
          f"(Conv/Gemm/MatMul multiply-accumulates at {'x'.join(map(str, SHAPE))}; float initializers)")
    print("  valid: onnx.checker.check_model(full_check=True) and an onnxruntime CPU run with the base output shape")
    print(f"  pruning s: median wall-clock (time.perf_counter) of {args.repeat} runs; in-process tools get one"
          " untimed warm-up run first")
    for r in rows:
        if r.get("what"):
            print(f"    {r['tool']}: {r['what']}")
    tp_row = next((r for r in rows if r["tool"].startswith("Torch-Pruning")), {})
    if tp_row.get("export_seconds") is not None:
        print(f"  (Torch-Pruning's ONNX export afterwards took {tp_row['export_seconds']:.1f} s, not counted)")
    print(f"  files: {workdir}" + ("" if args.keep else " (temporary)"))

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"ratio": args.ratio, "environment": env, "base": base_row, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

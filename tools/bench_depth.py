"""Depth vs width side by side: ResNet-50 and MobileNetV2 at equal MACs, and accuracy at equal latency.

    .venv/bin/python -m tools.bench_depth [--part latency|accuracy|all] [--models resnet50,mobilenet_v2]
        [--batch 1,32] [--iters 20] [--iters-large 3] [--repeats 3] [--lite-depth 0.3] [--reuse]
        [--json OUT.json]

Latency part (``--part latency``, random weights: it proves speed, never accuracy)
- Models: torchvision resnet50 and mobilenet_v2, ``tools/zoo.py``'s ``build_model`` (seed 0, norms
  randomised), exported as ``tools/bench_latency.py`` does (legacy exporter, opset 17, input
  ``input`` Nx3x224x224, dynamic batch), cached in .cache/zoo.
- At the MACs budget of each (``--target-macs`` 1/1.3 for ResNet-50, 1/1.4 for MobileNetV2; MACs at
  1x3x224x224), no data, onnxprune's defaults otherwise:
  width: ``target_macs`` F (the uniform ratio searched);
  depth: ``depth`` k/n with the smallest k of the n removable blocks (least important by weights)
  whose removal meets F, or all but one where none does (its MACs ratio is then what depth reaches);
  both: ``depth`` round(k/2)/n and ``target_macs`` F (the channels meet the rest).
  ResNet-50 also gets ``depth`` 0.25 alone: issue 14's point-6 check.
- Every model of an architecture is timed in ONE ``onnxprune.runtime.bench.bench`` call per batch
  (interleaved round-robin, one session each, spinning threads off), ``--repeats`` times, as
  tools/bench_latency.py times (larger batches with fewer runs, ``--iters-large``), on the
  onnxruntime CPU provider; figures are the medians of the repeats' speedups (base median / model
  median, same run). Efficiency = speedup / MACs ratio (1.0: latency fell as much as the MACs).
- Point 6: ResNet-50 ``depth`` 0.25 is valid (onnx full check, onnxruntime run, same input and output
  names and shapes: ``tools/zoo.py``'s ``check_pruned``), removes at least 3 blocks, and its latency
  at batch 1 falls at least 0.9x as much as its MACs: 1 - t_pruned/t_base >= 0.9 (1 - MACs kept).

Accuracy part (``--part accuracy``): the ImageNet-pretrained EfficientNet-Lite1 and the 250/250 split
of ../shared/data/imagenet-500 of ``tools/bench_pretrained.py`` (its cached export and arrays), the
onnxprune command line in a subprocess (``bench_pretrained.run_cli``), each with ``--data`` (the
same recovery: reconstruction and compensation, the defaults with data):
  depth: ``--depth R`` (``--lite-depth``);
  width: ``--target-speedup S --provider cpu``, S = depth's speedup measured here (batch 1):
  allocated by sensitivity (the default for a budget with data), the MACs it removes searched
  until the speedup is met;
  width-uniform: the same with ``--allocate uniform``: one ratio for every group, searched;
  width-alloc: ``--target-macs F``, F = depth's MACs kept: allocated by sensitivity, its latency
  as measured;
  both: ``--depth R --target-speedup S --provider cpu`` (the share of blocks chosen by output error).
Then one interleaved timing of the five at batch 1 and held-out top-1 with 95% bootstrap intervals,
paired differences against depth (``bench_pretrained``'s helpers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from onnxprune.analysis.stats import count_macs, count_params

ROOT = Path(__file__).resolve().parent.parent
MAC_BUDGETS = {"resnet50": 1 / 1.3, "mobilenet_v2": 1 / 1.4}
IMAGE_SHAPES = {"input": (1, 3, 224, 224)}
POINT6 = {"depth": 0.25, "blocks": 3, "latency_over_macs": 0.9}
OUT_DIR = Path("build") / "bench_depth"  # relative to ROOT, as bench_pretrained's


@dataclass
class Row:
    """One model of a comparison, with its speed: provider -> {batch: median speedup / ms / each repeat's}."""

    arch: str
    name: str
    path: str | None = None
    macs: int | None = None
    params: int | None = None
    blocks: int = 0  # removed
    ratio: float | None = None  # the channel ratio chosen
    options: dict = field(default_factory=dict)
    error: str | None = None
    speedup: dict = field(default_factory=dict)
    speedups: dict = field(default_factory=dict)
    median_ms: dict = field(default_factory=dict)


# --- models ------------------------------------------------------------------------------------

def cached_export(name: str) -> Path:
    """``name`` exported with a dynamic batch (bench_latency's recipe), cached in .cache/zoo."""
    from tools import zoo
    from tools.bench_latency import export_image_model

    path = zoo.default_cache_dir() / f"{name}-legacy-dynbatch-{zoo.RECIPE}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:  # written under a temporary name, then renamed: no half-written file under the real name
        export_image_model(zoo.build_model(name), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def prune(arch: str, name: str, base: Path, out: Path, **options) -> Row:
    from onnxprune import prune_file

    row = Row(arch, name, options={k: v if isinstance(v, (int, float, str)) else str(v) for k, v in options.items()})
    try:
        report = prune_file(base, out, force=True, input_shapes=IMAGE_SHAPES, quiet=True, **options)
    except Exception as exc:  # a failure is a result: reported, not made up
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    model = onnx.load(str(out))
    row.path, row.macs, row.params = str(out), count_macs(model, IMAGE_SHAPES), count_params(model)
    row.blocks = len((report.depth or {}).get("removed") or [])
    row.ratio = (report.target or {}).get("ratio")
    return row


def blocks_for(base: Path, budget: float) -> tuple[int, int]:
    """(k, n): the fewest of the n removable blocks whose removal (least important first, by
    weights) meets ``budget`` of the MACs; n - 1 where none does. Dry runs: nothing is written."""
    from onnxprune import prune_file

    def removing(k: int, n: int):
        return prune_file(base, None, depth=k / n, dry_run=True, input_shapes=IMAGE_SHAPES, quiet=True)

    n = removing(0, 1).depth["removable"]
    for k in range(1, n):
        report = removing(k, n)
        if report.macs_after / report.macs_before <= budget:
            return k, n
    return n - 1, n


def latency_rows(arch: str, work: Path) -> list[Row]:
    base = cached_export(arch)
    budget = MAC_BUDGETS[arch]
    k, n = blocks_for(base, budget)
    print(f"{arch}: {n} removable blocks; depth alone: {k} of them for MACs <= {budget:.3f}", flush=True)
    base_model = onnx.load(str(base))
    rows = [Row(arch, "base", str(base), count_macs(base_model, IMAGE_SHAPES), count_params(base_model))]
    rows.append(prune(arch, f"width (--target-macs {budget:.3f})", base, work / f"{arch}-width.onnx",
                      target=_target(budget)))
    rows.append(prune(arch, f"depth (--depth {k}/{n})", base, work / f"{arch}-depth.onnx", depth=k / n))
    half = max(1, (k + 1) // 2)  # half of the blocks, rounded up
    rows.append(prune(arch, f"both (--depth {half}/{n} --target-macs {budget:.3f})", base,
                      work / f"{arch}-both.onnx", depth=half / n, target=_target(budget)))
    if arch == "resnet50":
        rows.append(prune(arch, f"point 6 (--depth {POINT6['depth']:g})", base, work / f"{arch}-point6.onnx",
                          depth=POINT6["depth"]))
    return rows


def _target(budget: float):
    from onnxprune.options import Target

    return Target("macs", budget)


# --- timing ------------------------------------------------------------------------------------

def time_all(rows: list[Row], batches: list[int], args) -> None:
    """All working rows in one interleaved ``bench`` call per batch (batch 1: ``--iters`` timed runs,
    larger: ``--iters-large``), ``--repeats`` times; a row's speedup and ms are the repeats' medians."""
    from onnxprune.runtime.bench import bench

    timed = [r for r in rows if r.path]
    for b in batches:
        iters, warmup = (args.iters, args.warmup) if b == 1 else (args.iters_large, 1)
        print(f"timing {len(timed)} {rows[0].arch} models at batch {b}: {warmup} warm-up + {iters} timed runs, "
              f"interleaved, {args.repeats} repeat(s) ...", flush=True)
        speedups, ms = {}, {}
        for _ in range(args.repeats):
            result = bench([r.path for r in timed], [b], provider="cpu", threads=args.threads, warmup=warmup,
                           iters=iters, input_shapes=IMAGE_SHAPES)
            for t in result.timings:
                speedups.setdefault(t.model, []).append(t.speedup)
                ms.setdefault(t.model, []).append(t.median_ms)
        for r in timed:
            r.speedups.setdefault("cpu", {})[b] = speedups[r.path]
            r.speedup.setdefault("cpu", {})[b] = statistics.median(speedups[r.path])
            r.median_ms.setdefault("cpu", {})[b] = statistics.median(ms[r.path])


def latency_table(rows: list[Row], batches: list[int]) -> list[str]:
    base = rows[0]
    head = "| model | MACs | MACs ratio | blocks removed | channel ratio |" + "".join(
        f" bs{b} ms | bs{b} speedup | bs{b} eff |" for b in batches)
    lines = [head, "|" + "---|" * (5 + 3 * len(batches))]
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} |" + " |" * (3 + 3 * len(batches)))
            continue
        ratio = base.macs / r.macs
        cells = [r.name, f"{r.macs / 1e9:.2f}G", f"{ratio:.2f}x", str(r.blocks),
                 "-" if r.ratio is None else f"{r.ratio:.3f}"]
        for b in batches:
            s, ms = r.speedup.get("cpu", {}).get(b), r.median_ms.get("cpu", {}).get(b)
            cells += [f"{ms:.1f}", f"{s:.2f}x", f"{s / ratio:.2f}"] if s else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def point6(rows: list[Row]) -> dict | None:
    """Issue 14 point 6 on the ResNet-50 ``depth`` 0.25 row: valid, same IO, >= 3 blocks, latency fall."""
    from tools.zoo import check_pruned

    row = next((r for r in rows if r.name.startswith("point 6")), None)
    if row is None:
        return None
    if row.error:
        return {"pass": False, "measured": row.error}
    base = rows[0]
    checked = check_pruned(Path(base.path), Path(row.path))
    inputs = [[(i.name, str(i.type)) for i in onnx.load(str(p)).graph.input] for p in (base.path, row.path)]
    valid = checked["names_same"] and checked["shapes_same"] and checked["finite"] and inputs[0] == inputs[1]
    check = point6_verdict(valid, row.blocks, row.macs / base.macs, row.speedup.get("cpu", {}).get(1))
    return {**check, "valid_same_io": bool(valid), "checks": checked}


def point6_verdict(valid: bool, blocks: int, macs_kept: float, speedup: float | None) -> dict:
    """Point 6's verdict from what was measured: valid with the same IO, at least 3 blocks removed,
    and the batch-1 latency falling at least 0.9x as much as the MACs (1 - 1/speedup >= 0.9 (1 - kept))."""
    macs_fall = 1 - macs_kept
    latency_fall = 1 - 1 / speedup if speedup else float("nan")
    passed = valid and blocks >= POINT6["blocks"] and latency_fall >= POINT6["latency_over_macs"] * macs_fall
    return {"pass": bool(passed), "blocks": blocks, "macs_fall": macs_fall, "latency_fall_bs1": latency_fall,
            "measured": f"valid with the same IO: {bool(valid)}; {blocks} blocks removed; MACs fell "
                        f"{100 * macs_fall:.1f}%, batch-1 latency {100 * latency_fall:.1f}% "
                        f"({latency_fall / macs_fall:.2f}x the MACs' fall)"}


def run_latency(args, batches: list[int]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench_depth_"))
    out = {}
    for arch in args.models:
        print(f"\n== {arch}: exporting (cached) and pruning", flush=True)
        rows = latency_rows(arch, work)
        time_all(rows, batches, args)
        print(f"\n{arch} on CPUExecutionProvider, random weights; speedup and eff (= speedup / MACs ratio) "
              f"against the base, medians of {args.repeats} interleaved runs\n")
        print("\n".join(latency_table(rows, batches)))
        check = point6(rows)
        if check:
            print(f"\n{'PASS' if check['pass'] else 'FAIL'}  issue 14 point 6, ResNet-50 --depth 0.25 "
                  f"(same IO, >= 3 blocks, batch-1 latency falling >= 0.9x as much as MACs): {check['measured']}")
        out[arch] = {"rows": [asdict(r) for r in rows], "point6": check}
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return out


# --- accuracy ----------------------------------------------------------------------------------

def run_accuracy(args) -> dict:
    from onnxprune.runtime.bench import bench
    from tools import bench_pretrained as bp
    from tools import pretrained_lite as lite

    missing = lite.data_present(args.data_dir)
    if missing:
        print(f"accuracy part skipped: {missing}")
        return {"skipped": missing}
    base_path, _ = lite.cached_export()
    split = lite.cached_split(args.data_dir)
    x, y = split["heldout"]
    base = onnx.load(str(base_path))
    ctx = {"x": x, "y": y, "batch": 50, "base_macs": count_macs(base, {lite.INPUT: lite.SHAPE})}
    original = {"run": "original"}
    ctx["original_pred"] = bp.measure(base_path, original, ctx)
    (ROOT / OUT_DIR).mkdir(parents=True, exist_ok=True)
    shown, data = bp._shown(str(base_path)), ["--data", bp._shown(str(split["calib_path"]))]

    def argv(name, flags):
        return [shown, *flags, *data, "-o", str(OUT_DIR / f"{name}.onnx"), "--force",
                "--report", str(OUT_DIR / f"{name}.report.json")]

    rows = {"original": original}

    def run(name, flags):  # each result printed as it comes: a long run still shows what it measured
        if args.reuse:
            rows[name] = row = reused(name, ctx) or {"run": name, "error": f"no {name}.onnx in {OUT_DIR} (--reuse)"}
        else:
            rows[name] = row = bp.run_cli(name, argv(name, flags), ctx)
        if "error" not in row:
            print(f"{name}: held-out top-1 {bp._ci(row['top1'], row['top1_ci'])}, MACs {row['macs_ratio']:.2f}x "
                  "fewer", flush=True)

    print(f"original: held-out top-1 {bp._ci(original['top1'], original['top1_ci'])}", flush=True)
    depth_flags = ["--depth", f"{args.lite_depth:g}"]
    run("depth", depth_flags)
    if "error" in rows["depth"]:
        return {"rows": rows}
    lat = {"provider": "cpu", "warmup": args.warmup, "iters": args.iters}
    timed = [bench([str(base_path), rows["depth"]["model"]], [1], **lat).timings[1].speedup
             for _ in range(args.repeats)]
    target = statistics.median(timed)
    print(f"\ndepth's batch-1 speedup, median of {args.repeats} interleaved runs: {target:.3f}x", flush=True)
    speed = ["--target-speedup", f"{target:.3f}", "--provider", "cpu", "--bench-iters", str(args.iters)]
    # with data a speedup budget is allocated by sensitivity (pipeline/speedup_allocation.py); the
    # uniform ratio it took before, and a MACs budget at depth's MACs (allocated too), beside it
    run("width", speed)
    run("width-uniform", [*speed, "--allocate", "uniform"])
    run("width-alloc", ["--target-macs", f"{1 / rows['depth']['macs_ratio']:.3f}"])
    run("both", [*depth_flags, *speed])
    asked = (rows["width"].get("target") or {}).get("value", target)  # a reused run's own, else this one
    done = [r for r in ("depth", "width", "width-uniform", "width-alloc", "both") if "error" not in rows[r]]
    speedups = {r: [] for r in done}
    for _ in range(args.repeats):  # all of them in one interleaved run, repeated
        result = bench([str(base_path), *(rows[r]["model"] for r in done)], [1], **lat)
        for r, t in zip(done, result.timings[1:]):
            speedups[r].append(t.speedup)
    print(f"\n## EfficientNet-Lite1 width vs depth at about equal latency (batch-1 speedup {asked:.3f}x asked), "
          f"--data reconstruction; top-1 on {len(y)} held-out ImageNet photos\n")
    print("| run | MACs ratio | blocks removed | bs1 speedup (median of repeats) | top-1 % [95% CI] "
          "| agreement % [95% CI] | vs depth, top-1 points [paired 95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} |  |  |  |  |  |")
            continue
        blocks = _removed_blocks(r) if name != "original" else 0
        s = f"{statistics.median(speedups[name]):.2f}x" if name in speedups else "1.00x"
        vs = bp.difference(r, rows["depth"]) if name not in ("original", "depth") else "-"
        print(f"| {name} | {r['macs_ratio']:.2f}x | {blocks} | {s} | {bp._ci(r['top1'], r['top1_ci'])} "
              f"| {bp._ci(r['agreement'], r['agreement_ci'])} | {vs} |")
    clean = {k: {f: v for f, v in r.items() if not f.startswith("_")} for k, r in rows.items()}
    return {"target_speedup": asked, "depth_speedup_measured": target, "speedups": speedups, "rows": clean}


def reused(name: str, ctx: dict) -> dict | None:
    """``--reuse``: the run's model and report already in OUT_DIR, measured again (None where absent)."""
    from tools import bench_pretrained as bp

    out, report = ROOT / OUT_DIR / f"{name}.onnx", ROOT / OUT_DIR / f"{name}.report.json"
    if not (out.exists() and report.exists()):
        return None
    print(f"\n{name}: reusing {OUT_DIR / out.name} (--reuse)", flush=True)
    recorded = json.loads(report.read_text())
    row = {"run": name, "command": recorded.get("command"), "reused": True,
           **{k: recorded.get(k) for k in ("reconstruction", "compensation", "target", "depth")}}
    bp.measure(out, row, ctx)
    return row


def _removed_blocks(row: dict) -> int:
    report = json.loads((ROOT / row["model"].replace(".onnx", ".report.json")).read_text())
    return len((report.get("depth") or {}).get("removed") or [])


# --- main --------------------------------------------------------------------------------------

def parse_args(argv):
    from tools import pretrained_lite as lite

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("latency", "accuracy", "all"), default="latency")
    p.add_argument("--models", default="resnet50,mobilenet_v2", help="latency part: resnet50, mobilenet_v2")
    p.add_argument("--batch", default="1,32", help="latency part: batch sizes (default 1,32)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed runs per model at batch 1 (default 20)")
    p.add_argument("--iters-large", type=int, default=3, help="timed runs per model at larger batches (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing runs; medians of them (default 3)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--lite-depth", type=float, default=0.3, help="accuracy part: --depth R (default 0.3)")
    p.add_argument("--data-dir", type=Path, default=lite.DATA_DIR, help=f"default {lite.DATA_DIR}")
    p.add_argument("--reuse", action="store_true",
                   help="accuracy part: measure the models already in build/bench_depth (from an earlier run, "
                        "or the printed commands run by hand) instead of pruning again")
    p.add_argument("--json", metavar="OUT.json", help="also write every figure as JSON")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MAC_BUDGETS)
    if unknown:
        p.error(f"--models: unknown {', '.join(sorted(unknown))} (choose from {', '.join(MAC_BUDGETS)})")
    return args


def main(argv=None) -> int:
    from tools.bench_latency import environment

    args = parse_args(argv)
    env = environment()
    print(f"command: python -m tools.bench_depth {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {env['cpu']}, {env['cores']} cores, 1-min load {env['load_average_1m']:.2f} at start; "
          f"onnxruntime {env['onnxruntime']}, torch {env['torch']}", flush=True)
    started = time.perf_counter()
    out = {"environment": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.part in ("latency", "all"):
        out["latency"] = run_latency(args, [int(b) for b in args.batch.split(",") if b.strip()])
    if args.part in ("accuracy", "all"):
        out["accuracy"] = run_accuracy(args)
    out["load_average_1m_end"] = os.getloadavg()[0]
    minutes = (time.perf_counter() - started) / 60
    print(f"\n1-min load {out['load_average_1m_end']:.2f} at the end; total {minutes:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

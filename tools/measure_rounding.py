"""Which channel multiple avoids slow widths on an onnxruntime provider?

    .venv/bin/python -m tools.measure_rounding --provider cpu [--threads N] [--batches 1,32] [--json out.json]

Times small models whose channel width w runs over c, c+1, ..., c+32 around
several base widths c (64, 128, 256, 512), for each layer kind:

- Conv 3x3 (pad 1) and Conv 1x1, NCHW, C_in = C_out = w (a pruned group is
  the output of one conv and the input of the next), at the spatial size a
  ResNet gives that width at 224x224 input (64: 56x56, 128: 28x28, 256: 14x14,
  512: 7x7);
- MatMul (batch x 128 tokens, w) @ (w, w): a transformer's linear layers;
- Gemm (batch, w) x (w, w)^T: a classifier head;

at each batch size. Each model chains --depth such layers (default 3), as a
network does: onnxruntime's CPU provider converts convolutions whose widths
suit its blocked layout (NCHWc) and reorders the data once on the way in and
once on the way out, a cost a single-layer model would charge to every
layer. The widths of one series are timed interleaved
(onnxprune.runtime.bench.time_interleaved, spinning threads off; large layers a few
widths at a time, to stay within --memory-gb), each width in --sessions
separate sessions (default 3), and each width keeps the fastest run of its
fastest session (--statistic min, the default: on a shared machine other
processes only ever add time, so the minimum is the estimate of the
kernel's own speed that noise disturbs least; --statistic median on a quiet
machine). Several sessions, because on the 2-core machine this was written
on, one session of a model sometimes ran 2-5x slower than another session
of the same model for its whole life (most often with --threads 1),
whatever its width.

The work of every layer kind grows as w^2, so a width's efficiency is
w^2 / t(w), taken relative to the best of its series (1.0: as fast per
multiply-accumulate as the series gets). For each candidate multiple m (1,
2, 4, ..., 32), the mean efficiency of the widths that are multiples of m is
averaged over all series; the chosen m is the smallest whose average is
within --margin (default 0.02) of the best candidate's: rounding to it uses
the hardware (about) as well as any coarser rounding, and leaves the most
choice of widths. Also printed: how many multiples of m some wider layer of
the same series beats by more than --tolerance (10%), the rule "never slower
than a wider width" that timing noise on a shared machine makes too strict
to decide by. The result is what onnxprune/hardware.py records.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.runtime.bench import _providers, resolve_provider, time_interleaved
from onnxprune.runtime.session import require_onnxruntime, session

ROOT = Path(__file__).resolve().parent.parent

BASES = (64, 128, 256, 512)
SPATIAL = {64: 56, 128: 28, 256: 14, 512: 7}  # ResNet-50's stage sizes at 224x224
TOKENS = 128  # tokens per sample for MatMul (BERT's usual sequence length)
SPAN = 32  # widths c .. c + SPAN
CANDIDATES = (1, 2, 4, 8, 16, 32)
KINDS = ("conv3x3", "conv1x1", "matmul", "gemm")


@dataclass
class Series:
    kind: str
    base: int
    batch: int
    widths: list[int]
    ms: list[float] = field(default_factory=list)  # per width: the --statistic of its runs

    @property
    def label(self) -> str:
        return f"{self.kind} c={self.base} batch={self.batch}"

    def efficiency(self) -> dict[int, float]:
        """Width -> w^2 / t(w) (work per time: every kind's work grows as w^2), relative to the series' best."""
        per_time = {w: w * w / t for w, t in zip(self.widths, self.ms)}
        best = max(per_time.values())
        return {w: v / best for w, v in per_time.items()}

    def slow_widths(self, tolerance: float) -> list[int]:
        """Widths beaten by more than ``tolerance`` by some wider layer of this series."""
        times = np.asarray(self.ms)
        wider_best = np.minimum.accumulate(times[::-1])[::-1]  # fastest from each position on
        return [w for i, w in enumerate(self.widths[:-1]) if times[i] > (1 + tolerance) * wider_best[i + 1]]


def layer_model(kind: str, width: int, base: int, batch: int, depth: int = 3, seed: int = 0) -> onnx.ModelProto:
    """``depth`` chained layers of ``kind``, all at channel width ``width`` (random weights)."""
    rng = np.random.default_rng(seed)

    def weight(shape, name):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.05, name)

    def zeros(name):
        return numpy_helper.from_array(np.zeros(width, np.float32), name)

    if kind.startswith("conv"):
        hw = SPATIAL[base]
        shape = [batch, width, hw, hw]
    elif kind == "matmul":
        shape = [batch * TOKENS, width]
    elif kind == "gemm":
        shape = [batch, width]
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        y = "y" if i == depth - 1 else f"h{i}"
        if kind.startswith("conv"):
            k = 3 if kind == "conv3x3" else 1
            inits += [weight((width, width, k, k), f"w{i}"), zeros(f"b{i}")]
            nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [y], pads=[k // 2] * 4))
        elif kind == "matmul":
            inits.append(weight((width, width), f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [y]))
        else:
            inits += [weight((width, width), f"w{i}"), zeros(f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], transB=1))
        x = y
    graph = helper.make_graph(nodes, f"{kind}_{width}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def io_shapes(model: onnx.ModelProto) -> list[list[int]]:
    return [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (model.graph.input[0], model.graph.output[0])]


def session_bytes(model: onnx.ModelProto) -> int:
    """A generous estimate of one session's memory: weights, plus input and output several times over
    (the feed, the output, onnxruntime's layout copies and working buffers)."""
    weights = sum(math.prod(t.dims) for t in model.graph.initializer) * 4
    return weights + 16 * sum(math.prod(s) for s in io_shapes(model))


def make_runners(model: onnx.ModelProto, provider: str, threads: int | None, sessions: int) -> list:
    """``sessions`` runners of ``model``, sharing one input array."""
    from onnxprune.runtime.bench import make_runner as bench_runner

    feeds = {"x": np.random.default_rng(0).standard_normal(io_shapes(model)[0]).astype(np.float32)}
    return [bench_runner(session(model.SerializeToString(), threads, _providers(provider)), feeds, provider)
            for _ in range(sessions)]


STATISTICS = {"min": np.min, "median": np.median}


def measure_series(series: Series, provider: str, threads: int | None, warmup: int, iters: int,
                   statistic: str = "min", sessions: int = 3, memory: float = 2e9, depth: int = 3) -> None:
    """Widths interleaved in chunks that fit in ``memory`` bytes (all of them, for small layers)."""
    models = [layer_model(series.kind, w, series.base, series.batch, depth) for w in series.widths]
    chunk = max(1, int(memory // (sessions * max(session_bytes(m) for m in models))))
    series.ms = []
    for start in range(0, len(models), chunk):
        runners = [r for m in models[start:start + chunk] for r in make_runners(m, provider, threads, sessions)]
        times = time_interleaved(runners, warmup, iters)
        per_session = [float(STATISTICS[statistic](t)) * 1e3 for t in times]
        series.ms += [min(per_session[i:i + sessions]) for i in range(0, len(per_session), sessions)]
        del runners  # free the sessions before the next chunk


def slow_share(all_series: list[Series], m: int, tolerance: float) -> tuple[int, int]:
    """(slow, counted) multiples of ``m`` over every series (each series' widest width not counted)."""
    slow = counted = 0
    for s in all_series:
        bad = set(s.slow_widths(tolerance))
        for w in s.widths[:-1]:
            if w % m == 0:
                counted += 1
                slow += w in bad
    return slow, counted


def mean_efficiency(all_series: list[Series], m: int) -> float:
    """The mean relative efficiency of the multiples of ``m`` in each series, averaged over the series."""
    per_series = []
    for s in all_series:
        values = [v for w, v in s.efficiency().items() if w % m == 0]
        if values:
            per_series.append(float(np.mean(values)))
    return float(np.mean(per_series))


def choose_multiple(all_series: list[Series], margin: float) -> int:
    """The smallest candidate whose mean efficiency is within ``margin`` of the best candidate's."""
    means = {m: mean_efficiency(all_series, m) for m in CANDIDATES}
    best = max(means.values())
    return next(m for m in CANDIDATES if means[m] >= best - margin)


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    flags = ""
    try:
        text = open("/proc/cpuinfo").read()
        flags = "avx512f" if " avx512f" in text else "avx2" if " avx2" in text else ""
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores" + (f", {flags}" if flags else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="cpu", help="cpu, cuda or a full onnxruntime provider name (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--batches", default="1,32", help="batch sizes (default 1,32)")
    p.add_argument("--bases", default=",".join(map(str, BASES)), help="base widths c (default 64,128,256,512)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"layer kinds (default {','.join(KINDS)})")
    p.add_argument("--depth", type=int, default=3, help="chained layers per model (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=None,
                   help="timed runs per session (default 15 at batch sizes up to 8, 2 above)")
    p.add_argument("--sessions", type=int, default=3, help="sessions per width (default 3)")
    p.add_argument("--memory-gb", type=float, default=2.0,
                   help="sessions alive at once stay under about this much memory (default 2 GB): large layers "
                        "are timed a few widths at a time")
    p.add_argument("--statistic", choices=sorted(STATISTICS), default="min",
                   help="per width: fastest run (default; robust on a shared machine) or median")
    p.add_argument("--margin", type=float, default=0.02,
                   help="choose the smallest multiple within this of the best mean efficiency (default 0.02)")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="printed too: the share of widths a wider layer beats by more than this (default 0.10)")
    p.add_argument("--json", metavar="OUT.json", help="also write every series' timings as JSON")
    args = p.parse_args(argv)

    provider = resolve_provider(args.provider)
    ort = require_onnxruntime()
    batches = [int(b) for b in args.batches.split(",")]
    iters_of = {b: args.iters or (15 if b <= 8 else 2) for b in batches}
    bases = [int(c) for c in args.bases.split(",")]
    kinds = args.kinds.split(",")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    runs = "/".join(str(iters_of[b]) for b in batches)
    print(f"{provider}, threads {args.threads or 'default'}, {args.depth} layers per model, {args.warmup} warm-up + "
          f"{runs} timed runs (batch {'/'.join(map(str, batches))}) in each of {args.sessions} sessions per width, "
          f"interleaved, {args.statistic} kept; {machine()}; onnxruntime {ort.__version__}; "
          f"1-min load {load:.2f} at start", flush=True)
    all_series = []
    for kind in kinds:
        for batch in batches:
            for base in bases:
                s = Series(kind, base, batch, list(range(base, base + SPAN + 1)))
                measure_series(s, provider, args.threads, args.warmup, iters_of[batch], args.statistic,
                               args.sessions, args.memory_gb * 1e9, args.depth)
                all_series.append(s)
                slow = s.slow_widths(args.tolerance)
                fastest = min(s.ms)
                print(f"{s.label:<28} {s.ms[0]:8.3f} ms at c, fastest {fastest:8.3f} ms; slow widths "
                      f"(> {args.tolerance:.0%} behind a wider one): {slow or 'none'}", flush=True)
                print("    ms: " + " ".join(f"{w}:{t:.3g}" for w, t in zip(s.widths, s.ms)), flush=True)
    print()
    print(f"{'multiple':>8}  {'mean efficiency':>15}  beaten by a wider width by > {args.tolerance:.0%}")
    for m in CANDIDATES:
        slow, counted = slow_share(all_series, m, args.tolerance)
        print(f"{m:>8}  {mean_efficiency(all_series, m):>15.3f}  {slow:>6} / {counted:<6} ({slow / counted:.0%})")
    chosen = choose_multiple(all_series, args.margin)
    command = " ".join(["tools/measure_rounding.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"\nchosen multiple: {chosen} (the smallest within {args.margin} of the best mean efficiency)")
    print(f"date {datetime.date.today().isoformat()}; command: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "provider": provider, "machine": machine(), "onnxruntime": ort.__version__, "command": command,
            "chosen": chosen, "series": [asdict(s) for s in all_series]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

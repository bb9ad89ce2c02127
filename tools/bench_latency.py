"""Latency side by side: onnxprune vs Torch-Pruning at equal settings, speedup per MAC saved.

    .venv/bin/python -m tools.bench_latency [--models resnet50,mobilenet_v2,bert] [--ratios 0.3,0.5]
        [--round-to default,none,8,32] [--batch 1,8] [--iters 30] [--repeats 3] [--bert-layers 4]
        [--json out.json]

For each architecture, one base model and, for every ratio and channel
rounding, one model pruned by onnxprune and one by Torch-Pruning; then all
models of that architecture are timed in ONE ``onnxprune.runtime.bench.bench`` call
(interleaved round-robin, one session each, spinning threads off) on the
onnxruntime CPU provider, and on the CUDA provider too where
``onnxruntime.get_available_providers()`` lists it. Printed per model:
MACs ratio (base / pruned), latency speedup (base median / pruned median, same
run) and efficiency = speedup / MACs ratio (1.0: latency fell exactly as much
as the arithmetic did). With ``--repeats N`` the interleaved timing runs N
times and every figure is the median of the N runs' speedups. Then, per ratio
and batch, the verdict the fast-widths target asks for: the efficiency of
onnxprune's default command (``round_to`` left unset: "auto") over the best
Torch-Pruning variant's (the target: at least 0.95).

The models (random weights, no download):
- resnet50, mobilenet_v2: torchvision, ``tools/zoo.py``'s ``build_model``
  (seed 0, normalisation statistics and affine parameters randomised),
  exported with the legacy exporter, opset 17, input ``input`` Nx3x224x224
  with a dynamic batch dim;
- bert: ``transformers.BertModel(BertConfig(num_hidden_layers=L))`` as
  ``tools/bench_transformers.py``'s ``export_bert`` builds it (seed 0),
  sequence --seq, last_hidden_state.

The pruners, both by L1 magnitude, the classifier (resp. BERT's embeddings,
i.e. the hidden size) kept:
- onnxprune ``prune_file(ratio, round_to=r)`` on the base export (BERT: the
  ratio removes that share of every layer's heads and MLP neurons); "default"
  leaves ``round_to`` unset, as the command line does without --round-to;
- Torch-Pruning ``MetaPruner(model, example, MagnitudeImportance(p=1),
  pruning_ratio=ratio, round_to=r or None, ignored_layers=[classifier])`` on
  the torch model, exported like the base (BERT: ``num_heads`` of every
  query/key/value Linear, ``prune_num_heads=True, prune_head_dims=False,
  head_pruning_ratio=ratio``, ignored_layers=[embeddings, pooler]).
  Torch-Pruning rounds kept widths *down* to the multiple, onnxprune to the
  nearest one: rows at the same ratio remove different amounts of work, which
  is what the MACs ratio column and the efficiency are for.
A pruner that fails is reported as failed, with its error; no row is made up.

With CUDA, a roofline estimate per model is printed too: for every
Conv/Gemm/MatMul, max(FLOPs / --peak-tflops, bytes / --bandwidth-tbs), FLOPs
= 2 x MACs (onnxprune.analysis.stats), bytes = every input, weight and output tensor
read or written once; summed over the layers. It ignores elementwise ops,
launch overhead and caches: the time the arithmetic layers cannot go below.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from onnxprune.analysis.stats import count_macs, layer_macs  # the one MAC formula per op the tools share
from tools.bench_transformers import export_bert_model  # one BERT export recipe

ROOT = Path(__file__).resolve().parent.parent

SEED = 0
IMAGE = (3, 224, 224)
H100_TF32_TFLOPS = 494.7  # H100 SXM5, dense TF32 tensor core (onnxruntime's CUDA EP runs fp32 as TF32 by default)
H100_TBS = 3.35  # H100 SXM5 HBM3


# --- roofline ------------------------------------------------------------------------------

@dataclass
class LayerRoofline:
    node: str
    op: str
    flops: int
    bytes: int
    compute_s: float  # flops / peak
    memory_s: float  # bytes / bandwidth

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(model: onnx.ModelProto, input_shapes: dict | None, peak_flops: float, bandwidth: float,
             itemsize: int = 4) -> list[LayerRoofline]:
    """Per Conv/ConvTranspose/Gemm/MatMul: FLOPs (2 x MACs), bytes moved, and the two time limits.

    ``peak_flops`` in FLOP/s, ``bandwidth`` in bytes/s, ``itemsize`` bytes per
    element (4: float32). Bytes = every input (activations, weights, bias)
    and the output, each read or written once.
    """
    layers = []
    for node, dims, macs in layer_macs(model, input_shapes):
        if macs is None:
            raise ValueError(f"{node.name or node.op_type}: shapes unknown; pin the inputs")
        moved = sum(math.prod(d) for d in dims if d is not None) * itemsize
        flops = 2 * macs
        layers.append(LayerRoofline(node.name or node.output[0], node.op_type, flops, moved,
                                    flops / peak_flops, moved / bandwidth))
    return layers


def roofline_seconds(layers: list[LayerRoofline]) -> float:
    return sum(layer.seconds for layer in layers)


# --- models ------------------------------------------------------------------------------------

@dataclass
class Arch:
    name: str
    input_shapes: dict  # pinned shapes for analysis and MACs (batch 1); bench sets dim 0 per batch
    build: object  # () -> torch model, same weights every call
    export: object  # (torch model, path) -> None
    tp_options: object  # (torch model) -> dict of MetaPruner keyword arguments
    example: object  # () -> example inputs for Torch-Pruning


def export_image_model(model, path: Path) -> None:
    import torch

    x = torch.randn(1, *IMAGE, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def image_arch(name: str) -> Arch:
    from tools import zoo

    def classifier(model):
        return model.fc if name.startswith("resnet") else model.classifier[-1]

    def example():
        import torch

        return torch.randn(1, *IMAGE)

    return Arch(name, {"input": (1, *IMAGE)}, lambda: zoo.build_model(name), export_image_model,
                lambda model: {"ignored_layers": [classifier(model)]}, example)


def bert_arch(layers: int, seq: int, **sizes) -> Arch:
    """BERT with ``layers`` encoder layers; ``sizes`` (hidden_size, num_attention_heads,
    intermediate_size) override BERT-base's (tools/bench_cost.py builds BERT-large so)."""
    def build():
        import torch
        import transformers

        torch.manual_seed(0)  # the same weights as bench_transformers.export_bert
        return transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers, **sizes)).eval()

    def export(model, path):
        export_bert_model(model, path, seq)  # bench_transformers' recipe

    def example():
        import torch

        ids = torch.randint(0, 30522, (1, seq), generator=torch.Generator().manual_seed(SEED))
        return (ids, torch.ones(1, seq, dtype=torch.long))

    def tp_options(model):
        from transformers.models.bert.modeling_bert import BertSelfAttention

        heads = {}
        for m in model.modules():
            if isinstance(m, BertSelfAttention):
                heads.update({m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                              m.value: m.num_attention_heads})
        # hidden size kept (embeddings ignored), as onnxprune keeps it without --prune-hidden
        return {"ignored_layers": [model.embeddings, model.pooler], "num_heads": heads, "prune_num_heads": True,
                "prune_head_dims": False, "output_transform": lambda out: out.last_hidden_state.sum()}

    shapes = {"input_ids": (1, seq), "attention_mask": (1, seq)}
    return Arch("bert", shapes, build, export, tp_options, example)


# --- pruning ------------------------------------------------------------------------------------

@dataclass
class Row:
    arch: str
    tool: str
    ratio: float | None
    round_to: int | None  # None: onnxprune's default (for Torch-Pruning: no rounding)
    path: str | None = None
    macs: int | None = None
    params: int | None = None
    seconds: float | None = None  # pruning time
    error: str | None = None
    speedup: dict = field(default_factory=dict)  # provider -> {batch: speedup} (median of the repeats)
    speedups: dict = field(default_factory=dict)  # provider -> {batch: [speedup of each repeat]}
    median_ms: dict = field(default_factory=dict)  # provider -> {batch: ms}
    roofline_us: dict = field(default_factory=dict)  # batch -> microseconds (CUDA estimate)

    @property
    def label(self) -> str:
        if self.ratio is None:
            return "base"
        rounding = "default" if self.round_to is None else f"r{self.round_to}"
        return f"{self.tool} {self.ratio:g} {rounding}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def prune_onnxprune(base: Path, out: Path, arch: Arch, ratio: float, round_to: int | None) -> Row:
    from onnxprune import prune_file

    row = Row(arch.name, "onnxprune", ratio, round_to)
    started = time.perf_counter()
    try:
        prune_file(base, out, ratio, round_to=round_to, force=True, input_shapes=arch.input_shapes)
        row.seconds, row.path = time.perf_counter() - started, str(out)
    except Exception as exc:
        row.error = _one_line(exc)
    return row


def prune_torch_pruning(torch_model, out: Path, arch: Arch, ratio: float, round_to: int) -> Row:
    import torch_pruning as tp

    row = Row(arch.name, "Torch-Pruning", ratio, round_to)
    model = copy.deepcopy(torch_model)
    options = arch.tp_options(model)
    if "num_heads" in options:
        options["head_pruning_ratio"] = ratio
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(model, arch.example(), importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=ratio, round_to=round_to if round_to > 1 else None,
                                          **options)
            pruner.step()
        row.seconds = time.perf_counter() - started
        arch.export(model, out)
        row.path = str(out)
    except Exception as exc:
        row.error = _one_line(exc)
    return row


def measure_counts(rows: list[Row], arch: Arch) -> None:
    from onnxprune.analysis.stats import count_params

    for row in rows:
        if row.path:
            model = onnx.load(row.path)
            row.macs, row.params = count_macs(model, arch.input_shapes), count_params(model)


# --- timing ---------------------------------------------------------------------------------------

def time_rows(rows: list[Row], arch: Arch, provider: str, batches: list[int], args) -> None:
    """All working models of one architecture in one interleaved bench() call, ``args.repeats`` times;
    the first row is the base. A row's speedup and ms are the medians over the repeats."""
    import statistics

    from onnxprune.runtime.bench import bench

    timed = [r for r in rows if r.path]
    pinned = {name: shape for name, shape in arch.input_shapes.items()}
    by_path = {r.path: r for r in timed}
    times: dict = {}
    for _ in range(args.repeats):
        result = bench([r.path for r in timed], batches, provider=provider, threads=args.threads,
                       warmup=args.warmup, iters=args.iters, input_shapes=pinned)
        for t in result.timings:
            row = by_path[t.model]
            row.speedups.setdefault(provider, {}).setdefault(t.batch, []).append(t.speedup)
            times.setdefault((t.model, t.batch), []).append(t.median_ms)
    for row in timed:
        for b, values in row.speedups.get(provider, {}).items():
            row.speedup.setdefault(provider, {})[b] = statistics.median(values)
            row.median_ms.setdefault(provider, {})[b] = statistics.median(times[(row.path, b)])


def add_roofline(rows: list[Row], arch: Arch, batches: list[int], peak_flops: float, bandwidth: float) -> None:
    for row in rows:
        if not row.path:
            continue
        model = onnx.load(row.path)
        for b in batches:
            shapes = {name: (b, *shape[1:]) for name, shape in arch.input_shapes.items()}
            row.roofline_us[b] = roofline_seconds(roofline(model, shapes, peak_flops, bandwidth)) * 1e6


# --- output ----------------------------------------------------------------------------------------

def format_rows(rows: list[Row], provider: str, batches: list[int], roofline_too: bool) -> str:
    base = rows[0]
    head = f"{'model':<26} {'MACs':>8} {'MACs ratio':>10}"
    for b in batches:
        head += f" {'bs' + str(b) + ' ms':>9} {'speedup':>8} {'eff':>5}"
    if roofline_too:
        head += "".join(f" {'roof bs' + str(b) + ' us':>13} {'roof x':>7}" for b in batches)
    lines = [head]
    for row in rows:
        if row.error or not row.path:
            lines.append(f"{row.label:<26} FAILED: {row.error}")
            continue
        ratio = base.macs / row.macs if base.macs and row.macs else float("nan")
        line = f"{row.label:<26} {row.macs / 1e9:>7.2f}G {ratio:>9.2f}x"
        for b in batches:
            ms = row.median_ms.get(provider, {}).get(b)
            s = row.speedup.get(provider, {}).get(b)
            line += (f" {ms:>9.2f} {s:>7.2f}x {s / ratio:>5.2f}" if s is not None
                     else f" {'-':>9} {'-':>8} {'-':>5}")
        if roofline_too:
            for b in batches:
                roof, roof_base = row.roofline_us.get(b), base.roofline_us.get(b)
                line += f" {roof:>13.1f} {roof_base / roof:>6.2f}x" if roof else f" {'-':>13} {'-':>7}"
        lines.append(line)
    return "\n".join(lines)


def efficiency(row: Row, base: Row, provider: str, batch: int) -> float | None:
    s = row.speedup.get(provider, {}).get(batch)
    if s is None or not row.macs or not base.macs:
        return None
    return s / (base.macs / row.macs)


def verdict_lines(rows: list[Row], provider: str, batches: list[int]) -> list[str]:
    """Per ratio and batch: onnxprune's default efficiency against the best Torch-Pruning variant's."""
    base, lines = rows[0], []
    for ratio in sorted({r.ratio for r in rows if r.ratio is not None}):
        default = next((r for r in rows if r.tool == "onnxprune" and r.ratio == ratio and r.round_to is None), None)
        theirs = [r for r in rows if r.tool == "Torch-Pruning" and r.ratio == ratio and r.path]
        if default is None or not default.path or not theirs:
            continue
        for b in batches:
            ours = efficiency(default, base, provider, b)
            best = max(theirs, key=lambda r: efficiency(r, base, provider, b) or 0.0)
            best_eff = efficiency(best, base, provider, b)
            if ours is None or not best_eff:
                continue
            mark = "meets" if ours >= 0.95 * best_eff else "BELOW"
            lines.append(f"ratio {ratio:g} batch {b}: default eff {ours:.2f} / best Torch-Pruning "
                         f"({best.label}) {best_eff:.2f} = {ours / best_eff:.2f}x  {mark} the 0.95x target")
    return lines


def environment() -> dict:
    import onnxruntime
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    try:
        from importlib.metadata import version

        tp_version = version("torch-pruning")
    except Exception:
        tp_version = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "torch_pruning": tp_version,
            "providers": onnxruntime.get_available_providers()}


def _list(text: str, kind=float) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def _round_list(text: str) -> list[int | None]:
    """'default' -> None (onnxprune's own default), 'none' -> 1, else the multiple."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    return [None if v == "default" else 1 if v in ("none", "1") else int(v) for v in values]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,mobilenet_v2,bert", help="resnet50, mobilenet_v2, bert")
    p.add_argument("--ratios", default="0.3,0.5", help="pruning ratios (default 0.3,0.5)")
    p.add_argument("--round-to", default="default,none,8,32",
                   help="channel roundings: 'default' = onnxprune without round_to (Torch-Pruning: not run), "
                        "'none' = 1 (default default,none,8,32)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--providers", default="auto",
                   help="comma-separated onnxruntime providers (cpu, cuda); auto = cpu, plus cuda where available")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="timed runs per model and batch (default 30)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved timing runs; figures are their medians (default 3)")
    p.add_argument("--bert-layers", type=int, default=4, help="BERT encoder layers (default 4; BERT-base has 12)")
    p.add_argument("--seq", type=int, default=128, help="BERT sequence length (default 128)")
    p.add_argument("--peak-tflops", type=float, default=H100_TF32_TFLOPS,
                   help=f"roofline peak, TFLOP/s (default {H100_TF32_TFLOPS}: H100 SXM5 dense TF32)")
    p.add_argument("--bandwidth-tbs", type=float, default=H100_TBS,
                   help=f"roofline memory bandwidth, TB/s (default {H100_TBS}: H100 SXM5 HBM3)")
    p.add_argument("--no-torch-pruning", action="store_true", help="onnxprune rows only")
    p.add_argument("--keep", metavar="DIR", help="keep the ONNX files here (default: a temporary directory)")
    p.add_argument("--json", metavar="OUT.json", help="also write every row as JSON")
    return p.parse_args(argv)


def providers_to_run(spec: str) -> list[str]:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if spec == "auto":
        return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in available else [])
    return _list(spec, str)


def run_arch(arch: Arch, workdir: Path, args, providers: list[str], batches: list[int]) -> list[Row]:
    print(f"\n== {arch.name}: exporting and pruning", flush=True)
    torch_model = arch.build()
    base_path = workdir / f"{arch.name}.onnx"
    arch.export(torch_model, base_path)
    rows = [Row(arch.name, "base", None, None, path=str(base_path))]
    for ratio in _list(args.ratios):
        for r in _round_list(args.round_to):
            rows.append(prune_onnxprune(base_path, workdir / f"{arch.name}-op-{ratio:g}-r{r}.onnx", arch, ratio, r))
            if not args.no_torch_pruning and r is not None:
                rows.append(prune_torch_pruning(torch_model, workdir / f"{arch.name}-tp-{ratio:g}-r{r}.onnx",
                                                arch, ratio, r))
    measure_counts(rows, arch)
    for provider in providers:
        print(f"timing {sum(1 for r in rows if r.path)} {arch.name} models on {provider}, batches {batches} ...",
              flush=True)
        time_rows(rows, arch, provider, batches, args)
        roof = provider == "cuda"
        if roof:
            add_roofline(rows, arch, batches, args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12)
        print(f"\n{arch.name} on {provider} ({args.warmup} warm-up + {args.iters} timed runs per model and batch, "
              f"interleaved, median of {args.repeats} such runs; speedup and eff = speedup / MACs ratio against "
              "the base)")
        print(format_rows(rows, provider, batches, roof))
        verdicts = verdict_lines(rows, provider, batches)
        if verdicts:
            print("\n" + "\n".join(verdicts))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    batches = _list(args.batch, int)
    providers = providers_to_run(args.providers)
    env = environment()
    print(f"machine: {env['cpu']}, {env['cores']} cores, 1-min load {env['load_average_1m']:.2f} at start; "
          f"onnxruntime {env['onnxruntime']} ({', '.join(env['providers'])}), torch {env['torch']}, "
          f"torch-pruning {env['torch_pruning']}", flush=True)
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_latency_"))
    workdir.mkdir(parents=True, exist_ok=True)
    archs = {"resnet50": lambda: image_arch("resnet50"), "mobilenet_v2": lambda: image_arch("mobilenet_v2"),
             "bert": lambda: bert_arch(args.bert_layers, args.seq)}
    all_rows = []
    for name in _list(args.models, str):
        if name not in archs:
            print(f"unknown model {name!r}; choose from {', '.join(archs)}", file=sys.stderr)
            return 2
        try:
            all_rows += run_arch(archs[name](), workdir, args, providers, batches)
        except Exception:  # one architecture's failure is a result; go on with the next
            print(f"{name}: FAILED\n{traceback.format_exc()}", file=sys.stderr)
    env["load_average_1m_end"] = os.getloadavg()[0]
    print(f"\n1-min load {env['load_average_1m_end']:.2f} at the end; files: {workdir}"
          + ("" if args.keep else " (temporary, removed)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "args": vars(args),
                                               "rows": [asdict(r) for r in all_rows]}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``onnxprune bench A.onnx [B.onnx ...]``: onnxruntime latency side by side."""

from __future__ import annotations

import argparse

from .options import _batches, _count, _Parser, _positive, show

FLAGS = {"input_shapes": "--input-shape", "provider": "--provider", "batches": "--batch", "threads": "--threads",
         "warmup": "--warmup", "iters": "--iters", "json": "--json"}
BENCH_SCHEMA = 1


def build_bench_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxprune bench",
        description="onnxruntime latency of models side by side: warm-up, then timed runs interleaved "
        "round-robin; median, p90, p99 and speedup over the first model.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files; the first is the speedup reference")
    p.add_argument("--provider", default="cpu",
                   help="cpu, cuda, or a full onnxruntime provider name (default cpu)")
    p.add_argument("--batch", type=_batches, default=[1], metavar="B1,B2,...",
                   help="batch sizes (dim 0 of every input; default 1)")
    p.add_argument("--threads", type=_positive, metavar="N", help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--warmup", type=_count, default=10, metavar="W",
                   help="untimed runs per model and batch (default 10)")
    p.add_argument("--iters", type=_positive, default=100, metavar="N",
                   help="timed runs per model and batch (default 100)")
    p.add_argument("--json", metavar="FILE.json", help="write the timings as JSON (- for stdout)")
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin a dynamic input's other dims (dim 0 comes from --batch; repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def run_bench(argv: list[str]) -> int:
    from ..model.inputs import parse_input_shapes
    from ..model.save import check_outputs, model_files
    from ..runtime.bench import bench, format_table
    from .output import emit_json, human_stream, stamped

    args = build_bench_parser().parse_args(argv)
    # The JSON replaces an existing file, as it always did (no --force here), but never a model read.
    check_outputs({"`json`": args.json}, {f"the model {m}": model_files(m) for m in args.models}, force=True,
                  stdout_ok=("`json`",))
    result = bench(args.models, args.batch, provider=args.provider, threads=args.threads,
                   warmup=args.warmup, iters=args.iters, input_shapes=parse_input_shapes(args.input_shape))
    if not args.quiet:
        show(format_table(result), FLAGS, file=human_stream(args.json))
    if args.json:  # last: on stdout (-), the JSON alone and only once the command has succeeded
        emit_json(args.json, stamped(result.to_dict(), ["onnxprune", "bench", *argv], BENCH_SCHEMA))
    return 0

"""Transformer benchmark: BERT-base (12 layers, sequence 128) pruned at 0.4 (heads + MLP neurons).

    .venv/bin/python -m tools.bench_transformers [--ratio 0.4] [--seq 128] [--batch 1,8] [--json out.json]

The model: ``transformers.BertModel(BertConfig())`` (BERT-base: 12 layers,
hidden 768, 12 heads, MLP 3072), random init with torch seed 0, no download;
exported with the legacy exporter (opset 17, dynamic batch and sequence),
inputs ``input_ids`` and ``attention_mask``, output ``last_hidden_state``.
(The dynamo exporter gives the same graph structure for this model, see
tests/test_transformers.py; the legacy one exports it faster.)

It is pruned with the CLI in a subprocess (the time covers the whole run:
interpreter start, load, analyse, prune, onnxruntime verification, write),
40% of the heads of every layer and 40% of every MLP's neurons; the hidden
size is kept (see README). Then both models are timed with ``onnxprune bench``'s
function on the onnxruntime CPU provider, interleaved, at each batch size and
the given sequence length. MACs and params come from onnxprune.analysis.stats.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from onnxprune.analysis.stats import count_macs, count_params, format_count
from onnxprune.runtime.bench import bench, format_table

ROOT = Path(__file__).resolve().parent.parent


def export_bert(path: Path, layers: int, seq: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    export_bert_model(transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers)).eval(), path, seq)


def export_bert_model(model, path: Path, seq: int) -> None:
    """The export recipe for a (possibly pruned) BertModel; tools/bench_latency.py uses it too."""
    import warnings

    import torch

    class LastHidden(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask):
            return self.inner(ids, mask).last_hidden_state

    ids = torch.randint(0, model.config.vocab_size, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.long)
    names = ["input_ids", "attention_mask"]
    axes = {n: {0: "batch", 1: "seq"} for n in [*names, "last_hidden_state"]}
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(model), (ids, mask), str(path), input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        base, pruned = Path(tmp) / "bert.onnx", Path(tmp) / "bert.pruned.onnx"
        started = time.perf_counter()
        export_bert(base, args.layers, args.seq)
        print(f"exported BERT ({args.layers} layers) in {time.perf_counter() - started:.1f} s", flush=True)
        shape = [f"--input-shape={n}:1,{args.seq}" for n in ("input_ids", "attention_mask")]
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "onnxprune", str(base), "--structured", str(args.ratio),
                               "-o", str(pruned), *shape], capture_output=True, text=True)
        prune_seconds = time.perf_counter() - started
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        print(done.stdout)
        pinned = {"input_ids": (1, args.seq), "attention_mask": (1, args.seq)}
        rows = {}
        for label, path in (("base", base), ("pruned", pruned)):
            model = onnx.load(str(path))
            rows[label] = {"params": count_params(model), "macs": count_macs(model, pinned)}
        result = bench([str(base), str(pruned)], batches, threads=args.threads, iters=args.iters, warmup=5,
                       input_shapes={"input_ids": (1, args.seq), "attention_mask": (1, args.seq)})
    print(format_table(result))
    print(f"\npruning (whole CLI run): {prune_seconds:.1f} s")
    print(f"{'model':<8} {'params':>9} {'MACs':>9} " + " ".join(f"{'bs' + str(b) + ' ms':>10}" for b in batches))
    for label in ("base", "pruned"):
        name = "bert.onnx" if label == "base" else "bert.pruned.onnx"
        times = [t.median_ms for t in result.timings if t.model.endswith(name)]
        rows[label]["median_ms"] = dict(zip(batches, times))
        print(f"{label:<8} {format_count(rows[label]['params']):>9} {format_count(rows[label]['macs']):>9} "
              + " ".join(f"{t:>10.2f}" for t in times))
    speedups = {b: rows["base"]["median_ms"][b] / rows["pruned"]["median_ms"][b] for b in batches}
    print("latency speedup: " + ", ".join(f"batch {b} {s:.2f}x" for b, s in speedups.items())
          + f"; MACs {rows['base']['macs'] / rows['pruned']['macs']:.2f}x fewer")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "speedups": speedups, "prune_seconds": prune_seconds,
                                         "seq": args.seq, "ratio": args.ratio}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoder benchmark: GPT-2 exported with its KV cache, heads + MLP pruned with --allow-io-change.

    .venv/bin/python -m tools.bench_decoder [--ratio 0.4] [--layers 12] [--past 128] [--new 1,32] [--json out.json]

The model: ``transformers.GPT2Model(GPT2Config(n_layer=L))`` (GPT-2 small when
L = 12: hidden 768, 12 heads, MLP 3072), random init with torch seed 0, no
download, eager attention; wrapped so that the cache is flat graph IO
(``past_key_i``/``past_value_i`` in, ``present_key_i``/``present_value_i``
out) and exported with the legacy exporter (opset 17; batch, sequence and
past length dynamic). tests/test_iochange.py exports it the same way.

It is pruned with the CLI in a subprocess (the time covers the whole run,
verification included), ``--structured R --allow-io-change``: R of every
layer's heads (their cache shrinks with them) and of every MLP's neurons.
Then both models are timed side by side with ``onnxprune bench``'s function
on the onnxruntime CPU provider: a decode step (1 new token) and a prompt
chunk (32 new tokens) on a cache of ``--past`` positions, each model fed a
cache of its own head count.
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
from onnxprune.cut import iochange
from onnxprune.runtime.bench import bench, format_table

ROOT = Path(__file__).resolve().parent.parent


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kv}_{i}" for i in range(layers) for kv in ("key", "value")]
    return past, [n.replace("past", "present") for n in past]


def export_gpt2_with_cache(path: Path, config, exporter: str = "legacy", past: int = 3, new: int = 2) -> None:
    """``GPT2Model(config)`` (seeded) with a flat cache, exported with dynamic batch, sequence and past."""
    import torch
    import transformers

    class WithCache(torch.nn.Module):
        """(input_ids, past_key_0, past_value_0, ...) -> (hidden, present_key_0, present_value_0, ...);
        transformers 5 keeps the cache in a DynamicCache built from (key, value) pairs per layer."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *cache):
            pairs = [(cache[2 * i], cache[2 * i + 1]) for i in range(len(cache) // 2)]
            out = self.model(input_ids=input_ids, use_cache=True,
                             past_key_values=transformers.DynamicCache(ddp_cache_data=pairs, config=self.model.config))
            cache = (t for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
            return (out.last_hidden_state, *cache)

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = WithCache(transformers.GPT2Model(config).eval()).eval()
    heads, dim = config.n_head, config.n_embd // config.n_head
    inputs, outputs = cache_names(config.n_layer)
    args = (torch.randint(0, config.vocab_size, (1, new)),) + tuple(torch.rand(1, heads, past, dim) for _ in inputs)
    names = {"input_names": ["input_ids"] + inputs, "output_names": ["hidden"] + outputs}
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter == "legacy":
            dynamic = {"input_ids": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}}
            dynamic |= {n: {0: "batch", 2: "past"} for n in inputs} | {n: {0: "batch", 2: "total"} for n in outputs}
            torch.onnx.export(model, args, str(path), opset_version=17, dynamo=False, dynamic_axes=dynamic, **names)
        else:
            batch, seq, length = (torch.export.Dim(n) for n in ("batch", "seq", "past"))
            shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: length} for _ in inputs))
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False, dynamic_shapes=shapes,
                              **names)


def main(argv=None) -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--past", type=int, default=128)
    p.add_argument("--new", default="1,32", help="new tokens per run (1: a decode step)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    config = transformers.GPT2Config(n_layer=args.layers)
    heads, dim = config.n_head, config.n_embd // config.n_head
    inputs, _ = cache_names(args.layers)

    rows, tables = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        base, pruned = Path(tmp) / "gpt2.onnx", Path(tmp) / "gpt2.pruned.onnx"
        started = time.perf_counter()
        export_gpt2_with_cache(base, config)
        print(f"exported GPT-2 ({args.layers} layers) with its cache in {time.perf_counter() - started:.1f} s",
              flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "onnxprune", str(base), "--structured", str(args.ratio),
                               "--allow-io-change", "-o", str(pruned)], capture_output=True, text=True)
        prune_seconds = time.perf_counter() - started
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        print(done.stdout)
        for new in [int(n) for n in args.new.split(",")]:
            pinned = {"input_ids": (1, new)} | {n: (1, heads, args.past, dim) for n in inputs}
            for label, path in (("base", base), ("pruned", pruned)):
                model = onnx.load(str(path))
                row = rows.setdefault(label, {"params": count_params(model), "macs": {}, "median_ms": {}})
                row["macs"][new] = count_macs(model, iochange.shrink_shapes(pinned, iochange.read(model)))
            result = bench([str(base), str(pruned)], [1], threads=args.threads, iters=args.iters, warmup=5,
                           input_shapes=pinned)
            tables.append(f"{new} new token(s), cache of {args.past}:\n{format_table(result)}")
            for label, timing in zip(("base", "pruned"), result.timings):
                rows[label]["median_ms"][new] = timing.median_ms
    print("\n\n".join(tables))
    print(f"\npruning (whole CLI run): {prune_seconds:.1f} s")
    news = list(rows["base"]["median_ms"])
    print(f"{'model':<8} {'params':>9} " + " ".join(f"{'MACs ' + str(n):>10} {'ms ' + str(n):>8}" for n in news))
    for label, row in rows.items():
        print(f"{label:<8} {format_count(row['params']):>9} "
              + " ".join(f"{format_count(row['macs'][n]):>10} {row['median_ms'][n]:>8.2f}" for n in news))
    speedups = {n: rows["base"]["median_ms"][n] / rows["pruned"]["median_ms"][n] for n in news}
    print("latency speedup: " + ", ".join(
        f"{n} new token(s) {s:.2f}x (MACs {rows['base']['macs'][n] / rows['pruned']['macs'][n]:.2f}x fewer)"
        for n, s in speedups.items()))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "speedups": speedups, "prune_seconds": prune_seconds,
                                         "past": args.past, "ratio": args.ratio}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

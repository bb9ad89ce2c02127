"""onnxruntime-genai folders: a tiny Llama built by the model builder, pruned three ways.

    .venv/bin/python -m tools.bench_genai [--hidden 64,128] [--precision fp32,int4] [--ratio 0.3] [--json out.json]

The model: ``transformers.LlamaForCausalLM(LlamaConfig(...))``, random init with
torch seed 0, no download: vocabulary 64, 2 layers, 4 query heads over 2
key/value heads, MLP twice the hidden size, a word-level tokenizer trained on
a few words; built offline by ``onnxruntime_genai.models.builder -p PRECISION
-e cpu`` (q, k and v packed into one projection, GroupQueryAttention with a
cache). tests/test_configs.py builds it the same way (``build_folder``).

Each folder is pruned with the CLI in a subprocess, ``--structured R
--allow-io-change`` and the cache's shapes (``cache_shapes``), three ways:
the MLP only (``--head-ratio 0``), the default (query heads within each
key/value group) and ``--prune-kv-groups`` (whole key/value groups). It
prints the MACs (as onnxprune counts them, from the run's report), the heads
per layer left, and whether the written folder loads in onnxruntime-genai
and generates 8 tokens. A run that fails prints its one-line error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from onnxprune.analysis.stats import format_count

LAYERS, HEADS, KV_HEADS = 2, 4, 2
MODES = {"MLP only": ["--head-ratio", "0"], "default": [], "--prune-kv-groups": ["--prune-kv-groups"]}


def tiny_tokenizer(transformers):
    """A word-level tokenizer trained on a few words: offline, and enough for the builder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["hello world the cat sat on the mat"],
                              trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


def build_folder(work: Path, precision: str, hidden: int) -> Path:
    """The builder's folder (model.onnx, genai_config.json, tokenizer) for the tiny Llama, under ``work``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                      num_key_value_heads=KV_HEADS, max_position_embeddings=128)
    transformers.LlamaForCausalLM(config).save_pretrained(work / "hf")
    tiny_tokenizer(transformers).save_pretrained(work / "hf")  # the builder copies it beside the model
    built = work / "in"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"),
                    "-o", str(built), "-p", precision, "-e", "cpu", "-c", str(work / "cache")],
                   check=True, capture_output=True)
    return built


def cache_shapes(hidden: int) -> list[str]:
    """--input-shape for the prompt, its mask and the cache (the builder leaves its head size dynamic)."""
    shapes = ["--input-shape", "input_ids:1,4", "--input-shape", "attention_mask:1,8"]
    for layer in range(LAYERS):
        for kv in ("key", "value"):
            shapes += ["--input-shape", f"past_key_values.{layer}.{kv}:1,{KV_HEADS},4,{hidden // HEADS}"]
    return shapes


def generates_8_tokens(folder: Path) -> bool:
    """Whether onnxruntime-genai loads the folder and generates 8 tokens after a 4-token prompt."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16)
    generator = og.Generator(model, params)
    generator.append_tokens([1, 5, 6, 7])
    for _ in range(8):
        generator.generate_next_token()
    return len(generator.get_sequence(0)) == 12


def prune_folder(built: Path, out: Path, hidden: int, ratio: float, extra: list[str]) -> dict:
    """One CLI run: the report's MACs and head counts, and the folder's generation; or its error."""
    out.mkdir(parents=True)
    report = out / "report.json"
    run = subprocess.run([sys.executable, "-m", "onnxprune", str(built / "model.onnx"), "--structured", str(ratio),
                          "--allow-io-change", *cache_shapes(hidden), *extra, "-o", str(out / "model.onnx"),
                          "--report", str(report)], capture_output=True, text=True)
    if run.returncode:
        return {"exit": run.returncode, "error": run.stderr.strip().splitlines()[-1]}
    found = json.loads(report.read_text())
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    return {"macs_before": found["macs_before"], "macs_after": found["macs_after"],
            "heads": decoder["num_attention_heads"], "kv_heads": decoder["num_key_value_heads"],
            "generates": generates_8_tokens(out)}


def _cell(result: dict) -> str:
    if "error" in result:
        return f"exit {result['exit']}: {result['error']}"
    ratio = result["macs_before"] / result["macs_after"]
    return (f"{format_count(result['macs_after'])} ({ratio:.2f}x), heads {result['heads']}, KV {result['kv_heads']}"
            f"{'' if result['generates'] else ', DOES NOT GENERATE'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="64,128", help="hidden sizes (head size = hidden / 4)")
    parser.add_argument("--precision", default="fp32,int4")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in (int(h) for h in args.hidden.split(",")):
            for precision in args.precision.split(","):
                work = Path(tmp) / f"{precision}_{hidden}"
                built = build_folder(work, precision, hidden)
                results = {mode: prune_folder(built, work / f"out{i}", hidden, args.ratio, extra)
                           for i, (mode, extra) in enumerate(MODES.items())}
                before = next((r["macs_before"] for r in results.values() if "macs_before" in r), None)
                rows.append({"hidden": hidden, "precision": precision, "macs_before": before, **results})
                print(f"hidden {hidden}, {precision}: MACs {format_count(before) if before else '?'}")
                for mode in MODES:
                    print(f"  {mode:18} {_cell(results[mode])}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

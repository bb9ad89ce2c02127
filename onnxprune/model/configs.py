"""The configs beside a decoder model, updated to the pruned one: one writer for width and depth.

onnxruntime-genai loads a folder, not a model file: ``genai_config.json`` names the decoder's
file and gives its head counts and layer count (which it uses to size and name the KV cache),
the tokenizer files sit beside it, and a Hugging Face ``config.json`` often does too. A pruned
model written without them does not load; written with the input's copies it loads with the
wrong head counts. So the values are read back from the pruned graph itself (the attention
ops' head attributes, the cache inputs, the MLP's down projections) rather than from the
plan: whatever pruned the model, width or depth, the configs say what it is.

A value that one number cannot describe (heads pruned unevenly across layers, cache names
with gaps, which ``renumber_cache`` closes: cut/renumber.py) is a UsageError raised by
``updated_configs``, which the run calls before it stages anything: no output appears. The
input folder is never written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx

from ..errors import UsageError

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
# what onnxruntime-genai and transformers read beside the model; copied unchanged
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")
ATTENTION_OPS = {"GroupQueryAttention", "MultiHeadAttention", "Attention"}  # com.microsoft, with num_heads
DEFAULT_PAST_KEY = "past_key_values.%d.key"  # the exporters' and the builder's name
_DOWN_PROJ = re.compile(r"layers\.(\d+)/mlp/down_proj/")  # the builder's and torch.onnx's node names


def beside(input_path: Path) -> list[Path]:
    """The config and tokenizer files in the input model's folder."""
    folder = Path(input_path).parent
    names = (GENAI_CONFIG, HF_CONFIG, *TOKENIZER_FILES)
    return [folder / n for n in names if (folder / n).is_file()]


def updated_configs(input_path: Path, output: Path, model: onnx.ModelProto) -> tuple[list, list[dict]]:
    """([(final path, bytes)], [changes]): the files to stage beside ``output``, and for the
    report what each config changed (``{"file", "changes": {key: [before, after]}}``).
    Nothing when no config is beside the input, or when ``output`` is in the input's folder
    (its configs would be the input's). Raises UsageError when the pruned model cannot be
    described by one value per key."""
    files = beside(input_path)
    if not any(f.name in (GENAI_CONFIG, HF_CONFIG) for f in files):
        return [], []
    if Path(output).parent.resolve() == Path(input_path).parent.resolve():
        return [], []
    genai = _read_json(files, GENAI_CONFIG)
    past_key = ((genai or {}).get("model", {}).get("decoder", {}).get("inputs", {})
                .get("past_key_names", DEFAULT_PAST_KEY))
    shape = pruned_shape(model, past_key)
    staged, changes = [], []
    for f in files:
        if f.name == GENAI_CONFIG:
            data, changed = _genai(genai, shape, Path(output).name)
        elif f.name == HF_CONFIG:
            data, changed = _hf(_read_json(files, HF_CONFIG), shape)
        else:
            staged.append((Path(output).parent / f.name, f.read_bytes()))
            continue
        staged.append((Path(output).parent / f.name, (json.dumps(data, indent=4) + "\n").encode()))
        changes.append({"file": f.name, "changes": changed})
    return staged, changes


def pruned_shape(model: onnx.ModelProto, past_key: str = DEFAULT_PAST_KEY) -> dict:
    """The decoder's sizes as the graph has them: num_attention_heads and num_key_value_heads
    (attention ops' attributes), num_hidden_layers (cache inputs), intermediate_size (MLP down
    projections' input width); a key is absent where the graph does not show it."""
    shape = {}
    attention = [n for n in model.graph.node if n.op_type in ATTENTION_OPS and n.domain == "com.microsoft"]
    for key, attr in (("num_attention_heads", "num_heads"), ("num_key_value_heads", "kv_num_heads")):
        values = {a.i for n in attention for a in n.attribute if a.name == attr}
        shape.update(_one(key, values, "attention layers"))
    layers = _cache_layers(model, past_key)
    if layers:
        if layers != list(range(len(layers))):
            raise UsageError(f"the pruned model's cache inputs are layers {_listed(layers)}: onnxruntime-genai and "
                             f"config.json expect 0..{len(layers) - 1} (`renumber_cache` renumbers them; or write "
                             f"the output to a folder without the configs)")
        shape["num_hidden_layers"] = len(layers)
    shape.update(_one("intermediate_size", set(_mlp_widths(model).values()), "MLP layers"))
    return shape


def _one(key: str, values: set, where: str) -> dict:
    if len(values) > 1:
        raise UsageError(f"cannot write the configs: {key} differs across {where} ({_listed(sorted(values))}); "
                         f"prune them evenly (one --structured ratio, no per-layer ratios)")
    return {key: values.pop()} if values else {}


def _cache_layers(model: onnx.ModelProto, past_key: str) -> list[int]:
    pattern = re.compile("^" + re.escape(past_key).replace("%d", r"(\d+)") + "$")
    return sorted(int(m.group(1)) for i in model.graph.input if (m := pattern.match(i.name)))


def _mlp_widths(model: onnx.ModelProto) -> dict[int, int]:
    """Layer -> the down projection's input width (MatMul weight rows, MatMulNBits' K)."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    widths = {}
    for node in model.graph.node:
        layer = _DOWN_PROJ.search(node.name)
        if layer is None:
            continue
        if node.op_type == "MatMulNBits":
            widths[int(layer.group(1))] = next(a.i for a in node.attribute if a.name == "K")
        elif node.op_type == "MatMul" and len(sizes.get(node.input[1], [])) == 2:
            widths[int(layer.group(1))] = sizes[node.input[1]][0]
    return widths


def _genai(config: dict, shape: dict, filename: str) -> tuple[dict, dict]:
    decoder = config.setdefault("model", {}).setdefault("decoder", {})
    changed = _update(decoder, shape, ("num_attention_heads", "num_key_value_heads", "num_hidden_layers"))
    if decoder.get("filename") != filename:  # the output's name, which genai opens
        changed["filename"] = [decoder.get("filename"), filename]
        decoder["filename"] = filename
    return config, changed


def _hf(config: dict, shape: dict) -> tuple[dict, dict]:
    heads = config.get("num_attention_heads")
    # transformers derives head_dim = hidden_size / heads where it is absent: fewer heads, same head size
    if "head_dim" not in config and heads and shape.get("num_attention_heads", heads) != heads:
        config["head_dim"] = config["hidden_size"] // heads
    layers = config.get("num_hidden_layers")
    if layers and shape.get("num_hidden_layers", layers) != layers:  # e.g. layer_types: one entry a layer
        lists = [k for k, v in config.items() if isinstance(v, list) and len(v) == layers]
        if lists:
            raise UsageError(f"cannot write config.json: its per-layer list(s) {_listed(lists)} would need "
                             f"the removed layers' entries dropped; keep the layers or remove the lists")
    keys = ("num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size")
    return config, _update(config, shape, tuple(k for k in keys if k in config))


def _update(config: dict, shape: dict, keys: tuple) -> dict:
    changed = {}
    for key in keys:
        if key in shape and config.get(key) != shape[key]:
            changed[key] = [config.get(key), shape[key]]
            config[key] = shape[key]
    return changed


def _read_json(files: list[Path], name: str) -> dict | None:
    path = next((f for f in files if f.name == name), None)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: not a JSON object")
    return data


def _listed(values) -> str:
    return ", ".join(str(v) for v in values)

"""``--renumber-cache``: a decoder's KV cache numbered 0..n-1 again after its layers went.

Removing attention blocks under ``allow_io_change`` (cut/depth.py) drops
their cache inputs and outputs and keeps every other name, so a 4-layer
decoder without layer 1 takes ``past_key_values.0/2/3.key``. onnxruntime-genai
(and any runtime that sizes the cache from a layer count) names the cache
``past_key_values.%d.key`` for 0..n-1: this step renames the remaining cache
tensors, in the original order, to the contiguous numbers.

A cache name is recognised by its shape, not by a list of models: a graph
input or output whose name holds exactly one number, the layer, in a
template that says past, present or cache (``past_key_values.%d.key``,
``present.%d.value``, ``past_key_%d``, ``present_%d_out``). Each template is
one tensor per layer; all templates must cover the same layers, or the new
numbers would pair a layer's key with another layer's value. Other names are
left alone. The renaming is recorded in the model's metadata with the cut's
other IO changes (cut/iochange.py: an entry with ``axis`` -2 and its new name
in ``renamed``), so that verification, output errors and a user can map the
original's names to the renamed model's.
"""

from __future__ import annotations

import re
from collections import defaultdict

import onnx

from ..errors import UsageError
from . import iochange

CACHE_WORDS = ("past", "present", "cache")  # what a cache tensor's name says it is, in every exporter seen
_NUMBER = re.compile(r"\d+")


def cache_template(name: str) -> tuple[str, int] | None:
    """(template with ``%d`` for the layer, layer) for a cache tensor's name; None for any other name."""
    numbers = list(_NUMBER.finditer(name))
    if len(numbers) != 1 or str(int(numbers[0].group())) != numbers[0].group():  # none, several, or "01"
        return None
    number = numbers[0]
    template = name[:number.start()].replace("%", "%%") + "%d" + name[number.end():].replace("%", "%%")
    if not any(word in template.lower() for word in CACHE_WORDS):
        return None
    return template, int(number.group())


def cache_layers(model: onnx.ModelProto) -> dict[str, set[int]]:
    """Template -> the layers the graph inputs and outputs named by it have."""
    layers = defaultdict(set)
    for tensor in (*model.graph.input, *model.graph.output):
        found = cache_template(tensor.name)
        if found is not None:
            layers[found[0]].add(found[1])
    return dict(layers)


def new_cache_names(model: onnx.ModelProto) -> dict[str, str]:
    """Old name -> new name for the cache tensors whose layer number changes (empty: already 0..n-1).
    Raises UsageError where the graph has no cache names or its templates cover different layers."""
    templates = cache_layers(model)
    if not templates:
        raise UsageError("`renumber_cache`: no graph input or output is named as a KV cache with its layer number "
                         "(such as past_key_values.N.key, present.N.value, past_key_N): nothing to renumber")
    layers = sorted(set().union(*templates.values()))
    for template, have in sorted(templates.items()):
        missing = [n for n in layers if n not in have]
        if missing:
            other = next(t for t, s in sorted(templates.items()) if missing[0] in s)
            raise UsageError(f"`renumber_cache`: {other % missing[0]} has no {template % missing[0]} beside it "
                             f"(the cache names do not all cover layers {_listed(layers)}; a removed layer's input "
                             "that the graph still reads, e.g. for its shape, stays): renumbering would pair one "
                             "layer's tensors with another's")
    number = {layer: i for i, layer in enumerate(layers)}
    return {t % n: t % number[n] for t, have in sorted(templates.items()) for n in sorted(have) if number[n] != n}


def renumber_cache(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """A copy of ``model`` with its cache tensors numbered 0..n-1, the renaming added to its IO record
    (``model`` itself when the numbers already are). ``copy=False`` renames ``model`` itself instead:
    for a model the caller owns (a cut's result), whose weights are then not held twice."""
    mapping = new_cache_names(model)
    if not mapping:
        return model
    before = iochange.read(model)
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    renamed = model
    if copy:
        renamed = onnx.ModelProto()
        renamed.CopyFrom(model)
    graph = renamed.graph
    taken = _names(graph) - set(mapping)
    clash = next((new for new in mapping.values() if new in taken), None)
    if clash is not None:
        raise UsageError(f"`renumber_cache`: the graph already has a tensor named {clash}, which a renumbered "
                         "cache tensor would take")
    _rename_in(graph, mapping)
    changes = [iochange.renaming(name, role, mapping[name]) for role, names in (("input", inputs), ("output", outputs))
               for name in names if name in mapping]
    iochange.record(renamed, before + changes)
    return renamed


def _rename_in(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Every use of the names in ``graph``, its subgraphs included (they read outer names)."""
    for tensor in (*graph.input, *graph.output, *graph.value_info):
        tensor.name = mapping.get(tensor.name, tensor.name)
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                names[i] = mapping.get(name, name)
        for sub in _subgraphs(node):
            _rename_in(sub, mapping)


def _names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name in ``graph`` and its subgraphs."""
    names = {t.name for t in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for sub in _subgraphs(node):
            names |= _names(sub)
    return names - {""}


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _listed(values) -> str:
    return ", ".join(str(v) for v in values)

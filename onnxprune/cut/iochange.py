"""Graph inputs and outputs whose shape the cut changed (``--allow-io-change``).

Pruning keeps the graph's inputs and outputs as they were, with one opt-in
exception: attention heads that reach them, as in a decoder exported with a
KV cache (past_key/past_value in, present_key/present_value out). There the
head axis of the cache tensors shrinks with the heads.

The change is recorded in the pruned model itself (metadata entry
``onnxprune.io_changes``: per tensor and axis, the original size and the
positions kept), so that anything comparing it with the original model
(verification, output errors, distillation, benchmarks) can give it the kept
positions of the original's inputs and compare the kept positions of the
original's outputs, and so that a user can slice an existing cache the same way.

A removed block's cache goes whole (``axis`` REMOVED); ``--renumber-cache``
then renames the remaining cache tensors (``axis`` RENAMED, the new name in
``renamed``; cut/renumber.py). Every entry names a tensor as the original
has it: feeding and comparing take the kept positions first, then map the
names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import onnx

METADATA_KEY = "onnxprune.io_changes"
REMOVED = -1  # IOChange.axis of a graph input or output removed whole (a removed block's KV cache)
RENAMED = -2  # IOChange.axis of a graph input or output renamed (--renumber-cache): its new name in `renamed`


@dataclass
class IOChange:
    name: str
    role: str  # "input" or "output"
    axis: int
    size_before: int
    kept: list[int]  # positions of the original's axis that remain, in order
    shape: list[int] | None = None  # a removed input's shape at analysis: how the original is fed
    renamed: str | None = None  # a renamed tensor's name in the changed model

    @property
    def size_after(self) -> int:
        return len(self.kept)

    @property
    def removed(self) -> bool:
        return self.axis == REMOVED

    @property
    def is_rename(self) -> bool:
        return self.axis == RENAMED

    def to_json(self) -> dict:
        entry = asdict(self)
        if self.renamed is None:  # the entries of a cut that renames nothing read as they always have
            del entry["renamed"]
        return entry


def find_io_changes(view, cut) -> list[IOChange]:
    """The graph inputs and outputs with positions removed, per axis."""
    changes = []
    for role, tensors in (("input", view.graph.inputs), ("output", view.graph.outputs)):
        for t in tensors:
            for axis in range(view.rank(t) or 0):
                removed = cut.removed(t, axis)
                if len(removed):
                    size = int(view.dim(t, axis))
                    kept = np.setdiff1d(np.arange(size), removed).tolist()
                    changes.append(IOChange(t.name, role, axis, size, kept))
    return changes


def removal(name: str, role: str, shape: list[int] | None = None) -> IOChange:
    """The change of a graph input or output that a cut removed whole (cut/depth.py)."""
    return IOChange(name, role, REMOVED, 0, [], list(shape) if shape is not None else None)


def renaming(name: str, role: str, new_name: str) -> IOChange:
    """The change of a graph input or output that keeps its data under another name (cut/renumber.py)."""
    return IOChange(name, role, RENAMED, 0, [], None, new_name)


def new_names(changes: list[IOChange], role: str) -> dict[str, str]:
    """Original name -> the changed model's name, for the ``role`` ("input"/"output") tensors renamed."""
    return {c.name: c.renamed for c in changes if c.is_rename and c.role == role}


def _rename(arrays: dict, mapping: dict[str, str]) -> dict:
    # one pass, in order: a renumbered cache takes names that others gave up (layer 2 -> 1)
    return {mapping.get(k, k): v for k, v in arrays.items()} if mapping else arrays


def compose(earlier: list[IOChange], later: list[IOChange]) -> list[IOChange]:
    """The changes of two cuts in a row, relative to the first model."""
    result = {(c.name, c.axis): c for c in earlier}
    for c in later:
        first = result.get((c.name, c.axis))
        if first is None or c.is_rename:
            result[(c.name, c.axis)] = c
        else:
            result[(c.name, c.axis)] = IOChange(c.name, c.role, c.axis, first.size_before,
                                                [first.kept[k] for k in c.kept])
    return list(result.values())


def read(model: onnx.ModelProto) -> list[IOChange]:
    """The changes recorded in ``model`` (none for a model onnxprune did not reshape)."""
    entry = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    return [IOChange(**c) for c in json.loads(entry)] if entry else []


def record(model: onnx.ModelProto, changes: list[IOChange]) -> None:
    """Store ``changes`` in the model's metadata (replacing an earlier record)."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if changes:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps([c.to_json() for c in changes])


def apply_to_type(value_info: onnx.ValueInfoProto, changes: list[IOChange]) -> None:
    """Set the changed dims in a graph input's or output's declared shape."""
    dims = value_info.type.tensor_type.shape.dim
    for c in changes:
        if c.name == value_info.name and 0 <= c.axis < len(dims):
            dims[c.axis].Clear()
            dims[c.axis].dim_value = c.size_after


def _take(arrays: dict, changes: list[IOChange], role: str) -> dict:
    """The kept positions of ``arrays`` (keyed as the original names them), keyed as the changed model does."""
    result = dict(arrays)
    for c in changes:
        if c.role == role and c.name in result and not c.is_rename:
            if c.removed:  # the changed model has no such input or output
                del result[c.name]
            else:
                result[c.name] = np.take(result[c.name], c.kept, axis=c.axis)
    return _rename(result, new_names(changes, role))


def candidate_feeds(feeds: dict, changes: list[IOChange]) -> dict:
    """The original's inputs as the changed model takes them: the kept positions, under its names."""
    return _take(feeds, changes, "input") if changes else feeds


def candidate_data(data, changes: list[IOChange]):
    """A Dataset (data.py) of the original's inputs as the changed model takes them."""
    if not changes:
        return data
    from ..data import Dataset

    return Dataset(candidate_feeds(data.inputs, changes), data.labels, data.source, data.notes)


def comparable_outputs(outputs: dict, changes: list[IOChange]) -> dict:
    """The original's outputs at the positions the changed model still produces, under its names."""
    return _take(outputs, changes, "output") if changes else outputs


def _resize(shapes: dict, changes: list[IOChange], before: str, after: str) -> dict:
    """Shapes keyed by the original's input names, resized (the renaming is the callers')."""
    result = dict(shapes)
    for c in changes:
        if c.is_rename:
            continue
        if c.removed and c.role == "input":  # the original takes it, the changed model does not
            if before == "size_after" and c.shape is not None:
                result.setdefault(c.name, tuple(c.shape))
            elif before == "size_before":
                result.pop(c.name, None)
            continue
        dims = list(result.get(c.name, ()))
        if c.role == "input" and 0 <= c.axis < len(dims) and dims[c.axis] == getattr(c, before):
            dims[c.axis] = getattr(c, after)
            result[c.name] = tuple(dims)
    return result


def shrink_shapes(shapes: dict, changes: list[IOChange]) -> dict:
    """Input shapes for the original -> the same for the changed model, under its names (shapes
    already shrunk stay)."""
    return _rename(_resize(shapes, changes, "size_before", "size_after"), new_names(changes, "input"))


def grow_shapes(shapes: dict, changes: list[IOChange]) -> dict:
    """Input shapes for the changed model -> the same for the original, under its names."""
    original = {new: old for old, new in new_names(changes, "input").items()}
    return _resize(_rename(shapes, original), changes, "size_after", "size_before")


def describe(changes: list[IOChange], shapes_before: dict[str, list]) -> list[dict]:
    """One entry per changed tensor for the report: its shape before and after, what was kept, and
    (``renamed``) its name in the changed model where that differs."""
    entries = {}
    for c in changes:
        before = list(shapes_before.get(c.name, []))
        entry = entries.setdefault(c.name, {"name": c.name, "role": c.role, "shape_before": before,
                                            "shape_after": list(before), "kept": {}})
        if c.removed:
            entry["shape_after"], entry["kept"] = None, {}
            continue
        if c.is_rename:
            entry["renamed"] = c.renamed
            continue
        if c.axis < len(entry["shape_after"]):
            entry["shape_after"][c.axis] = c.size_after
        entry["kept"][str(c.axis)] = c.kept
    return list(entries.values())

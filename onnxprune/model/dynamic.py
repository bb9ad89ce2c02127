"""Sizes for a model's dynamic input dims that the model can run at.

A dynamic dim left unpinned needs a size for the analysis (static shapes, MACs) and for the
verification run. 1 is no such size: a detector with dynamic H/W, a decoder with a KV cache or an
audio front end cannot run at 1 (a strided conv stack leaves nothing), and MACs counted at 1 are
far too few. So each dim gets the size of its kind: from its name (``height`` -> 224), else from
another input that shares the name (one choice per name), else guessed from the input's rank,
element type and the dim's position. ``--input-shape`` overrides all of it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import onnx

# kind -> (size, what the summary calls it)
KINDS = {
    "batch": (1, "batch"),
    "image": (224, "image size"),
    "sequence": (128, "sequence length"),
    # 1, not 0: a cache of length 0 is an empty tensor, and onnxruntime refuses a Reshape of
    # one whose -1 has no elements to infer from ([1, 0, 32] -> [1, 0, -1, 8]: splitting heads).
    "past": (1, "past sequence length"),
    "audio": (16000, "audio samples"),
    "unknown": (1, "no kind known"),
}

# Dim names (matched whole, case-insensitively) -> kind. Checked in order: the first match wins,
# so "past_sequence_length" is a past length before it is a sequence length.
NAME_PATTERNS = [
    (r"(n|b|bs|batch|batch_?size|num_images|.*_batch|batch_.*)", "batch"),
    (r"past_.*|.*_past|cache_.*len.*|past", "past"),
    (r"(h|w|height|width|img_?[hw]|image_?(height|width)|in_?[hw]|.*_height|.*_width)", "image"),
    (r"(seq|seq_?len|sequence|sequence_?length|.*_sequence_length|.*_seq_len|tokens|num_tokens|"
     r"text_?length|t)", "sequence"),
    (r"(audio|audio_?len(gth)?|samples|num_samples|wav_?len(gth)?|length|len)", "audio"),
]


@dataclass(frozen=True)
class DimChoice:
    """One dynamic dim of a graph input and the size chosen for it."""

    input: str
    axis: int
    name: str | None  # the dim's dim_param; None for an unnamed dim
    size: int
    kind: str  # a key of KINDS
    how: str  # "name", "shared name" or "position"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputSpec:
    """What the choice reads of a graph input: its element type and each dim (size or name)."""

    name: str
    elem_type: int
    dims: tuple  # per axis: (fixed size or None, dim_param or None)


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
_INTS = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}


def kind_of_name(name: str, spec: InputSpec) -> str | None:
    """The kind a dim name says, or None; "length"-like names are audio only on a rank-2 float
    input (raw samples) and a sequence length elsewhere (token ids, masks)."""
    for pattern, kind in NAME_PATTERNS:
        if re.fullmatch(pattern, name.strip(), re.IGNORECASE):
            if kind == "audio" and not _raw_audio(spec):
                return "sequence"
            return kind
    return None


def kind_of_position(spec: InputSpec, axis: int) -> str:
    """The kind guessed from the input's rank, element type and the dim's position."""
    rank = len(spec.dims)
    if axis == 0 and rank >= 2:
        return "batch"
    if spec.elem_type in _FLOATS and rank == 4:
        nhwc = spec.dims[3][0] in (1, 3, 4) and spec.dims[1][0] is None
        return "image" if axis in ((1, 2) if nhwc else (2, 3)) else "unknown"
    if spec.elem_type in _INTS and rank in (2, 3) and axis == rank - 1:
        return "sequence"
    if _raw_audio(spec) and axis == 1:
        return "audio"
    if spec.elem_type in _FLOATS and rank == 3:
        return "sequence"  # [batch, frames, features] or [batch, features, frames]: a time axis
    return "unknown"


def _raw_audio(spec: InputSpec) -> bool:
    return spec.elem_type in _FLOATS and len(spec.dims) == 2


def choose_dims(specs: list[InputSpec], pinned: dict[str, tuple[int, ...]]) -> list[DimChoice]:
    """A size for every dynamic dim of the inputs not in ``pinned``.

    A dim name shared by several inputs gets one size, the first decided: a pinned input's
    size for it first, then a kind from its name, then from its position. A name that adds
    others (Optimum's ``past_sequence_length + sequence_length``) is their sum.
    """
    sizes: dict[str, int] = {}
    for spec in specs:  # --input-shape x:... sizes the names of x's dims for the other inputs too
        for (fixed, name), size in zip(spec.dims, pinned.get(spec.name, ())):
            if fixed is None and name:
                sizes.setdefault(name, size)
    chosen: dict[tuple[str, int], DimChoice] = {}
    named_kinds: dict[str, str] = {}
    for spec in (s for s in specs if s.name not in pinned):
        for fixed, name in spec.dims:
            if fixed is None and name and not _sum_terms(name):
                kind = kind_of_name(name, spec)
                if kind is not None:
                    named_kinds.setdefault(name, kind)
    for spec in (s for s in specs if s.name not in pinned):
        for axis, (fixed, name) in enumerate(spec.dims):
            if fixed is not None or (name and _sum_terms(name)):
                continue
            if name in sizes:
                choice = DimChoice(spec.name, axis, name, sizes[name], named_kinds.get(name, "unknown"),
                                   "shared name")
            elif name in named_kinds:
                choice = DimChoice(spec.name, axis, name, KINDS[named_kinds[name]][0], named_kinds[name], "name")
            else:
                kind = kind_of_position(spec, axis)
                choice = DimChoice(spec.name, axis, name or None, KINDS[kind][0], kind, "position")
            if name:
                sizes.setdefault(name, choice.size)
            chosen[spec.name, axis] = choice
    for spec in (s for s in specs if s.name not in pinned):
        for axis, (fixed, name) in enumerate(spec.dims):
            if fixed is None and name and _sum_terms(name):
                chosen[spec.name, axis] = _sum_choice(spec, axis, name, sizes)
    return [chosen[key] for key in sorted(chosen, key=lambda k: (_order(specs, k[0]), k[1]))]


def _sum_terms(name: str) -> list[str]:
    """The terms of a dim name of the form ``a + b`` (no terms for a plain name)."""
    terms = [t.strip() for t in name.split("+")]
    return terms if len(terms) > 1 and all(terms) else []


def _sum_choice(spec: InputSpec, axis: int, name: str, sizes: dict[str, int]) -> DimChoice:
    total = 0
    for term in _sum_terms(name):
        if term.isdigit():
            total += int(term)
        else:
            kind = kind_of_name(term, spec) or "unknown"
            total += sizes.setdefault(term, KINDS[kind][0])
    return DimChoice(spec.name, axis, name, total, "sequence", "shared name")


def _order(specs: list[InputSpec], name: str) -> int:
    return next(i for i, s in enumerate(specs) if s.name == name)


def describe_choices(choices: list[DimChoice], shapes: dict[str, tuple[int, ...]]) -> str:
    """One line naming each choice, per input with the flag that pins it:
    ``x: H=224, W=224 (image size; pin with `input_shapes` x:1,3,H,W)``."""
    parts = []
    for input_name in dict.fromkeys(c.input for c in choices):
        mine = [c for c in choices if c.input == input_name]
        dims = ", ".join(f"{_label(c)}={c.size}" for c in mine)
        kinds = ", ".join(dict.fromkeys(KINDS[c.kind][1] for c in mine))
        parts.append(f"{input_name}: {dims} ({kinds}; pin with `input_shapes` {pin_example(input_name, mine, shapes)})")
    return "; ".join(parts)


def describe_sizes(choices: list[DimChoice]) -> str:
    """``x: H=224, W=224; mask: seq=128``: the choices, per input, without the pinning advice."""
    inputs = dict.fromkeys(c.input for c in choices)
    return "; ".join(f"{name}: " + ", ".join(f"{_label(c)}={c.size}" for c in choices if c.input == name)
                     for name in inputs)


def pin_example(input_name: str, choices: list[DimChoice], shapes: dict[str, tuple[int, ...]],
                placeholders: bool = True) -> str:
    """``x:1,3,H,W``: the input's shape with its chosen dims shown by name (``placeholders``) or
    by the size chosen."""
    shown = [str(v) for v in shapes[input_name]]
    for c in choices:
        if c.input == input_name and c.kind != "batch":
            shown[c.axis] = _label(c) if placeholders else str(c.size)
    return f"{input_name}:{','.join(shown)}"


def _label(choice: DimChoice) -> str:
    return choice.name or f"dim{choice.axis}"

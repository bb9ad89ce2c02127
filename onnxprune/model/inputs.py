"""Shapes of a model's graph inputs: parsed from --input-shape, resolved against the model (the
dynamic dims left open sized by model/dynamic.py); how a declared dim is read (``declared_dim``),
and negative dims named as the dynamic dims they are."""

from __future__ import annotations

import onnx

from ..errors import UnsupportedModel, UsageError, quoted
from ..memory import available_memory, describe_bytes, nbytes_of
from .dynamic import DimChoice, InputSpec, choose_dims


def is_mask(name: str) -> bool:
    """Whether an integer or bool graph input is a mask (attention_mask, ...): made-up inputs feed
    it ones (nothing masked). A random 0/1 mask can mask every position of a row, and graphs that
    count its ones (onnxruntime-genai's: seqlens_k = sum - 1 for GroupQueryAttention) fail then."""
    return "mask" in name.lower()


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name:d0,d1,...`` strings (the --input-shape flag)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise UsageError(f"`input_shapes` {spec!r}: expected name:d0,d1,...")
        try:
            values = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise UsageError(f"`input_shapes` {spec!r}: dims must be integers") from None
        if any(v <= 0 for v in values):
            raise UsageError(f"`input_shapes` {spec!r}: dims must be positive")
        shapes[name] = values
    return shapes


def declared_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A declared dim's size; None for a dynamic one: a ``dim_param``, an unset dim, or a negative
    ``dim_value`` (paddle2onnx writes -1 for dynamic dims, and onnxruntime reads any negative
    value as dynamic). 0 is returned as it is: onnxruntime holds a model to a 0 like to any size."""
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return dim.dim_value
    return None


def name_negative_dims(model: onnx.ModelProto) -> int:
    """Declare every negative ``dim_value`` of the graph's inputs, outputs and value_info as a
    ``dim_param`` (``x_dim0``), in place; the number renamed.

    onnx.checker and onnxruntime accept -1, but ONNX shape inference carries it on as if it were
    a size (a Conv of a [-1, 3, 8, 8] input gives [-1, 8, 8, 8]), so the analysis would take
    it for a fixed dim, and tools that read the written model may too. A named dim says
    "dynamic" to all of them. Each gets its own name: -1 says nothing about two dims being equal.
    """
    graph = model.graph
    values = [*graph.input, *graph.output, *graph.value_info]
    taken = {d.dim_param for vi in values for d in vi.type.tensor_type.shape.dim if d.dim_param}
    renamed = 0
    for vi in values:
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                name = f"{vi.name}_dim{axis}"
                while name in taken:
                    name += "_"
                taken.add(name)
                d.dim_param = name  # the oneof: clears dim_value
                renamed += 1
    return renamed


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (old exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_input_shapes(
    model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: pinned dims, else static dims, else the sizes
    ``dynamic_choices`` picks for the dynamic ones."""
    return resolve_with_choices(model, pinned)[0]


def dynamic_choices(model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None) -> list[DimChoice]:
    """The sizes chosen for the dynamic dims that ``pinned`` leaves open (model/dynamic.py)."""
    return resolve_with_choices(model, pinned)[1]


def resolve_with_choices(
    model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None
) -> tuple[dict[str, tuple[int, ...]], list[DimChoice]]:
    """``resolve_input_shapes`` and ``dynamic_choices`` in one."""
    pinned = dict(pinned or {})
    inputs = {i.name: i for i in graph_inputs(model)}
    unknown = sorted(set(pinned) - set(inputs))
    if unknown:
        raise UsageError(
            f"`input_shapes` names unknown input {unknown[0]!r}; inputs are: {', '.join(inputs)}"
        )
    for name, vi in inputs.items():
        if name in pinned:
            _check_pinned(name, vi.type.tensor_type.shape.dim, pinned[name])
    specs = [input_spec(vi) for vi in inputs.values()]
    choices = choose_dims(specs, pinned)
    chosen = {(c.input, c.axis): c.size for c in choices}
    result = {}
    for spec in specs:
        if spec.name in pinned:
            result[spec.name] = pinned[spec.name]
        else:
            result[spec.name] = tuple(fixed if fixed is not None else chosen[spec.name, axis]
                                      for axis, (fixed, _) in enumerate(spec.dims))
    check_input_sizes(result, set(pinned))
    return result, choices


# Generated inputs are drawn as float64 (numpy's normal) before their cast: 8 bytes an element.
GENERATED_ITEMSIZE = 8


def check_input_sizes(shapes: dict[str, tuple[int, ...]], pinned: set[str]) -> None:
    """The inputs that verification, sensitivity and benchmarks generate at ``shapes`` must fit in
    the memory available: a model (or `input_shapes`) may claim a dim of 2^40. The error blames
    the flag when the shape was pinned, the model when it declared it."""
    available = available_memory()
    total = 0
    for name, shape in shapes.items():
        size = nbytes_of(shape, GENERATED_ITEMSIZE)
        total += size
        if total <= available:
            continue
        need = f"{describe_bytes(size)} for an input of shape {list(shape)}"
        if name in pinned:
            raise UsageError(f"`input_shapes` {name}: {need}, more than the {describe_bytes(available)} "
                             "of memory available")
        raise UnsupportedModel(f"model input {quoted(name)} declares {need}, more than the "
                               f"{describe_bytes(available)} of memory available: pin smaller sizes with "
                               "`input_shapes`")


def _check_pinned(name: str, dims, values: tuple[int, ...]) -> None:
    if len(values) != len(dims):
        raise UsageError(f"`input_shapes` {name}: rank {len(values)} given, model input has rank {len(dims)}")
    for d, v in zip(dims, values):
        fixed = declared_dim(d)
        if fixed is not None and fixed != v:
            raise UsageError(f"`input_shapes` {name}: dim {v} conflicts with the model's fixed dim {fixed}")


def input_spec(vi: onnx.ValueInfoProto) -> InputSpec:
    """What model/dynamic.py reads of a graph input."""
    t = vi.type.tensor_type
    return InputSpec(vi.name, t.elem_type, tuple((declared_dim(d), d.dim_param or None) for d in t.shape.dim))


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's first input fixes (None when its first dim is dynamic)."""
    inputs = graph_inputs(model)
    if not inputs:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    return (declared_dim(dims[0]) or None) if dims else None

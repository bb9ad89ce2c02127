"""Shapes of a model's graph inputs: parsed from --input-shape, resolved against the model."""

from __future__ import annotations

import onnx

from ..errors import UsageError


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


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real graph inputs (old exporters also list initializers as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_input_shapes(
    model: onnx.ModelProto, pinned: dict[str, tuple[int, ...]] | None
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every graph input: pinned dims, else static dims, else 1."""
    pinned = dict(pinned or {})
    inputs = {i.name: i for i in graph_inputs(model)}
    unknown = sorted(set(pinned) - set(inputs))
    if unknown:
        raise UsageError(
            f"`input_shapes` names unknown input {unknown[0]!r}; inputs are: {', '.join(inputs)}"
        )
    result = {}
    for name, vi in inputs.items():
        dims = vi.type.tensor_type.shape.dim
        if name in pinned:
            if len(pinned[name]) != len(dims):
                raise UsageError(
                    f"`input_shapes` {name}: rank {len(pinned[name])} given, model input has rank {len(dims)}"
                )
            for d, v in zip(dims, pinned[name]):
                if d.HasField("dim_value") and d.dim_value != v:
                    raise UsageError(
                        f"`input_shapes` {name}: dim {v} conflicts with the model's fixed dim {d.dim_value}"
                    )
            result[name] = pinned[name]
        else:
            result[name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
    return result


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's first input fixes (None when its first dim is dynamic)."""
    inputs = graph_inputs(model)
    if not inputs:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None

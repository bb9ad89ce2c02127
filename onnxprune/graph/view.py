"""A thin view over an onnx-graphsurgeon graph: producers, consumers, constants, shapes.

``GraphView.from_model`` imports the model into onnx-graphsurgeon and
normalises how exporters spell things, so that rules see one form:
Constant nodes become constant tensors, Identity nodes that merely route a
constant (the torch exporter does this for some biases) are bypassed, small
constant arithmetic is folded, Cast(weight) becomes the weight, and two
multi-op spellings of one op become that op: a transpose done as
flatten -> Transpose -> unflatten (one Transpose) and a channel shuffle
(one Gather). These rewrites reach the pruned model, which computes the same.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from ..model.proto import opset_of
from .names import matches, module_paths, unmatched_ignore_message
from .normalise import import_graph
from .shapes import Shapes

UNCACHED_BYTES = 1 << 20  # weights above this are loaded on each use, never kept in the graph

# onnx-graphsurgeon logs to stdout; its warnings (a dtype it has no numpy type
# for, such as bfloat16, which it keeps as it was) are noise on our command line.
G_LOGGER.severity = G_LOGGER.ERROR


@dataclass
class GraphView:
    graph: gs.Graph
    shapes: Shapes
    opset: int
    subgraph_refs: frozenset[str]
    # Cast(weight) nodes folded into constants: name -> the weight's stored dtype
    # (surgery.export stores the pruned weight in that dtype again, behind a Cast).
    cast_weights: dict = None
    prune_hidden: bool = False  # rules let the hidden size through LayerNorm (--prune-hidden)
    prune_kv_groups: bool = False  # grouped-query attention loses whole key/value groups (--prune-kv-groups)
    memo: dict = field(default_factory=dict)  # rules' costly findings about a node, computed once
    # node name -> the module path its exporter recorded (names.py); onnx-graphsurgeon drops
    # node metadata, so it is read off the model here
    modules: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, shapes: Shapes) -> GraphView:
        graph, cast_weights, subgraph_refs = import_graph(model, shapes)
        return cls(graph, shapes, opset_of(model), subgraph_refs, cast_weights, modules=module_paths(model))

    # --- structure -------------------------------------------------------
    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    def consumers(self, tensor: gs.Tensor) -> list[tuple[gs.Node, int]]:
        """(node, input index) for every use of ``tensor`` (a node may use it twice)."""
        uses, seen = [], set()
        for node in tensor.outputs:
            if id(node) in seen:
                continue
            seen.add(id(node))
            uses.extend((node, i) for i, t in enumerate(node.inputs) if t is tensor)
        return uses

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.inputs)

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    # --- names -------------------------------------------------------------
    def names_of(self, node: gs.Node) -> list[str]:
        """The names an ``ignore`` glob matches ``node`` by: its own, its module path, its constant inputs'."""
        module = self.modules.get(node.name)
        return [node.name, *([module] if module else []), *(t.name for t in node.inputs if self.is_constant(t))]

    def warn_unmatched(self, patterns) -> None:
        """A warning for each ``ignore`` glob that matches no node by ``names_of``."""
        left = dict.fromkeys(patterns)
        for node in self.nodes if left else ():
            for name in self.names_of(node):
                for pattern in matches(name, left):
                    del left[pattern]
        known = [n.name for n in self.nodes] + list(self.modules.values())
        for pattern in left:
            warnings.warn(unmatched_ignore_message(pattern, known), stacklevel=3)

    # --- values ------------------------------------------------------------
    @staticmethod
    def is_constant(tensor: gs.Tensor | None) -> bool:
        return isinstance(tensor, gs.Constant)

    @staticmethod
    def value(tensor: gs.Tensor) -> np.ndarray | None:
        """The constant's values, or None for a computed tensor.

        A large weight not loaded yet is read without caching it in the graph
        (``Constant.values`` would): a cached copy lives as long as the graph,
        one more copy of the model's weights at peak.
        """
        if isinstance(tensor, gs.Constant):
            lazy = tensor._values  # how onnx-graphsurgeon itself tells "not loaded yet"
            if isinstance(lazy, LazyValues) and lazy.nbytes > UNCACHED_BYTES:
                return lazy.load()
            return np.asarray(tensor.values)
        return None

    def int_values(self, tensor: gs.Tensor | None) -> list[int] | None:
        v = self.value(tensor) if tensor is not None else None
        return None if v is None else [int(x) for x in np.atleast_1d(v).tolist()]

    # --- shapes ------------------------------------------------------------
    def shape(self, tensor: gs.Tensor) -> tuple | None:
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        return self.shapes.static.get(tensor.name)

    def rank(self, tensor: gs.Tensor) -> int | None:
        s = self.shape(tensor)
        return None if s is None else len(s)

    def dim(self, tensor: gs.Tensor, axis: int) -> int | None:
        s = self.shape(tensor)
        if s is None or not -len(s) <= axis < len(s):
            return None
        return s[axis]

    def is_dynamic(self, tensor: gs.Tensor, axis: int) -> bool:
        if isinstance(tensor, gs.Constant):
            return False
        return axis in self.shapes.dynamic.get(tensor.name, set())


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)



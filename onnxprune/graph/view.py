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
from functools import cached_property

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

    @cached_property
    def all_nodes(self) -> list[gs.Node]:
        """The graph's nodes and those of every subgraph (If branches, Loop and Scan bodies), outer
        first. onnx-graphsurgeon gives a tensor of an outer scope one object, whose consumers
        include the subgraph nodes that read it, so channels flow into a body along it."""
        return [node for _, node in _scoped_nodes(self.graph, None)]

    @cached_property
    def scopes(self) -> dict[str, str]:
        """Node name -> the subgraph it is in ("then_branch of If cond_if"), for nodes of subgraphs."""
        return {node.name: scope for scope, node in _scoped_nodes(self.graph, None) if scope}

    @cached_property
    def boundaries(self) -> dict[str, str]:
        """Tensor name -> what it is for a subgraph whose input or output it is ("an output of body of
        com.example::Repeat r"), for subgraphs of ops no rule maps (If, Loop and Scan have rules):
        channels do not cross those."""
        found: dict[str, str] = {}
        for _, node in _scoped_nodes(self.graph, None):
            for name, body in _subgraphs(node):
                scope = f"{name} of {node.op} {node.name}"
                if _mapped(node):  # If, Loop, Scan: their rules (rules/control.py) map them
                    continue
                for t in body.inputs:
                    found.setdefault(t.name, f"an input of {scope}")
                for t in body.outputs:
                    found.setdefault(t.name, f"an output of {scope}")
        return found

    @cached_property
    def subgraph_ends(self) -> dict[str, list[tuple[gs.Node, str, int]]]:
        """Tensor name -> (node, side, index) for each input or output of an If branch or a Loop or
        Scan body it is: side "then_branch" for that branch's outputs, "body:in" for the body's
        inputs. The grower visits the node from there (rules/control.py maps them)."""
        found: dict[str, list] = {}
        for _, node in _scoped_nodes(self.graph, None):
            if not _mapped(node):
                continue
            for name, body in _subgraphs(node):
                for i, t in enumerate(body.outputs):
                    found.setdefault(t.name, []).append((node, name, i))
                for i, t in enumerate(body.inputs):
                    found.setdefault(t.name, []).append((node, f"{name}:in", i))
        return found

    @cached_property
    def inner_tensors(self) -> frozenset[str]:
        """Names of the tensors that exist only inside a subgraph (its inputs and what its nodes
        compute): onnxruntime cannot hand them out as graph outputs to measure."""
        names: set[str] = set()
        for scope, node in _scoped_nodes(self.graph, None):
            if scope:
                names.update(t.name for t in node.outputs)
            for _, body in _subgraphs(node):
                names.update(t.name for t in body.inputs)
        return frozenset(names)

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
        for node in self.all_nodes if left else ():
            for name in self.names_of(node):
                for pattern in matches(name, left):
                    del left[pattern]
        known = [n.name for n in self.all_nodes] + list(self.modules.values())
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
        one more copy of the model's weights at peak. It is read-only: it is
        converted once from its tensor (``LazyValues.load`` copies it once more
        to make it writable, 0.26 s of BERT-base's run), and every use slices
        or reduces it into new arrays.
        """
        if isinstance(tensor, gs.Constant):
            lazy = tensor._values  # how onnx-graphsurgeon itself tells "not loaded yet"
            if isinstance(lazy, LazyValues) and lazy.nbytes > UNCACHED_BYTES:
                return onnx.numpy_helper.to_array(lazy.tensor)
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


def _mapped(node: gs.Node) -> bool:
    """Does a rule map this node's subgraph inputs and outputs to its own (rules/control.py)?"""
    return node.op in ("If", "Loop", "Scan") and node.domain in (None, "", "ai.onnx")


def _subgraphs(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    found = []
    for name, value in node.attrs.items():
        for body in value if isinstance(value, list) else [value]:
            if isinstance(body, gs.Graph):
                found.append((name, body))
    return found


def _scoped_nodes(graph: gs.Graph, scope: str | None):
    """(scope, node) for every node of ``graph`` and, after each node, of its subgraphs."""
    for node in graph.nodes:
        yield scope, node
        for name, body in _subgraphs(node):
            yield from _scoped_nodes(body, f"{name} of {node.op} {node.name}")


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)



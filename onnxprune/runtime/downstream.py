"""A cut model run from where it first differs from the original, on the original's tensors there.

Sensitivity and allocation cut one group at a time and run each cut model on
the same samples. Every node upstream of the group's first changed node
computes what the original computes, and those nodes are most of a run's time
when the group sits late in the network. ``Downstream`` splits a candidate in
two: the nodes that differ from the original's (by op, attributes, inputs and
constant values) or read something that does, and the rest. The original's
values of the tensors the changed part reads from the rest (its *frontier*)
are captured once, by a model holding only the original's nodes that compute
them, and kept while the next candidates share that frontier (the ratios of
one group do); each candidate then runs its changed part alone. Outputs that
nothing changed are the original's own.

A candidate is run whole instead (``run`` returns None) when its graph inputs
or outputs were reshaped, when a node holds a subgraph (a body may read any
tensor of the outer graph), when nothing upstream is unchanged, or when the
frontier's values would take more than MAX_CAPTURE_BYTES over the samples.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..cut import iochange
from .session import session

# The captured frontier values of all samples at most: past this, the candidate runs whole
MAX_CAPTURE_BYTES = 512 << 20
# Below this share of the candidate's nodes left out, a split saves too little to pay for the
# capture and the two extra sessions
MIN_LEFT_OUT = 0.1


class Downstream:
    """The original ``model``'s frontier tensors on ``batches`` (the feeds of each batch),
    captured on demand, and each candidate's changed part run from them."""

    def __init__(self, model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]):
        self.model = model
        self.batches = batches
        self.producers = {out: node for node in model.graph.node for out in node.output if out}
        self.initializers = {t.name: t for t in model.graph.initializer}
        # what a batch feeds (an input with an initializer of its name has a default instead)
        self.inputs = {i.name for i in model.graph.input} - set(self.initializers)
        self.usable = not _has_subgraphs(model)
        self.frontier: tuple[str, ...] | None = None
        self.captured: list[dict[str, np.ndarray]] | None = None  # None: the frontier too large

    def run(self, candidate: onnx.ModelProto, names: list[str],
            expected: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]] | None:
        """``candidate``'s outputs ``names`` on every batch (those it did not change: ``expected``,
        the original's of each batch), or None when it is not split."""
        if not self.usable or iochange.read(candidate) or _has_subgraphs(candidate):
            return None
        changed, frontier = self._split(candidate)
        if len(changed) > (1 - MIN_LEFT_OUT) * len(candidate.graph.node):
            return None
        if any(n not in self.producers and n not in self.inputs for n in frontier):
            return None  # read from where the original has no node (a constant it computes now)
        try:
            return self._run_split(candidate, changed, frontier, names, expected)
        except Exception:  # noqa: BLE001 - a part onnxruntime refuses: the whole run decides, as without a split
            self.usable = False
            return None

    def _run_split(self, candidate, changed, frontier, names, expected):
        if self.frontier != frontier:
            self.frontier, self.captured = frontier, self._capture(frontier)  # the previous one freed
        if self.captured is None:
            return None
        made = {out for node in changed for out in node.output}
        computed = [n for n in names if n in made]
        sess = self._session(candidate, changed, frontier, computed) if computed else None
        results = []
        for values, original in zip(self.captured, expected):
            got = dict(zip(computed, sess.run(computed, values))) if sess is not None else {}
            results.append({n: got[n] if n in got else original[n] for n in names})
        return results

    # --- which nodes changed -------------------------------------------------
    def _split(self, candidate: onnx.ModelProto) -> tuple[list[onnx.NodeProto], tuple[str, ...]]:
        """(the candidate's nodes that differ or read what does, in order; their frontier)."""
        own = {t.name: t for t in candidate.graph.initializer}
        dirty: set[str] = set()
        changed = []
        for node in candidate.graph.node:
            if any(i in dirty for i in node.input) or not self._same(node, own):
                changed.append(node)
                dirty.update(o for o in node.output if o)
        frontier = dict.fromkeys(i for node in changed for i in node.input
                                 if i and i not in dirty and i not in own)
        return changed, tuple(frontier)

    def _same(self, node: onnx.NodeProto, own: dict[str, onnx.TensorProto]) -> bool:
        """Whether the original has this very node: the same op, attributes and inputs, and the
        same values in the constants it reads."""
        first = next((o for o in node.output if o), None)
        theirs = self.producers.get(first) if first else None
        if theirs is None or list(theirs.output) != list(node.output) or list(theirs.input) != list(node.input):
            return False
        if (theirs.op_type, theirs.domain) != (node.op_type, node.domain):
            return False
        if [a.SerializeToString() for a in theirs.attribute] != [a.SerializeToString() for a in node.attribute]:
            return False
        for name in node.input:
            if (name in own) != (name in self.initializers):
                return False
            if name in own and not _same_tensor(own[name], self.initializers[name]):
                return False
        return True

    # --- the original's frontier ---------------------------------------------
    def _capture(self, frontier: tuple[str, ...]) -> list[dict[str, np.ndarray]] | None:
        """The frontier's values on every batch: graph inputs from the feeds, the rest computed by
        the original's nodes upstream of it, from the previous frontier's values where they lead
        there (one group's frontier is mostly computed from the previous group's: the original
        runs once over all groups, not once per group); None past MAX_CAPTURE_BYTES."""
        known = self.captured or [{} for _ in self.batches]
        computed = [n for n in frontier if n not in self.inputs and n not in known[0]]
        sess = starts = None
        if computed:
            upstream, starts = self._upstream(computed, known)
            sess = session(upstream.SerializeToString())
        captured, total = [], 0
        for feeds, before in zip(self.batches, known):
            values = {n: feeds[n] if n in self.inputs else before[n] for n in frontier if n not in computed}
            if sess is not None:
                given = {n: feeds[n] if n in self.inputs else before[n] for n in starts}
                values.update(zip(computed, sess.run(computed, given)))
            total += sum(np.asarray(v).nbytes for v in values.values())
            if total > MAX_CAPTURE_BYTES:
                return None
            captured.append(values)
        return captured

    def _upstream(self, names: list[str], known: list[dict]) -> tuple[onnx.ModelProto, list[str]]:
        """The original cut down to the nodes that compute ``names`` (its outputs) from graph
        inputs and the tensors of ``known`` (its inputs, listed second)."""
        needed, starts, stack = set(), {}, list(names)
        while stack:
            name = stack.pop()
            if name in known[0] or name in self.inputs:
                starts.setdefault(name)
                continue
            node = self.producers.get(name)
            if node is None or id(node) in needed:
                continue
            needed.add(id(node))
            stack.extend(i for i in node.input if i and i not in self.initializers)
        nodes = [n for n in self.model.graph.node if id(n) in needed]
        read = {i for n in nodes for i in n.input}
        declared = {i.name: i for i in self.model.graph.input}
        inputs = [declared[n] if n in declared else _declared(n, [b[n] for b in known]) for n in starts]
        outputs = [onnx.ValueInfoProto(name=n) for n in names]
        made = _model_like(self.model, nodes, inputs, [t for t in self.model.graph.initializer if t.name in read],
                           outputs)
        return made, list(starts)

    def _session(self, candidate, changed, frontier, computed):
        """A session of the candidate's changed part: the frontier in, ``computed`` out."""
        inputs = [_declared(name, [b[name] for b in self.captured]) for name in frontier]
        read = {i for n in changed for i in n.input}
        declared = {o.name: o for o in candidate.graph.output}
        outputs = [declared.get(n) or onnx.ValueInfoProto(name=n) for n in computed]
        model = _model_like(candidate, changed, inputs, [t for t in candidate.graph.initializer if t.name in read],
                            outputs)
        return session(model.SerializeToString())


def _declared(name: str, values: list[np.ndarray]) -> onnx.ValueInfoProto:
    """A graph input for a captured tensor: its dtype, and each axis's size where every batch
    has the same (else a named dim: the last batch may be smaller)."""
    shapes = [np.shape(v) for v in values]
    rank = len(shapes[0])
    dims = [shapes[0][a] if all(s[a] == shapes[0][a] for s in shapes) else f"d{a}" for a in range(rank)]
    dtype = onnx.helper.np_dtype_to_tensor_dtype(np.asarray(values[0]).dtype)
    return onnx.helper.make_tensor_value_info(name, dtype, dims)


def _model_like(model: onnx.ModelProto, nodes, inputs, initializers, outputs) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(nodes, model.graph.name, inputs, outputs, initializers)
    made = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    made.functions.extend(model.functions)
    return made


def _same_tensor(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    if a is b:
        return True
    if (a.data_type, list(a.dims), a.data_location) != (b.data_type, list(b.dims), b.data_location):
        return False
    return a.SerializeToString() == b.SerializeToString()


def _has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for a in node.attribute)

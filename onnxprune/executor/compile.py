"""Compiling a graph into steps: reading the graph (subgraphs, topological order, the support
check), folding constants, placing each value on the host or the device, and scheduling
(which steps a set of outputs needs, when each value is freed). module.py's TorchGraph runs
the result; its docstring describes the design."""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import onnx
import torch
from onnx import helper

from ..errors import InvalidModel, UnsupportedModel, first_line
from ..rules.weights import learned_role
from .ops import HOST_INPUTS, OPS, PREPARE
from .tensors import FLOAT_TYPES, constant_value, tensor_from_proto

# Ops the compiler handles itself: Constant nodes become values, the others run subgraphs.
CONTROL_FLOW = ("Constant", "If", "Loop", "Scan")

EMPTY, TRASH = 0, 1  # slots of a missing input (always None) and of an unused output

# Value kinds.
INPUT, PARAM, CONST, HOST, DEVICE = "input", "param", "const", "host", "device"


# --- graph reading -------------------------------------------------------------------------------

def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            graphs.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(a.graphs)
    return graphs


def _outer_references(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    local = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    used: set[str] = set()
    for node in graph.node:
        used.update(i for i in node.input if i)
        for sub in _subgraphs(node):
            used |= _outer_references(sub)
        local.update(node.output)
    used.update(o.name for o in graph.output)
    return used - local


def _reads(node: onnx.NodeProto) -> list[str]:
    """Every name a node reads: its inputs and what its subgraphs take from outside."""
    names = [i for i in node.input if i]
    for sub in _subgraphs(node):
        names.extend(sorted(_outer_references(sub)))
    return names


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Nodes in an order where producers come first (the file order when it already is one)."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    deps = [{producer[x] for x in _reads(n) if x in producer} - {i} for i, n in enumerate(nodes)]
    if all(all(d < i for d in ds) for i, ds in enumerate(deps)):
        return list(nodes)
    users = defaultdict(list)
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise InvalidModel("the graph has a cycle")
    return order


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _label(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def check_supported(graph: onnx.GraphProto) -> None:
    """UnsupportedModel naming every op type without an implementation, in one line."""
    missing: dict[str, str] = {}
    for node in _all_nodes(graph):
        known = _label(node) in OPS or (node.domain in ("", "ai.onnx") and node.op_type in CONTROL_FLOW)
        if not known:
            missing.setdefault(_label(node), node.name or node.output[0])
    if missing:
        listed = ", ".join(f"{op} (node {name})" for op, name in missing.items())
        raise UnsupportedModel(f"no PyTorch implementation for op {listed}")


def _attributes(node: onnx.NodeProto, opset: int) -> dict:
    """Attributes as Python values, plus ``_opset`` and ``_num_outputs``; PREPARE applied."""
    attrs: dict = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            continue  # compiled by the executor
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = tensor_from_proto(value)
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        attrs[a.name] = value
    attrs["_opset"] = opset
    attrs["_num_outputs"] = len(node.output)
    prepare = PREPARE.get(_label(node))
    return prepare(attrs) if prepare else attrs


# Ops that hand their input on with only its layout or dtype changed: a tensor read through them
# is still read where they lead (a tied embedding transposed into the output projection, a float16
# weight behind a Cast, a bias routed through an Identity).
_PASS_THROUGH = frozenset({"Identity", "Cast", "CastLike", "Transpose", "Reshape", "Squeeze", "Unsqueeze",
                           "Flatten"})


def _float_tensors(graph: onnx.GraphProto) -> dict[str, int]:
    """The float initializers (subgraphs' too) and float Constant nodes: name -> number of elements."""
    found = {t.name: math.prod(t.dims) for g in _all_graphs(graph) for t in g.initializer
             if t.data_type in FLOAT_TYPES}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if t.data_type in FLOAT_TYPES:
                found[node.output[0]] = math.prod(t.dims)
    return found


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


def _activations(graph: onnx.GraphProto) -> set[str]:
    """Names whose values follow the values of a graph input: not shapes (Shape, Size and what
    only combines them with constants: positions from Range, a causal mask) and not constants."""
    initializers = {t.name for t in graph.initializer}
    found = {v.name for v in graph.input if v.name not in initializers}
    nodes = list(_all_nodes(graph))
    grew = True
    while grew:  # to a fixed point: the file order need not be topological
        grew = False
        for node in nodes:
            if node.op_type in ("Shape", "Size") or all(o in found for o in node.output if o):
                continue
            host = HOST_INPUTS.get(node.op_type, frozenset())
            reads = [name for i, name in enumerate(node.input) if i not in host]
            reads += [name for sub in _subgraphs(node) for name in _outer_references(sub)]
            if any(name in found for name in reads):
                found.update(o for o in node.output if o)
                found.update(v.name for sub in _subgraphs(node) for v in sub.input)  # a Loop's carried values
                grew = True
    return found


def learned_tensors(graph: onnx.GraphProto) -> dict[str, str]:
    """Float initializers and Constant nodes read in a learned slot of the weight table
    (rules/weights.py: a Conv's filters, a norm's scale, an embedding table, an Add/Mul constant
    of more than one element, ...), directly or through ``_PASS_THROUGH`` ops: name -> role.

    What is not here is arithmetic (Pow's exponent, epsilons, Clip bounds, attention scales),
    and so is a constant whose node meets no activation (rotary frequencies times positions
    from Range: a table computed from the shapes; training it would shift every position's
    phase). An embedding table counts whatever indexes it (position ids may come from Range)."""
    data = _activations(graph)
    readers = defaultdict(list)
    for node in _all_nodes(graph):  # subgraphs too: an If branch may read a weight of the main graph
        for i, name in enumerate(node.input):
            if name:
                readers[name].append((node, i))

    def meets_data(node: onnx.NodeProto, index: int) -> bool:
        host = HOST_INPUTS.get(node.op_type, frozenset())
        return any(name in data for i, name in enumerate(node.input) if i != index and i not in host)

    def role(name: str, elements: int, seen: set[str]) -> str | None:
        for node, i in readers.get(name, ()):
            if _label(node) in _PASS_THROUGH:
                out = node.output[0] if i == 0 and node.output else ""
                found = role(out, elements, seen | {out}) if out and out not in seen else None
            else:
                found = learned_role(_label(node), i, elements)
                if found != "table" and not meets_data(node, i):
                    found = None
            if found:
                return found
        return None

    roles = {name: role(name, elements, {name}) for name, elements in _float_tensors(graph).items()}
    return {name: r for name, r in roles.items() if r}


# --- compilation ---------------------------------------------------------------------------------

@dataclass
class Step:
    """One node, ready to run: ``fn(attrs, [env[i] for i in inputs])`` -> env[outputs]."""
    fn: Callable | None
    attrs: dict
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    moves: tuple[int, ...]      # input positions holding host values to move to the data's device
    uses: frozenset[int]        # every slot read, subgraphs included (for freeing and pruning)
    label: str
    # If: ((then steps, output slots, host outputs), (else ...)); Loop, Scan: ((body ...),), with
    # attrs["_control"] naming the op and attrs["_body_inputs"] the slots of the body's inputs
    branches: tuple | None = None


class Compiler:
    """Turns a graph into Steps, folding constants and placing values (host or device)."""

    def __init__(self, opset: int, trainable: Callable[[str], bool], learned_only: bool = False):
        self.opset = opset
        self.trainable = trainable
        self.learned_only = learned_only  # float initializers outside a learned slot are constants
        self.learned: dict[str, str] = {}  # learned_tensors of the main graph
        self.slots: dict[str, int] = {"": EMPTY, "\0trash": TRASH}
        self.kind: dict[str, str] = {}
        self.consts: dict[str, torch.Tensor] = {}     # CPU values of constants
        self.device_slots: dict[str, int] = {}         # constant name -> slot of its buffer copy
        self.params: dict[str, tuple[torch.Tensor, bool]] = {}
        self.param_sources: dict[str, str] = {}        # name -> "initializer" | "constant"

    def slot(self, name: str) -> int:
        return self.slots.setdefault(name, len(self.slots))

    def device_slot(self, name: str) -> int:
        """Where a consumer on the device reads ``name``: a constant's buffer copy, else its slot."""
        if self.kind.get(name) != CONST:
            return self.slot(name)
        if name not in self.device_slots:
            self.device_slots[name] = self.slot(name + "\0device")
        return self.device_slots[name]

    # values
    def add_param(self, name: str, value: torch.Tensor, source: str) -> None:
        self.params[name] = (value, bool(self.trainable(name)))
        self.param_sources[name] = source
        self.kind[name] = PARAM
        self.slot(name)

    def add_const(self, name: str, value: torch.Tensor) -> None:
        self.consts[name] = value
        self.kind[name] = CONST
        self.slot(name)

    def add_initializers(self, graph: onnx.GraphProto, top: bool) -> None:
        host_only = _host_only_names(graph)
        for t in graph.initializer:
            value = tensor_from_proto(t)
            # subgraph weights too: the cut moves a sliced weight of a branch or body into it
            if t.data_type in FLOAT_TYPES and t.name not in host_only \
                    and (t.name in self.learned or not self.learned_only):
                self.add_param(t.name, value, "initializer")
            else:
                self.add_const(t.name, value)

    # nodes
    def compile(self, graph: onnx.GraphProto, top: bool) -> list[Step]:
        if top:
            self.learned = learned_tensors(graph)
        self.add_initializers(graph, top)
        steps = []
        for node in _topological(list(graph.node)):
            if node.op_type == "Constant":
                # a float Constant node is a parameter only where it is a weight (paddle2onnx's spelling)
                if top and node.output[0] in self.learned:
                    self.add_param(node.output[0], constant_value(node), "constant")
                else:
                    self.add_const(node.output[0], constant_value(node))
            elif node.op_type == "If":
                steps.append(self.compile_if(node))
            elif node.op_type in ("Loop", "Scan"):
                steps.append(self.compile_body(node))
            else:
                step = self.compile_node(node)
                if step is not None:
                    steps.append(step)
        return steps

    def compile_node(self, node: onnx.NodeProto) -> Step | None:
        attrs = _attributes(node, self.opset)
        host = HOST_INPUTS.get(node.op_type, frozenset())
        kinds = [self.kind_of(name, node) if name else None for name in node.input]
        placement = _placement(node.op_type, kinds, host)
        if placement == "fold":
            self.fold(node, attrs)
            return None
        on_device = placement == DEVICE
        inputs, moves = [], []
        for i, (name, kind) in enumerate(zip(node.input, kinds)):
            data = on_device and i not in host
            inputs.append(self.device_slot(name) if data else self.slot(name))
            if data and kind == HOST:
                moves.append(i)
        out_kind = HOST if node.op_type in ("Shape", "Size") else placement
        for o in node.output:
            if o:
                self.kind[o] = out_kind
        return Step(OPS[_label(node)], attrs, tuple(inputs), self.output_slots(node), tuple(moves),
                    frozenset(inputs), f"{node.op_type} node {node.name or node.output[0]!r}")

    def compile_if(self, node: onnx.NodeProto) -> Step:
        for name in _reads(node):
            self.kind_of(name, node)
        branches = [self.compile_branch(helper.get_attribute_value(next(a for a in node.attribute if a.name == attr)))
                    for attr in ("then_branch", "else_branch")]
        for o in node.output:
            if o:
                self.kind[o] = DEVICE
        cond = self.slot(node.input[0])
        uses = frozenset({cond} | {s for steps, outs, _ in branches for s in outs}
                         | {s for steps, _, _ in branches for step in steps for s in step.uses})
        return Step(None, {}, (cond,), self.output_slots(node), (), uses,
                    f"If node {node.name or node.output[0]!r}", tuple(branches))

    def compile_branch(self, sub: onnx.GraphProto) -> tuple:
        """(steps, slots of the subgraph's outputs, positions of outputs computed on the host)."""
        steps = self.compile(sub, top=False)
        return (steps, tuple(self.device_slot(o.name) for o in sub.output),
                tuple(i for i, o in enumerate(sub.output) if self.kind.get(o.name) == HOST))

    def compile_body(self, node: onnx.NodeProto) -> Step:
        """Loop or Scan: the body runs once per iteration on the same values (outer scope visible),
        its inputs set each time: Loop's iteration number and condition (host numbers), then the
        carried values; Scan's states, then one slice of each scan input."""
        if node.op_type == "Scan" and self.opset < 9:
            raise UnsupportedModel(f"Scan node {node.name or node.output[0]!r}: opset {self.opset} Scan "
                                   "(with a batch axis) is not supported; opset 9 and later are")
        for name in _reads(node):
            self.kind_of(name, node)
        body = helper.get_attribute_value(next(a for a in node.attribute if a.name == "body"))
        numbers = 2 if node.op_type == "Loop" else 0  # Loop's trip count and condition
        body_inputs = []
        for i, vi in enumerate(body.input):
            self.kind[vi.name] = HOST if i < numbers else DEVICE
            body_inputs.append(self.slot(vi.name))
        branch = self.compile_branch(body)
        for o in node.output:
            if o:
                self.kind[o] = DEVICE
        inputs = tuple(self.slot(n) if i < numbers or not n else self.device_slot(n) for i, n in enumerate(node.input))
        attrs = {**_attributes(node, self.opset), "_control": node.op_type, "_body_inputs": tuple(body_inputs)}
        steps, outs, _ = branch
        uses = frozenset(set(inputs) | set(outs) | {s for step in steps for s in step.uses})
        return Step(None, attrs, inputs, self.output_slots(node), (), uses,
                    f"{node.op_type} node {node.name or node.output[0]!r}", (branch,))

    def output_slots(self, node: onnx.NodeProto) -> tuple[int, ...]:
        return tuple(self.slot(o) if o else TRASH for o in node.output)

    def kind_of(self, name: str, node: onnx.NodeProto) -> str:
        if name not in self.kind:
            raise InvalidModel(f"{_label(node)} node {node.name or node.output[0]!r} reads {name!r}, "
                               "which no node, input or initializer provides")
        return self.kind[name]

    def fold(self, node: onnx.NodeProto, attrs: dict) -> None:
        """Evaluate a node whose inputs are all known now; its outputs become constants."""
        args = [self.consts[n] if self.kind[n] == CONST else self.params[n][0] if n else None
                for n in node.input]
        try:
            with torch.no_grad():
                result = OPS[_label(node)](attrs, args)
        except Exception as exc:
            raise UnsupportedModel(f"{node.op_type} node {node.name or node.output[0]!r} on constant inputs "
                                   f"failed: {first_line(exc)}") from exc
        results = [result] if isinstance(result, torch.Tensor) else list(result)
        for name, value in zip(node.output, results):
            if name:
                self.add_const(name, value.detach())


def _placement(op_type: str, kinds: list[str | None], host_inputs: frozenset[int]) -> str:
    """'fold' (all inputs known now), 'host' (shape arithmetic on the CPU) or 'device'."""
    if op_type in ("Shape", "Size"):
        return "fold" if kinds and kinds[0] in (CONST, PARAM) else HOST
    if all(k in (None, CONST) for k in kinds):
        return "fold"
    data = [k for i, k in enumerate(kinds) if i not in host_inputs]
    return DEVICE if any(k in (INPUT, PARAM, DEVICE) for k in data) else HOST


def _host_only_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors read only as Python numbers (e.g. Resize scales): no gradient can reach them."""
    at_host, elsewhere = set(), set()
    for node in graph.node:
        host = HOST_INPUTS.get(node.op_type, frozenset())
        for i, name in enumerate(node.input):
            (at_host if i in host else elsewhere).add(name)
        for sub in _subgraphs(node):
            elsewhere |= _outer_references(sub)
    elsewhere.update(o.name for o in graph.output)
    return at_host - elsewhere


def schedule_steps(steps: list[Step], keep: Iterable[int]) -> tuple[tuple, ...]:
    """Steps as loop tuples, each with the slots whose last use it is (freed after it)."""
    keep = set(keep) | {EMPTY}
    last: dict[int, int] = {}
    for i, step in enumerate(steps):
        for s in step.uses:
            last[s] = i
    frees: list[list[int]] = [[] for _ in steps]
    for s, i in last.items():
        if s not in keep:
            frees[i].append(s)
    plan = []
    for step, free in zip(steps, frees):
        branches = None
        if step.branches is not None:
            branches = tuple((schedule_steps(b_steps, set(outs) | set(step.uses)), outs, moves)
                             for b_steps, outs, moves in step.branches)
        plan.append((step.fn, step.attrs, step.inputs, step.outputs, step.moves, tuple(free), branches,
                     step.label))
    return tuple(plan)


def needed_steps(steps: list[Step], wanted: set[int]) -> list[Step]:
    """The steps that the wanted slots depend on, in order."""
    needed, chosen = set(wanted), []
    for step in reversed(steps):
        if needed.intersection(step.outputs):
            chosen.append(step)
            needed |= step.uses
    return chosen[::-1]


class Plan(NamedTuple):
    """What computing some named tensors takes."""
    schedule: tuple         # loop tuples (see schedule_steps)
    slots: tuple[int, ...]  # where the results are
    moves: tuple[int, ...]  # results computed on the host, moved to the module's device
    inputs: tuple[str, ...]  # the graph inputs they depend on

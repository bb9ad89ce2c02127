"""The ONNX graph as a torch module: gradients, fine-tuning, write-back.

    tg = TorchGraph(model)                 # float initializers -> nn.Parameters
    loss = criterion(tg(x)[0], y); loss.backward()
    new_model = tg.write_back(model)       # trained values into the same initializers

Design
- The graph is compiled once, at construction, into a flat list of steps in
  topological order: (op function, resolved attributes, input slots, output
  slots). A forward pass is one loop over that list with the values in a
  Python list indexed by slot; a value is dropped after its last use. The op
  functions live in one table, ``torch_ops.OPS``.
- Values come in kinds. *Parameters*: float initializers (but those read only
  as numbers, e.g. Resize scales, which no gradient can reach), and float
  Constant nodes that are the weight of a Conv/Gemm/MatMul/norm/Add/Mul
  (paddle2onnx spells weights that way). *Constants*: every other initializer and
  Constant, and every node whose inputs are all constants, which is
  evaluated once here (folding), so shape arithmetic on constants costs
  nothing per call. *Runtime* values: the rest.
- Shape arithmetic stays on the host. Shape returns a CPU tensor, nodes that
  only combine host values and constants run on the CPU, inputs an op reads as
  Python numbers (``torch_ops.HOST_INPUTS``: shapes, axes, pads) always come
  from the CPU, and a host value that meets device data is moved there once.
  So shape arithmetic costs no device-to-host copies (which would wait for the
  accelerator). Constants used as data are buffers and follow ``.to(device)``.
- ``write_back`` stores each parameter in its own initializer (or Constant
  node) of a copy of the model: same name, dtype and shape; a parameter whose
  value did not change keeps its original bytes.

Semantics: inference everywhere (Dropout is the identity and
BatchNormalization uses its stored statistics, also in ``train()``), so a
fine-tuned graph is the graph that gets exported. ``If`` runs the branch its
condition picks; Loop and Scan are not supported.
"""

from __future__ import annotations

import heapq
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from ..errors import (
    InvalidModel,
    MissingDependency,
    UnsupportedModel,
    UsageError,
    first_line,
)
from ..model.proto import opset_of
from ..rules.weights import learned_inputs, operand

try:
    import torch
    from torch import nn
except ImportError as exc:  # torch is an optional dependency of onnxprune
    raise MissingDependency("the PyTorch executor needs torch: pip install 'onnxprune[torch]'") from exc

from .ops import HOST_INPUTS, ONNX_TO_TORCH, OPS, PREPARE

__all__ = ["TorchGraph"]

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE}
EMPTY, TRASH = 0, 1  # slots of a missing input (always None) and of an unused output

# Value kinds.
INPUT, PARAM, CONST, HOST, DEVICE = "input", "param", "const", "host", "device"


# --- tensors <-> TensorProto ---------------------------------------------------------------------

def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto as a (CPU, writable) torch tensor."""
    if uses_external_data(t) and not t.HasField("raw_data"):
        raise UnsupportedModel(f"tensor {t.name!r} is stored in an external file that was not loaded: "
                               "load the model with onnx.load(path) (external data included)")
    if t.data_type not in ONNX_TO_TORCH:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        raise UnsupportedModel(f"tensor {t.name!r} has type {name}, which the PyTorch executor does not handle")
    array = numpy_helper.to_array(t)
    if t.data_type == onnx.TensorProto.BFLOAT16:  # numpy has no bfloat16: move the bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Little-endian raw bytes, as ONNX raw_data stores them."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _stored_bytes(t: onnx.TensorProto) -> bytes | None:
    """The bytes a TensorProto's values have in raw_data form (None if not in memory)."""
    if uses_external_data(t) and not t.HasField("raw_data"):
        return None
    if t.HasField("raw_data"):
        return t.raw_data
    return tensor_bytes(tensor_from_proto(t))


def store_tensor(proto: onnx.TensorProto, value: torch.Tensor) -> None:
    """Put ``value`` into ``proto`` in place; same name, dtype and shape, bytes untouched if equal."""
    dtype = ONNX_TO_TORCH[proto.data_type]
    if tuple(value.shape) != tuple(proto.dims):
        raise UsageError(f"parameter {proto.name!r} has shape {tuple(value.shape)}, "
                         f"its initializer {tuple(proto.dims)}: write_back cannot change shapes")
    data = tensor_bytes(value.to(dtype))
    if _stored_bytes(proto) == data:
        return
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data"):
        proto.ClearField(name)
    proto.data_location = onnx.TensorProto.DEFAULT
    proto.raw_data = data


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
        known = node.domain in ("", "ai.onnx") and (node.op_type in OPS or node.op_type in ("Constant", "If"))
        if not known:
            missing.setdefault(_label(node), node.name or node.output[0])
    if missing:
        listed = ", ".join(f"{op} (node {name})" for op, name in missing.items())
        if any(op in ("Loop", "Scan") for op in missing):
            listed += "; Loop and Scan are not supported: only If is"
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
    prepare = PREPARE.get(node.op_type)
    return prepare(attrs) if prepare else attrs


def constant_value(node: onnx.NodeProto) -> torch.Tensor:
    """The value of a Constant node, whichever attribute spells it."""
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None:
        raise InvalidModel(f"Constant node {node.name or node.output[0]!r} needs exactly one value attribute")
    if a.name == "value":
        return tensor_from_proto(a.t)
    if a.name in ("value_float", "value_floats"):
        return torch.tensor(helper.get_attribute_value(a), dtype=torch.float32)
    if a.name in ("value_int", "value_ints"):
        return torch.tensor(helper.get_attribute_value(a), dtype=torch.int64)
    raise UnsupportedModel(f"Constant node {node.name or node.output[0]!r}: {a.name} is not supported "
                           "by the PyTorch executor")


def _constant_weights(graph: onnx.GraphProto) -> set[str]:
    """Outputs of float Constant nodes that feed a learned input (rules/weights.py); a coefficient
    of Add/Mul only when it has more than one element (x * 0.5 is arithmetic, not a weight)."""
    candidates = {}
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if t.data_type in FLOAT_TYPES:
                candidates[node.output[0]] = int(np.prod(t.dims)) if t.dims else 1
    weights = set()
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        for i in learned_inputs(node.op_type):
            name = node.input[i] if i < len(node.input) else ""
            if name in candidates and (operand(node.op_type, i).role != "coefficient" or candidates[name] > 1):
                weights.add(name)
    return weights


def _key(name: str, taken: set[str], reserved: nn.Module) -> str:
    """A torch attribute name for an ONNX tensor name: word characters only, unique."""
    key = re.sub(r"\W", "_", name) or "t"
    if key[0].isdigit():
        key = "t_" + key
    base, n = key, 0
    while key in taken or hasattr(reserved, key):
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key


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
    branches: tuple | None = None  # If: ((then steps, then output slots), (else ...))


class _Compiler:
    """Turns a graph into Steps, folding constants and placing values (host or device)."""

    def __init__(self, opset: int, trainable: Callable[[str], bool]):
        self.opset = opset
        self.trainable = trainable
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
            if top and t.data_type in FLOAT_TYPES and t.name not in host_only:
                self.add_param(t.name, value, "initializer")
            else:  # also subgraph initializers: write_back looks at the main graph only
                self.add_const(t.name, value)

    # nodes
    def compile(self, graph: onnx.GraphProto, top: bool) -> list[Step]:
        self.add_initializers(graph, top)
        weights = _constant_weights(graph) if top else set()
        steps = []
        for node in _topological(list(graph.node)):
            if node.op_type == "Constant":
                if node.output[0] in weights:
                    self.add_param(node.output[0], constant_value(node), "constant")
                else:
                    self.add_const(node.output[0], constant_value(node))
            elif node.op_type == "If":
                steps.append(self.compile_if(node))
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
        return Step(OPS[node.op_type], attrs, tuple(inputs), self.output_slots(node), tuple(moves),
                    frozenset(inputs), f"{node.op_type} node {node.name or node.output[0]!r}")

    def compile_if(self, node: onnx.NodeProto) -> Step:
        for name in _reads(node):
            self.kind_of(name, node)
        branches = []
        for attr in ("then_branch", "else_branch"):
            sub = helper.get_attribute_value(next(a for a in node.attribute if a.name == attr))
            steps = self.compile(sub, top=False)
            branches.append((steps, tuple(self.device_slot(o.name) for o in sub.output),
                             tuple(i for i, o in enumerate(sub.output) if self.kind.get(o.name) == HOST)))
        for o in node.output:
            if o:
                self.kind[o] = DEVICE
        cond = self.slot(node.input[0])
        uses = frozenset({cond} | {s for steps, outs, _ in branches for s in outs}
                         | {s for steps, _, _ in branches for step in steps for s in step.uses})
        return Step(None, {}, (cond,), self.output_slots(node), (), uses,
                    f"If node {node.name or node.output[0]!r}", tuple(branches))

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
                result = OPS[node.op_type](attrs, args)
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


def _schedule(steps: list[Step], keep: Iterable[int]) -> tuple[tuple, ...]:
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
            branches = tuple((_schedule(b_steps, set(outs) | set(step.uses)), outs, moves)
                             for b_steps, outs, moves in step.branches)
        plan.append((step.fn, step.attrs, step.inputs, step.outputs, step.moves, tuple(free), branches,
                     step.label))
    return tuple(plan)


def _needed(steps: list[Step], wanted: set[int]) -> list[Step]:
    """The steps that the wanted slots depend on, in order."""
    needed, chosen = set(wanted), []
    for step in reversed(steps):
        if needed.intersection(step.outputs):
            chosen.append(step)
            needed |= step.uses
    return chosen[::-1]


class _Plan(NamedTuple):
    """What computing some named tensors takes."""
    schedule: tuple         # loop tuples (see _schedule)
    slots: tuple[int, ...]  # where the results are
    moves: tuple[int, ...]  # results computed on the host, moved to the module's device
    inputs: tuple[str, ...]  # the graph inputs they depend on


# --- the module ----------------------------------------------------------------------------------

class TorchGraph(nn.Module):
    """An ONNX model as a torch module whose parameters are its float initializers.

    ``param_names`` maps each name of ``named_parameters()`` ("params.<key>")
    to its ONNX tensor name; ``parameter(onnx_name)`` returns the parameter.
    Call with the graph inputs (positional, in graph order, or by name); the
    result is a tuple in graph-output order. ``run(feeds, outputs)`` returns
    any tensors of the graph by name.
    """

    def __init__(self, model: onnx.ModelProto, *, trainable: Callable[[str], bool] | None = None):
        super().__init__()
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        graph = model.graph
        if len(graph.sparse_initializer):
            raise UnsupportedModel("sparse initializers are not supported by the PyTorch executor")
        check_supported(graph)
        initializers = {t.name for t in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in initializers]
        self.output_names = [v.name for v in graph.output]

        compiler = _Compiler(opset_of(model), trainable or (lambda name: True))
        for name in self.input_names:
            compiler.kind[name] = INPUT
            compiler.slot(name)
        self._steps = compiler.compile(graph, top=True)
        self._register(compiler)
        self._plans: dict[tuple[str, ...], tuple] = {}
        self._forward_plan = self._plan(tuple(self.output_names))

    # construction
    def _register(self, c: _Compiler) -> None:
        """Parameters and buffers; the slot table and the per-call template of values."""
        self.params = nn.ParameterDict()
        self.consts = nn.Module()
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # tells the module's device
        taken: set[str] = set()
        self.param_names: dict[str, str] = {}
        self._param_keys: dict[str, str] = {}
        self._param_sources = dict(c.param_sources)
        self._param_slots = []
        for name, (value, trainable) in c.params.items():
            key = _key(name, taken, self.params)
            self.params[key] = nn.Parameter(value, requires_grad=trainable and value.is_floating_point())
            self.param_names[f"params.{key}"] = name
            self._param_keys[name] = key
            self._param_slots.append((c.slot(name), key))
        self._buffer_slots = []
        for name, slot in c.device_slots.items():
            key = _key(name, taken, self.consts)
            self.consts.register_buffer(key, c.consts[name], persistent=False)
            self._buffer_slots.append((slot, key))
        self._kinds = dict(c.kind)
        self._read_slot = {name: c.device_slots.get(name, slot) for name, slot in c.slots.items()
                           if name in c.kind}
        self._template = [None] * len(c.slots)
        for name, value in c.consts.items():
            self._template[c.slots[name]] = value
        self._input_slots = [c.slots[n] for n in self.input_names]

    def _plan(self, names: tuple[str, ...]) -> "_Plan":
        plan = self._plans.get(names)
        if plan is None:
            unknown = [n for n in names if n not in self._read_slot]
            if unknown:
                raise UsageError(f"no tensor named {unknown[0]!r} in the graph")
            slots = tuple(self._read_slot[n] for n in names)
            steps = _needed(self._steps, set(slots))
            read = set(slots).union(*(step.uses for step in steps))
            plan = _Plan(_schedule(steps, slots), slots,
                         tuple(i for i, n in enumerate(names) if self._kinds.get(n) in (HOST, CONST)),
                         tuple(n for n, s in zip(self.input_names, self._input_slots) if s in read))
            self._plans[names] = plan
        return plan

    # running
    def forward(self, *inputs, **named):
        if named:
            if inputs:
                raise UsageError("pass the graph inputs either positionally or by name, not both")
            inputs = tuple(self._feed(named, name) for name in self.input_names)
        if len(inputs) != len(self.input_names):
            raise UsageError(f"the graph takes {len(self.input_names)} inputs "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        return tuple(self._execute(self._forward_plan, inputs))

    def run(self, feeds: Mapping[str, object], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Tensors ``outputs`` (default: the graph outputs) by name.

        Only the nodes they depend on run, so only the graph inputs those need must be fed.
        """
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise UsageError(f"{sorted(unknown)[0]!r} is not a graph input ({', '.join(self.input_names)})")
        names = tuple(outputs) if outputs is not None else tuple(self.output_names)
        plan = self._plan(names)
        for name in plan.inputs:
            self._feed(feeds, name)  # raises for a missing one
        inputs = [self._feed(feeds, name) if name in feeds else None for name in self.input_names]
        return dict(zip(names, self._execute(plan, inputs)))

    def _feed(self, feeds: Mapping[str, object], name: str):
        if name not in feeds:
            raise UsageError(f"missing graph input {name!r}")
        value = feeds[name]
        return torch.from_numpy(np.asarray(value)) if isinstance(value, (np.ndarray, np.generic)) else value

    def _env(self, inputs) -> list:
        env = self._template.copy()
        params, buffers = self.params._parameters, self.consts._buffers
        for slot, key in self._param_slots:
            env[slot] = params[key]
        for slot, key in self._buffer_slots:
            env[slot] = buffers[key]
        for slot, value in zip(self._input_slots, inputs):
            env[slot] = value
        return env

    def _execute(self, plan: "_Plan", inputs) -> list:
        env = self._env(inputs)
        device = self._anchor.device
        self._loop(plan.schedule, env, device)
        results = [env[s] for s in plan.slots]
        for i in plan.moves:
            results[i] = results[i].to(device)
        return results

    def _loop(self, schedule, env: list, device) -> None:
        for fn, attrs, ins, outs, moves, frees, branches, label in schedule:
            args = [env[i] for i in ins]
            try:
                if branches is not None:
                    result = self._branch(branches, args[0], env, device)
                else:
                    for i in moves:
                        args[i] = args[i].to(device)
                    result = fn(attrs, args)
            except Exception as exc:  # say which node failed (bad input shapes, ...); the type stays
                notes = getattr(exc, "__notes__", [])
                if hasattr(exc, "add_note") and not any(n.startswith("while running") for n in notes):
                    exc.add_note(f"while running {label}")  # innermost node only (If branches nest)
                raise
            if isinstance(result, torch.Tensor):
                env[outs[0]] = result
            else:
                for s, r in zip(outs, result):
                    env[s] = r
            for s in frees:
                env[s] = None

    def _branch(self, branches, cond, env: list, device) -> tuple:
        """If: run the branch the condition picks, on the same values (outer scope visible)."""
        schedule, outs, moves = branches[0] if bool(cond.reshape(-1)[0]) else branches[1]
        self._loop(schedule, env, device)
        return tuple(env[s].to(device) if i in moves else env[s] for i, s in enumerate(outs))

    # parameters
    def parameter(self, onnx_name: str) -> nn.Parameter:
        """The parameter holding initializer (or Constant weight) ``onnx_name``."""
        if onnx_name not in self._param_keys:
            raise KeyError(f"{onnx_name!r} is not a parameter of this graph")
        return self.params[self._param_keys[onnx_name]]

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` holding the parameters' current values in the same tensors."""
        new = onnx.ModelProto()
        new.CopyFrom(model)
        initializers = {t.name: t for t in new.graph.initializer}
        constants = {n.output[0]: n for n in new.graph.node if n.op_type == "Constant"}
        for name, key in self._param_keys.items():
            value = self.params[key].detach()
            if self._param_sources[name] == "initializer" and name in initializers:
                store_tensor(initializers[name], value)
            elif self._param_sources[name] == "constant" and name in constants:
                store_tensor(constants[name].attribute[0].t, value)
            else:
                raise UsageError(f"write_back: the model has no tensor {name!r}; pass the model this "
                                 "TorchGraph was built from")
        return new

    def extra_repr(self) -> str:
        return (f"inputs={self.input_names}, outputs={self.output_names}, steps={len(self._steps)}, "
                f"params={len(self._param_keys)}")

"""The ONNX graph as a torch module: gradients, fine-tuning, write-back.

    tg = TorchGraph(model)                 # float initializers -> nn.Parameters
    loss = criterion(tg(x)[0], y); loss.backward()
    new_model = tg.write_back(model)       # trained values into the same initializers

Design
- The graph is compiled once, at construction, into a flat list of steps in
  topological order: (op function, resolved attributes, input slots, output
  slots). A forward pass is one loop over that list with the values in a
  Python list indexed by slot; a value is dropped after its last use. The op
  functions live in one table, ``ops.OPS`` (ops/: one module per op family).
  Compilation (folding, placement, scheduling) is in compile.py, the
  TensorProto <-> torch conversions in tensors.py; this module runs the steps.
- Values come in kinds. *Parameters*: float initializers (but those read only
  as numbers, e.g. Resize scales, which no gradient can reach), and float
  Constant nodes that are the weight of a Conv/Gemm/MatMul/norm/Add/Mul
  (paddle2onnx spells weights that way). With ``trainable="learned"`` (what
  recovery trains) only the tensors read in a learned slot of the weight
  table (rules/weights.py, compile.py ``learned_tensors``) are parameters:
  Pow's exponent, an epsilon or an attention scale stays a constant (the
  exponent's gradient is NaN for negative inputs, and none of them is a
  weight). ``roles`` names the slot of each. *Constants*: every other initializer and
  Constant, and every node whose inputs are all constants, which is
  evaluated once here (folding), so shape arithmetic on constants costs
  nothing per call. *Runtime* values: the rest.
- Shape arithmetic stays on the host. Shape returns a CPU tensor, nodes that
  only combine host values and constants run on the CPU, inputs an op reads as
  Python numbers (``ops.HOST_INPUTS``: shapes, axes, pads) always come
  from the CPU, and a host value that meets device data is moved there once.
  So shape arithmetic costs no device-to-host copies (which would wait for the
  accelerator). Constants used as data are buffers and follow ``.to(device)``.
- ``write_back`` stores each parameter in its own initializer (or Constant
  node) of a copy of the model: same name, dtype and shape; a parameter whose
  value did not change keeps its original bytes. The initializers of
  subgraphs are parameters too (a cut If branch or Loop body holds its sliced
  weights itself), written back where they are.

Semantics: inference everywhere (Dropout is the identity and
BatchNormalization uses its stored statistics, also in ``train()``), so a
fine-tuned graph is the graph that gets exported. ``If`` runs the branch its
condition picks; ``Loop`` and ``Scan`` run their body once per iteration (in
Python: gradients flow through every iteration), on the same value table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import numpy as np
import onnx
import onnx.inliner

from ..errors import MissingDependency, UnsupportedModel, UsageError
from ..graph.shapes import graphs
from ..model.proto import opset_of

try:
    import torch
    from torch import nn
except ImportError as exc:  # torch is an optional dependency of onnxprune
    raise MissingDependency("the PyTorch executor needs torch: pip install 'onnxprune[torch]'") from exc

from .compile import CONST, HOST, INPUT, Compiler, Plan, check_supported, needed_steps, schedule_steps
from .tensors import store_tensor, tensor_from_proto

__all__ = ["TorchGraph", "tensor_from_proto"]


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


# --- the module ----------------------------------------------------------------------------------

class TorchGraph(nn.Module):
    """An ONNX model as a torch module whose parameters are its float initializers.

    ``param_names`` maps each name of ``named_parameters()`` ("params.<key>")
    to its ONNX tensor name; ``parameter(onnx_name)`` returns the parameter.
    Call with the graph inputs (positional, in graph order, or by name); the
    result is a tuple in graph-output order. ``run(feeds, outputs)`` returns
    any tensors of the graph by name.

    ``trainable``: None, every float initializer is a parameter with gradients
    (for gradient criteria, which may ask about any tensor); a predicate on the
    ONNX name, the same parameters, those it rejects without gradients;
    ``"learned"``, only the learned tensors are parameters (all with
    gradients), every other float initializer is a constant. ``roles`` maps
    each learned tensor of the main graph to its role in the weight table
    ("weight", "operand", "bias", "norm", "table", "coefficient").
    """

    def __init__(self, model: onnx.ModelProto, *, trainable: Callable[[str], bool] | str | None = None):
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

        if isinstance(trainable, str) and trainable != "learned":
            raise UsageError(f"TorchGraph: trainable must be a predicate, None or 'learned', got {trainable!r}")
        learned_only = trainable == "learned"
        predicate = trainable if callable(trainable) else (lambda name: True)
        compiler = Compiler(opset_of(model), predicate, learned_only)
        for name in self.input_names:
            compiler.kind[name] = INPUT
            compiler.slot(name)
        self._steps = compiler.compile(graph, top=True)
        self.roles: dict[str, str] = dict(compiler.learned)
        self._register(compiler)
        self._plans: dict[tuple[str, ...], tuple] = {}
        self._forward_plan = self._plan(tuple(self.output_names))

    # construction
    def _register(self, c: Compiler) -> None:
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

    def _plan(self, names: tuple[str, ...]) -> Plan:
        plan = self._plans.get(names)
        if plan is None:
            unknown = [n for n in names if n not in self._read_slot]
            if unknown:
                raise UsageError(f"no tensor named {unknown[0]!r} in the graph")
            slots = tuple(self._read_slot[n] for n in names)
            steps = needed_steps(self._steps, set(slots))
            read = set(slots).union(*(step.uses for step in steps))
            plan = Plan(schedule_steps(steps, slots), slots,
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

    def _execute(self, plan: Plan, inputs) -> list:
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
                    result = self._control(attrs, branches, args, env, device)
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

    def _control(self, attrs: dict, branches, args: list, env: list, device) -> tuple:
        control = attrs.get("_control", "If")
        if control == "If":
            return self._run_body(branches[0] if bool(args[0].reshape(-1)[0]) else branches[1], env, device)
        if control == "Loop":
            return self._repeat(attrs, branches[0], args, env, device)
        return self._scan(attrs, branches[0], args, env, device)

    def _run_body(self, branch, env: list, device, inputs=(), values=()) -> list:
        """Run a subgraph on the same values (outer scope visible), its inputs set first."""
        schedule, outs, moves = branch
        for slot, value in zip(inputs, values):
            env[slot] = value
        self._loop(schedule, env, device)
        return [env[s].to(device) if i in moves else env[s] for i, s in enumerate(outs)]

    def _repeat(self, attrs: dict, body, args: list, env: list, device) -> tuple:
        """Loop: while the iteration count is below M (if given) and the condition holds (if
        given), run the body on (iteration, condition, carried values); the carried values go
        round, each scan output is stacked along a new first axis."""
        trip, cond, carried = args[0], args[1], list(args[2:])
        limit = None if trip is None else int(trip.reshape(-1)[0])
        going = True if cond is None else bool(cond.reshape(-1)[0])
        scans: list[list] = []
        i = 0
        while going and (limit is None or i < limit):
            values = [torch.tensor(i, dtype=torch.int64), torch.tensor(going), *carried]
            results = self._run_body(body, env, device, attrs["_body_inputs"], values)
            going = bool(results[0].reshape(-1)[0])
            carried = results[1:1 + len(carried)]
            scans.append(results[1 + len(carried):])
            i += 1
        outputs = len(body[1]) - 1 - len(carried)
        if outputs and not scans:
            raise UnsupportedModel("a Loop that runs no iteration has scan outputs of unknown shape")
        return (*carried, *(torch.stack([s[k] for s in scans]) for k in range(outputs)))

    def _scan(self, attrs: dict, body, args: list, env: list, device) -> tuple:
        """Scan: the body runs on the states and one slice of each scan input (along its axis,
        forwards or backwards); the states go round, the scan outputs are stacked along theirs."""
        count = attrs["num_scan_inputs"]
        states, xs = list(args[:len(args) - count]), args[len(args) - count:]
        in_axes = attrs.get("scan_input_axes", [0] * count)
        in_reverse = attrs.get("scan_input_directions", [0] * count)
        xs = [x.movedim(a % x.dim(), 0) for x, a in zip(xs, in_axes)]
        xs = [x.flip(0) if back else x for x, back in zip(xs, in_reverse)]
        produced = len(body[1]) - len(states)
        out_axes = attrs.get("scan_output_axes", [0] * produced)
        out_reverse = attrs.get("scan_output_directions", [0] * produced)
        slices: list[list] = [[] for _ in range(produced)]
        for t in range(xs[0].shape[0]):
            results = self._run_body(body, env, device, attrs["_body_inputs"], [*states, *(x[t] for x in xs)])
            states = results[:len(states)]
            for k, y in enumerate(results[len(states):]):
                slices[k].append(y)
        ys = []
        for k, parts in enumerate(slices):
            y = torch.stack(parts)
            y = y.flip(0) if out_reverse[k] else y
            ys.append(y.movedim(0, out_axes[k] % y.dim()))
        return (*states, *ys)

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
        initializers = {t.name: t for g in graphs(new.graph) for t in g.initializer}  # subgraphs' too
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

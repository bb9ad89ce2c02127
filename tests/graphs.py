"""Test helpers: build small ONNX graphs with onnx.helper, run them with
onnxruntime, and check a pruned model against the original.

``masked_reference(model, analysis, plan)`` is the reference for mask
equivalence (DESIGN.md invariant 2): a copy of the ORIGINAL model in which
every removed channel's contribution is zeroed at its consumers, i.e. the
removed positions of the consumer-side weights (the reduction axis: Conv
weight axis 1, ConvTranspose weight axis 0, Gemm B's reduction axis, a
constant MatMul operand's reduction axis) are set to 0. The weights to mask
come from the group's ParamSlots; each masked weight becomes a private
initializer of its node, so shared initializers stay intact for other users.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxprune

FLOAT = TensorProto.FLOAT


# --- building -------------------------------------------------------------------------

class GraphBuilder:
    """A tiny imperative graph builder; every node gets a name (tests refer to them)."""

    def __init__(self, opset: int = 17, seed: int = 0, name: str = "g"):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count = itertools.count()
        self._names: set[str] = set()

    def fresh(self, base: str) -> str:
        while True:
            name = f"{base}_{next(self._count)}"
            if name not in self._names:
                self._names.add(name)
                return name

    # tensors
    def input(self, name: str, shape, dtype=FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        self._names.add(name)
        return name

    def const(self, value, name: str | None = None) -> str:
        name = name or self.fresh("c")
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape, name: str | None = None, fan_in: int | None = None, offset: float = 0.0) -> str:
        fan_in = fan_in or int(np.prod(shape[1:])) or 1
        w = self.rng.standard_normal(shape) / np.sqrt(fan_in) + offset
        return self.const(w.astype(np.float32), name or self.fresh("w"))

    def ints(self, values, name: str | None = None) -> str:
        return self.const(np.asarray(values, dtype=np.int64), name)

    def floats(self, values, name: str | None = None) -> str:
        return self.const(np.asarray(values, dtype=np.float32), name)

    # nodes
    def op(self, op: str, inputs, outputs: int = 1, name: str | None = None, domain: str = "", **attrs):
        name = name or self.fresh(op)
        self._names.add(name)
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs if outputs > 1 else outs[0]

    def conv(self, x, cin, cout, k=3, group=1, bias=True, name=None, stride=1, w=None, b=None, pad=None):
        name = name or self.fresh("conv")
        w = w or self.weight((cout, cin // group, k, k), f"{name}.W")
        inputs = [x, w]
        if bias:
            inputs.append(b or self.weight((cout,), f"{name}.B", fan_in=4))
        pad = k // 2 if pad is None else pad
        return self.op("Conv", inputs, name=name, kernel_shape=[k, k], pads=[pad] * 4,
                       strides=[stride, stride], group=group)

    def bn(self, x, c, name=None):
        name = name or self.fresh("bn")
        scale = self.const((self.rng.random(c) + 0.5).astype(np.float32), f"{name}.scale")
        shift = self.weight((c,), f"{name}.shift", fan_in=4)
        mean = self.weight((c,), f"{name}.mean", fan_in=4)
        var = self.const((self.rng.random(c) + 0.5).astype(np.float32), f"{name}.var")
        return self.op("BatchNormalization", [x, scale, shift, mean, var], name=name, epsilon=1e-5)

    def gemm(self, x, k, n, name=None, bias=True, trans_b=0, **attrs):
        name = name or self.fresh("gemm")
        w = self.weight((n, k) if trans_b else (k, n), f"{name}.W", fan_in=k)
        inputs = [x, w] + ([self.weight((n,), f"{name}.C", fan_in=4)] if bias else [])
        return self.op("Gemm", inputs, name=name, transB=trans_b, **attrs)

    def matmul(self, x, k, n, name=None):
        name = name or self.fresh("matmul")
        return self.op("MatMul", [x, self.weight((k, n), f"{name}.W", fan_in=k)], name=name)

    # model
    def build(self, outputs, check: bool = True) -> onnx.ModelProto:
        """The model, with graph output shapes filled in by shape inference."""
        outputs = [outputs] if isinstance(outputs, str) else list(outputs)
        graph = helper.make_graph(
            self.nodes, self.name, self.inputs,
            [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs], self.inits,
        )
        # Other domains a node uses (com.microsoft, ...) are imported at version 1.
        others = [helper.make_opsetid(d, 1) for d in sorted({n.domain for n in self.nodes} - {""})]
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset), *others],
                                  producer_name="onnxprune-tests")
        model.ir_version = min(model.ir_version, 10)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        known = {v.name: v for v in inferred.graph.output}
        ran = None
        for i, o in enumerate(outputs):
            if known[o].type.tensor_type.HasField("shape"):
                model.graph.output[i].CopyFrom(known[o])
            else:  # ONNX cannot infer it (e.g. GroupNormalization): take it from a run
                ran = ran or dict(zip(outputs, run(model, make_feeds(model))))
                model.graph.output[i].CopyFrom(helper.make_tensor_value_info(o, FLOAT, list(ran[o].shape)))
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def small_cnn(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """conv -> grouped conv -> depthwise conv -> NHWC round trip -> Split / Concat -> MaxPool -> Flatten -> Gemm.

    A few KB, with every attribute the analysis reads (kernel_shape, pads,
    strides, group, perm, axis) and four prunable groups; loads at any opset
    from 11 (Split takes its sizes as an attribute before 13).
    """
    b = GraphBuilder(opset, seed=seed, name="small_cnn")
    x = b.input("x", [1, 4, 8, 8])
    h = b.op("Relu", [b.conv(x, 4, 8, name="conv")])
    h = b.op("Relu", [b.conv(h, 8, 8, group=2, name="gconv")])
    h = b.conv(h, 8, 8, group=8, name="dwconv")
    t = b.op("Transpose", [h], perm=[0, 2, 3, 1])
    h = b.op("Transpose", [b.op("Relu", [t])], perm=[0, 3, 1, 2])
    if opset >= 13:
        p1, p2 = b.op("Split", [h, b.ints([3, 5])], outputs=2, axis=1, name="split")
    else:
        p1, p2 = b.op("Split", [h], outputs=2, axis=1, split=[3, 5], name="split")
    h = b.op("Concat", [b.conv(p1, 3, 4, k=1, name="left"), b.conv(p2, 5, 4, name="right")], axis=1)
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0])
    h = b.op("Flatten", [h], axis=1)
    return b.build(b.gemm(h, 8 * 16, 5, name="fc"))


def retyped(model: onnx.ModelProto, dtype) -> onnx.ModelProto:
    """A copy of ``model`` with every float32 tensor (weights, graph inputs and outputs) stored as ``dtype``.

    ``dtype`` is a numpy dtype, or ``ml_dtypes.bfloat16``; the values are cast.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for t in copy.graph.initializer:
        if t.data_type == FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for vi in (*copy.graph.input, *copy.graph.output):
        if vi.type.tensor_type.elem_type == FLOAT:
            vi.type.tensor_type.elem_type = elem
    return copy


def write_mlp(path: str | Path, width: int, layers: int, *, external: bool = False, seed: int = 0,
              in_features: int = 64, out_features: int = 16) -> int:
    """Write ``x -> [MatMul(width) + Add + Relu] * layers -> MatMul(out_features)`` to ``path``.

    Returns the bytes of its weights. With ``external``, each weight is
    generated and appended to one data file beside the model
    (``<name>.data``, offsets recorded with onnx's external data helpers), so
    at most one weight is ever in memory: how a model over the 2 GB protobuf
    limit is built without materialising it.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    data_file = path.with_name(path.name + ".data")
    sizes = [in_features] + [width] * layers + [out_features]
    inits, nodes, total = [], [], 0
    h = "x"
    with open(data_file, "wb") if external else contextlib.nullcontext() as data:
        for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
            w = _random_matrix(rng, k, n)
            total += w.nbytes
            inits.append(_external_tensor(w, f"fc{i}.W", data, data_file.name) if external
                         else numpy_helper.from_array(w, f"fc{i}.W"))
            del w
            nodes.append(helper.make_node("MatMul", [h, f"fc{i}.W"], [f"mm{i}"], name=f"fc{i}"))
            h = f"mm{i}"
            if i < layers:
                inits.append(numpy_helper.from_array(rng.standard_normal(n, dtype=np.float32) * 0.1, f"fc{i}.b"))
                nodes.append(helper.make_node("Add", [h, f"fc{i}.b"], [f"add{i}"], name=f"bias{i}"))
                nodes.append(helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"relu{i}"))
                h = f"relu{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", FLOAT, [1, in_features])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, out_features])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxprune-tests")
    model.ir_version = 8
    onnx.save_model(model, str(path))  # the weights are already in the data file: this writes the graph
    return total


def _random_matrix(rng: np.random.Generator, k: int, n: int, block: int = 256) -> np.ndarray:
    """A (k, n) float32 weight: one random (k, block) block, tiled with a random scale per column.

    Far cheaper than n independent columns on GB-sized models, and every
    output feature still has its own magnitude (what L1/L2 importance ranks).
    """
    base = rng.standard_normal((k, min(block, n)), dtype=np.float32) / np.float32(np.sqrt(k))
    scales = rng.uniform(0.5, 1.5, n).astype(np.float32)
    w = np.empty((k, n), np.float32)
    for start in range(0, n, base.shape[1]):
        stop = min(start + base.shape[1], n)
        np.multiply(base[:, : stop - start], scales[start:stop], out=w[:, start:stop])
    return w


def _external_tensor(w: np.ndarray, name: str, data, location: str) -> onnx.TensorProto:
    """A TensorProto whose values are appended to the open file ``data`` (no copy kept)."""
    from onnx.external_data_helper import set_external_data

    offset = data.tell()
    w.tofile(data)
    tensor = onnx.TensorProto(name=name, data_type=FLOAT, dims=w.shape, raw_data=b"")
    set_external_data(tensor, location, offset=offset, length=w.nbytes)  # insists on a raw_data field
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return tensor


# --- running --------------------------------------------------------------------------

def session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def make_feeds(model: onnx.ModelProto, seed: int = 0, dims: dict | None = None) -> dict[str, np.ndarray]:
    """Random float inputs; symbolic dims become ``dims.get(name, 2)``."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 2)
                 for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return session(model).run(None, feeds)


def rel_err(reference: np.ndarray, other: np.ndarray) -> float:
    reference = np.asarray(reference, np.float64)
    other = np.asarray(other, np.float64)
    assert reference.shape == other.shape, (reference.shape, other.shape)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    err = float(np.max(np.abs(reference - other))) if reference.size else 0.0
    return err / scale if scale > 0 else err


def assert_close(reference: list, other: list, tol: float = 1e-4) -> None:
    assert len(reference) == len(other)
    for i, (a, b) in enumerate(zip(reference, other)):
        e = rel_err(a, b)
        assert e <= tol, f"output {i}: relative error {e:.3g} > {tol}"


# --- mask equivalence -------------------------------------------------------------------

def consumer_side(slot) -> bool:
    """Is this ParamSlot the reduction (input-channel) axis of a weight?"""
    node, i, axis = slot.node, slot.input, slot.axis
    ndim = len(slot.tensor.shape)
    if node.op == "Conv":
        return i == 1 and axis == 1
    if node.op == "ConvTranspose":
        return i == 1 and axis == 0
    if node.op == "Gemm":
        return i == 1 and axis == (1 if node.attrs.get("transB", 0) else 0)
    if node.op == "MatMul":
        return (i == 1 and axis == ndim - 2) or (i == 0 and axis == ndim - 1)
    if node.op in ("LSTM", "GRU", "RNN"):
        return i in (1, 2) and axis == 2  # W's input columns, R's hidden columns (the units read back)
    if node.op == "Attention" and node.domain == "com.microsoft":  # the packed q/k/v weight's rows
        return i == 1 and axis == 0
    return False


def removed_positions(owner: np.ndarray, removed: np.ndarray) -> np.ndarray:
    owned = owner >= 0
    hit = np.zeros(len(owner), bool)
    hit[owned] = removed[owner[owned]]
    return np.nonzero(hit)[0]


def all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and those of its subgraphs (If branches, Loop and Scan bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                yield from all_nodes(sub)


def masked_reference(model: onnx.ModelProto, analysis, plan) -> onnx.ModelProto:
    """The original model with removed channels zeroed at their consumers' weights."""
    ref = copy.deepcopy(model)
    by_name = {n.name: n for n in all_nodes(ref.graph)}  # subgraph nodes too
    masked: dict[tuple[str, int], np.ndarray] = {}
    for group in analysis.groups:
        if group.id not in plan.keep:
            continue
        removed = plan.removed(group.id)
        for slot in group.params.values():
            if not consumer_side(slot):
                continue
            positions = removed_positions(slot.owner, removed)
            if not len(positions):
                continue
            key = (slot.node.name, slot.input)
            values = masked.setdefault(key, np.array(slot.tensor.values, copy=True))
            index = [slice(None)] * values.ndim
            index[slot.axis] = positions
            values[tuple(index)] = 0
    for (name, i), values in masked.items():
        node = by_name[name]
        new = f"{node.input[i]}__masked__{name}"
        ref.graph.initializer.append(numpy_helper.from_array(values, new))
        node.input[i] = new
    return ref


# --- checking a pruned model ------------------------------------------------------------------

def io_signature(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    ins = [(v.name, v.type.SerializeToString()) for v in model.graph.input if v.name not in inits]
    outs = [(v.name, v.type.SerializeToString()) for v in model.graph.output]
    return ins, outs


def check_valid(original: onnx.ModelProto, pruned: onnx.ModelProto, checker: bool = True) -> None:
    """Invariant 3: full checker, same IO names/shapes/dtypes, onnxruntime loads it."""
    if checker:
        onnx.checker.check_model(pruned, full_check=True)
    assert io_signature(pruned) == io_signature(original)
    session(pruned)


def prune_checked(model: onnx.ModelProto, ratio=None, plan=None, *, mask: bool = True, tol: float = 1e-4,
                  feeds: dict | None = None, macs_drop: bool = True, checker: bool = True, **options):
    """Prune, then check validity, the untouched input, MACs and mask equivalence.

    Returns (PruneResult, Analysis of the original, pruned outputs).
    """
    before = model.SerializeToString()
    analysis = onnxprune.analyse(model, options.get("input_shapes"), options.get("ignore", ()))
    result = onnxprune.prune(model, ratio, plan=plan, **options)
    assert model.SerializeToString() == before, "the input model was modified"
    check_valid(model, result.model, checker)
    feeds = feeds or make_feeds(model)
    out = run(result.model, feeds)
    if macs_drop:
        assert onnxprune.count_macs(result.model) < onnxprune.count_macs(model)
    if mask:
        assert_close(run(masked_reference(model, analysis, result.plan), feeds), out, tol)
    return result, analysis, out


# --- reading groups and models -------------------------------------------------------------

def group_of(analysis, source: str):
    """The group whose sources include node ``source``."""
    hits = [g for g in analysis.groups if source in g.sources]
    assert len(hits) == 1, f"{source}: {len(hits)} groups ({[g.id for g in analysis.groups]})"
    return hits[0]


def groups_by_source(analysis) -> dict[str, object]:
    return {s: g for g in analysis.groups for s in g.sources}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def nodes_of(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def attr_of(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """An initializer, or the value of a Constant node."""
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(attr_of(n, "value"))
    raise KeyError(name)


def input_value(model: onnx.ModelProto, node_name: str, index: int) -> np.ndarray:
    return value(model, node(model, node_name).input[index])


def full_plan(analysis, keep: dict[str, list[int]]):
    """A Plan keeping ``keep[group id]`` (sorted) for the given groups."""
    sizes = {g.id: g.size for g in analysis.groups}
    return onnxprune.Plan(keep={k: sorted(v) for k, v in keep.items()}, sizes={k: sizes[k] for k in keep})


# --- the CLI in-process -----------------------------------------------------------------------

def run_main(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the CLI run in this process on ``args``."""
    from onnxprune.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def listing(directory: Path) -> set[str]:
    """The names in ``directory``: what a run left there."""
    return {p.name for p in directory.iterdir()}


def one_error_line(err: str) -> str:
    """The one line a failed run printed (asserting it is one error line and no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxprune: error: "), err
    assert "Traceback" not in err
    return lines[0]

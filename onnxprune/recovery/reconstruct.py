"""Reconstruction: refit the layers a cut touched by least squares, on calibration data, no labels.

A *reader* is a node that sums over channels a cut removed (the Conv, Gemm
or MatMul after a pruned group, as the weight table in rules/weights.py
describes it). Each reader gets new weights and bias W, b minimising

    || X_pruned W + b - Y_original ||^2 + damping * || W - W_cut ||^2

where X_pruned is its input in the pruned model and Y_original its output
in the original (at the output channels it kept). Readers are refitted one
at a time in topological order, the pruned model's inputs computed with the
readers before it already refitted, while the targets always come from the
original: each layer corrects what the layers before it left, so errors do
not accumulate. Both models run in the PyTorch executor node by node over
all calibration batches together (executor/walk.py); the normal equations
are accumulated over im2col patches (Conv) or rows (Gemm, MatMul), so the
memory they take is bounded by the weight's size, not the data's. The
damping term, a small fraction of the mean of the Gram matrix's diagonal,
keeps a layer the data says little about near its cut weights.

Readers skipped (and why) are reported; bias compensation (cut/compensate.py)
still covers them. Depthwise convolutions need nothing: a removed channel
takes its own outputs with it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..cut import iochange
from ..data import Dataset, model_batches
from ..errors import require
from ..rules.weights import MULTIPLIED, WEIGHTS, proto_attrs

DAMPING = 0.01  # of the mean diagonal of X^T X, when no samples are held out to choose it
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # tried on held-out samples
HOLDOUT = 4  # every 4th sample checks the fit
MAX_ROWS = 4096  # rows (patch positions) per sample that enter the normal equations; a uniform subsample


@dataclass
class Reconstruction:
    readers: list[str] = field(default_factory=list)  # nodes refitted
    skipped: dict[str, str] = field(default_factory=dict)  # node -> why not
    samples: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"readers": len(self.readers), "skipped": self.skipped, "samples": self.samples,
                "seconds": self.seconds}


@dataclass
class Reader:
    """A node to refit: its data and weight inputs, its bias (if any), and the original outputs it kept."""

    node: onnx.NodeProto
    data: str
    weight: str
    bias: str | None
    kept: np.ndarray | None  # original output channels, in order (None: all)
    out_axis: int


def readers(pruned: onnx.ModelProto, removed: dict[tuple[str, int], np.ndarray],
            downstream: bool = False, moved: frozenset[str] = frozenset()) -> tuple[list[Reader], dict]:
    """The nodes of ``pruned`` that sum over removed channels, in graph order; and those skipped, with why.

    ``removed``: (tensor, axis) -> positions the cut removed there (of the original's extent).
    ``downstream``: also every linear node after the first of them (their inputs moved too).
    ``moved``: tensors whose readers read something else than in the original, every channel kept
    (a removed block's input, which its output's readers now read: cut/depth.py); the first linear
    node they reach, through any others, is a reader (with ``downstream``, every one after it too).
    """
    weights = {t.name for t in pruned.graph.initializer}
    moved = set(moved)
    for node in pruned.graph.node if moved else ():  # graph order is topological: one pass reaches them all
        if any(name in moved for name in node.input):
            moved.update(node.output)
    ranks, dims = _ranks(pruned), _dims(pruned)
    found, skipped = [], {}
    for node in pruned.graph.node:
        entry = WEIGHTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if entry is None or entry.macs is None or not node.input:
            continue
        attrs = proto_attrs(node)
        data = node.input[0]
        slot = entry.operands.get(0)
        axis = slot.reduces(attrs, ranks.get(data, 0)) if slot is not None and slot.reduces else None
        cut_input = axis is not None and len(removed.get((data, axis), ())) > 0
        if not cut_input and data not in moved and not (downstream and (found or skipped)):
            continue
        if _depthwise(node, attrs, ranks) and cut_input:
            continue  # a removed channel takes its own outputs with it: nothing to refit
        label = node.name or node.output[0]
        why = _unsupported(node, attrs, entry, weights, ranks)
        if why:
            skipped[label] = why
            continue
        out_axis = 1 if node.op_type == "Conv" else ranks.get(node.output[0], 2) - 1
        gone = removed.get((node.output[0], out_axis))
        gone = gone if gone is not None and len(gone) else None
        size = dims.get(node.output[0], [0] * (out_axis + 1))[out_axis] + (0 if gone is None else len(gone))
        kept = None if gone is None else np.setdiff1d(np.arange(size), gone)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        found.append(Reader(node, data, node.input[1], bias, kept, out_axis))
    return found, skipped


def _depthwise(node, attrs, ranks: dict) -> bool:
    group = int(attrs.get("group", 1))
    return WEIGHTS[node.op_type].grouped and group > 1 and ranks.get(("channels", node.input[0])) == group


def _unsupported(node, attrs, entry, weights: set[str], ranks: dict) -> str:
    """Why ``node`` cannot be refitted here ('' when it can)."""
    op = node.op_type
    if len(node.input) < 2 or node.input[1] not in weights:
        return "its weight is not an initializer"
    if entry.operands[1].role not in MULTIPLIED:
        return "input 1 is not its weight"
    if op == "Conv":
        rank = ranks.get(node.input[0])
        if rank not in (3, 4):
            return f"a {rank}-D convolution (1-D and 2-D are refitted)"
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return f"auto_pad {attrs['auto_pad']}"
        return ""
    if op == "Gemm":
        return ""
    if op == "MatMul":
        return "" if ranks.get(node.input[1]) == 2 else "a batched MatMul weight"
    return f"{op}: no least-squares refit"


def _dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    found = {t.name: list(t.dims) for t in model.graph.initializer}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        found.setdefault(vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim])
    return found


def _ranks(model: onnx.ModelProto) -> dict:
    dims = _dims(model)
    ranks: dict = {name: len(d) for name, d in dims.items()}
    for name, d in dims.items():
        if len(d) > 1:
            ranks[("channels", name)] = d[1]
    return ranks


def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, removed: dict, data: Dataset,
                batch_size: int | None = None, damping: float = DAMPING,
                downstream: bool = False, moved: frozenset[str] = frozenset()) -> tuple[onnx.ModelProto,
                                                                                         Reconstruction]:
    """``pruned`` with its readers refitted to ``original``'s outputs on ``data``; neither input is
    modified. ``moved``: see ``readers``."""
    torch = require("torch", "reconstruction", "'onnxprune[torch]'")
    from ..executor.module import TorchGraph
    from ..executor.walk import Walk

    started = time.perf_counter()
    found, skipped = readers(pruned, removed, downstream, moved)
    done = Reconstruction(skipped=skipped)
    if not found:
        return pruned, done
    model = _with_own_weights_and_biases(pruned, found)
    student = TorchGraph(model, trainable=lambda name: False)
    teacher = TorchGraph(original, trainable=lambda name: False)
    changes = iochange.read(pruned)
    batches = [feeds for feeds, _ in model_batches(data, original, batch_size)[0]]
    done.samples = sum(len(next(iter(b.values()))) for b in batches)

    def as_inputs(graph, feeds):
        return [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in graph.input_names]

    ours = Walk(student, [as_inputs(student, iochange.candidate_feeds(b, changes)) for b in batches])
    theirs = Walk(teacher, [as_inputs(teacher, b) for b in batches], wanted=[r.node.output[0] for r in found])
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for reader in found:
            inputs = ours.before(reader.node.output[0])
            targets = theirs.take(reader.node.output[0])
            if reader.kept is not None:
                index = torch.as_tensor(reader.kept)
                targets = [t.index_select(reader.out_axis, index) for t in targets]
            why = _refit(torch, student, reader, [i[0] for i in inputs], targets, damping, rng)
            if why:
                done.skipped[reader.node.name or reader.node.output[0]] = why
            else:
                done.readers.append(reader.node.name or reader.node.output[0])
    done.seconds = time.perf_counter() - started
    return student.write_back(model), done


def _with_own_weights_and_biases(model: onnx.ModelProto, found: list[Reader]) -> onnx.ModelProto:
    """A copy where each reader's weight is its own initializer (a refit must not change another
    node's) and each reader has a bias to refit (zeros where it had none)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {t.name: t for t in copy.graph.initializer}
    users: dict[str, int] = {}
    for node in copy.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes = {(n.name, tuple(n.output)): n for n in copy.graph.node}
    taken = set(initializers)
    for reader in found:
        node = nodes[(reader.node.name, tuple(reader.node.output))]
        weight = initializers[node.input[1]]
        if users[weight.name] > 1:
            node.input[1] = reader.weight = _add_initializer(copy, numpy_helper.to_array(weight),
                                                             f"{weight.name}_refit", taken)
        if reader.bias is not None and users.get(reader.bias, 0) > 1 and reader.bias in initializers:
            node.input[2] = reader.bias = _add_initializer(copy, numpy_helper.to_array(initializers[reader.bias]),
                                                           f"{reader.bias}_refit", taken)
        if reader.bias is None or reader.bias not in initializers:
            features = weight.dims[0] if node.op_type == "Conv" else _gemm_features(node, weight)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = reader.bias = _add_initializer(copy, np.zeros(features, dtype), f"{node.name}_bias",
                                                           taken) if node.op_type != "MatMul" else ""
            if node.op_type == "MatMul":
                del node.input[2:]
                reader.bias = None
        reader.node = node
    return copy


def _gemm_features(node: onnx.NodeProto, weight: onnx.TensorProto) -> int:
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return weight.dims[0] if trans_b else weight.dims[1]


def _add_initializer(model: onnx.ModelProto, values: np.ndarray, base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
    return name


def _refit(torch, graph, reader: Reader, xs: list, ys: list, damping: float, rng) -> str:
    """Solve the reader's least squares and store W, b in ``graph``'s parameters; '' or why not.

    Every HOLDOUT-th sample is held out: the damping is the one (of DAMPINGS) whose fit
    reproduces the held-out samples' outputs best, and a layer (or a convolution's group) whose
    best fit does worse there than its cut weights keeps them (too few samples for its inputs).
    The final fit uses all samples. A grouped convolution's groups are independent problems,
    solved together as one batch (a depthwise one has a group per channel: thousands of tiny
    systems that cost far more one by one than their arithmetic).
    """
    node, attrs = reader.node, proto_attrs(reader.node)
    weight = graph.parameter(reader.weight)
    bias = graph.parameter(reader.bias) if reader.bias else None
    if node.op_type == "Gemm" and bias is not None and float(attrs.get("beta", 1.0)) == 0:
        bias = None  # beta = 0: the bias input does not count
    fit, check, offset = None, None, 0
    axis = 1 if node.op_type == "Gemm" and attrs.get("transA", 0) else 0  # the samples' axis
    for x, y in zip(xs, ys):
        samples = x.shape[axis]
        held = (offset + np.arange(samples)) % HOLDOUT == HOLDOUT - 1
        offset += samples
        grams = _grams(torch, node.op_type, x, y, weight.shape, attrs, held, bias is not None, rng)
        if grams is None:
            return "its output does not match its input's patches"
        fit = _add(fit, grams[0])
        if grams[1] is not None:
            check = _add(check, grams[1])
    if fit is None:
        return "no samples"
    a, b = fit
    start = _current(torch, weight, bias, node.op_type, attrs, a.shape[0])
    reg = _regulariser(torch, a, bias is not None)
    scale = torch.full((a.shape[0],), damping, dtype=a.dtype)
    keep = torch.zeros(a.shape[0], dtype=torch.bool)  # groups whose cut weights generalise better
    if check is not None:
        a_c, b_c = check
        tried = [_error(start, a_c, b_c)]
        for factor in DAMPINGS:
            w, ok = _solve(torch, a, b, reg * factor, start)
            tried.append(torch.where(ok, _error(w, a_c, b_c), torch.inf))
        best = torch.stack(tried).argmin(0)
        keep = best == 0
        scale = torch.as_tensor((0.0, *DAMPINGS), dtype=a.dtype)[best]
        a, b = a + a_c, b + b_c
    w, ok = _solve(torch, a, b, reg * scale[:, None, None], start)
    if not (ok | keep).all():
        return "singular normal equations"
    if keep.all():
        return "refitting does not reproduce held-out samples better than the cut weights"
    _store(torch, weight, bias, torch.where(keep[:, None, None], start, w), node.op_type, attrs)
    return ""


def _grams(torch, op: str, x, y, weight_shape, attrs, held: np.ndarray, with_bias: bool, rng):
    """One batch's normal equations (X^T X, X^T Y), shaped (groups, ...) with one group but for a
    grouped convolution: (the fit's, the held-out samples' or None); None when a convolution's
    patches and outputs disagree."""
    if op == "Conv":
        found = _conv_patches(torch, x, y, weight_shape, attrs, rng)
        if found is None:
            return None
        patches, out = found
        # per sample, the positions' sums: the bias's row and column of the normal equations
        sums = (patches.sum(3), out.sum(3)) if with_bias else None
        part = _sample_grams(torch, patches, out, held, sums) if held.any() else None
        return _sample_grams(torch, patches, out, ~held, sums), part
    rows, targets, sample = _linear_rows(torch, x, y, attrs, op, rng)
    # every row once: the Gram matrices of all rows and of the held-out samples' rows (a
    # quarter, the only copy); the fit's are their difference
    mask = torch.as_tensor(held)[sample]
    whole = _gram(torch, rows, targets, with_bias)
    if not mask.any():
        return whole, None
    part = _gram(torch, rows[mask], targets[mask], with_bias)
    return tuple(u - v for u, v in zip(whole, part)), part


def _add(sums: tuple | None, grams: tuple) -> tuple:
    """``sums`` (X^T X, X^T Y) with ``grams`` added."""
    return grams if sums is None else tuple(u + v for u, v in zip(sums, grams))


def _regulariser(torch, gram, with_bias: bool):
    """Per group, the damping's unit: the mean of the Gram matrix's diagonal, on the weights
    (not the bias)."""
    size = gram.shape[1]
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)[:, : size - with_bias]
    unit = diagonal.mean(1) if diagonal.shape[1] else torch.zeros(gram.shape[0], dtype=gram.dtype)
    eye = torch.eye(size, dtype=gram.dtype)
    if with_bias:
        eye[-1, -1] = 0.0  # the bias is not pulled anywhere
    return unit[:, None, None] * eye


def _solve(torch, a, b, reg, start):
    """argmin ||X W - Y||^2 + ||W - start||^2_reg per group from the normal equations, and which
    groups' systems were solvable (a layer the data never excites is singular even damped)."""
    w, info = torch.linalg.solve_ex(a + reg, b + reg @ start)
    return w, (info == 0) & torch.isfinite(w).flatten(1).all(1)


def _error(w, a, b):
    """||X W - Y||^2 - ||Y||^2 per group from X^T X and X^T Y: ||Y||^2 is the same for every
    candidate W, so comparing candidates does not need it."""
    return (w * (a @ w)).sum((1, 2)) - 2 * (w * b).sum((1, 2))


def _with_bias(torch, xx, xy, ones, sums, count: float):
    """(X^T X, X^T Y) of X with a column of ones appended, from the rows' sums (``ones``: of
    X, ``sums``: of Y, both (groups, features)): no column of ones is copied in."""
    counts = torch.full((xx.shape[0], 1, 1), count, dtype=torch.float64)
    xx = torch.cat([torch.cat([xx, ones[:, :, None]], 2), torch.cat([ones[:, None, :], counts], 2)], 1)
    return xx, torch.cat([xy, sums[:, None, :]], 1)


def _gram(torch, rows, targets, with_bias: bool):
    """(X^T X, X^T Y) of (rows, features) in float64, shaped (1, ...), X with a column of ones for
    the bias.

    The products run in float32 (twice as fast as float64 on a CPU, and the solve is damped
    far above float32's rounding) and are summed in float64."""
    rows, targets = rows.float(), targets.float()
    xx, xy = (rows.T @ rows).double()[None], (rows.T @ targets).double()[None]
    if not with_bias:
        return xx, xy
    return _with_bias(torch, xx, xy, rows.sum(0).double()[None], targets.sum(0).double()[None], rows.shape[0])


def _sample_grams(torch, patches, out, chosen: np.ndarray, sums: tuple | None):
    """(X^T X, X^T Y) per group in float64 over the positions of the ``chosen`` samples, with
    the bias's row and column from ``sums`` (per sample, of patches and of outputs) if given.

    ``patches`` (samples, groups, features, positions) and ``out`` (samples, groups, outputs,
    positions) are read in place: one batched product per sample (over groups), accumulated
    in float32 (each already sums a whole sample's positions), then in float64."""
    _, groups, features, length = patches.shape
    picked = np.flatnonzero(chosen)
    xx = patches.new_zeros(groups, features, features)
    xy = patches.new_zeros(groups, features, out.shape[2])
    for i in picked:
        p = patches[i]
        xx.baddbmm_(p, p.transpose(1, 2))
        xy.baddbmm_(p, out[i].transpose(1, 2))
    xx, xy = xx.double(), xy.double()
    if sums is None:
        return xx, xy
    index = torch.as_tensor(picked)
    ones, outs = (s.index_select(0, index).sum(0, dtype=torch.float64) for s in sums)
    return _with_bias(torch, xx, xy, ones, outs, float(len(picked) * length))


def _subsample(torch, count: int, limit: int, rng):
    """Indices: all (None), or a uniform ``limit`` of them (the normal equations' cost grows with rows)."""
    if count <= limit:
        return None
    return torch.as_tensor(np.sort(rng.choice(count, limit, replace=False)))


def _conv_patches(torch, x, y, weight_shape, attrs, rng):
    """(patches, outputs) as (samples, groups, features or outputs, positions), patches in the
    weight's (C/g, k...) order; at most MAX_ROWS positions per sample (the same random ones for
    every sample); None when their positions disagree."""
    F = torch.nn.functional
    if x.dim() == 3:  # 1-D: one row of height 1
        x, y = x.unsqueeze(2), y.unsqueeze(2)
    n = x.shape[0]
    kernel = list(weight_shape[2:]) if len(weight_shape) == 4 else [1, weight_shape[2]]
    spatial = len(weight_shape) - 2
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    if spatial == 1:
        strides, dilations, pads = [1, *strides], [1, *dilations], [0, pads[0], 0, pads[1]]
    if any(pads):
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    if kernel == [1, 1]:  # a pointwise convolution's patches are its (strided) input: no im2col copy
        patches = x[:, :, ::strides[0], ::strides[1]].reshape(n, x.shape[1], -1)
    else:
        patches = F.unfold(x.float(), kernel, dilation=dilations, stride=strides)  # (n, C k, L)
    out = y.reshape(n, y.shape[1], -1)
    if patches.shape[2] != out.shape[2]:
        return None
    pick = _subsample(torch, patches.shape[2], MAX_ROWS, rng)
    if pick is not None:
        patches, out = patches.index_select(2, pick), out.index_select(2, pick)
    groups, length = int(attrs.get("group", 1)), patches.shape[2]
    return patches.float().reshape(n, groups, -1, length), out.float().reshape(n, groups, -1, length)


def _linear_rows(torch, x, y, attrs, op: str, rng):
    """(inputs, outputs, sample of each row) as rows of a Gemm (as A' = A or A^T) or of a MatMul's
    last axis."""
    if op == "Gemm" and attrs.get("transA", 0):
        x = x.T
    samples = x.shape[0]  # Gemm: one row each; MatMul: (batch, ..., K)
    rows, targets = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    sample = torch.arange(rows.shape[0]) // (rows.shape[0] // samples)
    pick = _subsample(torch, rows.shape[0], MAX_ROWS * samples, rng)
    if pick is not None:
        rows, targets, sample = rows[pick], targets[pick], sample[pick]
    return rows, targets, sample


def _current(torch, weight, bias, op: str, attrs, groups: int):
    """The cut weights in the solve's layout: (groups, inputs [+ bias], outputs per group)."""
    w = weight.detach().double()
    if op == "Conv":
        per = w.shape[0] // groups
        w = w.reshape(groups, per, -1).transpose(1, 2)
        b = bias.detach().double().reshape(groups, 1, per) if bias is not None else None
    else:
        if op == "Gemm":
            w = (w.T if attrs.get("transB", 0) else w) * float(attrs.get("alpha", 1.0))
            b = bias.detach().double().reshape(1, -1) * float(attrs.get("beta", 1.0)) if bias is not None else None
        else:
            b = None
        w, b = w[None], (b[None] if b is not None else None)
    return torch.cat([w, b], 1) if b is not None else w


def _store(torch, weight, bias, solved, op: str, attrs) -> None:
    """The solutions (groups, inputs [+ bias], outputs) into the parameters (in place: every
    batch's environment sees them)."""
    with_bias = bias is not None
    w, b = (solved[:, :-1], solved[:, -1]) if with_bias else (solved, None)
    if op == "Conv":
        weight.data.copy_(w.transpose(1, 2).reshape(weight.shape).to(weight.dtype))
        if b is not None:
            bias.data.copy_(b.reshape(bias.shape).to(bias.dtype))
        return
    w, b = w[0], (b[0] if b is not None else None)
    if op == "Gemm":
        w = w / float(attrs.get("alpha", 1.0))
        w = w.T if attrs.get("transB", 0) else w
        if b is not None:
            b = b / float(attrs.get("beta", 1.0))
    weight.data.copy_(w.reshape(weight.shape).to(weight.dtype))
    if b is not None:
        bias.data.copy_(b.reshape(bias.shape).to(bias.dtype))

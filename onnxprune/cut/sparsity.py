"""Unstructured and N:M sparsity: zero single weights, keep every tensor dense.

    result = onnxprune.sparsify(model, ratio=0.5)      # the 50% smallest |w| of each weight tensor
    result = onnxprune.sparsify(model, nm="2:4")       # 2 of every 4 along the reduction axis
    result.model, result.report                        # the input model is left unchanged

**Which tensors.** The constant weight operands of Conv, ConvTranspose, Gemm
and MatMul (either operand of Gemm/MatMul; Constant nodes and Identity-routed
weights included, as ``GraphView`` normalises them). Biases, normalisation
parameters and other constants are never considered. Embedding tables (the
constant data of a Gather) are reported but left dense unless
``embeddings=True`` (unstructured only: a lookup has no reduction axis for
N:M). A considered tensor is left alone, with the reason in the report, when
``ignore`` globs match its name or the name or module path of a node reading
it (a glob that matches nothing warns); when it is not a float tensor; when
something other than a weight slot also reads it (a
bias slot, a tied embedding's Gather, a subgraph, a graph output); when it has
fewer than ``min_elements`` elements (default 1024: the first conv, depthwise
convs and small heads hold few weights, are the most sensitive to pruning
and barely change the file size); and, for N:M, when its reduction size is
not a multiple of M or its readers reduce along different axes.

**Scores.** Higher means keep. |w| by default; ``scores`` maps a weight's name
to an array of its shape (e.g. |w * dL/dw| computed elsewhere). Ties go to the
earlier position (stable sort), so the result is deterministic.

**Unstructured.** round(ratio * n) lowest-scored weights of each tensor become
0, or, with ``global_ranking``, of all sparsified tensors ranked together.

**N:M layout.** NVIDIA's sparse tensor cores (Ampere and later: cuSPARSELt,
TensorRT, the ASP library in apex) need the pattern along the GEMM's reduction
(K) dimension. ASP's ``create_mask`` groups a Linear weight (out, in) along
``in`` and a conv weight (K, C, R, S) along C for every (k, r, s), which is
TensorRT's rule for convolutions: for each output channel and each kernel
position, every 4 consecutive input channels hold at least 2 zeros. onnxprune
uses the same layout on ONNX weights (runs of M consecutive elements along):

    Conv            W (O, I/g, k...)                 axis 1, within each group
    ConvTranspose   W (I, O/g, k...)                 axis 0; I/g must be a multiple of M
    Gemm            B (K, N) | transB=1: (N, K)      axis 0 | 1
                    A (M, K) | transA=1: (K, M)      axis 1 | 0
    MatMul          x @ W: W (..., K, N)             axis -2
                    W @ x: W (..., M, K)             axis -1  (1-D W: axis 0)

(ConvTranspose is outside ASP's and TensorRT's documented cases; its input
channels are the axis it reduces, so the same rule applies.)

**Storage.** The zeros stay in dense float tensors, which onnxruntime runs as
they are and deflate compresses: the report gives the zipped size before and
after. Turning the pattern into speed is up to the runtime (TensorRT with
sparse weights enabled, for N:M).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import UsageError
from ..graph.names import matches
from ..graph.shapes import Shapes
from ..graph.view import GraphView
from ..options import MIN_ELEMENTS, SparsityOptions
from ..report.records import SparsityReport, TensorSparsity
from ..rules.weights import operand, reduction

ZIP_LEVEL = 6  # zip's default deflate level
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass
class SparsityResult:
    model: onnx.ModelProto  # the input itself when no weight changed
    report: SparsityReport


@dataclass
class _Use:
    node: gs.Node
    axis: int | None  # the reduction axis of the weight in this node; None for a Gather table
    run: int | None  # reduction positions per convolution group (N:M runs must not cross them)


@dataclass
class _Weight:
    tensor: gs.Constant
    uses: list[_Use]
    others: list[str]  # readers that do not read it as a weight

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.shape)


@dataclass
class _Options:
    ratio: float | None
    nm: tuple[int, int] | None
    ignore: tuple[str, ...]
    min_elements: int
    embeddings: bool


# --- the step -----------------------------------------------------------------------------

def sparsify(
    model: onnx.ModelProto,
    ratio: float | None = None,
    nm=None,
    *,
    global_ranking: bool = False,
    scores: dict[str, np.ndarray] | None = None,
    ignore=(),
    min_elements: int = MIN_ELEMENTS,
    embeddings: bool = False,
    measure_zip: bool = True,
) -> SparsityResult:
    """Zero ``ratio`` of the weights (unstructured) or all but N of every M (``nm="2:4"``).

    ``model`` is not modified. ``measure_zip=False`` skips the zipped sizes
    (deflating the whole model twice takes seconds on large models).
    """
    parsed = SparsityOptions(ratio, nm, min_elements).check()
    if parsed is not None and global_ranking:
        raise UsageError("N:M sparsity keeps N of every M weights in place: global ranking does not apply")
    options = _Options(ratio, parsed, tuple(ignore), min_elements, embeddings)
    view = GraphView.from_model(model, Shapes())
    weights = _find_weights(view, _stored_names(model))
    view.warn_unmatched(options.ignore)
    reasons = {w.name: _skip_reason(w, options, view.modules) for w in weights}
    chosen = [w for w in weights if reasons[w.name] is None]
    given = _check_scores(scores or {}, weights, chosen, global_ranking and parsed is None)
    values = {w.name: np.asarray(view.value(w.tensor)) for w in weights}
    drops = _drop_masks(chosen, values, given, options, global_ranking)
    new_values = {name: np.where(drop, np.zeros((), values[name].dtype), values[name]) for name, drop in drops.items()}
    changed = {n: new_values[n] for n, drop in drops.items() if (drop & (values[n] != 0)).any()}
    sparse = _with_values(model, changed) if changed else model
    tensors = [_tensor_report(w, values[w.name], new_values.get(w.name), reasons[w.name], options, w.name in given)
               for w in weights]
    report = _report(tensors, options, global_ranking)
    if measure_zip:
        report.zipped_before, report.zipped_after = zipped_size(model), zipped_size(sparse)
    return SparsityResult(sparse, report)


# --- which tensors ------------------------------------------------------------------------

def weight_names(model: onnx.ModelProto) -> list[str]:
    """The weights sparsity can act on (for callers computing per-weight scores)."""
    view = GraphView.from_model(model, Shapes())
    return [w.name for w in _find_weights(view, _stored_names(model))]


def weight_use(node: gs.Node, index: int, shape: tuple[int, ...]) -> _Use | None:
    """How ``node`` reads its constant input ``index`` of ``shape`` as a weight; None if not a weight slot."""
    found = operand(node.op, index) if node.domain in (None, "", "ai.onnx") else None
    if found is not None and found.role == "table" and shape:
        return _Use(node, None, None)
    reduced = reduction(node.op, node.attrs, index, shape) if found is not None else None
    return None if reduced is None else _Use(node, *reduced)


def _find_weights(view: GraphView, stored: set[str]) -> list[_Weight]:
    """Every constant read in a weight slot, once (shared initializers too), in graph order."""
    found: list[_Weight] = []
    seen: set[int] = set()
    for node in view.nodes:
        for index, tensor in enumerate(node.inputs):
            if id(tensor) in seen or not view.is_constant(tensor):
                continue
            shape = tuple(int(d) for d in tensor.shape)
            if weight_use(node, index, shape) is None:
                continue
            seen.add(id(tensor))
            uses, others = [], []
            for reader, i in view.consumers(tensor):
                use = weight_use(reader, i, shape)
                if use is None:
                    others.append(f"{reader.op} {reader.name}")
                else:
                    uses.append(use)
            if view.is_graph_output(tensor):
                others.append("a graph output")
            if tensor.name in view.subgraph_refs:
                others.append("a subgraph")
            if tensor.name not in stored:
                others.append("a Constant attribute other than 'value'")
            found.append(_Weight(tensor, uses, others))
    return found


def _skip_reason(w: _Weight, options: _Options, modules: dict[str, str]) -> str | None:
    names = [w.name] + [u.node.name for u in w.uses] + [modules.get(u.node.name) for u in w.uses]
    if any(matches(n, options.ignore) for n in names):
        return "ignored (`ignore`)"
    dtype = np.dtype(w.tensor.dtype) if w.tensor.dtype is not None else None
    if dtype not in _FLOATS:
        return f"not a float tensor ({dtype})"
    if w.others:
        return f"also read by {w.others[0]}, not as a weight"
    tables = [u for u in w.uses if u.axis is None]
    if tables and not options.embeddings:
        return f"embedding table (read by Gather {tables[0].node.name}): left dense by default"
    if tables and options.nm:
        return f"embedding table (read by Gather {tables[0].node.name}): no reduction axis for N:M"
    elements = math.prod(w.shape)
    if elements < options.min_elements:
        return f"{elements} elements < minimum {options.min_elements}"
    if options.nm:
        return _nm_obstacle(w, options.nm[1])
    return None


def _nm_obstacle(w: _Weight, m: int) -> str | None:
    axes = sorted({u.axis for u in w.uses})
    if len(axes) > 1:
        return f"its readers reduce along different axes {axes}"
    run = min(u.run for u in w.uses)
    if run % m:
        return f"reduction size {run} (axis {axes[0]}) is not a multiple of {m}"
    return None


def _stored_names(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors _store can rewrite: initializers and Constant-node 'value's."""
    names = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1 and any(a.name == "value" for a in node.attribute):
            names.add(node.output[0])
    return names


def _check_scores(scores: dict, weights: list[_Weight], chosen: list[_Weight], ranked_together: bool) -> dict:
    """Scores as float64 arrays, after checking names, shapes and values."""
    shapes = {w.name: w.shape for w in weights}
    checked = {}
    for name, value in scores.items():
        if name not in shapes:
            raise UsageError(f"scores given for {name!r}, which is not a Conv/ConvTranspose/Gemm/MatMul weight")
        value = np.asarray(value, dtype=np.float64)
        if value.shape != shapes[name]:
            raise UsageError(f"scores for {name!r} have shape {value.shape}, the weight has {shapes[name]}")
        if np.isnan(value).any():
            raise UsageError(f"scores for {name!r} contain NaN")
        checked[name] = value
    missing = [w.name for w in chosen if w.name not in checked]
    if ranked_together and checked and missing:
        raise UsageError(
            f"global ranking compares scores across tensors: give scores for all {len(chosen)} sparsified "
            f"tensors or none (missing: {missing[0]})"
        )
    return checked


# --- which weights ------------------------------------------------------------------------

def _drop_masks(chosen, values, given, options: _Options, global_ranking: bool) -> dict[str, np.ndarray]:
    """name -> boolean mask of the weights to zero."""
    scores = {w.name: given[w.name] if w.name in given else magnitude(values[w.name]) for w in chosen}
    if options.nm:
        n, m = options.nm
        return {w.name: nm_drop_mask(scores[w.name], w.uses[0].axis, n, m) for w in chosen}
    if global_ranking and chosen:
        flat = np.concatenate([scores[w.name].ravel() for w in chosen])
        drop = lowest(flat, round(options.ratio * flat.size))
        ends = np.cumsum([scores[w.name].size for w in chosen])[:-1]
        return {w.name: d.reshape(w.shape) for w, d in zip(chosen, np.split(drop, ends))}
    return {w.name: lowest(scores[w.name].ravel(), round(options.ratio * scores[w.name].size)).reshape(w.shape)
            for w in chosen}


def lowest(flat: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` lowest values; ties go to the earlier position.

    A partition finds the k-th value in linear time (a full sort of a large
    model's weights takes seconds); the ties at that value are then taken in order.
    """
    if k == 0:
        return np.zeros(flat.size, dtype=bool)
    threshold = np.partition(flat, k - 1)[k - 1]
    drop = flat < threshold
    drop[np.flatnonzero(flat == threshold)[: k - int(drop.sum())]] = True
    return drop


def magnitude(values: np.ndarray) -> np.ndarray:
    """|w| as scores (float32 unless the weights are float64); NaN weights rank highest, so they stay."""
    scores = np.abs(values.astype(np.float64 if values.dtype == np.float64 else np.float32))
    return np.nan_to_num(scores, nan=np.inf)


def nm_drop_mask(scores: np.ndarray, axis: int, n: int, m: int) -> np.ndarray:
    """True for all but the ``n`` best of every ``m`` consecutive positions along ``axis``."""
    moved = np.moveaxis(scores, axis, -1)
    runs = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    drop = np.zeros(runs.shape, dtype=bool)
    np.put_along_axis(drop, np.argsort(runs, axis=-1, kind="stable")[..., : m - n], True, axis=-1)
    return np.moveaxis(drop.reshape(moved.shape), -1, axis)


# --- writing and reporting ----------------------------------------------------------------

def _with_values(model: onnx.ModelProto, new_values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers / Constant-node tensors hold ``new_values``.

    Only those tensors change: the graph, names and everything else stay as they were.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    targets = {t.name: t for t in copy.graph.initializer}
    for node in copy.graph.node:
        if node.op_type == "Constant" and len(node.output) == 1:
            for a in node.attribute:
                if a.name == "value":
                    targets.setdefault(node.output[0], a.t)
    for name, value in new_values.items():
        target = targets[name]
        fresh = numpy_helper.from_array(value, target.name)
        fresh.doc_string = target.doc_string
        target.CopyFrom(fresh)
    return copy


def _report(tensors: list[TensorSparsity], options: _Options, global_ranking: bool) -> SparsityReport:
    done = [t for t in tensors if t.skipped is None]
    unstructured = options.nm is None
    return SparsityReport(
        pattern="unstructured" if unstructured else f"{options.nm[0]}:{options.nm[1]}",
        ratio=float(options.ratio) if unstructured else None,
        ranking=("global" if global_ranking else "per-tensor") if unstructured else None,
        min_elements=options.min_elements,
        tensors=tensors,
        elements=sum(t.elements for t in done),
        zeros_before=sum(t.zeros_before for t in done),
        zeros_after=sum(t.zeros_after for t in done),
        zipped_before=None,
        zipped_after=None,
    )


def _tensor_report(w: _Weight, before: np.ndarray, after, reason, options: _Options, scored: bool) -> TensorSparsity:
    zeros_before = int(np.count_nonzero(before == 0))
    zeros_after = zeros_before if after is None else int(np.count_nonzero(after == 0))
    pattern = None
    if reason is None:
        n, m = options.nm or (None, None)
        pattern = "unstructured" if options.nm is None else f"{n}:{m} along axis {w.uses[0].axis}"
    return TensorSparsity(
        name=w.name, nodes=[u.node.name for u in w.uses], shape=list(w.shape), elements=int(before.size),
        zeros_before=zeros_before, zeros_after=zeros_after,
        sparsity=zeros_after / before.size if before.size else 0.0,
        pattern=pattern, criterion=None if reason else ("scores" if scored else "magnitude"), skipped=reason,
    )


def zipped_size(model: onnx.ModelProto) -> int:
    """Bytes of the model deflated at zip's default level, streamed tensor by tensor.

    The model's initializers, nodes and graph inputs/outputs/value_info are
    serialized one by one (no 2 GB protobuf limit, no second copy of the
    weights) and fed to one deflate stream: within a few hundred bytes of
    zipping the .onnx file (plus its external data).
    """
    stream = zlib.compressobj(ZIP_LEVEL)
    size = 0
    graph = model.graph
    for part in (*graph.initializer, *graph.node, *graph.input, *graph.output, *graph.value_info):
        size += len(stream.compress(part.SerializeToString()))
    return size + len(stream.flush())

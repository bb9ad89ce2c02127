"""Quantized graphs: QuantizeLinear/DequantizeLinear (QDQ) and the QOperator ops.

**QDQ.** A QDQ model (onnxruntime's ``quantize_static`` with the QDQ format)
is the float graph with quantization spelled around it: each weight is an
integer constant behind a DequantizeLinear, each activation passes through a
QuantizeLinear -> DequantizeLinear pair. Both pass channels through on every
axis. Their scale and zero point are per tensor (a scalar: kept as they are)
or per channel along ``axis`` (a 1-D tensor: sliced with the channels when
they run along that axis, kept when they run along another one). A weight
behind a DequantizeLinear is still a weight: ``is_weight`` lets the Conv,
Gemm and MatMul rules see it, and the group search follows a link to it
through the DequantizeLinear (``dequantized_constant``), so the integer
constant is sliced where the float one would be, and the per-channel scale
and zero point with it.

**QOperator.** QLinearConv, ConvInteger, QLinearMatMul and MatMulInteger,
and onnxruntime's ``com.microsoft`` ops (QGemm, QLinearAdd, QLinearMul,
QLinearConcat, QLinearSigmoid, QLinearLeakyRelu, QLinearGlobalAveragePool,
QLinearAveragePool) are float ops with their quantization parameters as extra
inputs: each is the float op's rule on the inputs that op has (``Twin``), and
its per-channel scales and zero points follow the operand axis they are
indexed by (a QLinearConv's ``w_scale`` runs along the filters, a QGemm's
``b_scale`` along B's output features). Scales of activations are per tensor
in these ops, so they are kept. The pools' ``channels_last`` layout (NHWC)
passes channels on the last axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from ..graph.view import attr
from .registry import RULES, Link, Reached, Relation, barrier, normalise_axis, other_side, rule

QDQ = ("QuantizeLinear", "DequantizeLinear")
QUANTIZATION = "quantization"  # the role of a sliced scale or zero point
_DEFAULT_DOMAINS = (None, "", "ai.onnx")


# Inputs of each quantized op that hold a model's stored values (weights and biases, as integers):
# parameters, like the float weights they stand for (analysis/stats.py counts them).
STORED_VALUES = {"DequantizeLinear": (0,), "QLinearConv": (3, 8), "ConvInteger": (1,), "QLinearMatMul": (3,),
                 "MatMulInteger": (1,), "com.microsoft.QGemm": (3, 6)}


def _present(t) -> bool:
    return t is not None and t.name != ""


def _per_channel(view, t) -> bool:
    """A scale or zero point with more than one value (per channel, or per block)."""
    shape = view.shape(t)
    return shape is not None and int(np.prod(shape)) > 1


# --- QDQ: y = (x - zero_point) * scale, or its inverse, per tensor / axis / block -------

@rule(*QDQ)
def qdq(node, view, r: Reached):
    if r.index != 0:
        return barrier("channels reach a scale or zero point")
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    links = [Link(other_side(r), 0, r.axis, r.owner)]
    axis = normalise_axis(int(attr(node, "axis", 1)), rank)
    blocked = int(attr(node, "block_size", 0) or 0) > 0
    for i in (1, 2):
        if i >= len(node.inputs) or not _present(node.inputs[i]) or not _per_channel(view, node.inputs[i]):
            continue  # per tensor: every channel left keeps it
        if not view.is_constant(node.inputs[i]):
            return barrier("per-channel scale or zero point computed at run time")
        if blocked:  # same rank as x; blocks run along `axis`, every other axis is whole
            if r.axis == axis:
                return barrier("channels run along the quantization blocks")
            links.append(Link("in", i, r.axis, r.owner, QUANTIZATION))
        elif r.axis == axis:
            links.append(Link("in", i, 0, r.owner, QUANTIZATION))
    return Relation(links)


def dequantized_constant(view, tensor):
    """The DequantizeLinear node computing ``tensor`` from constants alone (a QDQ weight or
    bias), else None. A link to such a tensor slices the DequantizeLinear's constants."""
    node = view.producer(tensor)
    if node is None or node.op != "DequantizeLinear" or node.domain not in _DEFAULT_DOMAINS:
        return None
    if not all(view.is_constant(t) for t in node.inputs if _present(t)):
        return None
    return node


def is_weight(view, tensor) -> bool:
    """A constant, or a constant stored quantized behind a DequantizeLinear."""
    return view.is_constant(tensor) or dequantized_constant(view, tensor) is not None


def stored_values(node, index: int, view) -> np.ndarray:
    """The float values constant input ``index`` of ``node`` stands for: a DequantizeLinear's
    integer input dequantized with its scale and zero point (what magnitudes are measured on:
    per-channel scales differ, so integer magnitudes do not compare across channels)."""
    values = np.asarray(view.value(node.inputs[index]))
    if node.op != "DequantizeLinear" or index != 0 or int(attr(node, "block_size", 0) or 0) > 0:
        return values
    scale = np.asarray(view.value(node.inputs[1]), np.float64)
    zero = np.asarray(view.value(node.inputs[2]), np.float64) if len(node.inputs) > 2 and _present(
        node.inputs[2]) else np.zeros(())
    if scale.ndim == 1 and values.ndim > 1:  # per channel along `axis`
        axis = normalise_axis(int(attr(node, "axis", 1)), values.ndim)
        shape = [1] * values.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.ndim == 1 else zero
    return (values.astype(np.float64) - zero) * scale


# --- QOperator: a float op's rule on the inputs it shares --------------------------------

Axis = Callable[[dict, int], int]
CONTRIB = "com.microsoft"  # onnxruntime's domain: QLinearAdd, QGemm, QLinearConcat, ...


@dataclass(frozen=True)
class Twin:
    """A quantized op as float op ``of``: ``inputs[k]`` is the quantized op's input that is the
    float op's input k (a function of the node for a variadic op); ``follows[j] = (i, axis)``:
    input j (a per-channel scale or zero point) runs along ``axis(attrs, rank of input i)`` of
    input i. ``channels_last``: the op honours onnxruntime's ``channels_last`` attribute (NHWC)."""

    of: str
    inputs: tuple[int, ...] | Callable
    follows: dict[int, tuple[int, Axis]] = field(default_factory=dict)
    domain: str = ""
    channels_last: bool = False

    def inputs_of(self, node) -> tuple[int, ...]:
        return self.inputs(node) if callable(self.inputs) else self.inputs


def _fixed(n: int) -> Axis:
    return lambda attrs, rank: n % rank


def _gemm_columns(attrs, rank):  # B is (K, N), or (N, K) with transB: the axis of its output features
    return 0 if attrs.get("transB", 0) else 1


def _concatenated(node) -> tuple[int, ...]:  # Y_scale, Y_zp, then (X, X_scale, X_zp) per input
    return tuple(range(2, len(node.inputs), 3))


_FIVE = (0,)  # X, X_scale, X_zp, Y_scale, Y_zp: unary and pooling ops
TWINS = {
    # x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, B: w_scale / w_zp per filter
    "QLinearConv": Twin("Conv", (0, 3, 8), {4: (3, _fixed(0)), 5: (3, _fixed(0))}),
    # x, w, x_zp, w_zp: w_zp per filter
    "ConvInteger": Twin("Conv", (0, 1), {3: (1, _fixed(0))}),
    # a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp: a's per row, b's per column
    "QLinearMatMul": Twin("MatMul", (0, 3), {1: (0, _fixed(-2)), 2: (0, _fixed(-2)),
                                             4: (3, _fixed(-1)), 5: (3, _fixed(-1))}),
    # a, b, a_zp, b_zp: a's per row, b's per column
    "MatMulInteger": Twin("MatMul", (0, 1), {2: (0, _fixed(-2)), 3: (1, _fixed(-1))}),
    # onnxruntime's QOperator ops. A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp
    "QGemm": Twin("Gemm", (0, 3, 6), {4: (3, _gemm_columns), 5: (3, _gemm_columns)}, CONTRIB),
    # A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp: every scale per tensor
    "QLinearAdd": Twin("Add", (0, 3), domain=CONTRIB),
    "QLinearMul": Twin("Mul", (0, 3), domain=CONTRIB),
    "QLinearConcat": Twin("Concat", _concatenated, domain=CONTRIB),
    "QLinearSigmoid": Twin("Sigmoid", _FIVE, domain=CONTRIB),
    "QLinearLeakyRelu": Twin("LeakyRelu", _FIVE, domain=CONTRIB),
    "QLinearGlobalAveragePool": Twin("GlobalAveragePool", _FIVE, domain=CONTRIB, channels_last=True),
    "QLinearAveragePool": Twin("AveragePool", _FIVE, domain=CONTRIB, channels_last=True),
}


def as_float(node, twin: Twin):
    """A stand-in for ``node`` that the float op's rule reads: its inputs, attributes shared."""
    inputs = [node.inputs[i] if i < len(node.inputs) else None for i in twin.inputs_of(node)]
    while inputs and not _present(inputs[-1]):
        inputs.pop()  # an absent optional input (a bias) is absent for the float op too
    return SimpleNamespace(op=twin.of, name=node.name, domain="", inputs=inputs,
                           outputs=node.outputs, attrs=node.attrs)


def _channels_last(node, view, r: Reached) -> Relation | None:
    """NHWC pooling: channels on the last axis pass through; on another axis they are pooled."""
    rank = view.rank(node.inputs[0])
    if rank is None:
        return barrier("input shape unknown")
    if r.axis != rank - 1:
        return barrier("channels reach a pooled (spatial) axis of an NHWC pool")
    return Relation([Link(other_side(r), 0, r.axis, r.owner)])


def _twin_rule(op: str, twin: Twin):
    def float_rule():
        return RULES[twin.of]

    def relate(node, view, r: Reached):
        inputs = twin.inputs_of(node)
        if r.side == "in" and r.index not in inputs:
            return barrier("channels reach a scale or zero point")
        if twin.channels_last and int(attr(node, "channels_last", 0)):
            return _channels_last(node, view, r)
        index = inputs.index(r.index) if r.side == "in" else r.index
        relation = float_rule().relate(as_float(node, twin), view, Reached(r.side, index, r.axis, r.owner))
        if relation.barrier:
            return relation
        links = []
        for link in relation.links:
            mapped = inputs[link.index] if link.side == "in" else link.index
            links.append(Link(link.side, mapped, link.axis, link.owner, link.role))
            if link.side == "in":
                followed = _followers(node, view, twin, mapped, link)
                if isinstance(followed, str):
                    return barrier(followed)
                links += followed
        return Relation(links, relation.ties, kind=relation.kind)

    def source(node, view):
        hook = float_rule().source
        return hook(as_float(node, twin), view) if hook else []

    def rewrite(node, view, cut):
        hook = float_rule().rewrite
        if hook:
            hook(as_float(node, twin), view, cut)

    rule(op, source=source, rewrite=rewrite, domain=twin.domain)(relate)


def _followers(node, view, twin: Twin, operand: int, link: Link) -> list[Link] | str:
    """Links to the per-channel scales and zero points that run along ``link``'s axis of input
    ``operand``; a reason instead where one of them is computed at run time."""
    found = []
    rank = view.rank(node.inputs[operand])
    for j, (i, axis) in twin.follows.items():
        if i != operand or j >= len(node.inputs) or not _present(node.inputs[j]) \
                or not _per_channel(view, node.inputs[j]) or rank is None or axis(node.attrs, rank) != link.axis:
            continue
        if not view.is_constant(node.inputs[j]):
            return "per-channel scale or zero point computed at run time"
        found.append(Link("in", j, 0, link.owner, QUANTIZATION))
    return found


for _op, _twin in TWINS.items():
    _twin_rule(_op, _twin)


def quantization_inputs(op: str, node_inputs: list[str]) -> list[str]:
    """The scales and zero points among a node's inputs (``op`` keyed as the rule table keys it):
    arithmetic of the quantization, not parameters of the model."""
    if op in QDQ:
        return node_inputs[1:3]
    twin = TWINS.get(op.removeprefix(f"{CONTRIB}.")) if op.startswith(f"{CONTRIB}.") or op in TWINS else None
    if twin is None:
        return []
    data = set(twin.inputs_of(SimpleNamespace(inputs=node_inputs)))
    return [name for i, name in enumerate(node_inputs) if i not in data]

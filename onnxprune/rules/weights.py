"""The table of weight slots: which inputs of an op hold learned tensors, and their axes.

One entry per op with weights, read by everything that must know where a
weight is and what it sums over: sparsity (the reduction axis N:M runs
along), compensation (the weight rows a removed input channel meets, and the
bias they fold into), the MAC counter, the model check of Conv groups, and
the PyTorch executor (Constant-node weights become parameters).

``Operand.role`` says what an input is:

- ``data``: an activation the op sums over (a Conv's input);
- ``weight``: a weight the op sums products with (a Conv's filters);
- ``operand``: either side of Gemm/MatMul, a weight where it is a constant;
- ``bias``: added to the output features; ``table``: rows looked up (Gather);
- ``norm``: per-channel scale or shift of a normalisation (or PRelu's slope);
- ``statistic``: BatchNormalization's running mean and variance: measured, not
  learned (a gradient step can make the variance negative, and the square root NaN);
- ``coefficient``: a constant of Add/Mul, a weight when it has more than one element.

``LEARNED`` are the roles a trainer may update (recovery trains exactly the
float tensors read in one of them, executor/compile.py ``learned_tensors``);
every other input (Pow's exponent, Clip's bounds, a Div's divisor, a scalar
coefficient such as an attention scale or an epsilon) is arithmetic, and
stays constant.

``reduces(attrs, rank)`` is the axis an operand is summed over (its input
channels), ``features(attrs, rank)`` the axis of the output features it
carries (for a bias: the axis of the op's output it is added along), None
where it has none. ``attrs`` are the node's attributes as a
dict. With ``grouped``, the op's ``group`` attribute splits axis 0 of the
weight into groups, and axis 1 counts positions within a group: Conv
(M, C/g, k...), ConvTranspose (C, M/g, k...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

Axis = Callable[[dict, int], "int | None"]


def axis(n: int) -> Axis:
    """The fixed axis ``n`` (negative: from the end)."""
    return lambda attrs, rank: n % rank if rank else None


@dataclass(frozen=True)
class Operand:
    role: str
    reduces: Axis | None = None
    features: Axis | None = None
    gain: str | None = None  # the attribute scaling what this input contributes (Gemm: alpha, beta)


@dataclass(frozen=True)
class OpWeights:
    operands: dict[int, Operand] = field(default_factory=dict)
    grouped: bool = False
    macs: Callable[[dict, list], int | None] | None = None  # (attrs, dims of inputs + output) -> MACs


def _known(*shapes) -> bool:
    return all(s is not None and None not in s for s in shapes)


def _conv_macs(attrs, dims):
    w, out = dims[1], dims[-1]
    return math.prod(out) * math.prod(w[1:]) if _known(w, out) else None  # out elements x (C/g x kernel)


def _conv_transpose_macs(attrs, dims):
    x, w = dims[0], dims[1]
    return math.prod(x) * math.prod(w[1:]) if _known(x, w) else None  # in elements x (M/g x kernel)


def _gemm_macs(attrs, dims):
    a, out = dims[0], dims[-1]
    if not _known(a, out):
        return None
    return math.prod(out) * (a[0] if attrs.get("transA", 0) else a[1])


def _matmul_macs(attrs, dims):
    a, out = dims[0], dims[-1]
    return math.prod(out) * a[-1] if _known(a, out) and a else None


def _recurrent_macs(attrs, dims):
    x, w, r = dims[0], dims[1], dims[2]  # X (T, B, I) or (B, T, I), W (D, G*H, I), R (D, G*H, H)
    return math.prod(x[:2]) * (math.prod(w) + math.prod(r)) if _known(x, w, r) else None  # per step, row


def _attention_macs(attrs, dims):
    """q k^T and the weighted sum of v: 2 x (q's elements) x keys, on (batch, sequence, hidden)
    and (batch, heads, sequence, head size) inputs alike."""
    q, k = dims[0], dims[1]
    if not _known(q, k) or len(q) not in (3, 4) or len(k) != len(q):
        return None
    return 2 * math.prod(q) * k[-2]


def _packed_attention_macs(attrs, dims):
    """The packed q/k/v projection, then the attention over the projected width."""
    x, w = dims[0], dims[1]
    if not _known(x, w) or len(x) != 3:
        return None
    width = w[1] // 3 if not attrs.get("qkv_hidden_sizes") else attrs["qkv_hidden_sizes"][0]
    return math.prod(x) * w[1] + 2 * x[0] * x[1] * x[1] * width


def _nbits_macs(attrs, dims):
    out = dims[-1]
    return math.prod(out) * int(attrs["K"]) if _known(out) and "K" in attrs else None

def _gemm_a(attrs, rank):  # A is (M, K), or (K, M) with transA
    return 0 if attrs.get("transA", 0) else 1


def _gemm_b(attrs, rank):  # B is (K, N), or (N, K) with transB
    return 1 if attrs.get("transB", 0) else 0


def _matmul_left(attrs, rank):  # (..., M, K) @ ...: K is the last axis
    return rank - 1 if rank else None


def _matmul_right(attrs, rank):  # ... @ (..., K, N): K is the one before last (a vector: its only axis)
    return 0 if rank == 1 else rank - 2


def _matmul_rows(attrs, rank):
    return None if rank < 2 else rank - 2


def _matmul_columns(attrs, rank):
    return None if rank < 2 else rank - 1


def _on_inputs(macs, *inputs: int):
    """``macs`` of a quantized op read on the inputs its float op has (QLinearConv's x, w: 0, 3)."""
    return lambda attrs, dims: macs(attrs, [dims[i] if i < len(dims) - 1 else None for i in inputs] + [dims[-1]])


_NORM = Operand("norm", None, axis(0))
_STATISTIC = Operand("statistic", None, axis(0))
_COEFFICIENT = Operand("coefficient")
# LSTM/GRU/RNN: W (D, G*H, I) and R (D, G*H, H) sum over their last axis; X is not listed (its
# projection is no 2-D weight that compensation or a refit could fold into a bias).
_RECURRENT = OpWeights({1: Operand("weight", axis(2), axis(1)), 2: Operand("weight", axis(2), axis(1)),
                        3: Operand("bias")}, macs=_recurrent_macs)

WEIGHTS: dict[str, OpWeights] = {
    "Conv": OpWeights({0: Operand("data", axis(1)), 1: Operand("weight", axis(1), axis(0)),
                       2: Operand("bias", None, axis(1))}, grouped=True, macs=_conv_macs),
    "ConvTranspose": OpWeights({0: Operand("data", axis(1)), 1: Operand("weight", axis(0), axis(1)),
                                2: Operand("bias", None, axis(1))}, grouped=True, macs=_conv_transpose_macs),
    "Gemm": OpWeights({0: Operand("operand", _gemm_a, lambda a, r: 1 - _gemm_a(a, r), "alpha"),
                       1: Operand("operand", _gemm_b, lambda a, r: 1 - _gemm_b(a, r), "alpha"),
                       2: Operand("bias", None, axis(-1), "beta")}, macs=_gemm_macs),
    "MatMul": OpWeights({0: Operand("operand", _matmul_left, _matmul_rows),
                         1: Operand("operand", _matmul_right, _matmul_columns)}, macs=_matmul_macs),
    "Gather": OpWeights({0: Operand("table")}),
    "BatchNormalization": OpWeights({1: _NORM, 2: _NORM, 3: _STATISTIC, 4: _STATISTIC}),
    "LayerNormalization": OpWeights({1: _NORM, 2: _NORM}),
    "InstanceNormalization": OpWeights({1: _NORM, 2: _NORM}),
    "GroupNormalization": OpWeights({1: _NORM, 2: _NORM}),
    "PRelu": OpWeights({1: _NORM}),
    "Add": OpWeights({0: _COEFFICIENT, 1: _COEFFICIENT}),
    "Mul": OpWeights({0: _COEFFICIENT, 1: _COEFFICIENT}),
    "LSTM": OpWeights({**_RECURRENT.operands, 7: _NORM}, macs=_recurrent_macs),  # 7: the peepholes
    "GRU": _RECURRENT,
    "RNN": _RECURRENT,
    # Quantized ops (rules/quant.py): counted like their float op. Their integer weights get no
    # operand slots: sparsity, compensation and training work on float weights only.
    "QLinearConv": OpWeights(macs=_on_inputs(_conv_macs, 0, 3)),
    "ConvInteger": OpWeights(macs=_conv_macs),
    "QLinearMatMul": OpWeights(macs=_on_inputs(_matmul_macs, 0, 3)),
    "MatMulInteger": OpWeights(macs=_matmul_macs),
    "com.microsoft.QGemm": OpWeights(macs=_on_inputs(_gemm_macs, 0, 3)),
}
# onnxruntime's contrib ops (rules/contrib.py), keyed "com.microsoft.Op" outside the default domain.
_BIAS = Operand("bias", None, axis(-1))
WEIGHTS.update({
    "com.microsoft.Attention": OpWeights({0: Operand("data", axis(-1)), 1: Operand("weight", axis(0), axis(1)),
                                          2: _BIAS}, macs=_packed_attention_macs),
    "com.microsoft.MultiHeadAttention": OpWeights({3: _BIAS}, macs=_attention_macs),
    "Attention": OpWeights({}, macs=_attention_macs),
    "SimplifiedLayerNormalization": OpWeights({1: _NORM}),
    "RMSNormalization": OpWeights({1: _NORM}),
    "com.microsoft.SkipLayerNormalization": OpWeights({2: _NORM, 3: _NORM, 4: _BIAS}),
    "com.microsoft.SkipSimplifiedLayerNormalization": OpWeights({2: _NORM, 3: _BIAS}),
    "com.microsoft.EmbedLayerNormalization": OpWeights({2: Operand("table"), 3: Operand("table"),
                                                        4: Operand("table"), 5: _NORM, 6: _NORM}),
    # the packed int weight is no learned float tensor; only its MACs are counted
    "com.microsoft.MatMulNBits": OpWeights({}, macs=_nbits_macs),
    "com.microsoft.BiasGelu": OpWeights({1: _BIAS}),
    "com.microsoft.FastGelu": OpWeights({1: _BIAS}),
})
MULTIPLIED = ("weight", "operand")  # roles whose constant values are summed with the data
LEARNED = ("weight", "operand", "bias", "norm", "table", "coefficient")  # roles a trainer may update


def operand(op: str, index: int) -> Operand | None:
    """What input ``index`` of a default-domain ``op`` is, when the table knows it."""
    entry = WEIGHTS.get(op)
    return entry.operands.get(index) if entry is not None else None


def learned_inputs(op: str) -> tuple[int, ...]:
    entry = WEIGHTS.get(op)
    return tuple(i for i, o in entry.operands.items() if o.role in LEARNED) if entry is not None else ()


def learned_role(op: str, index: int, elements: int) -> str | None:
    """The role under which a constant of ``elements`` values in input ``index`` of ``op`` is a
    learned tensor; None where it is not one (a coefficient needs more than one element:
    x * 0.5 is arithmetic, a per-channel scale is a weight)."""
    slot = operand(op, index)
    if slot is None or slot.role not in LEARNED or (slot.role == "coefficient" and elements <= 1):
        return None
    return slot.role


def reduction(op: str, attrs: dict, index: int, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(axis, positions per group along it) that a weight in input ``index`` is summed over;
    None where the input is not a multiplied weight of this rank."""
    entry, slot = WEIGHTS.get(op), operand(op, index)
    if slot is None or slot.role not in MULTIPLIED or not shape:
        return None
    if entry.grouped and len(shape) < 3:
        return None
    reduced = slot.reduces(attrs, len(shape))
    if reduced is None or not 0 <= reduced < len(shape):
        return None
    groups = max(int(attrs.get("group", 1)), 1) if entry.grouped else 1
    return reduced, shape[reduced] // groups if reduced == 0 else shape[reduced]


def group_problem(op: str, group: int, channels: int | None, w: list[int]) -> str | None:
    """Why ``group`` does not fit a grouped op's weight ``w`` and input ``channels``; None when it does."""
    if group < 1:
        return f"group {group} is not positive"
    weight = WEIGHTS[op].operands[1]
    if w[0] % group:
        what = "filters" if weight.features({}, len(w)) == 0 else "channels"
        return f"group {group} does not divide the weight's {w[0]} {what}"
    reduced = weight.reduces({}, len(w))
    expected = w[reduced] * (group if reduced == 1 else 1)  # axis 1 counts one group's positions
    if channels and channels != expected:
        return f"input has {channels} channels, the weights with group {group} expect {expected}"
    return None


def proto_attrs(node: onnx.NodeProto) -> dict:
    """A NodeProto's attributes as the dict the table's functions take."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

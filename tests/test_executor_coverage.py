"""The executor's op table against the rule table, and the ops added to close the gap.

Every op the pruner has a channel rule for should also run in the PyTorch executor (so a pruned
model can be fine-tuned); the ops the executor runs without a rule are listed with the reason a
rule does not exist. Then the six ops that closed the gap (BitwiseAnd/Or/Xor/Not, LpPool,
GlobalLpPool) against onnxruntime, in the style of test_executor.py's single-op cases.

Tolerance: max |diff| / max |reference| <= 1e-5 (test_executor.py's figure for single ops);
integer outputs must be equal.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

torch = pytest.importorskip("torch")

import onnxprune.rules  # noqa: E402
from onnxprune.executor.compile import CONTROL_FLOW  # noqa: E402
from onnxprune.executor.module import TorchGraph  # noqa: E402
from onnxprune.executor.ops import OPS  # noqa: E402

from graphs import rel_err, session  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Ops the compiler handles itself rather than through the op table.
COMPILED = set(CONTROL_FLOW)

# Ops with a channel rule but no torch implementation: op -> why it is acceptable for now.
_QUANTIZED = ("quantized graphs are pruned, not trained: integer weights take no gradient steps "
              "(recover the float model, then quantize it)")
KNOWN_WITHOUT_TORCH: dict[str, str] = {op: _QUANTIZED for op in (
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger",
    *(f"com.microsoft.{op}" for op in ("QGemm", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearSigmoid",
                                        "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool")))}

# Ops the executor runs that have no channel rule (channels reaching them stop there): op -> why.
KNOWN_WITHOUT_RULE = {
    "ArgMax": "reduces an axis to indices into it, which a cut on that axis would renumber",
    "ArgMin": "reduces an axis to indices into it, which a cut on that axis would renumber",
    "Constant": "normalised into constant tensors before the rules run (graph/normalise.py)",
    "CumSum": "a running sum: along the summed axis every position depends on all before it, "
              "so a channel there cannot be removed alone",
    "DepthToSpace": "each output channel is built from blocksize^2 input channels spread over space; "
                    "input channels could only go in those strided sets, which no rule ties yet",
    "Einsum": "which axes are kept or contracted is in the equation string, which no rule parses yet",
    "GatherElements": "reads elements at computed indices along an axis: where a channel ends up is data",
    "GatherND": "reads slices at computed coordinate tuples: where a channel ends up is data",
    "LRN": "sums over neighbouring channels, so a channel cannot be removed alone",
    "NonZero": "outputs coordinates of the nonzero elements: a data-dependent count, no channel axis",
    "OneHot": "creates a class axis from integer labels: there are no channels to follow in",
    "Range": "generates a 1-D sequence from scalars: no channels come in",
    "Scatter": "the opset < 11 name of ScatterElements: writes at computed indices, so where a "
               "channel's values land is data",
    "ScatterElements": "writes updates at computed indices along an axis: where a channel's values land is data",
    "ScatterND": "writes updates at computed coordinate tuples: where a channel's values land is data",
    "Size": "returns the element count as a scalar: no axis carries channels, and a cut changes the count",
    "SpaceToDepth": "each input channel becomes blocksize^2 output channels (one per block offset), "
                    "so output channels could only go in those sets, which no rule ties yet",

    "TopK": "selects by value along an axis and returns the positions: which channel lands where is data",
    "Trilu": "keeps a triangle of the last two axes by index (causal masks): removing a row or column "
             "would move the diagonal for the ones after it",
}


def executed_ops() -> set[str]:
    return set(OPS) | COMPILED


def test_every_op_with_a_rule_runs_in_the_executor():
    gaps = set(onnxprune.rules.RULES) - executed_ops()
    new, closed = sorted(gaps - set(KNOWN_WITHOUT_TORCH)), sorted(set(KNOWN_WITHOUT_TORCH) - gaps)
    assert not new, (f"ops with a channel rule but no torch implementation: {new}. Add one to "
                     "onnxprune/executor/ops/ (in the module named like the rule's family), or add the op to "
                     "KNOWN_WITHOUT_TORCH in this file with the reason it can wait")
    assert not closed, f"{closed} run in the executor now: remove them from KNOWN_WITHOUT_TORCH"


def test_every_op_without_a_rule_is_listed_with_its_reason():
    unruled = executed_ops() - set(onnxprune.rules.RULES)
    new, ruled = sorted(unruled - set(KNOWN_WITHOUT_RULE)), sorted(set(KNOWN_WITHOUT_RULE) - unruled)
    assert not new, (f"ops the executor runs without a channel rule: {new}. Add a rule to onnxprune/rules/ "
                     "(channels stop at an op without one), or add the op to KNOWN_WITHOUT_RULE in this file "
                     "with the reason it has none")
    assert not ruled, (f"{ruled} have a channel rule (or no torch implementation) now: remove them from "
                       "KNOWN_WITHOUT_RULE")
    assert all(reason.strip() for reason in KNOWN_WITHOUT_RULE.values())


# --- the added ops against onnxruntime -------------------------------------------------------

def one_op(op_type, feeds: dict[str, np.ndarray], attrs=None, opset=18):
    """A graph with one node whose inputs are all graph inputs (named as ``feeds``)."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for name, v in feeds.items()]
    node = helper.make_node(op_type, list(feeds), ["out"], name="node", **(attrs or {}))
    graph = helper.make_graph([node], "one_op", inputs, [helper.make_value_info("out", onnx.TypeProto())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)  # output types, which onnxruntime needs


def assert_matches(model, feeds, tol=1e-5):
    ref, = session(model).run(None, feeds)
    with torch.no_grad():
        got, = TorchGraph(model)(*(torch.from_numpy(v) for v in feeds.values()))
    got = got.numpy()
    assert got.dtype == ref.dtype, f"dtype {got.dtype}, onnxruntime {ref.dtype}"
    assert got.shape == ref.shape, f"shape {got.shape}, onnxruntime {ref.shape}"
    if ref.dtype.kind == "f":
        assert rel_err(ref, got) <= tol, f"relative error {rel_err(ref, got):.3g}"
    else:
        np.testing.assert_array_equal(got, ref)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_ints(dtype, *shape, seed=0):
    """Integers over the whole range of ``dtype``: every bit, the sign bit included, is exercised."""
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


LP_POOL_CASES = {
    "p1": (rand(1, 2, 7, 8), dict(kernel_shape=[3, 3], p=1)),
    "default_p_pads_strides": (rand(2, 3, 7, 8), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1])),
    "p3_ceil_pads": (rand(1, 2, 10, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                                             p=3)),
    "p2_ceil_asym_pads": (rand(1, 2, 9, 8), dict(kernel_shape=[3, 2], strides=[2, 3], pads=[1, 0, 0, 1],
                                                 ceil_mode=1, p=2)),
    "p3_same_upper": (rand(1, 2, 9, 8), dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER", p=3)),
    "p2_same_lower": (rand(1, 2, 8, 8), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    "p1_valid": (rand(1, 2, 7, 8), dict(kernel_shape=[3, 3], strides=[2, 3], auto_pad="VALID", p=1)),
    "p2_dilated": (rand(1, 2, 9, 9), dict(kernel_shape=[2, 3], dilations=[2, 2], pads=[1, 1, 0, 2])),
    "1d_p3": (rand(2, 3, 11), dict(kernel_shape=[3], strides=[2], pads=[1, 1], p=3)),
    "1d_ceil": (rand(2, 3, 6), dict(kernel_shape=[2], strides=[2], pads=[0, 1], ceil_mode=1, p=1)),
    "3d": (rand(1, 2, 4, 5, 6), dict(kernel_shape=[2, 2, 3], strides=[1, 2, 2], p=2)),
}


@pytest.mark.parametrize("case", sorted(LP_POOL_CASES))
def test_lp_pool_matches_onnxruntime(case):
    x, attrs = LP_POOL_CASES[case]
    assert_matches(one_op("LpPool", {"x": x}, attrs), {"x": x})


def test_lp_pool_before_opset_18_matches_onnxruntime():
    x = rand(1, 2, 7, 8)
    assert_matches(one_op("LpPool", {"x": x}, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], p=3), opset=11), {"x": x})


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 7), (1, 2, 3, 4, 5)], ids=["2d", "1d", "3d"])
def test_global_lp_pool_matches_onnxruntime(p, shape):
    x = rand(*shape)
    assert_matches(one_op("GlobalLpPool", {"x": x}, dict(p=p)), {"x": x})


INT_TYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("op_type", ["BitwiseAnd", "BitwiseOr", "BitwiseXor"])
def test_bitwise_binary_matches_onnxruntime(op_type, dtype):
    feeds = {"a": random_ints(dtype, 2, 3, 4), "b": random_ints(dtype, 3, 1, seed=1)}  # broadcast
    assert_matches(one_op(op_type, feeds), feeds)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda t: t.__name__)
def test_bitwise_not_matches_onnxruntime(dtype):
    feeds = {"x": random_ints(dtype, 3, 5)}
    assert_matches(one_op("BitwiseNot", feeds), feeds)


# --- LpPool gradients ------------------------------------------------------------------------

def scaled_lp_pool(attrs):
    """x * w -> LpPool: the parameter w reaches the output only through LpPool."""
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1, 2, 1, 1], [0.5, -2.0])
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("LpPool", ["h"], ["y"], **attrs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2, 9, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


GRADIENT_ATTRS = [dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, p=3),
                  dict(kernel_shape=[2, 3], auto_pad="SAME_UPPER", p=2), dict(kernel_shape=[3, 2], p=1)]


@pytest.mark.parametrize("attrs", GRADIENT_ATTRS, ids=["p3_ceil", "p2_same_upper", "p1"])
def test_lp_pool_gradient_reaches_the_parameter_and_is_right(attrs):
    tg = TorchGraph(scaled_lp_pool(attrs))
    y, = tg(torch.from_numpy(rand(2, 2, 9, 8)))
    y.square().sum().backward()
    grad = tg.parameter("w").grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)
    tg.double()  # and it is the derivative: finite differences through the whole graph, in float64
    x = torch.from_numpy(rand(1, 2, 9, 8, seed=3)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: tg(t)[0], (x,))


def test_lp_pool_gradient_is_zero_not_nan_where_a_window_is_all_zero():
    """The root's derivative is infinite at 0; one dead window (after a ReLU) must not make the gradient NaN."""
    tg = TorchGraph(scaled_lp_pool(dict(kernel_shape=[2, 2], strides=[2, 2], p=2)))
    x = torch.from_numpy(rand(2, 2, 9, 8))
    x[:, :, :4] = 0
    y, = tg(x)
    y.sum().backward()
    grad = tg.parameter("w").grad
    assert bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)

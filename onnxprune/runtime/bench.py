"""onnxruntime latency of several models side by side.

One session per model, spinning threads off, generated inputs per batch size,
warm-up runs, then timed runs interleaved round-robin (one run of each model
per round, starting model rotated) so that drift of the machine (clock,
caches, other load) affects every model alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..cut import iochange
from ..errors import UnsupportedModel, UsageError, first_line
from ..model.dynamic import DimChoice, describe_sizes, pin_example
from ..model.inputs import declared_dim, dynamic_choices, graph_inputs, resolve_input_shapes
from ..model.load import load_model
from .session import require_onnxruntime, session
from .verify import index_bounds, make_inputs, relative_error

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class Timing:
    """Latency of one model at one batch size, in milliseconds."""

    model: str
    batch: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    speedup: float  # median of the first model / median of this one
    runs: int


@dataclass
class BenchResult:
    provider: str
    threads: int | None  # None: onnxruntime's default
    warmup: int
    iters: int
    timings: list[Timing] = field(default_factory=list)
    # model -> the sizes chosen for its dynamic dims left unpinned (model/dynamic.py DimChoice.to_json)
    dynamic_dims: dict[str, list[dict]] = field(default_factory=dict)
    # model -> bytes on disk, external data included
    sizes: dict[str, int] = field(default_factory=dict)
    # model -> max output deviation from the first model on the first batch's inputs, relative to the
    # first model's output scale (runtime/verify.relative_error); absent where the inputs differ
    # (beyond what the model's io-change record maps: a pruned KV cache, renamed inputs)
    output_error: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_provider(name: str) -> str:
    """'cpu', 'cuda' or a full provider name -> an available provider name."""
    full = PROVIDER_ALIASES.get(name.lower(), name)
    available = require_onnxruntime().get_available_providers()
    if full not in available:
        raise UsageError(f"`provider` {name}: not available in this onnxruntime; available: {', '.join(available)}")
    return full


def batch_shapes(
    model: onnx.ModelProto, label: str, batch: int, pinned: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Every input's shape with dim 0 set to ``batch`` (pinned dims kept otherwise, the other
    dynamic ones sized by model/dynamic.py)."""
    chosen = resolve_input_shapes(model, pinned)
    wanted = {}
    for vi in graph_inputs(model):
        dims = vi.type.tensor_type.shape.dim
        if not dims:
            continue  # a scalar input has no batch dim
        first = declared_dim(dims[0])
        if first is not None and first != batch:
            raise UsageError(f"`batches` {batch}: {label} input {vi.name!r} has a fixed batch dim {first}")
        wanted[vi.name] = (batch,) + tuple(chosen[vi.name][1:])
    return resolve_input_shapes(model, wanted)


def _providers(provider: str) -> list[str]:
    # CPU stays as fallback for nodes the accelerator provider does not implement
    return [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]


def open_session(path: str, provider: str, threads: int | None):
    try:
        return session(Path(path), threads, _providers(provider))
    except Exception as exc:
        raise UnsupportedModel(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc


def make_runner(sess, feeds: dict, provider: str):
    """A no-argument callable doing one complete run (outputs ready when it returns)."""
    if provider != "CUDAExecutionProvider":
        return lambda: sess.run(None, feeds)
    # On CUDA, copies host <-> device would dominate small models: inputs live on
    # the device once, outputs stay there.
    ort = require_onnxruntime()
    binding = sess.io_binding()
    device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0) for name, value in feeds.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run():
        sess.run_with_iobinding(binding)  # synchronises the stream before returning
        return device_inputs  # keeps the device inputs alive with the runner

    return run


def time_interleaved(runners: list, warmup: int, iters: int) -> list[list[float]]:
    """Seconds per run for each runner: warm-up, then ``iters`` round-robin rounds."""
    for _ in range(warmup):
        for run in runners:
            run()
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    for r in range(iters):
        for k in range(n):
            i = (r + k) % n  # rotate who goes first: no model always follows the same one
            start = time.perf_counter()
            runners[i]()
            times[i].append(time.perf_counter() - start)
    return times


def summarise(label: str, batch: int, seconds: list[float], reference_median_ms: float | None) -> Timing:
    ms = np.asarray(seconds) * 1e3
    median, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    ref = median if reference_median_ms is None else reference_median_ms
    return Timing(label, batch, median, p90, p99, ref / median if median > 0 else math.inf, len(ms))


def bench(
    paths: list[str],
    batches: list[int],
    provider: str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    iters: int = 100,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    labels: list[str] | None = None,
) -> BenchResult:
    """Time ``paths`` side by side at each batch size; the first model is the speedup reference
    (and the reference of the output error). ``labels``: how the table names them (the paths)."""
    provider = resolve_provider(provider)
    labels = list(labels or paths)
    pinned = dict(input_shapes or {})
    models = [load_model(p) for p in paths]
    names = {vi.name for m in models for vi in graph_inputs(m)}
    unknown = sorted(set(pinned) - names)
    if unknown:
        raise UsageError(f"`input_shapes` names unknown input {unknown[0]!r}; inputs are: {', '.join(sorted(names))}")
    # Validate every batch size before spending time on sessions and runs.
    # A model with a reshaped cache (--allow-io-change) takes the pinned shapes' kept positions.
    # Shrunk (and renamed, --renumber-cache) before they are matched with the model's inputs.
    pins = [{k: v for k, v in iochange.shrink_shapes(pinned, iochange.read(m)).items()
             if k in {i.name for i in graph_inputs(m)}} for m in models]
    shapes = {b: [batch_shapes(m, p, b, pin) for m, p, pin in zip(models, paths, pins)] for b in batches}
    sessions = [open_session(p, provider, threads) for p in paths]
    result = BenchResult(provider, threads, warmup, iters)
    for path, model, pin in zip(paths, models, pins):  # dim 0 comes from `batches`, not from the choice
        choices = [c.to_json() for c in dynamic_choices(model, pin) if c.axis != 0]
        if choices:
            result.dynamic_dims[path] = choices
    result.sizes = {label: size_on_disk(p) for label, p in zip(labels, paths)}
    for b in batches:
        runners = []
        for path, model, sess, shape in zip(paths, models, sessions, shapes[b]):
            feeds = make_inputs(sess, shape, index_bounds(model), seed)
            try:
                sess.run(None, feeds)  # fail here with a clear message, not inside the timing loop
            except Exception as exc:
                raise UnsupportedModel(_unrunnable(path, b, shape, result.dynamic_dims.get(path), exc)) from exc
            runners.append(make_runner(sess, feeds, provider))
        if b == batches[0]:
            result.output_error = output_errors(labels, sessions, shapes[b], index_bounds(models[0]), seed,
                                                [iochange.read(m) for m in models])
        times = time_interleaved(runners, warmup, iters)
        first = summarise(labels[0], b, times[0], None)
        result.timings.append(first)
        for label, seconds in zip(labels[1:], times[1:]):
            result.timings.append(summarise(label, b, seconds, first.median_ms))
    return result


def size_on_disk(path: str) -> int:
    """Bytes of the model file and of the external data files it names."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations
                                     if (path.parent / loc).is_file())


def output_errors(labels: list[str], sessions: list, shapes: list[dict], bounds, seed: int,
                  changes: list[list] | None = None) -> dict[str, float]:
    """Each model's deviation from the first one on the first model's inputs (those that take the
    same inputs and give the same outputs: a pruned or quantized copy). A model whose inputs and
    outputs onnxprune reshaped (``changes``: its io-change record, cut/iochange.py, relative to the
    first model) takes the kept positions of the first one's inputs and is compared at the kept
    positions of its outputs, as verification compares it; one whose record does not lead back to
    the first model's inputs gets no figure."""
    feeds = make_inputs(sessions[0], shapes[0], bounds, seed)
    names = [o.name for o in sessions[0].get_outputs()]
    reference = dict(zip(names, sessions[0].run(None, feeds)))
    errors = {labels[0]: 0.0}
    changes = changes or [[] for _ in sessions]
    for label, sess, shape, change in zip(labels[1:], sessions[1:], shapes[1:], changes[1:]):
        try:  # a record about another model names inputs or positions the first one lacks
            their_feeds = iochange.candidate_feeds(feeds, change)
            expected = iochange.comparable_outputs(reference, change)
        except (KeyError, IndexError, ValueError):
            continue
        takes = [i.name for i in sess.get_inputs()]
        if any(n not in their_feeds for n in takes) or [o.name for o in sess.get_outputs()] != list(expected) \
                or any(n not in their_feeds or np.shape(their_feeds[n]) != tuple(d) for n, d in shape.items()):
            continue
        their_feeds = {n: their_feeds[n] for n in takes}
        got = sess.run(None, their_feeds)
        if all(np.shape(a) == np.shape(g) for a, g in zip(expected.values(), got)):
            errors[label] = max((relative_error(a, g) for a, g in zip(expected.values(), got)), default=0.0)
    return errors


def _unrunnable(path: str, batch: int, shapes: dict, choices: list[dict] | None, exc: Exception) -> str:
    if not choices:
        return f"onnxruntime cannot run {path} at batch {batch}: {first_line(exc)}"
    chosen = [DimChoice(**c) for c in choices]
    example = " ".join(f"`input_shapes` {pin_example(name, chosen, shapes, placeholders=False)}"
                       for name in dict.fromkeys(c.input for c in chosen))
    return (f"onnxruntime cannot run {path} at batch {batch} at the sizes chosen for its dynamic dims "
            f"({describe_sizes(chosen)}): give the sizes it runs at, e.g. {example} (with your sizes); "
            f"onnxruntime said: {first_line(exc)}")


def format_table(result: BenchResult) -> str:
    threads = result.threads if result.threads else "default"
    lines = [
        f"{result.provider}, threads {threads}, {result.warmup} warm-up + {result.iters} timed runs "
        "per model and batch, interleaved",
    ]
    for path, choices in result.dynamic_dims.items():
        chosen = [DimChoice(**c) for c in choices]
        lines.append(f"{path}: dynamic dims chosen: {describe_sizes(chosen)} (pin with `input_shapes`)")
    width = max([len("model")] + [len(t.model) for t in result.timings])
    lines.append(f"{'model':<{width}}  {'batch':>5}  {'median ms':>10}  {'p90 ms':>10}  {'p99 ms':>10}  {'speedup':>7}"
                 f"  {'size MB':>8}  {'error':>7}")
    for t in result.timings:
        size = result.sizes.get(t.model)
        error = result.output_error.get(t.model)
        lines.append(
            f"{t.model:<{width}}  {t.batch:>5}  {t.median_ms:>10.3f}  {t.p90_ms:>10.3f}  {t.p99_ms:>10.3f}"
            f"  {t.speedup:>6.2f}x  {'-' if size is None else f'{size / 1e6:.2f}':>8}"
            f"  {'-' if error is None else f'{error:.3g}':>7}"
        )
    return "\n".join(lines)

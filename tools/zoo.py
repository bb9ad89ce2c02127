"""Torchvision models exported to ONNX, pruned with onnxprune, checked.

    python -m tools.zoo                                  # the whole target list, ratio 0.4
    python -m tools.zoo --models resnet18,vgg11_bn --dynamo-models resnet18 --json zoo.json

Exports use random weights (``weights=None``) in eval mode. By default every
normalisation layer's statistics and affine parameters are randomised with a
fixed seed, and any other parameter that is constant (all zeros, all ones,
a layer scale filled with 1e-6, ...) is randomised at a scale of at least 0.1
(so no residual branch vanishes), so no two tensors are
identical by accident and the exporter has nothing to deduplicate.
``fresh=True`` exports the model exactly as torchvision initialises it
(BatchNorm biases all zero: the legacy exporter shares one zero initializer
among them), which is the case shared-initializer handling must survive.

Exports are cached in ``.cache/zoo`` (or ``$ONNXPRUNE_ZOO_CACHE``), keyed by
model, exporter and fresh; a cached file is reused as is.

Each model is pruned with ``onnxprune.prune_file`` and checked here
independently of onnxprune's own verification: onnx.checker full check,
an onnxruntime run on the same random input as the original, unchanged
output names and shapes. MACs and params come from ``onnxprune.count_macs``
and ``count_params`` on both files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bump when the export recipe changes: cached files from an older recipe are not reused.
RECIPE = "v2"
SEED = 0
MAC_TARGET = 1.3

LEGACY_MODELS = [
    "resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
    "efficientnet_v2_s", "vgg11_bn", "densenet121", "regnet_x_400mf", "convnext_tiny",
    "shufflenet_v2_x1_0", "squeezenet1_0", "googlenet", "mnasnet0_5", "resnext50_32x4d",
    "wide_resnet50_2", "vit_b_16", "swin_t", "alexnet", "inception_v3",
]
DYNAMO_MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"]
EXPORTERS = ("legacy", "dynamo")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONNXPRUNE_ZOO_CACHE") or ROOT / ".cache" / "zoo")


def input_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def build_model(name: str, fresh: bool = False):
    """A torchvision classifier with random weights, in eval mode."""
    import torch
    import torchvision

    torch.manual_seed(SEED)
    kwargs = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # silences the "default will change" warning; same init
    model = torchvision.models.get_model(name, **kwargs).eval()
    if not fresh:
        randomise(model, seed=SEED)
    return model


def randomise(model, seed: int = SEED) -> None:
    """Random norm statistics/affine params; perturb any other constant tensor."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.LayerNorm, torch.nn.GroupNorm)

    def uniform(t, lo, hi):
        return (torch.rand(t.shape, generator=gen) * (hi - lo) + lo).to(t.dtype)

    def normal(t, std):
        return (torch.randn(t.shape, generator=gen) * std).to(t.dtype)

    done = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, norms):
                continue
            if getattr(module, "weight", None) is not None:
                module.weight.copy_(uniform(module.weight, 0.5, 1.5))
                done.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(normal(module.bias, 0.1))
                done.add(id(module.bias))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(normal(module.running_mean, 0.1))
                module.running_var.copy_(uniform(module.running_var, 0.5, 1.5))
        for tensor in list(model.parameters()) + list(model.buffers()):
            if id(tensor) in done or not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            flat = tensor.flatten()
            if bool((flat == flat[0]).all()):  # constant: zeros, ones, layer-scale 1e-6, ...
                value = float(flat[0])
                if value == 0:
                    tensor.copy_(normal(tensor, 0.02))
                else:  # at least 0.1 in size: a 1e-6 layer scale would make whole blocks vanish
                    scale = value if abs(value) >= 0.1 else math.copysign(0.1, value)
                    tensor.copy_(uniform(tensor, 0.5, 1.5) * scale)


def cache_path(name: str, exporter: str = "legacy", fresh: bool = False, cache_dir=None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache_dir / f"{name}-{exporter}{'-fresh' if fresh else ''}-{RECIPE}.onnx"


def export(name: str, exporter: str = "legacy", fresh: bool = False, cache_dir=None) -> Path:
    """Path of the ONNX export of ``name`` (exported now unless cached)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = cache_path(name, exporter, fresh, cache_dir)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    import torch

    model = build_model(name, fresh)
    size = input_size(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    # Export under a temporary name in the same folder, then rename: parallel
    # test workers and interrupted runs never see a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # The dynamo exporter prints progress on stdout: keep stdout for the table.
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                torch.onnx.export(model, (x,), tmp, dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["output"])
            else:
                torch.onnx.export(model, (x,), tmp, dynamo=True, external_data=False,
                                  input_names=["input"], output_names=["output"])
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a cache is an ordinary file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass
class Row:
    model: str
    exporter: str
    fresh: bool = False
    valid: bool = False
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    seconds: float | None = None
    groups_pruned: int = 0
    groups_blocked: int = 0
    max_deviation: float | None = None
    output_names_same: bool = False
    output_shapes_same: bool = False
    error: str | None = None

    @property
    def macs_ratio(self) -> float | None:
        if not self.macs_before or not self.macs_after:
            return None
        return self.macs_before / self.macs_after

    @property
    def params_ratio(self) -> float | None:
        if not self.params_before or not self.params_after:
            return None
        return self.params_before / self.params_after

    @property
    def meets_target(self) -> bool:
        return self.valid and (self.macs_ratio or 0) >= MAC_TARGET

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(macs_ratio=self.macs_ratio, params_ratio=self.params_ratio, meets_target=self.meets_target)
        return data


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:240]}"


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, seed: int = SEED):
    import numpy as np

    sess = _session(path)
    rng = np.random.default_rng(seed)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
             for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def check_pruned(original: Path, pruned: Path) -> dict:
    """Independent checks: full checker, onnxruntime run, outputs compared with the original."""
    import numpy as np
    import onnx

    onnx.checker.check_model(str(pruned), full_check=True)
    before, after = _run(original), _run(pruned)
    deviation = 0.0
    for name, ref in before.items():
        if name in after and np.shape(after[name]) == np.shape(ref):
            scale = float(np.max(np.abs(ref))) or 1.0
            deviation = max(deviation, float(np.max(np.abs(ref.astype(np.float64) - after[name]))) / scale)
    finite = all(np.isfinite(v).all() for v in after.values())
    return {
        "names_same": list(before) == list(after),
        "shapes_same": [np.shape(v) for v in before.values()] == [np.shape(v) for v in after.values()],
        "finite": finite,
        "deviation": deviation,
    }


def evaluate(path: Path, name: str, exporter: str, ratio: float = 0.4, fresh: bool = False,
             workdir=None, **options) -> Row:
    """Prune ``path`` at ``ratio`` into ``workdir`` (a temp dir by default) and check the result."""
    import onnx

    import onnxprune

    row = Row(name, exporter, fresh)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        out = Path(tmp) / f"{path.stem}.pruned.onnx"
        try:
            base = onnx.load(str(path))
            row.macs_before, row.params_before = onnxprune.count_macs(base), onnxprune.count_params(base)
            del base
            started = time.perf_counter()
            report = onnxprune.prune_file(path, out, ratio, **options)
            row.seconds = time.perf_counter() - started
            row.groups_pruned = sum(g.channels_after < g.channels_before for g in report.groups)
            row.groups_blocked = len(report.blocked)
            pruned = onnx.load(str(out))
            row.macs_after, row.params_after = onnxprune.count_macs(pruned), onnxprune.count_params(pruned)
            del pruned
            checks = check_pruned(path, out)
            row.output_names_same, row.output_shapes_same = checks["names_same"], checks["shapes_same"]
            row.max_deviation = checks["deviation"]
            row.valid = checks["names_same"] and checks["shapes_same"] and checks["finite"]
            if not checks["finite"]:
                row.error = "pruned model produces non-finite outputs"
            elif not row.valid:
                row.error = "output names or shapes changed"
        except Exception as exc:  # one line per failing model; the table goes on
            row.error = _one_line(exc)
    return row


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows: list[Row]) -> str:
    head = (f"{'model':<20} {'exporter':<8} {'valid':<5} {'MACs before':>11} {'MACs after':>11} {'MACs x':>7} "
            f"{'params x':>8} {'prune s':>8} {'pruned':>6} {'blocked':>7} {'max dev':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        label = r.model + (" (fresh)" if r.fresh else "")
        lines.append(
            f"{label:<20} {r.exporter:<8} {('yes' if r.valid else 'NO'):<5} "
            f"{_fmt(r.macs_before and r.macs_before / 1e9, '.3f'):>10}G "
            f"{_fmt(r.macs_after and r.macs_after / 1e9, '.3f'):>10}G "
            f"{_fmt(r.macs_ratio, '.2f'):>6}x {_fmt(r.params_ratio, '.2f'):>7}x {_fmt(r.seconds, '.2f'):>8} "
            f"{r.groups_pruned:>6} {r.groups_blocked:>7} {_fmt(r.max_deviation, '.3g'):>8}"
        )
        if r.error:
            lines.append(f"    error: {r.error}")
    good = sum(r.meets_target for r in rows)
    lines.append(f"{good}/{len(rows)} valid with >= {MAC_TARGET}x fewer MACs")
    return "\n".join(lines)


def _names(text: str | None, default: list[str]) -> list[str]:
    if text is None:
        return list(default)
    return [n.strip() for n in text.split(",") if n.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models",
                   help=f"legacy-exporter models, comma separated (default: all {len(LEGACY_MODELS)}; '' for none)")
    p.add_argument("--dynamo-models", help=f"dynamo-exporter models (default: all {len(DYNAMO_MODELS)}; '' for none)")
    p.add_argument("--fresh", action="store_true", help="also prune a freshly initialised resnet18 (shared zero bias)")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--round-to", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="export cache (default $ONNXPRUNE_ZOO_CACHE or .cache/zoo)")
    p.add_argument("--json", type=Path, help="write the rows as JSON")
    args = p.parse_args(argv)

    jobs = [(m, "legacy", False) for m in _names(args.models, LEGACY_MODELS)]
    jobs += [(m, "dynamo", False) for m in _names(args.dynamo_models, DYNAMO_MODELS)]
    if args.fresh:
        jobs.append(("resnet18", "legacy", True))
    rows = []
    for name, exporter, fresh in jobs:
        try:
            path = export(name, exporter, fresh, args.cache)
        except Exception as exc:
            row = Row(name, exporter, fresh, error=f"export failed: {_one_line(exc)}")
        else:
            row = evaluate(path, name, exporter, args.ratio, fresh, round_to=args.round_to)
        rows.append(row)
        print(f"[{len(rows)}/{len(jobs)}] {name} ({exporter}{', fresh' if fresh else ''}): "
              f"{'ok' if row.meets_target else 'FAIL'} {row.error or ''}", file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in rows], indent=1) + "\n")
    return 0 if all(r.meets_target for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

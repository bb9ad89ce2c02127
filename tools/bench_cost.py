"""What pruning costs at scale: the whole CLI's time, CPU time and peak memory, against the I/O
floor (``onnx.load`` + ``onnx.save`` of the same model) and against Torch-Pruning's pruning plus
the ``torch.onnx.export`` a Torch-Pruning user needs to get the same file.

    python -m tools.bench_cost                                  # resnet50, vit_b_16
    python -m tools.bench_cost --models resnet50,vit_l_16 --repeat 3 --json build/bench_cost.json

Each measurement runs in a fresh child process (``--child``), so its peak resident memory
(VmHWM) is its own; the models' measurements are interleaved and repeated, and the table
shows medians. Models, random weights, exported once by the legacy exporter and cached:
torchvision classifiers by name (tools/zoo.py; vit_h_14, 2.5 GB, is written with external data),
and BERTs (``transformers.BertModel``, sequence 128, tools/bench_latency.py's recipe): ``bert_base``
(12 layers, hidden 768), ``bert_large`` (24 layers, hidden 1024) and ``bert_1024x12`` (12 layers,
hidden 1024: 0.73 GB). The CLI runs ``--structured 0.4`` with its defaults (verification
included); Torch-Pruning prunes the same torch model by L1 magnitude at 0.4 (BERT: heads and MLP
neurons, the hidden size kept, as the CLI keeps it). The last line fits the CLI's seconds per GB
of model.

``--taylor N`` adds, for the torchvision models, the cost of pruning by gradients on the same N
seeded random images (timing only: what the numbers are does not matter, the work does): the
CLI with ``--importance taylor --data`` (compensation on, reconstruction off: ``--no-reconstruct``)
against Torch-Pruning's ``TaylorImportance`` (forward and backward over the same images in batches
of the same size, the loss the cross-entropy against the model's own top-1, as the CLI takes it
without labels), then its pruning and export.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATIO = 0.4
ROOT = Path(__file__).resolve().parent.parent
TAYLOR_BATCH = 16  # the batch both sides run their gradients at


# --- the child: one measurement, its own time, CPU time and peak memory ---------------------------

def _child(kind: str, name: str, model: str, out: str) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "floor":
        import onnx

        onnx.save(onnx.load(model), out)
    elif kind == "cli":
        from onnxprune.cli import main

        code = main([model, "--structured", str(RATIO), "-o", out, "--force", "-q"])
        if code:
            raise SystemExit(code)
    elif kind == "cli_taylor":
        from onnxprune.cli import main

        code = main([model, "--structured", str(RATIO), "--importance", "taylor", "--data", _taylor_data(out),
                     "--no-reconstruct", "--batch-size", str(TAYLOR_BATCH), "-o", out, "--force", "-q"])
        if code:
            raise SystemExit(code)
    elif kind == "torch_pruning":
        return _torch_pruning(name, out, start, cpu)
    elif kind == "tp_taylor":
        return _torch_pruning(name, out, start, cpu, taylor=_taylor_data(out))
    else:
        raise SystemExit(f"unknown measurement {kind}")
    return _done(start, cpu)


def _peak_rss() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent through fork, so a child of a process that once held a big model would report that."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _done(start: float, cpu: float, **extra) -> dict:
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "peak_rss_bytes": _peak_rss(), **extra}


# name -> (layers, hidden size, attention heads, MLP width)
BERTS = {"bert_base": (12, 768, 12, 3072), "bert_large": (24, 1024, 16, 4096), "bert_1024x12": (12, 1024, 16, 4096)}
BERT_SEQ = 128


def _bert_arch(name: str):
    from tools.bench_latency import bert_arch

    layers, hidden, heads, width = BERTS[name]
    return bert_arch(layers, BERT_SEQ, hidden_size=hidden, num_attention_heads=heads, intermediate_size=width)


def export_model(name: str) -> Path:
    """The cached export of ``name`` (made now when missing), as the table measures it."""
    from tools import zoo

    if name not in BERTS:
        return zoo.export(name)
    path = zoo.default_cache_dir() / f"{name}-legacy-s{BERT_SEQ}.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        arch = _bert_arch(name)
        tmp = path.with_name(f".{path.name}.tmp")  # renamed when whole: an interrupted export is never cached
        arch.export(arch.build(), tmp)
        os.replace(tmp, path)
    return path


def cached_export(name: str) -> Path:
    import torch

    from tools.bench_depth import cached_export

    torch.backends.mha.set_fastpath_enabled(False)  # the legacy exporter has no fused attention kernel
    return cached_export(name)


def _taylor_data(out: str) -> str:
    """The images both sides of the Taylor comparison score on: written beside ``out`` by the parent."""
    return str(Path(out).parent / "taylor.npz")


def write_taylor_data(folder: Path, name: str, samples: int) -> None:
    import numpy as np

    from tools import zoo

    size = zoo.input_size(name)
    x = np.random.default_rng(0).standard_normal((samples, 3, size, size)).astype(np.float32)
    np.savez(folder / "taylor.npz", input=x)


def _taylor_gradients(torch, model, images: str) -> None:
    """What TaylorImportance reads: the weights' gradients of the cross-entropy against the model's
    own top-1, accumulated over the images in TAYLOR_BATCH batches."""
    import numpy as np

    x = torch.from_numpy(np.load(images)["input"])
    model.zero_grad()
    for i in range(0, len(x), TAYLOR_BATCH):
        logits = model(x[i:i + TAYLOR_BATCH])
        torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach()).backward()


def _torch_pruning(name: str, out: str, start: float, cpu: float, taylor: str | None = None) -> dict:
    """Build the torch model, prune it with Torch-Pruning (magnitude, the classifier kept; or Taylor
    on the ``taylor`` images), export."""
    if name in BERTS:
        return _torch_pruning_bert(name, out, start, cpu)
    import torch
    import torch_pruning as tp

    from tools import zoo

    model = zoo.build_model(name)
    size = zoo.input_size(name)
    example = torch.randn(1, 3, size, size)
    built = time.perf_counter()
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    # attention's heads as Torch-Pruning's ViT example gives them (the embedding width stays: its
    # class token and position table are not layers it can follow)
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    ignored = classifier + [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and heads]
    importance = tp.importance.TaylorImportance() if taylor else tp.importance.MagnitudeImportance(p=1)
    pruner = tp.pruner.MetaPruner(model, example, importance=importance,
                                  pruning_ratio=RATIO, ignored_layers=ignored, num_heads=heads,
                                  prune_head_dims=False, prune_num_heads=bool(heads), head_pruning_ratio=RATIO)
    if taylor:
        _taylor_gradients(torch, model, taylor)
    pruner.step()
    pruned = time.perf_counter()
    torch.backends.mha.set_fastpath_enabled(False)  # the legacy exporter has no fused attention kernel
    with torch.no_grad():
        torch.onnx.export(model.eval(), (example,), out, opset_version=17, dynamo=False)
    return _done(start, cpu, prune_seconds=pruned - built, export_seconds=time.perf_counter() - pruned)


def model_bytes(path: Path) -> int:
    """The model's bytes on disk: the .onnx file and the external data files it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(path.parent / f) for f in files)


def _torch_pruning_bert(name: str, out: str, start: float, cpu: float) -> dict:
    """BERT as tools/bench_latency.py prunes it with Torch-Pruning: heads and MLP neurons at RATIO."""
    import torch_pruning as tp

    arch = _bert_arch(name)
    model = arch.build()
    built = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, arch.example(), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=RATIO, head_pruning_ratio=RATIO, **arch.tp_options(model))
    pruner.step()
    pruned = time.perf_counter()
    arch.export(model, out)
    return _done(start, cpu, prune_seconds=pruned - built, export_seconds=time.perf_counter() - pruned)


def _measure(kind: str, name: str, model: Path, folder: Path) -> dict:
    out = folder / f"{name}.{kind}.onnx"
    proc = subprocess.run([sys.executable, "-m", "tools.bench_cost", "--child", kind, name, str(model), str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    for leftover in folder.glob(f"{name}.{kind}.onnx*"):
        leftover.unlink()
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------

def _median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def _row(name: str, size: int, runs: dict[str, list[dict]]) -> dict:
    cli, floor, tp = runs["cli"], runs["floor"], runs["torch_pruning"]
    row = {"model": name, "bytes": size,
           "cli_seconds": _median(cli, "seconds"), "cli_cpu_seconds": _median(cli, "cpu_seconds"),
           "cli_peak_rss_bytes": _median(cli, "peak_rss_bytes"), "floor_seconds": _median(floor, "seconds"),
           "tp_prune_seconds": _median(tp, "prune_seconds"),
           "tp_prune_export_seconds": (_median(tp, "prune_seconds") or 0) + (_median(tp, "export_seconds") or 0)
           if _median(tp, "prune_seconds") is not None else None,
           "errors": sorted({r["error"] for rs in runs.values() for r in rs if "error" in r})}
    if runs.get("cli_taylor"):
        tp_taylor = runs["tp_taylor"]
        row.update(cli_taylor_seconds=_median(runs["cli_taylor"], "seconds"),
                   tp_taylor_prune_seconds=_median(tp_taylor, "prune_seconds"),
                   tp_taylor_prune_export_seconds=(_median(tp_taylor, "prune_seconds") or 0)
                   + (_median(tp_taylor, "export_seconds") or 0) if _median(tp_taylor, "prune_seconds") else None)
    return row


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| model | MB | CLI s | CLI CPU s | peak RSS MiB | RSS / model | load+save s | CLI / floor | "
             "Torch-Pruning prune s | prune + export s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mb = r["bytes"] / 1e6
        rss = r["cli_peak_rss_bytes"]
        ratio = r["cli_seconds"] / r["floor_seconds"] if r["cli_seconds"] and r["floor_seconds"] else None
        lines.append(f"| {r['model']} | {mb:.0f} | {_fmt(r['cli_seconds'], '.2f')} | "
                     f"{_fmt(r['cli_cpu_seconds'], '.2f')} | {_fmt(rss and rss / 2**20, '.0f')} | "
                     f"{_fmt(rss and rss / r['bytes'], '.2f')}x | {_fmt(r['floor_seconds'], '.2f')} | "
                     f"{_fmt(ratio, '.2f')}x | {_fmt(r['tp_prune_seconds'], '.2f')} | "
                     f"{_fmt(r['tp_prune_export_seconds'], '.2f')} |")
    timed = [(r["bytes"] / 1e9, r["cli_seconds"]) for r in rows if r["cli_seconds"]]
    if len(timed) >= 2:
        slope = statistics.linear_regression([g for g, _ in timed], [s for _, s in timed]).slope
        lines.append(f"\nCLI time fitted over the models: {slope:.1f} s per GB of model.")
    taylor = [r for r in rows if "cli_taylor_seconds" in r]
    if taylor:
        lines += ["", "| model | CLI `--importance taylor --data` s | Torch-Pruning Taylor: gradients + prune s | "
                  "+ export s | CLI / Torch-Pruning + export |", "|---|---|---|---|---|"]
        for r in taylor:
            cli, tp = r["cli_taylor_seconds"], r["tp_taylor_prune_export_seconds"]
            lines.append(f"| {r['model']} | {_fmt(cli, '.2f')} | {_fmt(r['tp_taylor_prune_seconds'], '.2f')} | "
                         f"{_fmt(tp, '.2f')} | {_fmt(cli and tp and cli / tp, '.2f')}{'x' if cli and tp else ''} |")
    for r in rows:
        for error in r["errors"]:
            lines.append(f"\n{r['model']}: {error}")
    return "\n".join(lines)


def compile_package() -> None:
    """onnxprune's bytecode, written now: an installed package carries it, but a checkout run with
    PYTHONDONTWRITEBYTECODE (as in CI) would compile its 130 modules again in every child, 0.27 s
    of each CLI measurement (2-core Xeon) that no user pays."""
    import compileall

    compileall.compile_dir(ROOT / "onnxprune", quiet=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vit_b_16",
                   help="comma-separated: torchvision model names, bert_base, bert_large, bert_1024x12")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (medians shown)")
    p.add_argument("--json", help="write the measurements as JSON")
    p.add_argument("--taylor", type=int, default=0, metavar="N",
                   help="also time Taylor pruning on N random images, the CLI against Torch-Pruning "
                        "(torchvision models only)")
    p.add_argument("--child", nargs=4, metavar=("KIND", "NAME", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    compile_package()
    paths = {name: export_model(name) for name in names}
    kinds = {name: ["floor", "cli", "torch_pruning"] + (["cli_taylor", "tp_taylor"]
                                                         if args.taylor and name not in BERTS else [])
             for name in names}
    runs = {name: {kind: [] for kind in kinds[name]} for name in names}
    # the gradients run at TAYLOR_BATCH on both sides: the CLI needs an export with a dynamic batch
    dynamic = {name: cached_export(name) for name in names if "cli_taylor" in kinds[name]}
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        for _ in range(args.repeat):  # interleaved: every model's measurements see the same machine state
            for name in names:
                folder = Path(tmp) / name
                folder.mkdir(exist_ok=True)
                if "cli_taylor" in kinds[name] and not (folder / "taylor.npz").exists():
                    write_taylor_data(folder, name, args.taylor)
                for kind in kinds[name]:
                    path = dynamic[name] if kind == "cli_taylor" else paths[name]
                    runs[name][kind].append(_measure(kind, name, path, folder))
    rows = [_row(name, model_bytes(paths[name]), runs[name]) for name in names]
    print(table(rows))
    if args.json:
        record = {"python": platform.python_version(), "cores": os.cpu_count(), "ratio": RATIO, "taylor": args.taylor,
                  "repeat": args.repeat, "rows": rows, "runs": runs,
                  "load_average_1m": os.getloadavg()[0]}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

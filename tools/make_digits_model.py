"""Train the bundled digits CNN and export models/digits_cnn.onnx (+ models/README.md).

    .venv/bin/python -m tools.make_digits_model [--out models/digits_cnn.onnx] [--epochs 30]

CPU only, a few seconds. Seeds are fixed; the architecture and the split live
in tools/digits_arch.py. Prints the held-out accuracy measured with
onnxruntime on the exported file (the figure written to models/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from tools.digits_arch import SPLIT, accuracy_onnx, build_model, load_split

ROOT = Path(__file__).resolve().parent.parent
MIN_ACCURACY = 0.95


def train(model, x, y, epochs: int, seed: int):
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            batch = x[idx]
            # one-pixel random shifts: cheap augmentation that helps the tiny set
            dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch = torch.roll(batch, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(batch), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def export(model, path: Path):
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter is asked for on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        _export_legacy(torch, model, path)


def _export_legacy(torch, model, path: Path):
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path),
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )


def write_readme(path: Path, onnx_path: Path, acc: float, train_acc: float, n_train: int, n_test: int, epochs: int):
    import onnx

    import onnxprune

    model = onnx.load(str(onnx_path))
    ops = sorted({n.op_type for n in model.graph.node})
    params = onnxprune.count_params(model)
    macs = onnxprune.count_macs(model, {"input": (1, 1, 8, 8)})
    size_kb = onnx_path.stat().st_size / 1024
    path.write_text(f"""# Bundled model: digits_cnn.onnx

A small CNN trained on scikit-learn's `digits` data set (`load_digits`: 1,797
8x8 grey images of handwritten digits, no download). Used by `make demo` and
by `tests/test_demo.py`, and meant for accuracy benchmarks of pruning.
Regenerate it (and this file) with `.venv/bin/python -m tools.make_digits_model`.

- Input `input`: float32 (batch, 1, 8, 8), pixel value / 16 (so in [0, 1]);
  batch is dynamic. Output `logits`: float32 (batch, 10).
- Split: `train_test_split(x, y, test_size={SPLIT['test_size']}, random_state={SPLIT['random_state']}, stratify=y)`:
  {n_train} train / {n_test} held-out samples. `tools/digits_arch.py: load_split()`
  returns exactly that split, preprocessed.
- Held-out accuracy (onnxruntime, the exported file): **{acc:.2%}**
  (train {train_acc:.2%}).
- Training: {epochs} epochs, AdamW + one-cycle LR, batch 64, one-pixel random
  shifts, torch seed 0, one CPU thread (a rerun on the same machine wrote a
  byte-identical file).
- Export: `torch.onnx.export(..., dynamo=False, opset_version=17,
  dynamic_axes={{'input': {{0: 'batch'}}, 'logits': {{0: 'batch'}}}})`; eval mode, so
  every BatchNorm is folded into its Conv.
- Size: {size_kb:.0f} KiB, {params:,} parameters, {macs:,} MACs per image
  (`onnxprune.count_params` / `count_macs`).
- Ops in the graph: {', '.join(ops)}.

## Architecture (`tools/digits_arch.py: build_model()`)

| block | layers | output (C x H x W) | what it exercises |
|---|---|---|---|
| stem | Conv3x3(1->16) + BN + ReLU | 16x8x8 | plain conv group |
| expand | Conv3x3(16->32) + BN + ReLU | 32x8x8 | |
| residual | Conv3x3(32->32) + BN + ReLU, Conv3x3(32->32) + BN, Add(skip), ReLU | 32x8x8 | residual Add couples `expand` and the 2nd conv into one group |
| pool | MaxPool 2x2 | 32x4x4 | pass-through |
| depthwise | Conv3x3(32->32, group=32) + BN + ReLU | 32x4x4 | depthwise conv: channels pass through, `group` rewritten |
| pointwise | Conv1x1(32->48) + BN + ReLU | 48x4x4 | |
| grouped | Conv3x3(48->48, group=4) + BN + ReLU | 48x4x4 | grouped conv: group count kept, tied in-group positions |
| squeeze-excite | GlobalAvgPool -> Conv1x1(48->12) + ReLU -> Conv1x1(12->48) -> Sigmoid -> Mul | 48x4x4 | SE Mul couples the gate with the features |
| head | GlobalAvgPool -> Flatten -> Linear(48->10) | 10 | classifier output is a graph output (a barrier) |
""")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "models" / "digits_cnn.onnx")
    p.add_argument("--readme", default=str(ROOT / "models" / "README.md"), help="'' to write none")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and reproducible
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x_train, x_test, y_train, y_test = load_split()
    started = time.perf_counter()
    model = train(build_model(), x_train, y_train, args.epochs, args.seed)
    seconds = time.perf_counter() - started
    export(model, args.out)
    acc = accuracy_onnx(args.out, x_test, y_test)
    train_acc = accuracy_onnx(args.out, x_train, y_train)
    size = args.out.stat().st_size
    print(f"trained {args.epochs} epochs in {seconds:.1f} s on {len(x_train)} samples")
    print(f"held-out accuracy {acc:.4f} ({len(x_test)} samples), train {train_acc:.4f}")
    print(f"wrote {args.out} ({size / 1024:.0f} KiB)")
    if args.readme:
        write_readme(Path(args.readme), args.out, acc, train_acc, len(x_train), len(x_test), args.epochs)
        print(f"wrote {args.readme}")
    if acc < MIN_ACCURACY or size >= 1_000_000:
        print(f"error: accuracy {acc:.4f} < {MIN_ACCURACY} or file >= 1 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

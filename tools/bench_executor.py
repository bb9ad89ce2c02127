"""Throughput of onnxprune's PyTorch executor against the same network written in PyTorch.

    python -m tools.bench_executor                      # digits training (batch 64, 256) + resnet18 inference
    python -m tools.bench_executor --rounds 30 --threads 2

Training: ``models/digits_cnn.onnx`` run by ``TorchGraph`` against
``tools/digits_arch.build_model()`` (the architecture it was exported from),
SGD steps (forward, cross-entropy, backward, update) on the same random batch.
The export folds each BatchNorm into its Conv, so the native network does a
little more work (batch statistics); ``native-folded`` is the native network
with each BatchNorm replaced by a Conv bias, i.e. the exported computation.

Inference: resnet18 exported by ``tools/zoo.py`` (legacy exporter) against
torchvision's resnet18 in eval mode, forward only under ``torch.no_grad``.

The contenders run interleaved, one block of steps each per round, in an order
that alternates between rounds; each prints the median steps/s over the
rounds and its ratio to the native network.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def digits_models():
    """(executor, native, native with BatchNorm folded into conv biases), all in train mode."""
    import onnx
    import torch

    from onnxprune.executor.module import TorchGraph
    from tools import digits_arch

    torch.manual_seed(0)
    executor = TorchGraph(onnx.load(str(ROOT / "models" / "digits_cnn.onnx")))
    native = digits_arch.build_model()
    folded = digits_arch.build_model()
    for block in folded.modules():
        if isinstance(block, torch.nn.Sequential) and isinstance(block[1], torch.nn.BatchNorm2d):
            conv = block[0]
            conv.bias = torch.nn.Parameter(torch.zeros(conv.out_channels))
            block[1] = torch.nn.Identity()
    return {"executor": executor.train(), "native": native.train(), "native-folded": folded.train()}


def train_step_fn(model, x, y):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        loss_fn(logits, y).backward()
        opt.step()
    return step


def resnet18_models():
    import onnx

    from onnxprune.executor.module import TorchGraph
    from tools import zoo

    executor = TorchGraph(onnx.load(str(zoo.export("resnet18", "legacy")))).eval()
    native = zoo.build_model("resnet18").eval()
    return {"executor": executor, "native": native}


def forward_fn(model, x):
    import torch

    def step():
        with torch.no_grad():
            model(x)
    return step


def interleaved(steps: dict, rounds: int, per_round: int, warmup: int) -> dict[str, float]:
    """Median steps/s of each contender, timed in alternating order round by round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            rates[name].append(per_round / (time.perf_counter() - start))
    return {name: statistics.median(v) for name, v in rates.items()}


def report(title: str, rates: dict[str, float]) -> None:
    base = rates["native"]
    print(title)
    for name, rate in rates.items():
        print(f"  {name:<14} {rate:9.1f} steps/s   {rate / base:5.2f}x native")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads mostly measure contention; "
                        "0 = torch's choice)")
    p.add_argument("--batches", default="64,256", help="digits training batch sizes")
    p.add_argument("--resnet-batch", type=int, default=8, help="0 skips the resnet18 inference part")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, median")
    gen = torch.Generator().manual_seed(0)
    for batch in (int(b) for b in args.batches.split(",") if b):
        models = digits_models()
        x = torch.rand(batch, 1, 8, 8, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        steps = {name: train_step_fn(m, x, y) for name, m in models.items()}
        per_round = max(5, 2560 // batch)
        report(f"digits CNN training, batch {batch} ({per_round} SGD steps per round)",
               interleaved(steps, args.rounds, per_round, warmup=5))
    if args.resnet_batch:
        models = resnet18_models()
        x = torch.randn(args.resnet_batch, 3, 224, 224, generator=gen)
        steps = {name: forward_fn(m, x) for name, m in models.items()}
        report(f"resnet18 inference, batch {args.resnet_batch} (forward, no_grad)",
               interleaved(steps, args.rounds, 2, warmup=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

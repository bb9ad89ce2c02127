"""Train a small GPT-2-style byte-level language model on the Python standard library's sources.

    .venv/bin/python -m tools.make_text_model [--out .cache/text_model] [--steps 1200] [--threads 1]
        [--exporter legacy|dynamo]

Nothing is downloaded: the corpus is the interpreter's own standard library
(``sysconfig.get_paths()["stdlib"]``), its ``.py`` files in sorted order,
without ``site-packages`` (installed packages, not the standard library) and
without test suites (``test``/``tests``/``idle_test`` folders: mostly test
data and fixtures). Every 10th file of that sorted list is held out (an even
spread over the packages); the model never sees those files, neither does
onnxprune's calibration.

The model (plain torch, written here so that the exported graph is the plain
GPT-2 form: a fused QKV projection split in three, Reshape to heads, MatMul /
causal mask / Softmax / MatMul, a 4x MLP with tanh GELU, pre-LayerNorm
residual blocks, learned positions): 256-byte vocabulary (no specials; files
are joined with a NUL byte), context 128, ``--layers`` 4, ``--hidden`` 256,
``--heads`` 8. The output projection is not tied to the embedding (a tied
table would be one initializer read by a Gather and a MatMul; untied costs
65K parameters at this vocabulary). No dropout: the budget is far below one
epoch of the corpus, the model underfits.

Training: AdamW (lr 2e-3, weight decay 0.1 on matrices), linear warm-up then
cosine decay, gradient clipping at 1, batch 32 random windows of the training
stream for ``--steps`` steps; seed fixed, ``--threads`` torch threads (1 by
default: one thread makes the run repeatable bit for bit on one machine).

Written to ``--out`` (``.cache/`` is git-ignored):

- ``model.onnx``: ``input_ids`` int64 (batch, seq) -> ``logits`` float32
  (batch, seq, 256); batch and seq dynamic (seq at most 128);
- ``calib.npz``: ``--calib`` windows from the training files at seeded random
  offsets, ``input_ids`` (N, 128) and ``labels`` (N, 128), the next bytes;
- ``heldout.npz``: ``--heldout`` windows evenly spaced over the held-out
  stream, same arrays;
- ``manifest.json``: the corpus (files, bytes), the settings, the losses,
  the held-out perplexity of the model (onnxruntime, the exported file) and
  of a unigram model (training-byte frequencies, add-one smoothed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONTEXT = 128
VOCAB = 256
SEPARATOR = b"\0"  # between files: a byte Python sources do not contain
EXCLUDED = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
HELD_OUT_EVERY = 10


# --- the corpus ------------------------------------------------------------------------------

def corpus_files(stdlib: Path | None = None) -> list[Path]:
    """The standard library's .py files, sorted by their path relative to the stdlib folder."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDED & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, held out): every ``HELD_OUT_EVERY``-th file is held out."""
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def byte_stream(files: list[Path]) -> np.ndarray:
    return np.frombuffer(SEPARATOR.join(f.read_bytes() for f in files), dtype=np.uint8)


def windows(stream: np.ndarray, starts: np.ndarray) -> dict[str, np.ndarray]:
    """``input_ids`` = stream[s : s + 128], ``labels`` = stream[s + 1 : s + 129] for each start s."""
    index = starts[:, None] + np.arange(CONTEXT + 1)[None, :]
    chunk = stream[index].astype(np.int64)
    return {"input_ids": chunk[:, :-1], "labels": chunk[:, 1:]}


def evenly_spaced(stream: np.ndarray, count: int) -> np.ndarray:
    """Starts of ``count`` windows spread over the whole stream (non-overlapping when it is long enough)."""
    return np.linspace(0, len(stream) - CONTEXT - 1, count).astype(np.int64)


# --- the model ---------------------------------------------------------------------------------

def build_model(layers: int = 4, hidden: int = 256, heads: int = 8, mlp: int = 4):
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(hidden, 3 * hidden)
            self.proj = nn.Linear(hidden, hidden)
            # an additive causal mask, sliced to the sequence: a constant the export folds, not shape logic
            mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split(hidden, dim=2)
            q, k, v = (z.view(b, t, heads, hidden // heads).transpose(1, 2) for z in (q, k, v))
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(hidden // heads)) + self.mask[:t, :t]
            y = scores.softmax(-1) @ v
            return self.proj(y.transpose(1, 2).reshape(b, t, hidden))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.attn = nn.LayerNorm(hidden), Attention()
            self.ln2 = nn.LayerNorm(hidden)
            self.mlp = nn.Sequential(nn.Linear(hidden, mlp * hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp * hidden, hidden))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class ByteGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, hidden), nn.Embedding(CONTEXT, hidden)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(hidden)
            self.head = nn.Linear(hidden, VOCAB, bias=False)
            for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), residual outputs scaled down
                if p.dim() > 1:
                    std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") or ".mlp.2." in name else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, input_ids):
            t = input_ids.shape[1]
            x = self.wte(input_ids) + self.wpe.weight[:t]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return ByteGPT()


# --- training ------------------------------------------------------------------------------------

def train(model, stream: np.ndarray, steps: int, batch: int, lr: float, seed: int, log_every: int = 100):
    import torch

    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(stream.astype(np.int64))
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    # warm-up avoids early Adam blow-ups; cosine to 10% settles the end without a tuned schedule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    started, history, running = time.perf_counter(), [], 0.0
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=gen)
        chunk = data[starts[:, None] + torch.arange(CONTEXT + 1)[None, :]]
        logits = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running += loss.item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            history.append({"step": step, "loss": running / n, "seconds": time.perf_counter() - started})
            print(f"step {step:5d}  loss {running / n:.4f}  {time.perf_counter() - started:7.1f} s", flush=True)
            running = 0.0
    model.eval()
    return history, time.perf_counter() - started


def export(model, path: Path, exporter: str = "legacy") -> None:
    import torch

    example = (torch.zeros(2, CONTEXT, dtype=torch.int64),)
    names = {"input_names": ["input_ids"], "output_names": ["logits"]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice, asked for on purpose
        if exporter == "legacy":
            torch.onnx.export(model, example, str(path), opset_version=17, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                              **names)
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=CONTEXT)
            torch.onnx.export(model, example, str(path), dynamo=True, external_data=False,
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}}, **names)


# --- measuring ---------------------------------------------------------------------------------------

def perplexity(model, data: dict[str, np.ndarray], batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) over all positions of ``data``, with onnxruntime.

    ``model``: a path or bytes. Log-softmax in float64 so that the mean is the model's, not rounding's.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    for i in range(0, len(data["input_ids"]), batch_size):
        ids, labels = data["input_ids"][i:i + batch_size], data["labels"][i:i + batch_size]
        logits = sess.run(["logits"], {"input_ids": ids})[0].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
        total += float((log_z - picked).sum())
        count += labels.size
    return math.exp(total / count)


def unigram_perplexity(train_stream: np.ndarray, labels: np.ndarray) -> float:
    counts = np.bincount(train_stream, minlength=VOCAB).astype(np.float64) + 1.0  # add-one: unseen bytes
    log_p = np.log(counts / counts.sum())
    return math.exp(-float(log_p[labels.reshape(-1)].mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "text_model")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--calib", type=int, default=2048, help="calibration windows (from the training files)")
    p.add_argument("--heldout", type=int, default=512, help="held-out windows (from the held-out files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    files = corpus_files()
    train_files, held_files = split_files(files)
    train_stream, held_stream = byte_stream(train_files), byte_stream(held_files)
    print(f"corpus {len(files)} files ({len(train_files)} train, {len(held_files)} held out), "
          f"{len(train_stream) / 1e6:.2f} MB train, {len(held_stream) / 1e6:.2f} MB held out")
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    calib = windows(train_stream, np.sort(rng.integers(0, len(train_stream) - CONTEXT - 1, args.calib)))
    held = windows(held_stream, evenly_spaced(held_stream, args.heldout))
    np.savez(args.out / "calib.npz", **calib)
    np.savez(args.out / "heldout.npz", **held)

    model = build_model(args.layers, args.hidden, args.heads)
    params = sum(p.numel() for p in model.parameters())
    print(f"model {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {params / 1e6:.2f}M parameters; "
          f"{args.steps} steps of {args.batch} x {CONTEXT} bytes ({args.steps * args.batch * CONTEXT / 1e6:.1f}M "
          f"tokens), {args.threads} thread(s)")
    history, seconds = train(model, train_stream, args.steps, args.batch, args.lr, args.seed)
    path = args.out / "model.onnx"
    export(model, path, args.exporter)
    ppl = perplexity(path, held)
    calib_ppl = perplexity(path, {k: v[:512] for k, v in calib.items()})
    unigram = unigram_perplexity(train_stream, held["labels"])
    with torch.no_grad():  # the export must compute what the torch model does
        ids = torch.from_numpy(held["input_ids"][:8])
        logits = model(ids).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    deviation = float(np.abs(got - logits).max())
    manifest = {
        "stdlib": sysconfig.get_paths()["stdlib"], "python": sys.version.split()[0],
        "files": len(files), "train_files": len(train_files), "heldout_files": len(held_files),
        "train_bytes": int(len(train_stream)), "heldout_bytes": int(len(held_stream)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": params, "train_seconds": seconds, "history": history,
        "heldout_perplexity": ppl, "calib_perplexity": calib_ppl, "unigram_perplexity": unigram,
        "export_max_abs_deviation": deviation, "torch": torch.__version__,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"trained in {seconds:.0f} s; export {args.exporter}, max |onnx - torch| {deviation:.2e}")
    print(f"held-out perplexity {ppl:.3f} ({held['labels'].size} tokens in {args.heldout} windows); "
          f"calibration windows {calib_ppl:.3f}; unigram {unigram:.3f}")
    print(f"wrote {path}, calib.npz ({args.calib} windows), heldout.npz, manifest.json in {args.out}")
    return 0 if ppl < unigram / 2 else 1


if __name__ == "__main__":
    sys.exit(main())

"""The command line's shared pieces: a parser that fails in one line, value types, option groups,
and the flag each option of options.py is given by (for messages: the library names options
in backticks, `round_to`; the command line shows --round-to)."""

from __future__ import annotations

import argparse
import re
import sys

from ..errors import UsageError, escape

# option (as options.py and the library's messages name it) -> flag, shared by the commands that have it
COMMON_FLAGS = {
    "input_shapes": "--input-shape", "ignore": "--ignore", "prune_hidden": "--prune-hidden",
    "allow_io_change": "--allow-io-change", "importance": "--importance", "round_to": "--round-to",
    "prune_kv_groups": "--prune-kv-groups",
    "min_channels": "--min-channels", "seed": "--seed", "data": "--data", "calib_samples": "--calib-samples",
    "batch_size": "--batch-size", "compensate": "--compensate", "reconstruct": "--reconstruct",
    "size": "--image-size", "mean": "--mean",
    "std": "--std", "channel_order": "--channel-order", "layout": "--layout", "quiet": "--quiet",
}


def render(text: str, flags: dict[str, str]) -> str:
    """``text`` with each `option` the command has a flag for shown as that flag."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), text)


def message_line(message: str, flags: dict[str, str]) -> str:
    """A message as the one line the terminal gets: flags for options, and every non-printable
    character escaped (a model's node names and a folder's file names may hold any)."""
    return escape(render(message, flags))


def warn(message: str, flags: dict[str, str]) -> None:
    print(f"onnxprune: warning: {message_line(message, flags)}", file=sys.stderr)


def show(text: str, flags: dict[str, str] | None = None, file=None) -> None:
    """Print ``text`` (a summary, a table: lines) on stdout (or ``file``: stderr when a JSON takes
    stdout), escaped like messages, newlines kept. Every command prints through here and ``warn``;
    files get the real names."""
    print(escape(render(text, flags or {}), keep_newlines=True), file=file)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def _number(convert, valid, requirement: str):
    """An argparse type: ``convert`` the text, then check it (``valid`` is False for NaN too)."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
        return value

    return parse


_ratio = _number(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
_positive = _number(int, lambda v: v >= 1, "must be at least 1")


def _round_to(text: str):
    """--round-to: a positive integer, or 'auto' (planning/plan.py's default rounding)."""
    return text if text == "auto" else _positive(text)


_count = _number(int, lambda v: v >= 0, "must be at least 0")
_seed = _number(int, lambda v: 0 <= v < 2**32, "must be in [0, 2^32)")
_nonneg_float = _number(float, lambda v: 0 <= v < float("inf"), "must be a finite number >= 0")
_fraction = _number(float, lambda v: 0 < v <= 1, "the fraction kept must be in (0, 1]")
_speedup = _number(float, lambda v: 0 < v < float("inf"), "must be a positive number")
_reduction = _number(float, lambda v: 0 < v < float("inf"), "must be a positive number (original MACs / pruned MACs)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected H,W (positive integers), got {text!r}")
    return int(parts[0]), int(parts[1])


def _batches(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        try:
            values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must be at least 1, got {text}")
    return values


def _nm(text: str) -> tuple[int, int]:
    from ..checks import parse_nm

    try:
        return parse_nm(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin a dynamic input's dims for analysis and verification (repeatable)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="node names, module paths (dynamo exports) or weight names (globs) to leave alone; "
                        "blocks their groups; one that matches nothing warns (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _importance_option(p: argparse.ArgumentParser, data_note: bool = True) -> None:
    from ..scoring.criteria import CRITERIA, needs_data

    note = f"; {', '.join(c for c in CRITERIA if needs_data(c))} need --data" if data_note else ""
    p.add_argument("--importance", choices=CRITERIA, metavar="NAME",
                   help=f"channel importance: {', '.join(CRITERIA)} (default l1; obs where ratios are "
                        f"allocated by sensitivity with --data{note})")


def _width_options(p: argparse.ArgumentParser) -> None:
    """How kept widths are rounded and bounded: shared by prune and sensitivity."""
    p.add_argument("--round-to", type=_round_to, metavar="N|auto",
                   help="kept channels per group are a multiple of N; 1 keeps the exact counts (default auto: "
                        "multiples of 8, halved while more than 12.5%% off the requested count; with --provider, "
                        "its measured multiple)")
    p.add_argument("--min-channels", type=_positive, default=1, metavar="N",
                   help="never keep fewer than N channels in a group (default 1)")


def _analysis_options(p: argparse.ArgumentParser) -> None:
    """What may be grouped and cut: shared by prune, info and sensitivity."""
    p.add_argument("--prune-hidden", action="store_true",
                   help="also prune the hidden size of transformers (through LayerNorm and embeddings; "
                        "needs recovery training)")
    p.add_argument("--allow-io-change", action="store_true",
                   help="let attention heads that reach graph inputs/outputs (a decoder's KV cache) be pruned: "
                        "those tensors' head axis shrinks; the report lists their new shapes")
    p.add_argument("--prune-kv-groups", action="store_true",
                   help="grouped-query attention: remove whole key/value heads with their query heads (default: "
                        "query heads within each key/value group, as many in every group; the key/value "
                        "projections and the KV cache stay whole)")


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data (for the data criteria, reconstruction and bias compensation)")
    g.add_argument("--data", metavar="PATH", help="FILE.npz (arrays named after the inputs, optional 'labels'), "
                   "or a folder of .npz / .npy files or of images")
    g.add_argument("--calib-samples", type=_positive, metavar="N", help="use N samples drawn with --seed (default all)")
    g.add_argument("--batch-size", type=_positive, metavar="N",
                   help="samples per run (default 32, or the model's fixed batch; training: 64, the global batch "
                        "that torchrun's processes share)")
    g.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the layers after each cut by least squares so that they reproduce the original's "
                        "outputs on the data, kept if the model's outputs improve on samples it did not fit "
                        "(default: on with --data)")
    g.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="fold removed channels' mean output into the next layer's bias (default: on with --data)")
    g.add_argument("--image-size", type=_size, metavar="H,W", help="images: resize to H,W (default: the model input's)")
    g.add_argument("--mean", type=_floats, metavar="M0,M1,M2", help="images: per-channel mean after scaling to [0, 1]")
    g.add_argument("--std", type=_floats, metavar="S0,S1,S2", help="images: per-channel std after scaling to [0, 1]")
    g.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb", help="images: channel order (default rgb)")
    g.add_argument("--layout", choices=("nchw", "nhwc"), help="images: tensor layout (default: from the input shape)")


def _training_options(p: argparse.ArgumentParser) -> None:
    from ..options import TrainOptions

    g = p.add_argument_group("recovery (needs --data; the original model is the teacher)")
    g.add_argument("--distill", action="store_true", help="knowledge distillation from the original model (no labels)")
    g.add_argument("--finetune", action="store_true", help="fine-tune on the labels in --data")
    g.add_argument("--epochs", type=_positive, default=3, metavar="N", help="training epochs (default 3)")
    g.add_argument("--lr", type=_nonneg_float, default=TrainOptions.lr,
                   help=f"Adam learning rate (default {TrainOptions.lr:g}, for pretrained weights; a small model "
                   "trained from scratch wants about 1e-3)")
    g.add_argument("--distill-loss", choices=("auto", "kl", "mse"), default="auto",
                   help="auto: KL on temperature-softened logits over the last axis for (batch, classes) "
                        "and (batch, seq, vocab) outputs (per sample, per token), else MSE")
    g.add_argument("--temperature", type=_nonneg_float, default=4.0, help="distillation temperature (default 4)")
    g.add_argument("--feature-distill", type=_nonneg_float, default=0.0, metavar="W",
                   help="also match the cut groups' inputs and the block outputs at the kept channels, "
                        "their mean MSE weighted by W")
    g.add_argument("--loss", choices=("auto", "ce", "mse"), default="auto",
                   help="fine-tuning loss: auto = cross-entropy for logits with integer labels, else MSE")
    g.add_argument("--sparsity-reg", type=_nonneg_float, default=0.0, metavar="LAMBDA",
                   help="group-lasso regularisation of the channel groups during training")
    g.add_argument("--steps", type=_positive, default=1, metavar="K",
                   help="prune in K rounds, re-scoring and recovering between rounds")
    g.add_argument("--val-fraction", type=_ratio, default=0.1, metavar="F",
                   help="held-out validation fraction of --data (default 0.1)")
    g.add_argument("--device", default="auto",
                   help="training device: auto (CUDA when available), cpu, cuda[:N]; on CUDA the forward pass "
                        "runs under autocast (bfloat16, or float16 with loss scaling)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random resized crops (35-100%% of the area) and flips of the training batches, the "
                        "teacher seeing the same (default: on when --data is a folder of images)")
    g.add_argument("--max-accuracy-drop", type=_nonneg_float, metavar="P",
                   help="fail (exit 6, nothing written) if top-1 accuracy drops more than P points")
    g.add_argument("--max-output-error", type=_nonneg_float, metavar="E",
                   help="fail (exit 6, nothing written) if the relative RMS output error exceeds E")


def training_options(args):
    from ..options import TrainOptions

    if not (args.distill or args.finetune):
        for flag in ("sparsity_reg", "feature_distill", "augment"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies during training: add --distill or --finetune")
        return None
    return TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size or 64, distill=args.distill,
                        finetune=args.finetune, distill_loss=args.distill_loss, temperature=args.temperature,
                        loss=args.loss, feature_weight=args.feature_distill, sparsity_reg=args.sparsity_reg,
                        val_fraction=args.val_fraction, device=args.device, seed=args.seed, quiet=args.quiet,
                        augment=args.augment)


def image_options(args):
    from ..data import ImageOptions

    options = ImageOptions(channel_order=args.channel_order, layout=args.layout, size=args.image_size)
    if args.mean:
        options.mean = args.mean
    if args.std:
        options.std = args.std
    return options


def analysis_options(args):
    from ..model.inputs import parse_input_shapes
    from ..options import AnalysisOptions

    return AnalysisOptions(parse_input_shapes(args.input_shape), tuple(args.ignore), args.prune_hidden,
                           args.allow_io_change, args.prune_kv_groups)


def data_options(args):
    from ..options import DataOptions

    return DataOptions(args.data, args.calib_samples, args.batch_size, args.compensate, image_options(args),
                       getattr(args, "reconstruct", None))

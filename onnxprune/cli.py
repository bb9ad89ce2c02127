"""Command line: argparse front, no logic. Errors -> one line on stderr + exit code."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from . import __version__
from .errors import EXIT_CODES, OnnxPruneError, UsageError
from .errors import first_line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 1:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin a dynamic input's dims for analysis and verification (repeatable)")
    p.add_argument("--ignore", action="append", default=[], metavar="GLOB",
                   help="node or weight names (globs) to leave alone; blocks their groups (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _analysis_options(p: argparse.ArgumentParser) -> None:
    """What may be grouped and cut: shared by prune, info and sensitivity."""
    p.add_argument("--prune-hidden", action="store_true",
                   help="also prune the hidden size of transformers (through LayerNorm and embeddings; "
                        "needs recovery training)")
    p.add_argument("--allow-io-change", action="store_true",
                   help="let attention heads that reach graph inputs/outputs (a decoder's KV cache) be pruned: "
                        "those tensors' head axis shrinks; the report lists their new shapes")


def build_parser() -> argparse.ArgumentParser:
    from .importance import CRITERIA, needs_data

    p = _Parser(
        prog="onnxprune",
        description="Structured pruning of ONNX models: removes channels, writes a smaller, verified model.",
        epilog="Also: 'onnxprune info MODEL' describes the prunable groups; 'onnxprune bench A.onnx "
        "B.onnx' times models side by side with onnxruntime; 'onnxprune sensitivity MODEL --data D' "
        "measures how much each group matters. Exit codes: "
        + "; ".join(f"{k} {v.split(' (')[0]}" for k, v in EXIT_CODES.items()),
    )
    p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    p.add_argument("model", help="input .onnx file (never modified)")
    p.add_argument("--structured", type=_ratio, metavar="R", help="fraction of each group's channels to remove")
    p.add_argument("-o", "--output", help="output path (default: MODEL.pruned.onnx beside the input)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output (or the input)")
    p.add_argument("--importance", default="l1", choices=CRITERIA, metavar="NAME",
                   help=f"channel importance: {', '.join(CRITERIA)} (default l1; "
                        f"{', '.join(c for c in CRITERIA if needs_data(c))} need --data)")
    p.add_argument("--head-ratio", type=_ratio, metavar="R",
                   help="fraction of attention heads to remove (default: the --structured ratio)")
    _analysis_options(p)
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels of all groups together instead of R per group")
    p.add_argument("--round-to", type=_positive, default=1, metavar="N",
                   help="kept channels per group are a multiple of N (default 1)")
    p.add_argument("--min-channels", type=_positive, default=1, metavar="N",
                   help="never keep fewer than N channels in a group (default 1)")
    p.add_argument("--max-group-ratio", type=_ratio, default=0.9, metavar="R",
                   help="with --global: remove at most R of any one group (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed for --importance random and generated inputs")
    p.add_argument("--report", metavar="FILE.json", help="write a JSON report")
    p.add_argument("--dry-run", action="store_true", help="plan and report only; write no model")
    p.add_argument("--plan-out", metavar="FILE.json", help="save the kept channel indices per group")
    p.add_argument("--plan-in", metavar="FILE.json", help="apply a saved plan exactly (instead of --structured)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every pruned group")
    _group_ratio_options(p)
    _data_options(p)
    _training_options(p)
    _sparsity_options(p)
    _target_options(p)
    _common(p)
    return p


def _nm(text: str) -> tuple[int, int]:
    from .sparsity import parse_nm

    try:
        return parse_nm(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sparsity_options(p: argparse.ArgumentParser) -> None:
    from .sparsity import MIN_ELEMENTS

    g = p.add_argument_group("sparsity (zero single weights; after --structured, or alone)")
    g.add_argument("--unstructured", type=_ratio, metavar="R",
                   help="zero the fraction R of each weight tensor, lowest |w| first (with --global: of all "
                        "weights ranked together)")
    g.add_argument("--nm", type=_nm, metavar="N:M",
                   help="keep the N largest of every M consecutive weights along the reduction axis (e.g. 2:4)")
    g.add_argument("--min-elements", type=_count, default=MIN_ELEMENTS, metavar="N",
                   help=f"leave weight tensors with fewer than N elements dense (default {MIN_ELEMENTS})")


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


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data (for the data criteria and bias compensation)")
    g.add_argument("--data", metavar="PATH", help="FILE.npz (arrays named after the inputs, optional 'labels'), "
                   "or a folder of .npz / .npy files or of images")
    g.add_argument("--calib-samples", type=_positive, metavar="N", help="use N samples drawn with --seed (default all)")
    g.add_argument("--batch-size", type=_positive, metavar="N", help="samples per run (default 32, or the model's fixed batch)")
    g.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="fold removed channels' mean output into the next layer's bias (default: on with --data)")
    g.add_argument("--image-size", type=_size, metavar="H,W", help="images: resize to H,W (default: the model input's)")
    g.add_argument("--mean", type=_floats, metavar="M0,M1,M2", help="images: per-channel mean after scaling to [0, 1]")
    g.add_argument("--std", type=_floats, metavar="S0,S1,S2", help="images: per-channel std after scaling to [0, 1]")
    g.add_argument("--channel-order", choices=("rgb", "bgr"), default="rgb", help="images: channel order (default rgb)")
    g.add_argument("--layout", choices=("nchw", "nhwc"), help="images: tensor layout (default: from the input shape)")


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recovery (needs --data; the original model is the teacher)")
    g.add_argument("--distill", action="store_true", help="knowledge distillation from the original model (no labels)")
    g.add_argument("--finetune", action="store_true", help="fine-tune on the labels in --data")
    g.add_argument("--epochs", type=_positive, default=3, metavar="N", help="training epochs (default 3)")
    g.add_argument("--lr", type=_nonneg_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    g.add_argument("--distill-loss", choices=("auto", "kl", "mse"), default="auto",
                   help="auto: KL on temperature-softened (batch, classes) logits, else MSE")
    g.add_argument("--temperature", type=_nonneg_float, default=4.0, help="distillation temperature (default 4)")
    g.add_argument("--feature-distill", type=_nonneg_float, default=0.0, metavar="W",
                   help="also match intermediate features at the kept channels, with weight W")
    g.add_argument("--loss", choices=("auto", "ce", "mse"), default="auto",
                   help="fine-tuning loss: auto = cross-entropy for logits with integer labels, else MSE")
    g.add_argument("--sparsity-reg", type=_nonneg_float, default=0.0, metavar="LAMBDA",
                   help="group-lasso regularisation of the channel groups during training")
    g.add_argument("--steps", type=_positive, default=1, metavar="K",
                   help="prune in K rounds, re-scoring and recovering between rounds")
    g.add_argument("--val-fraction", type=_ratio, default=0.1, metavar="F",
                   help="held-out validation fraction of --data (default 0.1)")
    g.add_argument("--device", default="auto", help="training device: auto (CUDA when available), cpu, cuda[:N]")
    g.add_argument("--max-accuracy-drop", type=_nonneg_float, metavar="P",
                   help="fail (exit 6, nothing written) if top-1 accuracy drops more than P points")
    g.add_argument("--max-output-error", type=_nonneg_float, metavar="E",
                   help="fail (exit 6, nothing written) if the relative RMS output error exceeds E")


def training_options(args):
    from .recover import TrainOptions

    if not (args.distill or args.finetune):
        for flag in ("sparsity_reg", "feature_distill"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} applies during training: add --distill or --finetune")
        return None
    return TrainOptions(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size or 64, distill=args.distill,
                        finetune=args.finetune, distill_loss=args.distill_loss, temperature=args.temperature,
                        loss=args.loss, feature_weight=args.feature_distill, sparsity_reg=args.sparsity_reg,
                        val_fraction=args.val_fraction, device=args.device, seed=args.seed, quiet=args.quiet)


def image_options(args):
    from .data import ImageOptions

    options = ImageOptions(channel_order=args.channel_order, layout=args.layout, size=args.image_size)
    if args.mean:
        options.mean = args.mean
    if args.std:
        if any(s <= 0 for s in args.std):
            raise UsageError(f"--std values must be positive, got {args.std}")
        options.std = args.std
    return options


def build_info_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune info", description="Params, MACs and channel groups of a model.")
    p.add_argument("model")
    _analysis_options(p)
    p.add_argument("--json", metavar="FILE.json", help="write the description as JSON")
    _common(p)
    return p


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


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def build_bench_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxprune bench",
        description="onnxruntime latency of models side by side: warm-up, then timed runs interleaved "
        "round-robin; median, p90, p99 and speedup over the first model.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files; the first is the speedup reference")
    p.add_argument("--provider", default="cpu",
                   help="cpu, cuda, or a full onnxruntime provider name (default cpu)")
    p.add_argument("--batch", type=_batches, default=[1], metavar="B1,B2,...",
                   help="batch sizes (dim 0 of every input; default 1)")
    p.add_argument("--threads", type=_positive, metavar="N", help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--warmup", type=_count, default=10, metavar="W", help="untimed runs per model and batch (default 10)")
    p.add_argument("--iters", type=_positive, default=100, metavar="N",
                   help="timed runs per model and batch (default 100)")
    p.add_argument("--json", metavar="FILE.json", help="write the timings as JSON")
    p.add_argument("--input-shape", action="append", metavar="NAME:D0,D1,...",
                   help="pin a dynamic input's other dims (dim 0 comes from --batch; repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _check_flags(args, argv) -> None:
    if args.plan_in and args.structured is not None:
        raise UsageError("--plan-in and --structured are exclusive: a plan already says what to cut")
    if args.plan_in and any(a.split("=")[0] in ("--importance", "--global", "--round-to") for a in argv):
        raise UsageError("--plan-in applies a plan exactly; --importance/--global/--round-to do not apply")
    sparse = args.unstructured is not None or args.nm is not None
    if args.unstructured is not None and args.nm is not None:
        raise UsageError("--unstructured and --nm are exclusive: choose one sparsity pattern")
    if args.nm is not None and args.global_ranking and args.structured is None:
        raise UsageError("--global ranks channels or --unstructured weights; --nm keeps N of every M in place")
    if (args.plan_in is None and args.structured is None and not sparse and args.ratios is None
            and not _targeted(args)):
        raise UsageError("nothing to do: give --structured R, --target-macs F, --plan-in FILE, --unstructured R "
                         "or --nm N:M")
    if args.dry_run and args.output:
        raise UsageError("--dry-run writes no model; drop --output (use --plan-out or --report)")


def run_prune(argv: list[str]) -> int:
    from .api import prune_file
    from .model import parse_input_shapes

    args = build_parser().parse_args(argv)
    target, bench = _target_and_bench(args, argv)
    _check_flags(args, argv)
    ratios = _group_ratios(args)
    report = prune_file(
        args.model, args.output, args.structured,
        force=args.force, dry_run=args.dry_run, plan_in=args.plan_in, plan_out=args.plan_out,
        report_path=args.report, seed=args.seed,
        importance=args.importance, global_ranking=args.global_ranking, round_to=_round_to(args, argv),
        min_channels=args.min_channels, max_group_ratio=args.max_group_ratio,
        ignore=tuple(args.ignore), input_shapes=parse_input_shapes(args.input_shape),
        data=args.data, calib_samples=args.calib_samples, batch_size=args.batch_size,
        compensate=args.compensate, images=image_options(args), head_ratio=args.head_ratio,
        prune_hidden=args.prune_hidden, allow_io_change=args.allow_io_change, quiet=args.quiet, train=training_options(args), steps=args.steps,
        max_accuracy_drop=args.max_accuracy_drop, max_output_error=args.max_output_error,
        unstructured=args.unstructured, nm=args.nm, min_elements=args.min_elements,
        ratios=ratios, allocate=args.allocate, target=target, bench=bench,
    )
    for w in report.warnings:
        print(f"onnxprune: warning: {w}", file=sys.stderr)
    if not args.quiet:
        print(report.summary(verbose=args.verbose))
        if args.verbose and report.allocation:
            from .sensitivity import format_allocation

            print(format_allocation(report.allocation))
        if report.written:
            print(f"wrote   {report.output}")
        elif args.dry_run:
            print("dry run: nothing written")
        if report.bench is not None:
            from .bench import format_table

            print(format_table(report.bench))
    return 0


# --- budgets (--target-*), hardware rounding (--provider) and --bench ------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"the fraction kept must be in (0, 1], got {text}")
    return value


def _speedup(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets and hardware (a --target-* replaces --structured: the ratio is searched for)")
    g.add_argument("--target-macs", type=_fraction, metavar="F",
                   help="remove channels until at most the fraction F of the MACs is left (e.g. 0.5)")
    g.add_argument("--target-params", type=_fraction, metavar="F",
                   help="remove channels until at most the fraction F of the parameters is left")
    g.add_argument("--target-speedup", type=_speedup, metavar="S",
                   help="remove channels until the model runs S times faster on --provider (measured at the first "
                        "--bench-batch; at most 8 benchmark runs)")
    g.add_argument("--provider", metavar="NAME",
                   help="the runtime the model is for (cpu, cuda): the default --round-to comes from its measured "
                        "table (onnxprune/hardware.py); --target-speedup times on it")
    g.add_argument("--bench", metavar="PROVIDER",
                   help="after writing, time the input and the output side by side on PROVIDER (cpu, cuda)")
    g.add_argument("--bench-batch", type=_batches, metavar="B1,B2,...",
                   help="batch sizes for --bench (default 1); --target-speedup uses the first")
    g.add_argument("--bench-iters", type=_positive, metavar="N",
                   help="timed runs per model and batch (default 100 for --bench, 20 per --target-speedup candidate)")
    g.add_argument("--threads", type=_positive, metavar="N",
                   help="intra-op threads for --bench and --target-speedup (default: onnxruntime's)")


def _targeted(args) -> bool:
    return any(v is not None for v in (args.target_macs, args.target_params, args.target_speedup))


def _target_and_bench(args, argv):
    """The --target-* budget and the --bench request; provider availability is checked here, before any work."""
    from .target import Latency, Target, check_combination

    given = [(metric, value) for metric, value in (("macs", args.target_macs), ("params", args.target_params),
                                                   ("speedup", args.target_speedup)) if value is not None]
    if len(given) > 1:
        raise UsageError("--target-macs, --target-params and --target-speedup are exclusive: choose one budget")
    timed = bool(args.bench) or args.target_speedup is not None
    for flag in ("--bench-batch", "--bench-iters", "--threads"):
        if not timed and any(a.split("=")[0] == flag for a in argv):
            raise UsageError(f"{flag} applies to --bench and --target-speedup")
    batches = tuple(args.bench_batch or (1,))
    target = None
    if given:
        metric, value = given[0]
        latency = None
        if metric == "speedup" and args.provider:
            latency = Latency(args.provider, batches[:1], args.threads, warmup=3, iters=args.bench_iters or 20)
        target = Target(metric, value, latency)
        check_combination(target, args.structured, args.plan_in, args.steps, args.allocate)
        target.check()
    bench = None
    if args.bench:
        bench = Latency(args.bench, batches, args.threads, iters=args.bench_iters or 100)
        if args.dry_run:
            raise UsageError("--bench times the written model: drop --dry-run")
        bench.check()
    return target, bench


def _round_to(args, argv) -> int:
    """An explicit --round-to wins; else the --provider's measured multiple; else 1."""
    if any(a.split("=")[0] == "--round-to" for a in argv) or not args.provider:
        return args.round_to
    from .hardware import round_to_for

    return round_to_for(args.provider)


def run_info(argv: list[str]) -> int:
    import json

    from .api import analyse
    from .model import check_side_files, load_model, parse_input_shapes, write_text_file
    from .stats import count_macs, count_params, format_count

    args = build_info_parser().parse_args(argv)
    check_side_files(args.model, None, {"--json": args.json})
    model = load_model(args.model)
    analysis = analyse(model, parse_input_shapes(args.input_shape), tuple(args.ignore), args.prune_hidden,
                       args.allow_io_change)
    macs = count_macs(model, shapes=analysis.shapes.static)
    prunable = analysis.prunable
    blocked = [g for g in analysis.groups if g.blocked]
    info = {
        "params": count_params(model),
        "macs": macs,
        "inputs": {k: list(v) for k, v in analysis.shapes.pinned_inputs.items()},
        "prunable": [{"id": g.id, "sources": g.sources, "channels": g.size, "kind": g.kind,
                      "units": len(g.unit_members()), "nodes": len(g.nodes)} for g in prunable],
        "blocked": [{"id": g.id, "sources": g.sources, "channels": g.size, "reason": "; ".join(g.blocked)}
                    for g in blocked],
    }
    if args.json:
        write_text_file(args.json, json.dumps(info, indent=1) + "\n")
    if not args.quiet:
        shapes = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in info["inputs"].items())
        print(f"params {format_count(info['params'])}, MACs {format_count(macs)} at {shapes}")
        print(f"{len(prunable)} prunable group(s), {sum(g.size for g in prunable)} channels")
        for g in prunable:
            unit = "heads" if g.kind == "heads" else "units"
            tied = f", {len(g.unit_members())} {unit}" if len(g.unit_members()) != g.size else ""
            print(f"  {g.size:>5} ch{tied:<12} {', '.join(g.sources)}")
        print(f"{len(blocked)} blocked group(s)")
        for g in blocked:
            print(f"  {g.size:>5} ch  {', '.join(g.sources)}: {'; '.join(g.blocked)}")
    return 0


def run_bench(argv: list[str]) -> int:
    import json

    from .bench import bench, format_table
    from .model import ensure_writable, parse_input_shapes, write_text_file

    args = build_bench_parser().parse_args(argv)
    if args.json:
        ensure_writable(args.json, "--json")
    result = bench(args.models, args.batch, provider=args.provider, threads=args.threads,
                   warmup=args.warmup, iters=args.iters, input_shapes=parse_input_shapes(args.input_shape))
    if args.json:
        write_text_file(args.json, json.dumps(result.to_dict(), indent=1) + "\n")
    if not args.quiet:
        print(format_table(result))
    return 0


# --- per-group ratios and the sensitivity command ---------------------------------------
def _group_ratio_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-group ratios")
    g.add_argument("--ratios", metavar="FILE", help="JSON (or YAML) mapping of group id or source-node glob to a "
                   "ratio; other groups get --structured R (or stay whole without it)")
    g.add_argument("--allocate", choices=("sensitivity",),
                   help="sensitivity: measure each group's output error on --data and choose per-group ratios "
                        "that remove --structured R of all prunable channels with the least error")


def _group_ratios(args) -> dict | None:
    if (args.ratios or args.allocate) and args.steps > 1:
        raise UsageError("--ratios/--allocate choose per-group ratios once; they do not combine with --steps")
    if not args.ratios:
        return None
    from .sensitivity import load_ratios

    return load_ratios(args.ratios)


def _ratio_list(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        values.append(_ratio(part.strip()))
    return values


def build_sensitivity_parser() -> argparse.ArgumentParser:
    from .importance import CRITERIA
    from .sensitivity import DEFAULT_RATIOS

    p = _Parser(prog="onnxprune sensitivity",
                description="Prune each channel group alone at several ratios and measure the output error "
                            "(and top-1 accuracy, with labels) on calibration data.")
    p.add_argument("model")
    p.add_argument("--ratios-to-try", type=_ratio_list, default=list(DEFAULT_RATIOS), metavar="R1,R2,...",
                   help=f"ratios to cut each group at (default {','.join(f'{r:g}' for r in DEFAULT_RATIOS)})")
    p.add_argument("--importance", default="l1", choices=CRITERIA, metavar="NAME",
                   help=f"channel importance: {', '.join(CRITERIA)} (default l1)")
    p.add_argument("--round-to", type=_positive, default=1, metavar="N",
                   help="kept channels per group are a multiple of N (default 1)")
    p.add_argument("--min-channels", type=_positive, default=1, metavar="N",
                   help="never keep fewer than N channels in a group (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for --calib-samples and --importance random")
    p.add_argument("--json", metavar="FILE.json", help="write the measurements as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot error against ratio per group (needs matplotlib)")
    _analysis_options(p)
    _data_options(p)
    _common(p)
    return p


def run_sensitivity(argv: list[str]) -> int:
    import json
    import warnings

    from .data import load_data
    from .model import ensure_writable, load_model, parse_input_shapes, write_text_file
    from .sensitivity import measure_sensitivity, plot, require_matplotlib

    args = build_sensitivity_parser().parse_args(argv)
    if not args.data:
        raise UsageError("sensitivity measures output error on data: give --data FILE")
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path:
            ensure_writable(path, flag)
    if args.plot:
        require_matplotlib()  # before minutes of measuring, not after
    model = load_model(args.model)
    data = load_data(args.data, model, image_options(args)).sample(args.calib_samples, args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure_sensitivity(
            model, data, args.ratios_to_try, importance=args.importance, seed=args.seed, round_to=args.round_to,
            min_channels=args.min_channels, compensate=args.compensate is not False, batch_size=args.batch_size,
            input_shapes=parse_input_shapes(args.input_shape), ignore=tuple(args.ignore),
            prune_hidden=args.prune_hidden, allow_io_change=args.allow_io_change, quiet=args.quiet)
    for w in caught:
        print(f"onnxprune: warning: {w.message}", file=sys.stderr)
    if args.json:
        write_text_file(args.json, json.dumps({"model": args.model, "data": args.data, **result.to_json()},
                                              indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    if not args.quiet:
        print(result.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        if argv[:1] == ["info"]:
            return run_info(argv[1:])
        if argv[:1] == ["bench"]:
            return run_bench(argv[1:])
        if argv[:1] == ["sensitivity"]:
            return run_sensitivity(argv[1:])
        return run_prune(argv)
    except OnnxPruneError as exc:
        if debug:
            traceback.print_exc()
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): the work is done, stay quiet
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as exc:  # a bug: keep it to one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"onnxprune: internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

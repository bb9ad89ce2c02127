"""``onnxprune MODEL ...``: the pruning command."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import replace

from .. import __version__
from ..errors import EXIT_CODES, UsageError
from ..progress import start_stages
from .options import (
    COMMON_FLAGS,
    _analysis_options,
    _batches,
    _common,
    _count,
    _data_options,
    _fraction,
    _importance_option,
    _nm,
    _Parser,
    _positive,
    _ratio,
    _reduction,
    _seed,
    _speedup,
    _training_options,
    _width_options,
    analysis_options,
    data_options,
    show,
    training_options,
    warn,
)
from .output import human_stream
from .recipe import RawValues, add_config_option, expand_recipe, recorded


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="onnxprune",
        description="Structured pruning of ONNX models: removes channels, writes a smaller, verified model.",
        epilog="Also: 'onnxprune info MODEL' describes the prunable groups; 'onnxprune bench A.onnx "
        "B.onnx' times models side by side with onnxruntime; 'onnxprune sensitivity MODEL --data D' "
        "measures how much each group matters; 'onnxprune sweep MODEL --ratios-to-try 0.1,0.3' prunes at "
        "several ratios and measures each. Exit codes: "
        + "; ".join(f"{k} {v.split(' (')[0]}" for k, v in EXIT_CODES.items()),
    )
    p.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    p.add_argument("model", help="input .onnx file (never modified)")
    add_config_option(p)
    p.add_argument("--structured", type=_ratio, metavar="R", help="fraction of each group's channels to remove")
    p.add_argument("-o", "--output", help="output path (default: MODEL.pruned.onnx beside the input)")
    p.add_argument("--force", action="store_true",
                   help="replace existing output files (never a file the run reads, a link, a device or a FIFO)")
    _importance_option(p)
    p.add_argument("--head-ratio", type=_ratio, metavar="R",
                   help="fraction of attention heads to remove (default: the --structured ratio)")
    _analysis_options(p)
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels of all groups together instead of R per group")
    _width_options(p)
    p.add_argument("--max-group-ratio", type=_ratio, default=0.9, metavar="R",
                   help="with --global: remove at most R of any one group (default 0.9)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for --importance random and generated inputs")
    p.add_argument("--report", metavar="FILE.json", help="write a JSON report (- for stdout; the summary then goes "
                   "to stderr)")
    p.add_argument("--summary-md", metavar="FILE.md", help="write a Markdown summary (params, MACs, latency, accuracy, "
                   "what was pruned and what stayed whole and why) for a CI job summary; - for stdout")
    p.add_argument("--dry-run", action="store_true", help="plan and report only; write no model")
    p.add_argument("--plan-out", metavar="FILE.json",
                   help="save the kept channel indices per group (- for standard output)")
    p.add_argument("--plan-in", metavar="FILE.json", help="apply a saved plan exactly (instead of --structured)")
    p.add_argument("-v", "--verbose", action="store_true", help="list every pruned group")
    _group_ratio_options(p)
    _depth_options(p)
    _data_options(p)
    _training_options(p)
    _sparsity_options(p)
    _target_options(p)
    _quantize_options(p)
    _common(p)
    return p


def _quantize_options(p: argparse.ArgumentParser) -> None:
    from ..pipeline.quantize import QUANT_FORMATS, QUANT_TYPES

    g = p.add_argument_group("quantization (after pruning and recovery, with onnxruntime.quantization)")
    g.add_argument("--quantize", choices=QUANT_TYPES,
                   help="write the pruned model quantized, weights in this type (activations uint8): static, "
                        "calibrated on --data, or dynamic without it; verification and the quality gates judge "
                        "the quantized model")
    g.add_argument("--quantize-per-channel", action="store_true", help="with --quantize: one scale per channel")
    g.add_argument("--quantize-format", choices=QUANT_FORMATS,
                   help="with --quantize: qdq (QuantizeLinear/DequantizeLinear around float ops; the default "
                        "with --data, which it needs) or qoperator (QLinearConv, ...; dynamic quantization's)")
    g.add_argument("--keep-float", metavar="FILE", help="with --quantize: also write the float pruned model to FILE")


def _sparsity_options(p: argparse.ArgumentParser) -> None:
    from ..options import MIN_ELEMENTS

    g = p.add_argument_group("sparsity (zero single weights; after --structured, or alone)")
    g.add_argument("--unstructured", type=_ratio, metavar="R",
                   help="zero the fraction R of each weight tensor, lowest |w| first (with --global: of all "
                        "weights ranked together)")
    g.add_argument("--nm", type=_nm, metavar="N:M",
                   help="keep the N largest of every M consecutive weights along the reduction axis (e.g. 2:4)")
    g.add_argument("--min-elements", type=_count, default=MIN_ELEMENTS, metavar="N",
                   help=f"leave weight tensors with fewer than N elements dense (default {MIN_ELEMENTS})")


def _target_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("budgets and hardware (a --target-* replaces --structured: the ratio is searched for)")
    g.add_argument("--target-macs", type=_fraction, metavar="F",
                   help="remove channels until at most the fraction F of the MACs is left (e.g. 0.5)")
    g.add_argument("--target-params", type=_fraction, metavar="F",
                   help="remove channels until at most the fraction F of the parameters is left")
    g.add_argument("--target-speedup", type=_speedup, metavar="S",
                   help="remove channels until the model runs S times faster on --provider (measured at the first "
                        "--bench-batch; at most 8 benchmark runs)")
    g.add_argument("--min-reduction", type=_reduction, metavar="X",
                   help="fail (exit 7, nothing written) unless the MACs fall at least X times (original MACs / "
                        "pruned MACs); a run that lowers them less than 1.05x warns anyway, naming what held them")
    g.add_argument("--provider", metavar="NAME",
                   help="the runtime the model is for (cpu, cuda): the default --round-to comes from its measured "
                        "table (onnxprune/runtime/hardware.py); --target-speedup times on it")
    g.add_argument("--bench", metavar="PROVIDER",
                   help="after writing, time the input and the output side by side on PROVIDER (cpu, cuda)")
    g.add_argument("--bench-batch", type=_batches, metavar="B1,B2,...",
                   help="batch sizes for --bench (default 1); --target-speedup uses the first")
    g.add_argument("--bench-iters", type=_positive, metavar="N",
                   help="timed runs per model and batch (default 100 for --bench, 20 per --target-speedup candidate)")
    g.add_argument("--threads", type=_positive, metavar="N",
                   help="intra-op threads for --bench and --target-speedup (default: onnxruntime's)")


def _depth_options(p: argparse.ArgumentParser) -> None:
    from ..scoring.blocks import BLOCK_CRITERIA

    g = p.add_argument_group("depth (remove whole residual blocks first; 'onnxprune info' lists them)")
    g.add_argument("--depth", type=_ratio, metavar="R",
                   help="remove the fraction R of the removable residual blocks (ResNet/MobileNet/ConvNeXt blocks, "
                        "pre-norm attention and MLP sub-blocks, post-norm transformer layers), the least important "
                        "first; combines with --structured and the budgets --target-macs/-params/-speedup (the "
                        "channels are pruned after)")
    g.add_argument("--drop-blocks", metavar="GLOB[,GLOB...]",
                   help="remove these blocks (ids as 'onnxprune info' lists them: module paths, or block:N)")
    g.add_argument("--block-importance", choices=BLOCK_CRITERIA, metavar="NAME",
                   help=f"block importance: {', '.join(BLOCK_CRITERIA)} (removal: output error with the block "
                        "removed; influence: 1 - cos(block input, output); both need --data; weights: the RMS of "
                        "the weight that writes into the residual. Default: removal with --data, else weights)")
    g.add_argument("--renumber-cache", action="store_true",
                   help="with --allow-io-change: rename the remaining KV cache inputs/outputs so that their layer "
                        "numbers are 0..n-1 again, in order (past_key_values.2.key -> past_key_values.1.key once "
                        "layer 1 is gone), as onnxruntime-genai expects; the report and the model's metadata "
                        "(onnxprune.io_changes) map the old names to the new")


def _group_ratio_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("per-group ratios")
    g.add_argument("--ratios", metavar="FILE", help="JSON (or YAML) mapping of group id or source-node glob (node "
                   "name or module path) to a ratio; other groups get --structured R (or stay whole without it)")
    g.add_argument("--allocate", choices=("uniform", "sensitivity"),
                   help="sensitivity: measure each group's output error on --data and choose per-group ratios "
                        "that remove --structured R of all prunable channels (or meet --target-macs/--target-params/"
                        "--target-speedup) with the least error; uniform: one ratio for every group. Default: "
                        "sensitivity for a --target-* with --data (a speedup: without --depth), else uniform")


# option -> flag, for this command's messages (cli/options.render)
FLAGS = {
    **COMMON_FLAGS,
    "ratio": "--structured", "output": "--output", "force": "--force", "head_ratio": "--head-ratio",
    "global_ranking": "--global", "max_group_ratio": "--max-group-ratio", "report_path": "--report",
    "dry_run": "--dry-run", "plan_out": "--plan-out", "plan": "--plan-in", "ratios": "--ratios",
    "allocate": "--allocate", "distill": "--distill", "finetune": "--finetune", "epochs": "--epochs",
    "lr": "--lr", "distill_loss": "--distill-loss", "temperature": "--temperature",
    "feature_weight": "--feature-distill", "loss": "--loss", "sparsity_reg": "--sparsity-reg", "steps": "--steps",
    "val_fraction": "--val-fraction", "device": "--device", "max_accuracy_drop": "--max-accuracy-drop",
    "max_output_error": "--max-output-error", "unstructured": "--unstructured", "nm": "--nm",
    "min_elements": "--min-elements", "target_macs": "--target-macs", "target_params": "--target-params",
    "target_speedup": "--target-speedup", "min_reduction": "--min-reduction", "provider": "--provider",
    "bench": "--bench",
    "batches": "--bench-batch", "iters": "--bench-iters", "threads": "--threads", "verbose": "--verbose",
    "augment": "--augment", "config": "--config", "summary_md": "--summary-md", "depth": "--depth",
    "drop_blocks": "--drop-blocks", "block_importance": "--block-importance", "quantize": "--quantize",
    "renumber_cache": "--renumber-cache",
    "per_channel": "--quantize-per-channel", "quantize_format": "--quantize-format", "keep_float": "--keep-float",
}


def _given(argv, *flags: str) -> bool:
    return any(a.split("=")[0] in flags for a in argv)


def run_prune(argv: list[str]) -> int:
    from ..api import prune_file

    typed = ["onnxprune", *argv]
    parser = build_parser()
    argv = expand_recipe(parser, argv)
    with RawValues(parser) as raw:
        args = parser.parse_args(argv)
    if args.dry_run and args.output:
        raise UsageError("--dry-run writes no model; drop --output (use --plan-out or --report)")
    options = prune_options(args, argv)
    options = replace(options, output=replace(options.output, recipe=recorded(parser, args, raw.raw), command=typed,
                                              summary_md=args.summary_md))
    from ..recovery.distributed import World, distributed_options, process_group  # numpy: imported in the command

    world = World.from_env()
    if world.distributed:  # under torchrun: one rank writes and prints, all train together
        options = distributed_options(world, options)
    start_stages(world.main and not args.quiet and (args.verbose or sys.stderr.isatty()))
    try:
        with process_group(world, options), warnings.catch_warnings():
            if not world.main:  # the same warnings as rank 0's, once is enough
                warnings.simplefilter("ignore")
            report = prune_file(args.model, args.output, options=options)
    finally:  # the library, called later in this process, prints no stage lines
        start_stages(False)
    if not world.main:
        return 0
    for w in report.warnings:
        warn(w, FLAGS)
    human = human_stream(args.report, args.plan_out, args.summary_md)
    if not args.quiet:
        show(report.summary(verbose=args.verbose), FLAGS, file=human)
        if args.verbose and report.allocation:
            from ..report.text import format_allocation

            show(format_allocation(report.allocation), file=human)
        if report.written:
            show(f"wrote   {report.output}", file=human)
        elif args.dry_run:
            show("dry run: nothing written", file=human)
        if report.bench is not None:
            from ..runtime.bench import format_table

            show(format_table(report.bench), FLAGS, file=human)
    return 0


def prune_options(args, argv):
    """The flags as options.PruneOptions: a mapping, no checks but those of flags that only
    apply together with another flag (the library validates the rest)."""
    from ..options import (
        GateOptions,
        OutputOptions,
        PruneOptions,
        SparsityOptions,
        WidthOptions,
    )

    sparse = args.unstructured is not None or args.nm is not None
    gated = args.max_accuracy_drop is not None or args.max_output_error is not None or args.min_reduction is not None
    target, bench = _target_and_bench(args, argv)
    return PruneOptions(
        analysis=analysis_options(args),
        widths=WidthOptions(ratio=args.structured, head_ratio=args.head_ratio, ratios=_ratios_file(args),
                            allocate=args.allocate, plan=args.plan_in, importance=args.importance,
                            global_ranking=args.global_ranking, round_to=args.round_to, provider=args.provider,
                            min_channels=args.min_channels, max_group_ratio=args.max_group_ratio),
        data=data_options(args),
        training=training_options(args),
        steps=args.steps,
        sparsity=SparsityOptions(args.unstructured, args.nm, args.min_elements) if sparse else None,
        depth=_depth(args),
        gate=GateOptions(args.max_accuracy_drop, args.max_output_error, args.min_reduction) if gated else None,
        target=target,
        bench=bench,
        quantize=_quantize(args, argv),
        output=OutputOptions(args.force, args.dry_run, args.plan_out, args.report,
                             reads=tuple(p for p in (args.ratios, args.config) if p),
                             renumber_cache=args.renumber_cache),
        seed=args.seed,
        quiet=args.quiet,
    )


def _target_and_bench(args, argv):
    """The --target-* budget and the --bench request."""
    from ..options import Latency, Target

    given = [(metric, value) for metric, value in (("macs", args.target_macs), ("params", args.target_params),
                                                   ("speedup", args.target_speedup)) if value is not None]
    if len(given) > 1:
        raise UsageError("--target-macs, --target-params and --target-speedup are exclusive: choose one budget")
    timed = bool(args.bench) or args.target_speedup is not None
    for flag in ("--bench-batch", "--bench-iters", "--threads"):
        if not timed and _given(argv, flag):
            raise UsageError(f"{flag} applies to --bench and --target-speedup")
    batches = tuple(args.bench_batch or (1,))
    target = None
    if given:
        metric, value = given[0]
        latency = None
        if metric == "speedup" and args.provider:
            latency = Latency(args.provider, batches[:1], args.threads, warmup=3, iters=args.bench_iters or 20)
        target = Target(metric, value, latency)
    bench = Latency(args.bench, batches, args.threads, iters=args.bench_iters or 100) if args.bench else None
    return target, bench


def _depth(args):
    from ..options import DepthOptions

    if args.depth is None and not args.drop_blocks:
        if args.block_importance:
            raise UsageError("--block-importance scores blocks for --depth R: add --depth")
        return None
    drop = tuple(g.strip() for g in (args.drop_blocks or "").split(",") if g.strip())
    return DepthOptions(args.depth, drop, args.block_importance)
def _quantize(args, argv):
    """The --quantize request; its companions apply only with it."""
    from ..pipeline.quantize import QuantizeOptions

    if args.quantize is None:
        for flag in ("--quantize-per-channel", "--quantize-format", "--keep-float"):
            if _given(argv, flag):
                raise UsageError(f"{flag} applies to --quantize")
        return None
    return QuantizeOptions(args.quantize, args.quantize_per_channel, args.quantize_format, args.keep_float)


def _ratios_file(args) -> dict | None:
    if not args.ratios:
        return None
    from ..planning.ratios import load_ratios

    return load_ratios(args.ratios)

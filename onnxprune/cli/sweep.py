"""``onnxprune sweep MODEL --ratios-to-try R1,R2,...``: the prune command at each ratio, measured.

The parser is the prune command's (so every prune option means the same here, including ones
added later), less the flags that name one run's outputs or its ratio: the sweep chooses the
ratio and writes no model.
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .options import show, warn
from .prune import FLAGS as PRUNE_FLAGS
from .prune import build_parser, prune_options
from .recipe import RawValues, expand_recipe, recorded
from .sensitivity import _ratio_list

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)

# prune flags that make no sense for a sweep: one run's outputs, its ratio, a budget searching for one
_NOT_FOR_SWEEP = ("--output", "--force", "--report", "--dry-run", "--plan-out", "--plan-in", "--structured",
                  "--target-macs", "--target-params", "--target-speedup", "--summary-md")

FLAGS = {**PRUNE_FLAGS, "ratios": "--ratios", "json": "--json", "plot": "--plot", "eval_data": "--eval-data"}


def build_sweep_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "onnxprune sweep"
    p.description = ("Prune at each of several ratios with the prune command's options and measure each result "
                     "side by side: params, MACs, output error / agreement / top-1 on data, and latency with "
                     "--bench. Writes no model.")
    p.epilog = "Exit code: 0 when at least one ratio pruned (failed ratios are listed); else that of the first."
    for action in p._actions:  # argparse has no public way to hide an inherited flag
        if any(flag in _NOT_FOR_SWEEP for flag in action.option_strings) or "--version" in action.option_strings:
            action.help = argparse.SUPPRESS
    p.add_argument("--ratios-to-try", type=_ratio_list, default=list(DEFAULT_RATIOS), metavar="R1,R2,...",
                   help=f"the --structured ratios to prune at (default {','.join(f'{r:g}' for r in DEFAULT_RATIOS)})")
    p.add_argument("--eval-data", metavar="PATH",
                   help="held-out data to measure each pruned model on (as --data; default: the --val-fraction "
                        "split of --data, which calibration also reads)")
    p.add_argument("--json", metavar="FILE.json", help="write the sweep as JSON (- for stdout)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="plot accuracy (or output error) and the --bench speedup against MACs (needs matplotlib)")
    return p


def _refuse_single_run_flags(argv: list[str]) -> None:
    for arg in argv:
        flag = arg.split("=")[0]
        if flag in _NOT_FOR_SWEEP or flag == "-o":
            raise UsageError(f"{flag} does not apply to sweep (given here or in --config): it prunes at each "
                             "--ratios-to-try ratio and writes no model (use --json / --plot for its results)")


def run_sweep(argv: list[str]) -> int:
    import json
    from dataclasses import replace

    from ..data import load_data
    from ..model.load import read_model
    from ..model.publish import Staging
    from ..model.save import check_outputs, model_files
    from ..pipeline import steps
    from ..pipeline.sweep import SWEEP_SCHEMA, sweep_file
    from ..report.sensitivity import require_matplotlib
    from ..report.sweep import sweep_png, sweep_table
    from .output import human_stream, stamped

    typed = list(argv)
    parser = build_sweep_parser()
    argv = expand_recipe(parser, argv)
    _refuse_single_run_flags(argv)
    with RawValues(parser) as raw:
        args = parser.parse_args(argv)
    # Replaced when they exist, as the other commands' JSON and plots are; never a file read.
    check_outputs({"`json`": args.json, "`plot`": args.plot},
                  {"the input model": model_files(args.model), "`data`": args.data, "`eval_data`": args.eval_data,
                   "`ratios`": args.ratios, "`config`": args.config}, force=True, stdout_ok=("`json`",))
    if args.plot:
        require_matplotlib()  # before minutes of pruning, not after
    options = prune_options(args, argv)
    model = read_model(args.model).model
    data = steps.data_of(model, options.data)
    if data is not None:  # loaded once for all the ratios
        options = replace(options, data=replace(options.data, data=data))
    evaluation, evaluated_on = None, None
    if args.eval_data:
        evaluation, evaluated_on = load_data(args.eval_data, model, options.data.images), "--eval-data"
    elif data is not None:
        _, evaluation = data.split(args.val_fraction, args.seed)
        evaluated_on = f"the {args.val_fraction:g} validation split of --data"
    result = sweep_file(args.model, args.ratios_to_try, options, evaluation, evaluated_on)
    for message in result.warnings:
        warn(message, FLAGS)
    record = stamped({"recipe": recorded(parser, args, raw.raw), **result.to_json()}, ["onnxprune", "sweep", *typed],
                     SWEEP_SCHEMA)
    with Staging(force=True) as stage:  # both or neither
        if args.json:
            stage.text(args.json, json.dumps(record, indent=1) + "\n")
        if args.plot:
            stage.bytes(args.plot, sweep_png(result))
    if not args.quiet:  # on stderr when stdout holds the JSON
        show(sweep_table(result), FLAGS, file=human_stream(args.json))
    return 0

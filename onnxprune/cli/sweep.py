"""``onnxprune sweep MODEL --ratios-to-try R1,R2,...``: the prune command at each ratio, measured.

The parser is the prune command's (so every prune option means the same here, including ones
added later), less the flags that name one run's outputs or its ratio: the sweep chooses the
ratio and writes no model.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .options import render
from .prune import FLAGS as PRUNE_FLAGS
from .prune import build_parser, prune_options
from .recipe import RawValues, expand_recipe, recorded
from .sensitivity import _ratio_list

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)

# prune flags that make no sense for a sweep: one run's outputs, its ratio, a budget searching for one
_NOT_FOR_SWEEP = ("--output", "--force", "--report", "--dry-run", "--plan-out", "--plan-in", "--structured",
                  "--target-macs", "--target-params", "--target-speedup")

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
    from dataclasses import replace

    from ..data import load_data
    from ..model.load import read_model
    from ..model.save import check_side_files
    from ..pipeline import steps
    from ..pipeline.sweep import SWEEP_SCHEMA, sweep_file
    from ..report.sensitivity import require_matplotlib
    from ..report.sweep import plot_sweep, sweep_table
    from .output import emit_json, file_path, human_stream, stamped

    typed = list(argv)
    parser = build_sweep_parser()
    argv = expand_recipe(parser, argv)
    _refuse_single_run_flags(argv)
    with RawValues(parser) as raw:
        args = parser.parse_args(argv)
    check_side_files(args.model, None, {"`json`": file_path(args.json), "`plot`": args.plot},
                     {"`data`": args.data, "`eval_data`": args.eval_data, "`ratios`": args.ratios})
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
        print(f"onnxprune: warning: {render(message, FLAGS)}", file=sys.stderr)
    if args.plot:
        plot_sweep(result, args.plot)
    if not args.quiet:
        print(render(sweep_table(result), FLAGS), file=human_stream(args.json))
    if args.json:  # last: on stdout (-), the JSON alone and only once the command has succeeded
        record = {"recipe": recorded(parser, args, raw.raw), **result.to_json()}
        emit_json(args.json, stamped(record, ["onnxprune", "sweep", *typed], SWEEP_SCHEMA))
    return 0

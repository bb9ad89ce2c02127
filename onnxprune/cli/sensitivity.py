"""``onnxprune sensitivity MODEL --data D``: each group's output error when cut alone."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .options import (
    COMMON_FLAGS,
    _analysis_options,
    _common,
    _data_options,
    _importance_option,
    _Parser,
    _ratio,
    _seed,
    _width_options,
    analysis_options,
    data_options,
    show,
    warn,
)

FLAGS = {**COMMON_FLAGS, "ratios": "--ratios-to-try", "json": "--json", "plot": "--plot"}
SENSITIVITY_SCHEMA = 1


def _ratio_list(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        values.append(_ratio(part.strip()))
    return values


def build_sensitivity_parser() -> argparse.ArgumentParser:
    from ..pipeline.sensitivity import DEFAULT_RATIOS

    p = _Parser(prog="onnxprune sensitivity",
                description="Prune each channel group alone at several ratios and measure the output error "
                            "(and top-1 accuracy, with labels) on calibration data.")
    p.add_argument("model")
    p.add_argument("--ratios-to-try", type=_ratio_list, default=list(DEFAULT_RATIOS), metavar="R1,R2,...",
                   help=f"ratios to cut each group at (default {','.join(f'{r:g}' for r in DEFAULT_RATIOS)})")
    _importance_option(p, data_note=False)
    _width_options(p)
    p.add_argument("--seed", type=_seed, default=0, help="seed for --calib-samples and --importance random")
    p.add_argument("--json", metavar="FILE.json", help="write the measurements as JSON (- for stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="plot error against ratio per group (needs matplotlib)")
    _analysis_options(p)
    _data_options(p)
    _common(p)
    return p


def run_sensitivity(argv: list[str]) -> int:
    import json
    import warnings

    from ..model.load import read_model
    from ..model.publish import Staging
    from ..model.save import check_outputs, model_files
    from ..options import PruneOptions, WidthOptions, validate_data
    from ..pipeline import steps
    from ..pipeline.sensitivity import measure_sensitivity
    from ..report.sensitivity import plot_png, require_matplotlib
    from ..report.text import conversion_line
    from .output import human_stream, stamped

    args = build_sensitivity_parser().parse_args(argv)
    if not args.data:
        raise UsageError("sensitivity measures output error on data: give --data FILE")
    # Replaced when they exist, as they always were (no --force here); never a file read.
    check_outputs({"`json`": args.json, "`plot`": args.plot},
                  {"the input model": model_files(args.model), "`data`": args.data}, force=True, stdout_ok=("`json`",))
    if args.plot:
        require_matplotlib()  # before minutes of measuring, not after
    options = PruneOptions(analysis=analysis_options(args), data=data_options(args), seed=args.seed, quiet=args.quiet,
                           widths=WidthOptions(importance=args.importance, round_to=args.round_to,
                                               min_channels=args.min_channels))
    validate_data(options.data)
    loaded = read_model(args.model)
    model = loaded.model
    conversion = loaded.conversion and loaded.conversion.to_json()
    data = steps.data_of(model, options.data).sample(args.calib_samples, args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure_sensitivity(model, data, args.ratios_to_try, options=options)
    for message in dict.fromkeys(str(w.message) for w in caught):  # once each
        warn(message, FLAGS)
    record = stamped({"model": args.model, "data": args.data, "conversion": conversion, **result.to_json()},
                     ["onnxprune", "sensitivity", *argv], SENSITIVITY_SCHEMA)
    with Staging(force=True) as stage:  # both or neither; replaced when they exist, as they always were
        if args.json:
            stage.text(args.json, json.dumps(record, indent=1) + "\n")
        if args.plot:
            stage.bytes(args.plot, plot_png(result))
    if not args.quiet:  # on stderr when stdout holds the JSON
        out = human_stream(args.json)
        if conversion:
            show(conversion_line(conversion), file=out)
        show(result.table(), file=out)
    return 0

"""``onnxprune info MODEL``: params, MACs and the channel groups."""

from __future__ import annotations

import argparse

from .options import (
    COMMON_FLAGS,
    _analysis_options,
    _common,
    _Parser,
    analysis_options,
    show,
    warn,
)

FLAGS = {**COMMON_FLAGS, "json": "--json"}


def build_info_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune info", description="Params, MACs and channel groups of a model.")
    p.add_argument("model")
    _analysis_options(p)
    p.add_argument("--json", metavar="FILE.json", help="write the description as JSON (- for standard output)")
    _common(p)
    return p


def run_info(argv: list[str]) -> int:
    import json
    import warnings

    from ..analysis.analyse import analyse
    from ..analysis.groups import named_modules
    from ..analysis.stats import count_macs, count_params, format_count
    from ..model.load import read_model
    from ..model.save import STDOUT, check_outputs, model_files, write_text_file
    from ..report.text import conversion_line, dynamic_line, label_of, labelled_reason, node_labels, worth_a_line

    args = build_info_parser().parse_args(argv)
    # Replaced when it exists, as it always was (no --force here); never a file read.
    check_outputs({"`json`": args.json}, {"the input model": model_files(args.model)}, force=True,
                  stdout_ok=("`json`",))
    loaded = read_model(args.model)
    model = loaded.model
    with warnings.catch_warnings(record=True) as caught:  # an --ignore glob that matches nothing
        warnings.simplefilter("always")
        analysis = analyse(model, analysis_options(args))
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    for message in notes:
        warn(message, FLAGS)
    macs = count_macs(model, shapes=analysis.shapes.static)
    prunable = analysis.prunable
    blocked = [g for g in analysis.groups if g.blocked]
    info = {
        "conversion": loaded.conversion and loaded.conversion.to_json(),
        "params": count_params(model),
        "macs": macs,
        "inputs": {k: list(v) for k, v in analysis.shapes.pinned_inputs.items()},
        "dynamic_dims": [c.to_json() for c in analysis.shapes.chosen],
        "prunable": [{"id": g.id, "sources": g.sources, "modules": g.modules, "channels": g.size, "kind": g.kind,
                      "units": len(g.unit_members()), "nodes": len(g.nodes)} for g in prunable],
        "blocked": [{"id": g.id, "sources": g.sources, "modules": g.modules, "channels": g.size,
                     "reason": "; ".join(g.blocked)} for g in blocked],
        "modules": named_modules(analysis.groups, analysis.view.modules),
        "warnings": notes,
    }
    if args.json:
        write_text_file(args.json, json.dumps(info, indent=1) + "\n")
    if not args.quiet and args.json != STDOUT:  # stdout holds the JSON
        if info["conversion"]:
            show(conversion_line(info["conversion"]))
        shapes = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in info["inputs"].items())
        show(f"params {format_count(info['params'])}, MACs {format_count(macs)} at {shapes}")
        if worth_a_line(info["dynamic_dims"]):
            show(dynamic_line(info["dynamic_dims"], info["inputs"]), FLAGS)
        show(f"{len(prunable)} prunable group(s), {sum(g.size for g in prunable)} channels")
        labels = node_labels(info["modules"])
        for g in prunable:
            unit = "heads" if g.kind == "heads" else "units"
            tied = f", {len(g.unit_members())} {unit}" if len(g.unit_members()) != g.size else ""
            show(f"  {g.size:>5} ch{tied:<12} {', '.join(label_of(s, labels) for s in g.sources)}")
        show(f"{len(blocked)} blocked group(s)")
        for g in blocked:
            reason = labelled_reason("; ".join(g.blocked), labels)
            show(f"  {g.size:>5} ch  {', '.join(label_of(s, labels) for s in g.sources)}: {reason}", FLAGS)
    return 0

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
INFO_SCHEMA = 1


def build_info_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune info", description="Params, MACs and channel groups of a model.")
    p.add_argument("model")
    _analysis_options(p)
    p.add_argument("--json", metavar="FILE.json", help="write the description as JSON (- for stdout)")
    _common(p)
    return p


def run_info(argv: list[str]) -> int:
    import warnings

    from ..analysis.analyse import analyse
    from ..analysis.blocks import find_blocks
    from ..analysis.groups import named_modules
    from ..analysis.stats import count_macs, count_params, format_count
    from ..model.load import read_model
    from ..model.save import check_outputs, model_files
    from ..report.text import conversion_line, dynamic_line, label_of, labelled_reason, node_labels, worth_a_line
    from .output import emit_json, human_stream, stamped

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
        "blocks": [b.to_json() for b in find_blocks(model, analysis.shapes.static, args.allow_io_change)],
        "warnings": notes,
    }
    out = human_stream(args.json)
    if not args.quiet:
        if info["conversion"]:
            show(conversion_line(info["conversion"]), file=out)
        shapes = ", ".join(f"{k}:{','.join(map(str, v))}" for k, v in info["inputs"].items())
        show(f"params {format_count(info['params'])}, MACs {format_count(macs)} at {shapes}", file=out)
        if worth_a_line(info["dynamic_dims"]):
            show(dynamic_line(info["dynamic_dims"], info["inputs"]), FLAGS, file=out)
        show(f"{len(prunable)} prunable group(s), {sum(g.size for g in prunable)} channels", file=out)
        labels = node_labels(info["modules"])
        for g in prunable:
            unit = "heads" if g.kind == "heads" else "units"
            tied = f", {len(g.unit_members())} {unit}" if len(g.unit_members()) != g.size else ""
            show(f"  {g.size:>5} ch{tied:<12} {', '.join(label_of(s, labels) for s in g.sources)}", file=out)
        show(f"{len(blocked)} blocked group(s)", file=out)
        for g in blocked:
            reason = labelled_reason("; ".join(g.blocked), labels)
            show(f"  {g.size:>5} ch  {', '.join(label_of(s, labels) for s in g.sources)}: {reason}", FLAGS, file=out)
        _print_blocks(info["blocks"], out)
    if args.json:  # last: on stdout (-), the JSON alone and only once the command has succeeded
        emit_json(args.json, stamped(info, ["onnxprune", "info", *argv], INFO_SCHEMA))
    return 0


def _print_blocks(blocks: list[dict], out) -> None:
    """The residual blocks --depth and --drop-blocks remove, by id, and why the others cannot go."""
    from ..analysis.stats import format_count

    removable = [b for b in blocks if "reason" not in b]
    show(f"{len(removable)} removable block(s) (--depth, --drop-blocks), "
         f"{len(blocks) - len(removable)} not removable", file=out)
    for b in blocks:
        reason = f": {b['reason']}" if "reason" in b else ""
        macs = format_count(b["macs"]) if b["macs"] is not None else "?"
        show(f"  {b['id']:<28} {b['kind']:<15} {macs:>8} MACs{reason}", FLAGS, file=out)

"""The Python API: the pipeline as functions, options as keywords or as option objects.

    import onnxprune
    report = onnxprune.prune_file("model.onnx", "small.onnx", ratio=0.4, round_to=8)
    result = onnxprune.prune(onnx_model, ratio=0.4)      # in memory, nothing written

    from onnxprune.options import PruneOptions, WidthOptions
    report = onnxprune.prune_file("model.onnx", options=PruneOptions(widths=WidthOptions(ratio=0.4)))

The keywords are the fields of the option groups in options.py (the
command line's options, as ``onnxprune --help`` lists them), each mapped into
its group once (``PruneOptions.from_keywords``); ``options`` and keywords
combine, the keywords winning. Everything is validated before any work.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from .analysis.analyse import Analysis
from .analysis.analyse import analyse as analyse_model
from .errors import UsageError
from .model.load import read_model
from .options import KEYWORDS, AnalysisOptions, PruneOptions, validate
from .pipeline import steps
from .pipeline.prune import PruneResult, prune_model
from .pipeline.rounds import prune_rounds as run_rounds
from .pipeline.run import run_file
from .report.records import Report

__all__ = ["Analysis", "PruneResult", "analyse", "prune", "prune_file", "prune_rounds"]

# The groups each function takes keywords for (prune_file: all of them).
_ONE_PRUNE = ("analysis", "widths", "data", "seed", "quiet")
_ROUNDS = (*_ONE_PRUNE, "training", "steps")


def analyse(model: onnx.ModelProto, input_shapes: dict | None = None, ignore=(), prune_hidden: bool = False,
            allow_io_change: bool = False, prune_kv_groups: bool = False) -> Analysis:
    """Channel groups of ``model`` (which is not modified)."""
    return analyse_model(model, AnalysisOptions(input_shapes, tuple(ignore), prune_hidden, allow_io_change,
                                                prune_kv_groups))


def prune(model: onnx.ModelProto | str | Path, ratio: float | None = None, *, options: PruneOptions | None = None,
          **keywords) -> PruneResult:
    """Prune ``model`` in memory: remove ``ratio`` of each group's channels, or apply ``plan``.

    With ``data`` (a Dataset or a --data path), the data criteria can be used
    and the removed channels' mean contributions are folded into the readers'
    biases (``compensate``, on by default when data is given). ``head_ratio``
    applies to groups whose units are attention heads (default: ``ratio``).
    ``ratios`` maps group ids or source-node globs to their own ratios;
    ``allocate="sensitivity"`` chooses them from measured output error.
    ``allow_io_change`` lets attention heads that reach graph inputs and outputs
    (a KV cache) be pruned: those tensors' head axis shrinks (cut/iochange.py).
    In grouped-query attention the query heads are cut within each key/value
    group (as many in every group); ``prune_kv_groups`` removes whole groups.
    """
    options = validate(_options(ratio, options, keywords, _ONE_PRUNE), whole_run=False)
    _no_depth(options, "prune")
    if isinstance(model, onnx.ModelProto):
        return prune_model(model, _with_data(model, options))
    loaded = read_model(model)
    result = prune_model(loaded.model, _with_data(loaded.model, options))
    result.report.conversion = loaded.conversion and loaded.conversion.to_json()
    return result


def prune_rounds(model: onnx.ModelProto, ratio: float | None = None, *, options: PruneOptions | None = None,
                 **keywords) -> PruneResult:
    """Prune in ``steps`` rounds, re-scoring each time, and recover after each round when ``train``
    (TrainOptions) is given; the teacher is always the original model."""
    options = validate(_options(ratio, options, keywords, _ROUNDS), whole_run=False)
    _no_depth(options, "prune_rounds")
    return run_rounds(model, _with_data(model, options))


def prune_file(input_path: str | Path, output_path: str | Path | None = None, ratio: float | None = None, *,
               options: PruneOptions | None = None, **keywords) -> Report:
    """Prune a file and write the verified result atomically (unless ``dry_run``).

    Takes every option: ``unstructured`` (a ratio) or ``nm`` (``"2:4"``) zero
    single weights after the structured step, or alone when neither ``ratio``
    nor ``plan_in`` is given; ``target`` (options.Target) searches for the
    ratio that meets a MACs, params or latency budget instead of taking
    ``ratio``; ``bench`` (options.Latency) times the input and the written
    output side by side afterwards (``report.bench``); ``train``
    (options.TrainOptions) recovers accuracy; ``quantize`` (``"int8"``,
    ``"uint8"`` or pipeline.quantize.QuantizeOptions) writes the result
    quantized by onnxruntime (static on ``data``, dynamic without);
    ``max_accuracy_drop`` and ``max_output_error`` gate the result; ``depth`` (a
    fraction of the removable residual blocks) and ``drop_blocks`` (block id
    globs) remove whole blocks first (docs/depth.md), ``block_importance`` ranks them.
    """
    return run_file(input_path, output_path, _options(ratio, options, keywords, None))


def _options(ratio, options: PruneOptions | None, keywords: dict, groups) -> PruneOptions:
    """``options`` (default: all defaults) with the keywords (and ``ratio``) set in their groups;
    ``groups``: the option groups (or top-level fields) the calling function takes."""
    if ratio is not None:
        keywords = {**keywords, "ratio": ratio}
    for name in keywords:
        group, field = KEYWORDS.get(name, ("?", name))
        if groups is not None and group not in groups and field not in groups:
            raise TypeError(f"unexpected keyword argument {name!r}")
    return (options or PruneOptions()).with_keywords(**keywords)


def _no_depth(options: PruneOptions, function: str) -> None:
    """Depth pruning is a step of a file run (pipeline/run.py): options that ask for it here would be ignored."""
    if options.depth is not None:
        raise UsageError(f"`depth`/`drop_blocks` remove blocks in a file run: use prune_file, not {function}")


def _with_data(model: onnx.ModelProto, options: PruneOptions) -> PruneOptions:
    return replace(options, data=replace(options.data, data=steps.data_of(model, options.data)))

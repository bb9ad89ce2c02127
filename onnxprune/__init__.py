"""onnxprune: structured pruning of ONNX models, framework-agnostic.

The public names below are imported on first use: ``import onnxprune`` (and
the command line's start, ``onnxprune --help``) stays fast, and an interrupt
while the heavy modules load is handled by the command line like any other.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "api": ["Analysis", "PruneResult", "analyse", "prune", "prune_file", "prune_rounds"],
    "options": ["AnalysisOptions", "DataOptions", "GateOptions", "Latency", "OutputOptions", "PruneOptions",
                "SparsityOptions", "Target", "TrainOptions", "WidthOptions"],
    "data": ["Dataset", "load_data"],
    "errors": ["InvalidModel", "OnnxPruneError", "QualityGateFailed", "ReductionTooSmall", "UnsupportedModel",
               "UsageError", "VerificationFailed"],
    "depth_options": ["DepthOptions"],
    "planning.plan": ["Plan"],
    "cut.sparsity": ["SparsityResult", "sparsify"],
    "recovery.train": ["distill", "finetune"],
    "metrics": ["evaluate"],
    "analysis.stats": ["count_macs", "count_params"],
    "executor.module": ["TorchGraph"],
}
_MODULE_OF = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *__all__])

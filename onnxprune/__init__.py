"""onnxprune: structured pruning of ONNX models, framework-agnostic."""

__version__ = "0.1.0"

from .api import Analysis, PruneResult, analyse, prune, prune_file  # noqa: E402
from .errors import InvalidModel, OnnxPruneError, UnsupportedModel, UsageError, VerificationFailed  # noqa: E402
from .plan import Plan  # noqa: E402
from .sparsity import SparsityResult, sparsify  # noqa: E402
from .stats import count_macs, count_params  # noqa: E402

__all__ = [
    "Analysis", "PruneResult", "analyse", "prune", "prune_file", "Plan",
    "count_macs", "count_params", "sparsify", "SparsityResult",
    "OnnxPruneError", "InvalidModel", "UnsupportedModel", "UsageError", "VerificationFailed",
]

"""onnxprune: structured pruning of ONNX models, framework-agnostic."""

__version__ = "0.1.0"

from .api import Analysis, PruneResult, analyse, prune, prune_file, prune_rounds  # noqa: E402
from .data import Dataset, load_data  # noqa: E402
from .errors import (  # noqa: E402
    InvalidModel, OnnxPruneError, QualityGateFailed, UnsupportedModel, UsageError, VerificationFailed,
)
from .plan import Plan  # noqa: E402
from .sparsity import SparsityResult, sparsify  # noqa: E402
from .recover import TrainOptions, distill, evaluate, finetune  # noqa: E402
from .stats import count_macs, count_params  # noqa: E402

__all__ = [
    "Analysis", "PruneResult", "analyse", "prune", "prune_file", "prune_rounds", "Plan",
    "Dataset", "load_data", "TrainOptions", "distill", "finetune", "evaluate",
    "count_macs", "count_params", "sparsify", "SparsityResult",
    "OnnxPruneError", "InvalidModel", "UnsupportedModel", "UsageError", "VerificationFailed", "QualityGateFailed",
]

"""Typed errors. The CLI maps each to one exit code (see ``EXIT_CODES``)."""


class OnnxPruneError(Exception):
    """Base class: an error with a one-line message meant for the user."""

    exit_code = 1


class UsageError(OnnxPruneError):
    """Bad arguments, or an output that would overwrite something without --force."""

    exit_code = 2


class InvalidModel(OnnxPruneError):
    """The input is not a readable, valid ONNX model."""

    exit_code = 3


class UnsupportedModel(OnnxPruneError):
    """A valid model that onnxprune cannot handle (opset < 7 or not convertible, runtime cannot run it, ...)."""

    exit_code = 4


class VerificationFailed(OnnxPruneError):
    """The pruned model failed a check; nothing was written."""

    exit_code = 5


class QualityGateFailed(OnnxPruneError):
    """--max-accuracy-drop / --max-output-error exceeded on the validation split; nothing written."""

    exit_code = 6


class ReductionTooSmall(OnnxPruneError):
    """The prune lowered MACs less than `min_reduction` asks (original / pruned); nothing written."""

    exit_code = 7


class PlanMismatch(UsageError):
    """A plan file does not fit the model it is applied to."""


class BudgetUnreachable(UsageError):
    """A MACs, params or speedup budget no ratio meets (blocked groups, `min_channels`, `round_to`, timings)."""


class MissingDependency(UsageError):
    """An optional package the requested work needs is not installed."""


def require(module: str, needed_for: str, install: str):
    """``module``, imported; or a one-line MissingDependency saying what needs it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{needed_for} needs {module}: pip install {install}") from None


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for messages that must stay on one line."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


EXIT_CODES = {
    0: "success (also when nothing was prunable: an unchanged copy is written)",
    1: "internal error (a bug: please report it with --debug output)",
    2: "usage error (bad flags, bad plan or ratios file, output exists without --force or would replace an "
       "input, unwritable output, onnxruntime not installed)",
    3: "invalid input model (missing, unreadable, not ONNX, fails onnx.checker)",
    4: "unsupported model (opset < 7, or one onnx.version_converter cannot upgrade, or onnxruntime cannot run it)",
    5: "verification failed (the pruned model did not pass the checks; nothing written)",
    6: "quality gate failed (--max-accuracy-drop / --max-output-error exceeded; nothing written)",
    7: "reduction too small (MACs fell less than --min-reduction asks; nothing written)",
    129: "hung up (SIGHUP); nothing written",
    130: "interrupted (Ctrl-C); nothing written",
    143: "terminated (SIGTERM); nothing written",
}


QUOTE_LIMIT = 80  # characters of an offending value a message quotes


def quoted(value, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message names a bad value, it does not print
    it (a value read from a file can be megabytes long)."""
    text = repr(value) if not isinstance(value, str) else repr(value[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def escape(text: str, keep_newlines: bool = False) -> str:
    """``text`` safe for a terminal: every non-printable character (escape sequences, carriage
    returns, other controls, and newlines unless ``keep_newlines``) shown as ``\\xNN`` (``\\uNNNN``
    above 0xff). Names come from models and file systems, which allow anything."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else _escaped(c) for c in text)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"

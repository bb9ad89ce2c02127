"""Command line: argparse front, no logic. Errors -> one line on stderr + exit code.

One module per command (prune, info, bench, sensitivity, sweep), the shared option
groups and value types in options.py. Modules that need numpy, onnx or torch
are imported inside the commands, so an interrupt while they load is handled
here like any other.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import traceback
import warnings

from ..errors import OnnxPruneError, escape, first_line
from . import bench, info, prune, sensitivity, sweep
from .options import message_line, warn
from .prune import build_parser, run_prune

run_bench, run_info, run_sensitivity = bench.run_bench, info.run_info, sensitivity.run_sensitivity
run_sweep = sweep.run_sweep
# the first argument -> the command's module (each has run_COMMAND and FLAGS); anything else: prune
COMMANDS = {"info": info, "bench": bench, "sensitivity": sensitivity, "sweep": sweep}

__all__ = ["main", "build_parser", "run_prune", "run_info", "run_bench", "run_sensitivity", "run_sweep"]


def _one_line_warnings(flags: dict[str, str]):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        warn(str(message), flags)
    return show


# Signals that stop a run the way Ctrl-C does: the exception unwinds through the staged outputs
# (model/publish.Staging), which removes them; the exit status is 128 + the signal's number.
STOPPING = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class Stopped(KeyboardInterrupt):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _load_pipeline() -> None:
    """Import numpy, onnx and the pipeline with the stopping signals held back until they are
    loaded: an interrupt raised inside a C extension's initialisation can crash the interpreter."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has signals
        importlib.import_module("onnxprune.api")
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in STOPPING}
    try:
        importlib.import_module("onnxprune.api")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise Stopped(received[0])


def _stop_on_signals() -> dict:
    """SIGTERM and SIGHUP raise Stopped (SIGINT already raises KeyboardInterrupt), unless ignored
    (nohup): the previous handlers, to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for s in STOPPING[1:]:
        if signal.getsignal(s) != signal.SIG_IGN:
            previous[s] = signal.signal(s, _raise_stopped)
    return previous


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    command = COMMANDS.get(argv[0]) if argv else None
    flags = (command or prune).FLAGS
    if not debug:  # warnings not collected into a report: one line each, like the errors
        warnings.showwarning = _one_line_warnings(flags)
    handlers = _stop_on_signals()
    try:
        _load_pipeline()
        if debug:  # onnxruntime's own log lines too
            from ..runtime.session import VERBOSE, set_log_severity

            set_log_severity(VERBOSE)
        if command is not None:
            return getattr(command, f"run_{argv[0]}")(argv[1:])
        return run_prune(argv)
    except OnnxPruneError as exc:
        if debug:
            traceback.print_exc()
        print(f"onnxprune: error: {message_line(str(exc), flags)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        print(f"onnxprune: {what}; nothing written", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # stdout closed early (| head): the work is done, stay quiet
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as exc:  # a bug: keep it to one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"onnxprune: internal error: {type(exc).__name__}: {escape(first_line(exc))} (rerun with --debug)",
              file=sys.stderr)
        return 1
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)

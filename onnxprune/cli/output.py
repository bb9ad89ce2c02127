"""Where a command's JSON goes, and what every JSON says about the run that wrote it.

``-`` as a JSON path (``--report -``, ``--json -``) means stdout: the JSON is then the
only thing on stdout, printed once the command has succeeded (a failed run prints
nothing there), and the human summary goes to stderr. Every JSON carries its
``schema_version``, the versions of onnxprune and the runtimes it ran with, and the
command line.
"""

from __future__ import annotations

import json
import sys

STDOUT = "-"  # as model/publish.STDOUT (not imported: onnx loads inside the commands)


def human_stream(*paths: str | None):
    """Where the summary goes: stderr when a JSON takes stdout."""
    return sys.stderr if STDOUT in paths else sys.stdout


def stamped(record: dict, command: list[str], schema_version: int) -> dict:
    """``record`` with its schema version, the run's versions and command line first, in strict
    JSON (records.strict_json)."""
    from ..report.records import run_environment, strict_json

    return strict_json({"schema_version": schema_version, "environment": run_environment(), "command": command,
                        **{k: v for k, v in record.items() if k != "schema_version"}})


def emit_json(path: str, record: dict) -> None:
    """``record`` as JSON to ``path``, atomically, or to stdout for ``-``."""
    from ..model.save import write_text_file

    text = json.dumps(record, indent=1) + "\n"
    if path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_file(path, text)

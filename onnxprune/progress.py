"""Progress on a terminal: a tqdm bar with ETA; nothing in pipelines or with `quiet`."""

from __future__ import annotations

import sys


def progress(iterable, total: int, desc: str, quiet: bool, unit: str = "batch"):
    """A tqdm bar with ETA on a terminal; the bare iterable in pipelines or with `quiet`."""
    if quiet or not sys.stdout.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)

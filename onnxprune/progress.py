"""Progress on a terminal: a tqdm bar with ETA; nothing in pipelines or with `quiet`."""

from __future__ import annotations

import sys

from .errors import escape


def _shown(quiet: bool):
    """tqdm, when a bar should be shown (a terminal, not `quiet`, tqdm installed); else None."""
    if quiet or not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def progress(iterable, total: int, desc: str, quiet: bool, unit: str = "batch"):
    """A tqdm bar with ETA on a terminal; the bare iterable in pipelines or with `quiet`."""
    tqdm = _shown(quiet)
    if tqdm is None:
        return iterable
    return tqdm(iterable, total=total, desc=escape(desc), unit=unit, leave=False)


class _Silent:
    """What ``counter`` gives where no bar is shown: the same calls, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def counter(total: int, desc: str, quiet: bool, unit: str = " samples"):
    """A bar counting ``unit`` (``update(n)``) up to ``total``: tqdm shows the rate (e.g. samples/s,
    scaled: 1.2k samples/s) and the time left on a terminal; a silent stand-in elsewhere. A
    context manager (the bar is cleared when it ends)."""
    tqdm = _shown(quiet)
    if tqdm is None:
        return _Silent()
    return tqdm(total=total, desc=escape(desc), unit=unit, unit_scale=True, leave=False)

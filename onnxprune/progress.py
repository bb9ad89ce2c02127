"""Progress: tqdm bars with ETA on a terminal, and the command line's stage lines.

- Bars (``progress``, ``counter``) go to stderr, only when stderr is a terminal
  and not `quiet`: pipelines and logs get none.
- Stage lines (``stage_done``: "onnxprune: analyse   0.31 s") say which step of a
  run took how long. The command line turns them on (``start_stages``): on a
  terminal, or anywhere with -v; never with -q. A run over in under a second
  prints none (they are held back until a second has passed). The library
  prints none unless asked.
"""

from __future__ import annotations

import contextlib
import sys
import time

from .errors import escape

SHOW_AFTER_S = 1.0  # stage lines of a run that ends sooner are not worth the noise

def _shown(quiet: bool):
    """tqdm, when a bar should be shown (stderr a terminal, not `quiet`, tqdm installed); else None."""
    if quiet or not sys.stderr.isatty():
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


class _Stages:
    """The current run's stage clock (one command line run at a time, in its main thread)."""

    def __init__(self):
        self.on = False
        self.muted = 0
        self.started = self.last = 0.0
        self.held: list[str] = []
        self.times: list[dict] = []  # every stage of the run, shown or not: the report's `stages`

    def start(self, show: bool) -> None:
        self.on = show
        self.reset()

    def reset(self) -> None:
        self.muted, self.held, self.times = 0, [], []
        self.started = self.last = time.perf_counter()

    def done(self, name: str) -> None:
        if self.muted:  # inside a search: its time goes to the search's own line
            return
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.times.append({"stage": name, "seconds": round(seconds, 4)})
        if not self.on:
            return
        self.held.append(f"onnxprune: {escape(name):<12} {seconds:7.2f} s")
        if now - self.started >= SHOW_AFTER_S:
            for line in self.held:
                print(line, file=sys.stderr, flush=True)
            self.held = []


_STAGES = _Stages()


def start_stages(show: bool) -> None:
    """Start the stage clock of a command line run; ``show``: print its stage lines."""
    _STAGES.start(show)


def restart_stage_clock() -> None:
    """A run begins (pipeline/run.py): its stage times start from here; shown as the command set."""
    _STAGES.reset()


def stage_times() -> list[dict]:
    """The stages of the run so far, each with its seconds."""
    return list(_STAGES.times)


def stage_done(name: str) -> None:
    """The stage ``name`` ended now: its line (time since the last stage) when stage lines are on."""
    _STAGES.done(name)


@contextlib.contextmanager
def muted_stages():
    """No stage lines inside (a search that prunes many candidates), one for the whole after it."""
    _STAGES.muted += 1
    try:
        yield
    finally:
        _STAGES.muted -= 1

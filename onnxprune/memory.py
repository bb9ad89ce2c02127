"""Sizes checked before they are allocated, and freed memory handed back.

A model, a data file or an image header can claim any size (an input dim of
2^40, an .npy header of 10^12 elements, a 30000 x 30000 PNG); allocating it
ends in a MemoryError or the OOM killer long after the cause is known. What
reads such a size asks ``check_fits`` first and gets a one-line error naming
the claim instead. ``release_freed_memory`` frees what the pipeline dropped
before a step that allocates a model's worth (issue 20: peak memory).
"""

from __future__ import annotations

import ctypes.util
import gc
import math
import os


def available_memory() -> int:
    """Bytes the system can give this process now: MemAvailable on Linux, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40  # unknown: only absurd claims are refused


def fits(nbytes: int) -> bool:
    return nbytes <= available_memory()


def nbytes_of(shape, itemsize: int) -> int:
    """Bytes of an array of ``shape`` (Python integers: no overflow, whatever the claim)."""
    return math.prod(int(d) for d in shape) * itemsize


def describe_bytes(nbytes: int) -> str:
    if nbytes >= 1e15:
        return f"{nbytes / 1e12:,.0f} TB"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes} bytes"


def release_freed_memory() -> None:
    """Collect garbage in reference cycles and hand freed memory back to the system.

    onnx-graphsurgeon's graphs are full of reference cycles, so a model and its analysis
    dropped by the pipeline stay alive until a full collection; and glibc keeps what freed
    weights held for reuse (malloc_trim returns it), where onnxruntime's allocations or a
    written model's buffers may not fit, and the run's peak would count it twice. Called
    where the next step allocates a model's worth: writing the pruned model, building a
    session. The trim is glibc's; nothing on other C libraries (musl, macOS)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return
    if trim is not None:
        trim(0)

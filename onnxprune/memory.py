"""Sizes checked before they are allocated.

A model, a data file or an image header can claim any size (an input dim of
2^40, an .npy header of 10^12 elements, a 30000 x 30000 PNG); allocating it
ends in a MemoryError or the OOM killer long after the cause is known. What
reads such a size asks ``check_fits`` first and gets a one-line error naming
the claim instead.
"""

from __future__ import annotations

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

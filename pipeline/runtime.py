"""Process-wide settings for CPU work: how glibc's malloc treats large buffers.

PyTorch's CPU kernels allocate and free feature maps of tens of MB on every network call.
With glibc's defaults such blocks are mmap'ed and unmapped each time, so every call pays
page faults for fresh zeroed pages; on the development machine that halved detector
throughput at 416x416 (``bench/detect.py``). Serving blocks up to 256 MB from the heap and
keeping up to 1 GB of freed memory there (instead of returning it to the system) removes
that cost. The price is a resident size that stays near its peak, and, when the network
input size changes from call to call (every WiderFace image has its own 8K size), a heap
that fragments and grows: the freed blocks of one size rarely fit the next. A detect run
over 8K frames on the CPU therefore hands the freed pages back (:func:`release_freed_memory`)
before a network call that would take it past its memory bound (``pipeline.detect.DetectLoop``).
Nothing here changes results.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import psutil

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap, not from mmap (bytes)
MMAP_THRESHOLD = 256 << 20
#: freed heap memory kept for reuse before it is returned to the system (bytes)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, when this process runs on it (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Apply the malloc settings above to this process; True when they took effect (Linux
    with glibc), False elsewhere (other C libraries keep their own behaviour)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def resident_bytes() -> int:
    """This process's resident set size, in bytes."""
    return int(psutil.Process().memory_info().rss)


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (glibc ``malloc_trim(0)``, which also
    releases free pages in the middle of the heap); True when glibc released any. Costs the
    page faults of touching those pages again, so callers do it only when memory is short."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False

"""Process-wide settings for CPU work: how glibc's malloc treats large buffers.

PyTorch's CPU kernels allocate and free feature maps of tens of MB on every network call.
With glibc's defaults such blocks are mmap'ed and unmapped each time, so every call pays
page faults for fresh zeroed pages; on the development machine that halved detector
throughput at 416x416 (``bench/detect.py``). Serving blocks up to 256 MB from the heap and
keeping up to 1 GB of freed memory there (instead of returning it to the system) removes
that cost. The price is a resident size that stays near its peak, which batch jobs have
anyway. Nothing here changes results.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap, not from mmap (bytes)
MMAP_THRESHOLD = 256 << 20
#: freed heap memory kept for reuse before it is returned to the system (bytes)
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the malloc settings above to this process; True when they took effect (Linux
    with glibc), False elsewhere (other C libraries keep their own behaviour)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))

"""pipeline.runtime: the malloc settings take effect where glibc is the C library."""

from __future__ import annotations

import platform
import sys

import pytest

from pipeline.runtime import keep_freed_memory, release_freed_memory, resident_bytes


def test_keep_freed_memory_applies_on_glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc settings apply to Linux with glibc only")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent


def test_release_freed_memory_returns_pages_to_the_system():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    keep_freed_memory()  # freed heap blocks stay resident
    blocks = [bytearray(8 << 20) for _ in range(32)]  # 256 MB in 8 MB heap blocks, touched
    for block in blocks[:-1]:  # the last one pins the top of the heap: only a trim of the middle helps
        block[:] = b"x" * len(block)
    del blocks[:-1]
    before = resident_bytes()
    assert release_freed_memory() is True
    assert resident_bytes() < before - (128 << 20)

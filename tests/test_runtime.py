"""pipeline.runtime: the malloc settings take effect where glibc is the C library."""

from __future__ import annotations

import platform
import sys

import pytest

from pipeline.runtime import keep_freed_memory


def test_keep_freed_memory_applies_on_glibc():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc settings apply to Linux with glibc only")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent

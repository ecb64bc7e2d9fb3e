"""Shared fixtures (never imported by test modules; their plain helpers are in tests/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import need_shared, one_thread


@pytest.fixture
def shared():
    """Callable fixture: ``shared("widerface416")`` -> Path, or skip/fail as need_shared does."""
    return need_shared


@pytest.fixture
def weights_dir() -> Path:
    """../shared/weights, used as the weights cache in tests."""
    return need_shared("weights")


@pytest.fixture
def one_torch_thread():
    """The one-thread fixture every torch-heavy test uses (see tests.support.one_thread)."""
    with one_thread():
        yield

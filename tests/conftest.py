"""Shared fixtures: where ../shared lives, and skip-or-fail when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CONFRANK_SHARED", ROOT.parent / "shared"))


def need_shared(*parts: str) -> Path:
    """Path under ../shared; skip the test when missing, fail under CONFRANK_REQUIRE_SHARED=1."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"shared data not found: {path}"
        if os.environ.get("CONFRANK_REQUIRE_SHARED") == "1":
            pytest.fail(reason + " (CONFRANK_REQUIRE_SHARED=1)")
        pytest.skip(reason)
    return path


@pytest.fixture
def shared():
    """Callable fixture: ``shared("widerface416")`` -> Path, or skip/fail as above."""
    return need_shared


@pytest.fixture
def weights_dir() -> Path:
    """../shared/weights, used as the weights cache in tests."""
    return need_shared("weights")


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run ``confrank ARGS`` in this process: (exit code, stdout, stderr)."""
    from pipeline.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def one_torch_thread():
    """One intra-op thread per test process: pytest -n 2 on a 2-core machine otherwise
    oversubscribes the CPU (10x slower convolutions)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

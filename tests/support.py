"""Test helpers imported by test modules (conftest.py holds only fixtures and is never imported):
where ../shared lives, skip-or-fail when it is absent, confrank in this process, one torch thread."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def run_cli(args, capsys) -> tuple[int, str, str]:
    """Run ``confrank ARGS`` in this process: (exit code, stdout, stderr)."""
    from stages.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block, the previous count restored after it:
    pytest -n 2 on a 2-core machine otherwise oversubscribes the CPU (10x slower convolutions).
    Tests use the ``one_torch_thread`` fixture; module-scoped fixtures use this directly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kill_when_reached(command: list[str], env: dict[str, str], what: str) -> None:
    """Start ``command``, a child that prints ``confrank-test: reached`` to stderr at a hook,
    and SIGKILL it there; the test fails when the child ends before, naming ``what``."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stderr:
            if line.startswith("confrank-test: reached"):
                break
        else:
            proc.wait()
            pytest.fail(f"{what} ended (exit {proc.returncode}) before reaching its hook: {proc.stdout.read()}")
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()

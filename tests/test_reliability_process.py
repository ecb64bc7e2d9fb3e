"""Failure-table rows that promise what a user sees: ``confrank`` run as a process prints
one line ``confrank: error: ...`` on stderr, exits with status 1, and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.layout import Layout
from tests.support import ROOT, need_shared, run_cli

#: ``python -c`` program: confrank's entry point, with the temporary file of every output
#: named ``.NAME.*`` (NAME = argv[1]) replaced by /dev/full, so writing it meets the kernel's ENOSPC
FULL_DISK = """
import os, sys, tempfile
name, real = sys.argv.pop(1), tempfile.mkstemp
def mkstemp(prefix="", suffix="", dir=None):
    fd, path = real(prefix=prefix, suffix=suffix, dir=dir)
    if prefix.startswith(f".{name}."):
        os.close(fd)
        os.unlink(path)
        os.symlink("/dev/full", path)
        fd = os.open(path, os.O_WRONLY)
    return fd, path
tempfile.mkstemp = mkstemp
from stages.cli import main
main(sys.argv[1:])
"""


def confrank(args: list, env: dict[str, str], program: list[str] | None = None) -> subprocess.CompletedProcess:
    """``confrank ARGS`` in a new Python process (``python -m stages.cli``, the console
    script's entry point), or ``program`` followed by ARGS."""
    command = [sys.executable, *(program or ["-m", "stages.cli"]), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300, check=False)


def indexed(tmp_path: Path, capsys) -> Path:
    """A data folder with the first widerface416 image indexed as dataset ``x``."""
    src = need_shared("widerface416")
    lines = (src / "wider_face_split" / "wider_face_val_bbx_gt.txt").read_text().splitlines()
    name, count = lines[0], int(lines[1])
    root = tmp_path / "ds"
    (root / "wider_face_split").mkdir(parents=True)
    (root / "wider_face_split" / "wider_face_val_bbx_gt.txt").write_text("\n".join(lines[:2 + max(count, 1)]) + "\n")
    image = root / "WIDER_val" / "images" / name
    image.parent.mkdir(parents=True)
    image.write_bytes((src / "WIDER_val" / "images" / name).read_bytes())
    data = tmp_path / "data"
    code, _, err = run_cli(["index", "--name", "x", "--root", root, "--data-dir", data], capsys)
    assert code == 0, err
    return data


def outputs_of_detect(data: Path) -> list[Path]:
    """Every file (shards and temporaries) under the detections and latency folders."""
    return sorted(p for sub in ("detections", "latency") for p in (data / "interim" / sub).rglob("*") if p.is_file())


@pytest.mark.slow
def test_full_disk_during_detect_prints_one_line_and_leaves_nothing(tmp_path, capsys, weights_dir):
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available")
    data = indexed(tmp_path, capsys)
    shard = Layout(data).detections("x", "slim", "original", 0)
    proc = confrank([shard.name, "detect", "--dataset", "x", "--detector", "slim", "--device", "cpu", "--workers", 0,
                     "--data-dir", data], {"CONFRANK_WEIGHTS": str(weights_dir)}, program=["-c", FULL_DISK])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == f"confrank: error: [Errno 28] No space left on device: '{shard}'\n"
    assert outputs_of_detect(data) == []  # neither table of the pair, no temporary file
    rerun = confrank(["detect", "--dataset", "x", "--detector", "slim", "--device", "cpu", "--workers", 0,
                      "--data-dir", data], {"CONFRANK_WEIGHTS": str(weights_dir)})
    assert rerun.returncode == 0 and shard.is_file(), rerun.stderr


@pytest.mark.slow
def test_weights_file_that_is_not_a_checkpoint_prints_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    junk = tmp_path / "Resnet50_Final.pth"
    junk.write_bytes(b"<html>404 Not Found</html>\n")  # a failed download saved as the checkpoint
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(cache))
    assert run_cli(["weights", "add", "--name", "Resnet50_Final", junk], capsys)[0] == 0
    data = indexed(tmp_path, capsys)
    proc = confrank(["detect", "--dataset", "x", "--detector", "retinaface-r50", "--device", "cpu", "--workers", 0,
                     "--data-dir", data], {"CONFRANK_WEIGHTS": str(cache)})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"confrank: error: {cache / 'Resnet50_Final.pth'}: expected a PyTorch checkpoint"), lines
    assert outputs_of_detect(data) == []
    assert (cache / "Resnet50_Final.pth").read_bytes() == junk.read_bytes()  # left as it is, for the user to replace

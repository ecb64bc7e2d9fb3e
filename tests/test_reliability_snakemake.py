"""Pre-emption under Snakemake: the whole process group of a `snakemake` run is SIGKILLed
while a detect job runs (as a cluster does to a pre-empted job); `snakemake
--rerun-incomplete` then completes, and the shards are byte-identical to the same commands
run by hand without interruption.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.cli import main
from pipeline.provenance import code_version
from pipeline.tables import read_table
from stages.layout import Layout
from stages.common import snakemake_command
from tests.support import ROOT, need_shared

SHARDS = 1
#: a detect job that takes ~10 s on a 2-core CPU (6 images x 10 views up to 1700 px), so that
#: the kill lands in the middle of it however fast the machine is at 416 px
DATASET, IMAGES, SCALES = "few", 6, "wider-multi"


def write_config(workdir: Path, weights: Path) -> None:
    config = {
        "data_dir": "data", "weights_dir": str(weights), "device": "cpu",
        "datasets": {"w416": {"source": "folder", "root": str(need_shared("widerface416"))},
                     DATASET: {"source": "subset", "subset_of": "w416", "max_images": IMAGES, "shards": SHARDS}},
        "experiments": [{"dataset": DATASET, "detectors": ["slim"], "scales": [SCALES], "methods": ["multi"]}],
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def detecting(group: int) -> bool:
    """Whether the ``confrank detect`` process of process group ``group`` is detecting: its
    DataLoader decode workers (its child processes) exist, which happens only once the
    weights are loaded and the images are being read. Linux (/proc)."""
    processes = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended meanwhile
            continue
        processes.append((int(stat.parent.name), int(fields[1]), int(fields[2]), argv))
    detect = {pid for pid, _, pgrp, argv in processes
              if pgrp == group and Path(argv[0].decode()).name.startswith("python") and b"detect" in argv and b"--scales" in argv}
    return any(ppid in detect for _, ppid, _, _ in processes)


def snakemake(workdir: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = snakemake_command(["--configfile", "config.yaml", "--cores", "1", *args])
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def by_hand(workdir: Path, weights: Path, capsys, monkeypatch) -> None:
    """The commands the rules run (same rule names in the provenance), uninterrupted."""
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights))
    steps = [("index", ["index", "--name", "w416", "--root", str(need_shared("widerface416"))]),
             ("subset", ["subset", "--parent", "w416", "--name", DATASET, "--max-images", str(IMAGES)])]
    steps += [("detect", ["detect", "--dataset", DATASET, "--detector", "slim", "--scales", SCALES,
                                "--shard", f"{k}/{SHARDS}", "--device", "cpu"]) for k in range(SHARDS)]
    for rule, args in steps:
        monkeypatch.setenv("CONFRANK_RULE", rule)
        try:
            main([*args, "--data-dir", "data"])
        except SystemExit as exc:
            pytest.fail(f"{args[0]} exited {exc.code}: {capsys.readouterr().err}")
    capsys.readouterr()


@pytest.mark.slow
def test_killed_snakemake_run_completes_with_rerun_incomplete(tmp_path, weights_dir, capsys, monkeypatch,
                                                             one_torch_thread):
    killed, manual = tmp_path / "killed", tmp_path / "manual"
    for folder in (killed, manual):
        folder.mkdir()
    write_config(killed, weights_dir)
    shard0 = killed / Layout(Path("data")).detections(DATASET, "slim", SCALES, 0)
    log = killed / "logs" / "detect" / DATASET / "slim" / SCALES / "part-0.log"

    sources = code_version.__wrapped__()  # uncached: the hash of pipeline/ and stages/ now
    proc = snakemake(killed, "detect_all", start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and detecting(proc.pid)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.exists() and detecting(proc.pid), \
            f"the detect job never started detecting: {proc.stdout.read() if proc.poll() is not None else ''}"
        assert proc.poll() is None and not shard0.exists()
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake, its shell and the detect process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert not shard0.exists()

    # a killed snakemake leaves its lock: the documented recovery is --unlock, then rerun
    unlock = snakemake(killed, "--unlock")
    assert unlock.wait(timeout=120) == 0, unlock.stdout.read()
    unlock.stdout.close()
    rerun = snakemake(killed, "--rerun-incomplete", "detect_all")
    out, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, out
    assert "steps (100%) done" in out

    by_hand(manual, weights_dir, capsys, monkeypatch)
    unchanged = code_version.__wrapped__() == sources == code_version()
    for k in range(SHARDS):
        rel = Layout(Path("data")).detections(DATASET, "slim", SCALES, k)
        if unchanged:
            assert (killed / rel).read_bytes() == (manual / rel).read_bytes(), rel
        else:  # sources edited while the test ran (a working tree, not CI): the data must agree
            assert read_table(killed / rel, "detections").equals(read_table(manual / rel, "detections")), rel
    assert sorted(p.name for p in shard0.parent.iterdir()) == [f"part-{k}.parquet" for k in range(SHARDS)]

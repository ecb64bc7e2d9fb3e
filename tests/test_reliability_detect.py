"""Pre-emption and resource faults of `confrank detect`, done for real.

A detect job is started as its own process and killed with SIGKILL in the middle of a shard
(between two batches, and in the middle of writing the Parquet file); the rerun must give
files byte-identical to an uninterrupted run. A full disk is produced by the kernel itself
(the temporary file is pointed at /dev/full), and out-of-GPU-memory errors are raised from
the detector on CPU.

The shard used is 0/8 of the shared widerface416 images (12 real 416x416 photos) with the
slim detector, whose batches of 4 give three network calls per shard.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from stages.cli import main
from pipeline.detect import Decoded, DetectLoop
from pipeline.detectors import registry, weights as weights_cache
from pipeline.imaging import decode_image, to_chw_tensor
from pipeline.scales import scale_set
from pipeline.tables import read_table, shard_paths
from stages.detect import run_detect
from stages.layout import Layout
from tests.support import ROOT, kill_when_reached, need_shared

DETECTOR, SCALES, SHARD = "slim", "original", (0, 8)
DETECT_ARGS = ["detect", "--dataset", "w416", "--detector", DETECTOR, "--scales", SCALES,
               "--shard", f"{SHARD[0]}/{SHARD[1]}", "--device", "cpu", "--workers", "0", "--batch-size", "4"]

#: runs the real CLI in a child process, with one hook that announces a point in the run on
#: stderr and then waits there to be killed (the pause only makes the kill land on time)
CHILD = r"""
import sys, time
HOOK = sys.argv.pop(1)
MARK = "confrank-test: reached " + HOOK

def pause():
    print(MARK, file=sys.stderr, flush=True)
    time.sleep(300)

if HOOK == "after-first-batch":
    import pipeline.detect as detect
    original = detect.DetectLoop.run_chunk
    def run_chunk(self, chunk):
        out = original(self, chunk)
        pause()
        return out
    detect.DetectLoop.run_chunk = run_chunk
elif HOOK == "mid-write":
    import os
    import pyarrow.parquet as pq
    original = pq.write_table
    def write_table(table, where, *args, **kwargs):
        original(table, where, *args, **kwargs)
        size = os.path.getsize(where)
        with open(where, "r+b") as fh:      # half a file on disk, as when the kill hits mid-write
            fh.truncate(size // 2)
        pause()
    pq.write_table = write_table

from stages.cli import main
main(sys.argv[1:])
"""


def child_env(weights: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CONFRANK_WEIGHTS": str(weights),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def index_w416(data: Path, capsys) -> Layout:
    try:
        main(["index", "--name", "w416", "--root", str(need_shared("widerface416")), "--data-dir", str(data)])
    except SystemExit as exc:
        pytest.fail(f"index failed: {exc.code} {capsys.readouterr().err}")
    capsys.readouterr()
    return Layout(data)


def outputs(layout: Layout) -> tuple[Path, Path]:
    return (layout.detections("w416", DETECTOR, SCALES, SHARD[0]), layout.latency("w416", DETECTOR, SCALES, SHARD[0]))


@pytest.fixture
def reference(tmp_path, capsys, weights_dir, monkeypatch, one_torch_thread) -> bytes:
    """The detections shard of an uninterrupted run (in this process), as bytes."""
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    layout = index_w416(tmp_path / "reference", capsys)
    path, computed = run_detect("w416", DETECTOR, SCALES, SHARD, layout, torch.device("cpu"), 4, workers=0)
    assert computed
    return path.read_bytes()


def kill_at(hook: str, data: Path, weights: Path) -> None:
    """Start `confrank detect` in a child process and SIGKILL it once it reaches ``hook``."""
    kill_when_reached([sys.executable, "-c", CHILD, hook, *DETECT_ARGS, "--data-dir", str(data)],
                      child_env(weights), f"detect (hook {hook})")


def rerun_by_hand(data: Path, weights: Path) -> str:
    """`python -m stages.cli detect ...` run to completion (same working folder as the
    tests, so the provenance's input names are the same as in-process runs)."""
    proc = subprocess.run([sys.executable, "-m", "stages.cli", *DETECT_ARGS, "--data-dir", str(data)],
                          capture_output=True, text=True, env=child_env(weights), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_kill_between_batches_leaves_nothing_and_rerun_is_bit_identical(tmp_path, capsys, weights_dir, reference):
    layout = index_w416(tmp_path / "killed", capsys)
    kill_at("after-first-batch", layout.root, weights_dir)
    detections, latency = outputs(layout)
    assert not detections.exists() and not latency.exists()
    assert not detections.parent.exists() or temporaries(detections.parent) == []
    assert "written" in rerun_by_hand(layout.root, weights_dir)
    assert detections.read_bytes() == reference
    assert len(read_table(latency, "latency")) == 12


@pytest.mark.slow
def test_kill_while_writing_keeps_the_old_file_and_stale_temporaries_are_harmless(
        tmp_path, capsys, weights_dir, reference):
    layout = index_w416(tmp_path / "killed", capsys)
    detections, latency = outputs(layout)
    # an older shard (written by other code: different provenance) that the run replaces
    detections.parent.mkdir(parents=True)
    old = write_older_shard(detections)
    kill_at("mid-write", layout.root, weights_dir)
    assert detections.read_bytes() == old  # the final name still holds the old, complete file
    stale = temporaries(detections.parent) + temporaries(latency.parent)
    assert stale, "the kill should have left a half-written temporary file behind"
    assert shard_paths(detections.parent) == [detections]
    # the dataset readers users are told to use skip the dot-files
    assert len(pd.read_parquet(detections.parent)) == 0

    assert "written" in rerun_by_hand(layout.root, weights_dir)
    assert detections.read_bytes() == reference
    assert all(p.exists() for p in stale)  # not touched, and not in the way
    # a shard folder read on its own has no hive keys above it: detector lives in the path
    assert pd.read_parquet(detections.parent).equals(read_table(detections, "detections").drop(columns="detector"))
    _, computed = run_detect("w416", DETECTOR, SCALES, SHARD, layout, torch.device("cpu"), 4, workers=0)
    assert not computed  # complete now: a third run skips it


def write_older_shard(path: Path) -> bytes:
    from pipeline.tables import empty_frame, write_table

    write_table(empty_frame("detections"), path, "detections", {"stage": "detect", "code_version": "old"})
    return path.read_bytes()


def test_full_disk_during_shard_write_leaves_no_shard(tmp_path, capsys, weights_dir, monkeypatch, one_torch_thread):
    """The kernel's own ENOSPC: the temporary file of the detections shard is /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("/dev/full is not available")
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))
    layout = index_w416(tmp_path / "data", capsys)
    detections, latency = outputs(layout)
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_disk(prefix="", suffix="", dir=None):
        fd, name = real_mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        if prefix.startswith(f".{detections.name}.") and Path(dir) == detections.parent:
            os.close(fd)
            os.unlink(name)
            os.symlink("/dev/full", name)
            fd = os.open(name, os.O_WRONLY)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_full_disk)
    with pytest.raises(OSError) as err:
        run_detect("w416", DETECTOR, SCALES, SHARD, layout, torch.device("cpu"), 4, workers=0)
    assert err.value.errno == errno.ENOSPC or "No space left on device" in str(err.value)
    assert not detections.exists() and not latency.exists()  # neither table of the pair is left
    assert temporaries(detections.parent) == []  # the failed temporary file is removed
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    path, computed = run_detect("w416", DETECTOR, SCALES, SHARD, layout, torch.device("cpu"), 4, workers=0)
    assert computed and len(read_table(path, "detections")) > 0


# ----------------------------------------------------------------------------- GPU memory
# test_detectors.py checks the retry order with a fake detector; here the real detector runs
# and the boxes after a retry or a CPU fallback must equal those of a run that fits.


class OutOfMemoryAbove:
    """Wraps a detector: raises torch.OutOfMemoryError, as CUDA does, when a network call's
    input has more than ``limit`` pixels (batch x height x width)."""

    def __init__(self, detector, limit: int):
        self.inner, self.limit, self.calls = detector, limit, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def detect(self, batch: torch.Tensor):
        pixels = batch.shape[0] * batch.shape[2] * batch.shape[3]
        self.calls.append(tuple(batch.shape))
        if pixels > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {pixels * 12} bytes")
        return self.inner.detect(batch)


@pytest.fixture
def slim_and_images(weights_dir, one_torch_thread):
    files = weights_cache.resolve(registry.get_info(DETECTOR).weights, weights_dir)
    detector = registry.build(DETECTOR, files, torch.device("cpu"))
    root = need_shared("widerface416", "WIDER_val", "images")
    paths = sorted(root.rglob("*.jpg"))[:3]
    images = [Decoded(p.stem, to_chw_tensor(decode_image(p))) for p in paths]
    return files, detector, images


def _frames(loop: DetectLoop, images) -> pd.DataFrame:
    detections, _ = loop.run(images)
    return detections.sort_values(["image_id", "score"], ascending=[True, False], kind="stable").reset_index(drop=True)


def test_batch_out_of_gpu_memory_is_retried_one_image_at_a_time(slim_and_images, caplog):
    _, detector, images = slim_and_images
    expected = _frames(DetectLoop(detector, scale_set(SCALES), batch_size=3), images)
    flaky = OutOfMemoryAbove(detector, limit=416 * 416)  # one image fits, a batch does not
    loop = DetectLoop(flaky, scale_set(SCALES), batch_size=3)
    got = _frames(loop, images)
    pd.testing.assert_frame_equal(got, expected)
    assert flaky.calls[0][0] == 3 and all(shape[0] == 1 for shape in flaky.calls[1:])
    assert loop.fallbacks == [] and "retrying one image at a time" in caplog.text


def test_image_too_large_for_gpu_runs_on_cpu_copy(slim_and_images, caplog):
    files, detector, images = slim_and_images
    expected = _frames(DetectLoop(detector, scale_set(SCALES), batch_size=2), images)
    built = []

    def cpu_copy():
        built.append(1)
        return registry.build(DETECTOR, files, torch.device("cpu"))

    loop = DetectLoop(OutOfMemoryAbove(detector, limit=100 * 100), scale_set(SCALES), batch_size=2,
                      cpu_fallback=cpu_copy)
    got = _frames(loop, images)
    pd.testing.assert_frame_equal(got, expected)
    assert len(loop.fallbacks) == 3 and built == [1]  # every image fell back; one CPU copy built
    assert "running it on the CPU" in caplog.text

"""The detect stage: shard membership, table contracts, provenance, skipping, bad images."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.detect import MemoryBudget
from pipeline.detectors import registry
from pipeline.tables import read_metadata, read_table, shard_members, write_table
from stages import detect as detect_stage
from stages.detect import cli, run_detect
from stages.layout import Layout

DETECTOR = "retinaface-mnet025"


@pytest.fixture(autouse=True)
def _env(monkeypatch, weights_dir, one_torch_thread):
    monkeypatch.setenv("CONFRANK_WEIGHTS", str(weights_dir))


def make_dataset(tmp_path, shared, n=6, absolute=False):
    """An images table over the first ``n`` widerface416 images copied under tmp_path/root."""
    src = shared("widerface416", "WIDER_val", "images")
    root = tmp_path / "root"
    rows = []
    for p in sorted(src.glob("*/*.jpg"))[:n]:
        dest = root / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        rows.append({"image_id": f"{p.parent.name}/{p.stem}",
                     "path": str(dest) if absolute else f"{p.parent.name}/{p.name}",
                     "width": 416, "height": 416, "split": "val", "event": p.parent.name})
    layout = Layout(tmp_path / "data")
    write_table(pd.DataFrame(rows), layout.images("tiny"), "images", {"root": str(root)},
                sort_by=[("image_id", "ascending")])
    return layout, root, [r["image_id"] for r in rows]


def test_shards_cover_the_dataset_once_sorted_and_described(tmp_path, shared):
    layout, _, ids = make_dataset(tmp_path, shared, n=5)
    seen = []
    for k in range(2):
        path, computed = run_detect("tiny", DETECTOR, "original", (k, 2), layout, torch.device("cpu"), workers=0)
        assert computed
        det = read_table(path, "detections")
        lat = read_table(layout.latency("tiny", DETECTOR, "original", k), "latency")
        members = shard_members(ids, 2, k)
        assert sorted(det["image_id"].astype(str).unique()) == members
        assert lat["image_id"].astype(str).tolist() == members
        assert (lat["latency_ms"] > 0).all() and (lat["input_width"] == 416).all()
        keys = list(zip(det["image_id"].astype(str), -det["score"]))
        assert keys == sorted(keys)
        assert (det["scale"] == 0).all() and not det["flip"].any() and (det["detector"] == DETECTOR).all()
        meta = read_metadata(path)
        assert meta["detector"] == DETECTOR and meta["scale_set"] == "original"
        assert meta["weights"] == {"retinaface_mobilenet0.25_Final":
                                   "38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0"}
        assert meta["config"]["shard"] == k and meta["config"]["n_shards"] == 2 and "code_version" in meta
        seen += members
    assert sorted(seen) == sorted(ids)


def test_complete_shard_is_skipped_and_recompute_is_identical(tmp_path, shared):
    layout, _, _ = make_dataset(tmp_path, shared, n=2, absolute=True)
    path, computed = run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=0)
    first, mtime = path.read_bytes(), path.stat().st_mtime_ns
    _, computed = run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=0)
    assert not computed and path.stat().st_mtime_ns == mtime
    # a different configuration is a different result: recomputed
    _, computed = run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), batch_size=1,
                             amp="bf16", workers=0)
    assert computed and read_metadata(path)["config"]["amp"] == "bf16"
    path.unlink()
    run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=1)
    assert path.read_bytes() == first


def test_skip_does_not_depend_on_how_or_where_it_was_run(tmp_path, shared, monkeypatch):
    """A shard written by a snakemake job (rule name set, run from the workflow folder) is up
    to date for the same command by hand from another folder, after an edit to code the stage
    does not import; an edit to the stage's own code (its `code` hash) recomputes it."""
    import pipeline.provenance
    import stages.detect

    layout, _, _ = make_dataset(tmp_path, shared, n=1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONFRANK_RULE", "detect")
    path, computed = run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=0)
    assert computed and read_metadata(path)["inputs"].keys() == {"data/interim/index/tiny/images.parquet"}
    mtime = path.stat().st_mtime_ns
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("CONFRANK_RULE")
    monkeypatch.setattr(pipeline.provenance, "code_version", lambda: "0.1.0+edited")  # e.g. a docstring in report.py
    _, computed = run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=0)
    assert not computed and path.stat().st_mtime_ns == mtime
    monkeypatch.setattr(stages.detect, "code_hash", lambda *modules: "0" * 16)  # the stage's code changed
    _, computed = run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=0)
    meta = read_metadata(path)
    assert computed and meta["code"] == "0" * 16 and meta["rule"] == ""


@pytest.mark.slow
def test_multi_scale_set_with_flips(tmp_path, shared):
    layout, _, _ = make_dataset(tmp_path, shared, n=1)
    path, _ = run_detect("tiny", "slim", "wider-multi", (0, 1), layout, torch.device("cpu"), workers=0)
    det = read_table(path, "detections")
    lat = read_table(layout.latency("tiny", "slim", "wider-multi", 0), "latency")
    assert sorted(set(zip(lat["scale"], lat["flip"]))) == [(t, f) for t in (500, 800, 1100, 1400, 1700) for f in (False, True)]
    assert det.groupby(["scale", "flip"]).size().max() <= 5000
    assert (det["x2"] > det["x1"]).all()
    # boxes are in original pixels at every scale: the best face is found at the same place
    best = det.sort_values("score", ascending=False).groupby(["scale", "flip"]).head(1)
    centres = (best[["x1", "x2"]].mean(axis=1).to_numpy(), best[["y1", "y2"]].mean(axis=1).to_numpy())
    assert np.ptp(centres[0]) < 416 and np.all((centres[0] > 0) & (centres[0] < 416))


def test_bad_image_fails_with_one_line_naming_it(tmp_path, shared):
    layout, root, ids = make_dataset(tmp_path, shared, n=2)
    bad = root / (ids[1] + ".jpg")
    bad.write_bytes(bad.read_bytes()[:3000])
    result = CliRunner().invoke(cli, ["--dataset", "tiny", "--detector", DETECTOR, "--workers", "0",
                                      "--device", "cpu", "--data-dir", str(layout.root)])
    assert result.exit_code != 0
    assert str(bad) in str(result.exception) and "truncated" in str(result.exception)
    assert not layout.detections("tiny", DETECTOR, "original", 0).exists()


def test_grey_image_runs_and_cli_reports(tmp_path, shared):
    layout, root, ids = make_dataset(tmp_path, shared, n=1)
    image = root / (ids[0] + ".jpg")
    Image.open(image).convert("L").save(image, format="PNG")  # grey PNG under a .jpg name
    result = CliRunner().invoke(cli, ["--dataset", "tiny", "--detector", DETECTOR, "--shard", "0/1", "--workers", "0",
                                      "--device", "cpu", "--data-dir", str(layout.root)])
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    again = CliRunner().invoke(cli, ["--dataset", "tiny", "--detector", DETECTOR, "--workers", "0",
                                     "--device", "cpu", "--data-dir", str(layout.root)])
    assert "up to date, skipped" in again.output
    assert len(read_table(layout.detections("tiny", DETECTOR, "original", 0), "detections")) > 0


def test_default_batch_fits_in_the_available_memory(tmp_path, shared, monkeypatch):
    """8K inputs of 416x416 images at the default batch of 4 once took all of a 24 GB
    machine: a call holds only as many images as fit in the memory available."""
    layout, _, _ = make_dataset(tmp_path, shared, n=4)
    per_image = registry.get_info(DETECTOR).bytes_per_pixel * 416 * 416
    monkeypatch.setattr(detect_stage.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=int(2.5 * per_image / detect_stage.MEMORY_SHARE)))
    calls = []
    real = detect_stage.build_detector

    def recording(*args, **kwargs):
        detector = real(*args, **kwargs)
        inner = detector.detect
        detector.detect = lambda images: calls.append(images.shape[0]) or inner(images)
        return detector

    monkeypatch.setattr(detect_stage, "build_detector", recording)
    run_detect("tiny", DETECTOR, "original", (0, 1), layout, torch.device("cpu"), workers=0)  # default batch 4
    assert calls == [2, 2]


def test_memory_budget_reads_host_ram_on_cpu_and_free_gpu_memory_on_cuda(monkeypatch):
    monkeypatch.setattr(detect_stage.psutil, "virtual_memory", lambda: SimpleNamespace(available=10_000))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4_000, 80_000))
    share = detect_stage.MEMORY_SHARE
    assert detect_stage.memory_budget(torch.device("cpu"), 5.0) == MemoryBudget(int(10_000 * share), 5.0)
    assert detect_stage.memory_budget(torch.device("cuda"), 5.0) == MemoryBudget(int(4_000 * share), 5.0)

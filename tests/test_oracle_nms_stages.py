"""`confrank oracle`, `nms`, `evaluate`, `import` and `export` through the CLI."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pandas as pd
import pytest

from pipeline.tables import read_metadata, read_table, write_table
from stages.layout import Layout
from tests.support import need_shared, run_cli


def _gt() -> pd.DataFrame:
    rows = [("e/a", 0, 0, 0, 19, 19, True), ("e/a", 1, 100, 100, 139, 139, False), ("e/b", 0, 50, 50, 69, 69, True)]
    frame = pd.DataFrame(rows, columns=["image_id", "gt_id", "x1", "y1", "x2", "y2", "hard"])
    frame["easy"] = frame["medium"] = frame["hard"]
    for attr in ("blur", "expression", "illumination", "invalid", "occlusion", "pose"):
        frame[attr] = 0
    return frame


def _dets(scales=(1000,), flips=(False,)) -> pd.DataFrame:
    rows = []
    for scale in scales:
        for flip in flips:
            rows += [("e/a", 1, 1, 19, 19, 0.9), ("e/a", 0, 0, 18, 18, 0.8), ("e/a", 300, 300, 310, 310, 0.3),
                     ("e/b", 50, 50, 68, 69, 0.7), ("e/c", 5, 5, 15, 15, 0.6)]
    frame = pd.DataFrame([r[:6] for r in rows], columns=["image_id", "x1", "y1", "x2", "y2", "score"])
    frame["scale"] = np.repeat([s for s in scales for _ in flips], 5)
    frame["flip"] = np.repeat([f for _ in scales for f in flips], 5)
    frame["detector"] = "toy"
    return frame


@pytest.fixture
def data(tmp_path):
    layout = Layout(tmp_path)
    write_table(_gt(), layout.gt("toy"), "gt")
    images = pd.DataFrame({"image_id": ["e/a", "e/b", "e/c"], "path": "", "width": 400, "height": 400, "split": "val", "event": "e"})
    write_table(images, layout.images("toy"), "images")
    dets = _dets()
    write_table(dets[dets.image_id != "e/c"], layout.detections("toy", "toy", "original", 0), "detections")
    write_table(dets[dets.image_id == "e/c"], layout.detections("toy", "toy", "original", 1), "detections")
    multi = _dets((500, 800), (False, True))
    write_table(multi, layout.detections("toy", "toy", "wider-multi", 0), "detections")
    return layout


@pytest.mark.parametrize("scheduler", ["threads", "synchronous"])
def test_oracle_stage(data, capsys, scheduler):
    args = ["oracle", "--dataset", "toy", "--detector", "toy", "--scales", "original", "--data-dir", str(data.root), "--dask-scheduler", scheduler]
    assert run_cli(args, capsys)[0] == 0
    part0 = read_table(data.oracle("toy", "toy", "original", 0), "detections")
    got = dict(zip(zip(part0.image_id.astype(str), part0.score.astype(float).round(3)), zip(part0.oracle_iou, part0.gt_id)))
    assert got[("e/a", 0.9)] == (pytest.approx(19 * 19 / 400), 0)
    assert got[("e/a", 0.3)] == (0.0, -1)
    assert got[("e/b", 0.7)] == (pytest.approx(19 * 20 / 400), 0)
    part1 = read_table(data.oracle("toy", "toy", "original", 1), "detections")
    assert part1.gt_id.tolist() == [-1]  # e/c has no faces
    assert read_metadata(data.oracle("toy", "toy", "original", 0))["stage"] == "oracle"


def test_oracle_on_a_dask_cluster_by_address(data, capsys):
    """--dask-scheduler tcp://HOST:PORT sends the shard tasks to a running cluster (here a local
    one on loopback) and writes the same bytes as the local threads scheduler."""
    from distributed import LocalCluster

    base = ["oracle", "--dataset", "toy", "--detector", "toy", "--scales", "original", "--data-dir", str(data.root)]
    assert run_cli(base + ["--dask-scheduler", "threads"], capsys)[0] == 0
    local = [data.oracle("toy", "toy", "original", k).read_bytes() for k in (0, 1)]
    for k in (0, 1):
        data.oracle("toy", "toy", "original", k).unlink()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        code, _, err = run_cli(base + ["--dask-scheduler", cluster.scheduler_address], capsys)
    assert code == 0, err
    assert [data.oracle("toy", "toy", "original", k).read_bytes() for k in (0, 1)] == local


def test_bad_scheduler_and_missing_inputs(data, capsys):
    code, _, err = run_cli(["oracle", "--dataset", "toy", "--detector", "toy", "--scales", "original", "--data-dir", str(data.root), "--dask-scheduler", "gpu"], capsys)
    assert code != 0 and "--dask-scheduler" in err
    code, _, err = run_cli(["nms", "--dataset", "toy", "--detector", "none", "--scales", "original", "--method", "single", "--data-dir", str(data.root)], capsys)
    assert code == 1 and "confrank detect" in err
    code, _, err = run_cli(["nms", "--dataset", "toy", "--detector", "toy", "--scales", "original", "--method", "rank", "--data-dir", str(data.root)], capsys)
    assert code != 0 and "--ranker" in err


def test_nms_single_multi_oracle_and_evaluate(data, capsys):
    root = str(data.root)
    base = ["--dataset", "toy", "--detector", "toy", "--data-dir", root]
    assert run_cli(["nms", *base, "--scales", "original", "--method", "single"], capsys)[0] == 0
    final = read_table(data.final("toy", "toy", "original", "single"), "final")
    assert sorted(zip(final.image_id.astype(str), final.score.astype(float).round(3))) == [("e/a", 0.3), ("e/a", 0.9), ("e/b", 0.7), ("e/c", 0.6)]
    assert read_metadata(data.final("toy", "toy", "original", "single"))["config"]["fusion"] == "nms"

    code, out, _ = run_cli(["evaluate", *base, "--scales", "original", "--method", "single", "--format", "json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["method"] == "single" and result["ap"]["hard"] == 1.0
    assert not data.pr_plot("toy", "toy", "original", "single").exists()  # drawn only when asked
    assert run_cli(["evaluate", *base, "--scales", "original", "--method", "single", "--plot"], capsys)[0] == 0
    assert data.pr_plot("toy", "toy", "original", "single").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(read_table(data.pr_curves("toy", "toy", "original", "single"), "pr").subset.astype(str)) == {"easy", "medium", "hard", "voc"}

    code, _, err = run_cli(["nms", *base, "--scales", "wider-multi", "--method", "single"], capsys)
    assert code == 1 and "one-scale" in err
    assert run_cli(["nms", *base, "--scales", "wider-multi", "--method", "multi", "--keep-singletons"], capsys)[0] == 0
    multi = read_table(data.final("toy", "toy", "wider-multi", "multi"), "final")
    meta = read_metadata(data.final("toy", "toy", "wider-multi", "multi"))["config"]
    assert meta["fusion"] == "voting" and meta["keep_singletons"] is True
    # four views of each box: e/a has one cluster of 8 (two overlapping boxes) and one of 4
    assert multi.groupby(multi.image_id.astype(str)).size().to_dict() == {"e/a": 2, "e/b": 1, "e/c": 1}

    assert run_cli(["oracle", *base, "--scales", "original"], capsys)[0] == 0
    assert run_cli(["nms", *base, "--scales", "original", "--method", "oracle"], capsys)[0] == 0
    oracle = read_table(data.final("toy", "toy", "original", "oracle"), "final")
    assert oracle[oracle.image_id.astype(str) == "e/a"].score.max() == pytest.approx(19 * 19 / 400)


def test_rank_method_reads_reranked_shards(data, capsys):
    dets = _dets().assign(rank_score=lambda f: 1 - f["score"])
    write_table(dets, data.reranked("r1", "toy", "toy", "original", 0), "detections")
    args = ["nms", "--dataset", "toy", "--detector", "toy", "--scales", "original", "--method", "rank", "--ranker", "r1", "--data-dir", str(data.root)]
    assert run_cli(args, capsys)[0] == 0
    final = read_table(data.final("toy", "toy", "original", "rank-r1"), "final")
    assert final[final.image_id.astype(str) == "e/c"].score.tolist() == [pytest.approx(0.4)]


@pytest.mark.slow
def test_import_export_round_trip_on_a_real_submission(tmp_path, capsys):
    truth = need_shared("widerface")
    archive = need_shared("widerface", "submissions", "thflgg133.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "sub", filter="data")
    root = str(tmp_path / "data")
    assert run_cli(["index", "--name", "wf", "--root", str(truth), "--data-dir", root], capsys)[0] == 0
    assert run_cli(["import", "--dataset", "wf", "--detector", "th", "--txt", str(tmp_path / "sub"), "--data-dir", root], capsys)[0] == 0
    code, out, _ = run_cli(["evaluate", "--dataset", "wf", "--detector", "th", "--method", "imported", "--format", "json", "--data-dir", root], capsys)
    first = json.loads(out)["ap"]
    np.testing.assert_allclose([first[s] for s in ("easy", "medium", "hard")],
                               [0.9069584243856689, 0.8815790551288838, 0.7382863255381045], rtol=0, atol=1e-6)
    layout = Layout(tmp_path / "data")
    dets = read_table(layout.detections("wf", "th", "original", 0), "detections")
    assert (dets.scale == 0).all() and not dets.flip.any()
    out_dir = tmp_path / "export"
    assert run_cli(["export", "--dataset", "wf", "--detector", "th", "--method", "imported", "--txt", str(out_dir), "--data-dir", root], capsys)[0] == 0
    assert len(list(out_dir.rglob("*.txt"))) == 3226
    assert run_cli(["import", "--dataset", "wf", "--detector", "again", "--txt", str(out_dir), "--data-dir", root], capsys)[0] == 0
    code, out, _ = run_cli(["evaluate", "--dataset", "wf", "--detector", "again", "--method", "imported", "--format", "json", "--data-dir", root], capsys)
    assert json.loads(out)["ap"] == first
    code, _, err = run_cli(["export", "--dataset", "wf", "--detector", "th", "--method", "imported", "--txt", str(out_dir), "--data-dir", root], capsys)
    assert code == 1 and "--force" in err

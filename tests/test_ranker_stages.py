"""The feature ranker through its stages: features (cached = on the fly), ensemble NMS,
train --model gbm / --preset, rerank, and confrank cv on a synthetic dataset with ground truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from pipeline.errors import ConfrankError
from pipeline.provenance import provenance
from pipeline.tables import read_metadata, read_table, write_table
from stages import cv as cv_stage
from stages import features as features_stage
from stages import fuse as fuse_stage
from stages import nms as nms_stage
from stages import rerank as rerank_stage
from stages import train as train_stage
from stages.featurestore import compute_features, feature_shards
from stages.layout import Layout
from pipeline.config import PRESET_DIR, preset_names
from pipeline.ranker.registry import settings_of
from stages.ranker_options import ranker_values


def ranker_settings(params):
    """(kind name, settings) the registry makes of a command's resolved parameters."""
    kind, settings = settings_of(ranker_values(params))
    return kind.name, settings

DETECTORS = ("detA", "detB")
EVIDENCE = "detA,detB"
SORT = [("image_id", "ascending"), ("score", "descending")]


def make_pool(layout: Layout, name: str = "toy", n_images: int = 10, seed: int = 0) -> None:
    """Images/gt tables and oracle shards (two shards per detector) of ``n_images`` images
    with two faces each: boxes near a face score higher, and detB agrees with detA's good boxes."""
    rng = np.random.default_rng(seed)
    images, gts, dets = [], [], []
    for i in range(n_images):
        image_id = f"0--Toy/{name}_{i}"
        images.append({"image_id": image_id, "path": f"{image_id}.jpg", "width": 200, "height": 100,
                       "split": "val", "event": "0--Toy"})
        faces = np.array([[20 + 3 * i, 20, 50 + 3 * i, 60], [120, 30, 140, 55]], np.float32)
        for g, f in enumerate(faces):
            gts.append({"image_id": image_id, "gt_id": g, "x1": f[0], "y1": f[1], "x2": f[2], "y2": f[3],
                        "blur": 0, "expression": 0, "illumination": 0, "invalid": 0, "occlusion": 0, "pose": 0,
                        "easy": g == 0, "medium": True, "hard": True})
        for d, det in enumerate(DETECTORS):
            n = 30
            centre = faces[rng.integers(0, 2, n)]
            boxes = centre + rng.normal(0, 4 + 6 * rng.random((n, 1)), (n, 4)).astype(np.float32)
            boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 3)
            iou = np.array([max(_iou(b, f) for f in faces) for b in boxes], np.float32)
            score = np.clip(0.4 * iou + rng.uniform(0, 0.6, n), 0.02, 1).astype(np.float32)
            dets.append(pd.DataFrame({"image_id": image_id, "detector": det, "scale": 0, "flip": False,
                                      "x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2], "y2": boxes[:, 3],
                                      "score": score, "oracle_iou": iou, "gt_id": np.int32(0)}))
    write_table(pd.DataFrame(images), layout.images(name), "images", provenance("index", {}, root="."))
    write_table(pd.DataFrame(gts), layout.gt(name), "gt", provenance("index", {}))
    frame = pd.concat(dets, ignore_index=True)
    ids = sorted(frame["image_id"].unique())
    for det in DETECTORS:
        part = frame[frame["detector"] == det]
        for k, chunk in enumerate((ids[: len(ids) // 2], ids[len(ids) // 2:])):
            write_table(part[part["image_id"].isin(chunk)], layout.oracle(name, det, "original", k), "detections",
                        provenance("oracle", {}), sort_by=SORT)


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture
def pool(tmp_path):
    layout = Layout(tmp_path / "data")
    make_pool(layout, "toy", 10, seed=0)
    make_pool(layout, "toy2", 6, seed=1)
    return layout


def invoke(command, args, layout):
    res = CliRunner().invoke(command, [*args, "--data-dir", str(layout.root)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_cached_features_equal_features_on_the_fly(pool):
    fly = compute_features(pool, "toy", "detA", "original", ["detA", "detB"])
    invoke(features_stage.cli, ["--dataset", "toy", "--detector", "detA", "--scales", "original", "--evidence", EVIDENCE], pool)
    assert read_metadata(pool.features("toy", "detA", "original", 0))["config"]["evidence"] == ["detB"]
    cached = feature_shards(pool, "toy", "detA", "original", ["detA", "detB"])
    assert [c[2] for c in cached] == [[pool.features("toy", "detA", "original", k)] for k in (0, 1)]
    for (k, a, _), (j, b, _) in zip(fly, cached):
        assert k == j
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b[a.columns].reset_index(drop=True), check_dtype=False,
                                      check_categorical=False)
    # another evidence set, or a changed source shard, is not served from the cache
    assert feature_shards(pool, "toy", "detA", "original", ["detA"])[0][2][0] != pool.features("toy", "detA", "original", 0)
    src = pool.oracle("toy", "detA", "original", 0)
    table = read_table(src, "detections")
    table["score"] = table["score"] * 0.5
    write_table(table, src, "detections", read_metadata(src), sort_by=SORT)
    fresh = feature_shards(pool, "toy", "detA", "original", ["detA", "detB"])
    assert fresh[0][2][0] == src and fresh[0][1]["conf"].max() <= 0.5


def test_ensemble_method_fuses_on_the_ensemble_score(pool):
    invoke(features_stage.cli, ["--dataset", "toy", "--detector", "detA", "--scales", "original", "--evidence", EVIDENCE], pool)
    invoke(nms_stage.cli, ["--dataset", "toy", "--detector", "detA", "--scales", "original", "--method", "ensemble"], pool)
    final = read_table(pool.final("toy", "detA", "original", "ensemble"), "final")
    feats = pd.concat([read_table(pool.features("toy", "detA", "original", k), "features") for k in (0, 1)])
    assert read_metadata(pool.final("toy", "detA", "original", "ensemble"))["config"]["score_column"] == "ensemble_score"
    assert set(np.round(final["score"], 6)) <= set(np.round(feats["ensemble_score"], 6))


def test_train_gbm_then_rerank(pool):
    out = invoke(train_stage.cli, ["--datasets", "toy,toy2", "--detectors", "detA,detB", "--scales", "original",
                                   "--ranker", "g", "--model", "gbm", "--evidence", EVIDENCE, "--gbm-trees", "20",
                                   "--gbm-min-leaf", "5", "--workers", "1"], pool)
    assert "gbm, 20 trees" in out
    folder = pool.ranker_dir("g")
    assert {p.name for p in folder.iterdir()} >= {"model.pt", "train_log.parquet", "loss.png", "train_images.txt"}
    log = read_table(folder / "train_log.parquet", "train_log")
    assert log["step"].tolist() == [10, 20] and log["loss"].iloc[-1] < log["loss"].iloc[0]
    assert 0.5 < log["pair_accuracy"].iloc[-1] <= 1
    invoke(rerank_stage.cli, ["--dataset", "toy", "--detector", "detB", "--scales", "original", "--ranker", "g"], pool)
    ranked = pd.concat([read_table(pool.reranked("g", "toy", "detB", "original", k), "detections") for k in (0, 1)])
    source = pd.concat([read_table(pool.oracle("toy", "detB", "original", k), "detections") for k in (0, 1)])
    assert ranked[["image_id", "x1", "score"]].reset_index(drop=True).equals(source[["image_id", "x1", "score"]].reset_index(drop=True))
    # the ranker learned the oracle better than the detector score did
    corr = np.corrcoef(ranked["rank_score"], ranked["oracle_iou"])[0, 1]
    assert corr > np.corrcoef(ranked["score"], ranked["oracle_iou"])[0, 1]


def test_gbm_without_evidence_is_refused(pool):
    res = CliRunner().invoke(train_stage.cli, ["--datasets", "toy", "--detectors", "detA", "--scales", "original",
                                               "--ranker", "g", "--model", "gbm", "--data-dir", str(pool.root)])
    assert res.exit_code != 0 and "needs --evidence" in str(res.exception)


def _options(command, args):
    """The ranker options click resolves for ``args`` (preset applied), without running."""
    ctx = command.make_context("x", [*args, "--datasets", "d", "--detectors", "a", "--scales", "original", "--ranker", "r"])
    return ctx.params


@pytest.mark.parametrize("preset", preset_names())
def test_preset_round_trips_into_the_same_settings_as_its_flags(preset):
    values = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    flags = []
    for key, value in values.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [name, ",".join(value) if isinstance(value, list) else str(value)]
    by_preset = ranker_settings(_options(train_stage.cli, ["--preset", preset]))
    by_flags = ranker_settings(_options(train_stage.cli, flags))
    assert by_preset == by_flags


def test_paper_preset_is_the_default_and_cpu_is_not():
    defaults = ranker_settings(_options(train_stage.cli, []))
    assert ranker_settings(_options(train_stage.cli, ["--preset", "paper"])) == defaults  # seed 000, 4.2
    assert ranker_settings(_options(train_stage.cli, ["--preset", "cpu"]))[0] == "gbm"


def test_flags_override_the_preset():
    kind, gbm = ranker_settings(_options(train_stage.cli, ["--preset", "cpu", "--gbm-trees", "7"]))
    assert kind == "gbm" and gbm.trees == 7


def test_unknown_preset_and_bad_key_name_the_file(tmp_path):
    with pytest.raises(Exception, match="no such preset"):
        _options(train_stage.cli, ["--preset", "nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("gbm_trees: 5\nwarp_speed: 9\n")
    with pytest.raises(Exception, match=r"bad.yaml: 'warp_speed' is not a ranker option"):
        _options(train_stage.cli, ["--preset", str(bad)])
    bad.write_text("- gbm_trees\n- 5\n")
    with pytest.raises(Exception, match=r"bad.yaml: expected a mapping of option names to values"):
        _options(train_stage.cli, ["--preset", str(bad)])
    bad.write_text("gbm_trees: [5\n")
    with pytest.raises(Exception, match=r"bad.yaml: expected valid YAML"):
        _options(train_stage.cli, ["--preset", str(bad)])


@pytest.mark.slow
def test_cv_run_and_summary(pool):
    args = ["--name", "x", "--pool", "toy,toy2", "--detectors", "detA,detB", "--scales", "original", "--folds", "3",
            "--model", "gbm", "--evidence", EVIDENCE, "--gbm-trees", "10", "--gbm-min-leaf", "5", "--workers", "1"]
    invoke(cv_stage.cli, ["run", "--variant", "g", *args], pool)
    table = read_table(pool.cv_deltas("x", "g"), "cv_deltas")
    assert sorted(table["fold"].unique()) == [1, 2, 3]
    assert set(table["subset"]) == {"easy", "medium", "hard"} and set(table["detector"]) == set(DETECTORS)
    assert table.groupby(["detector", "subset"])["n_images"].sum().eq(16).all()  # every image held out once
    np.testing.assert_allclose(table["delta"], table["ap_rank"] - table["ap_single"])
    assert (table["ap_oracle"] >= table["ap_single"] - 1e-9).all() and table["ap_ensemble"].notna().all()
    # each fold's ranker saw only the other folds' images
    for k in (1, 2, 3):
        trained = (pool.cv_variant_dir("x", "g") / f"fold-{k}" / "train_images.txt").read_text().split("\n")
        held = set(table[(table["fold"] == k)]["n_images"])
        assert len([t for t in trained if t]) == 16 - held.pop()
    invoke(cv_stage.cli, ["run", "--variant", "lodo", *args, "--train-detectors", "detB"], pool)
    out = invoke(cv_stage.cli, ["summary", "--name", "x"], pool)
    assert "| g | detA |" in out and "| lodo | detB |" in out
    both = read_table(pool.cv_deltas("x"), "cv_deltas")
    assert set(both["ranker"]) == {"g", "lodo"} and set(both[both["ranker"] == "lodo"]["train_detectors"]) == {"detB"}
    assert pool.cv_summary("x").read_text().startswith("# Cross-validation x")


def test_cv_is_deterministic(pool):
    args = ["run", "--name", "x", "--variant", "g", "--pool", "toy", "--detectors", "detA", "--scales", "original",
            "--folds", "2", "--model", "gbm", "--evidence", EVIDENCE, "--gbm-trees", "5", "--gbm-min-leaf", "5",
            "--workers", "1"]
    invoke(cv_stage.cli, args, pool)
    first = read_table(pool.cv_deltas("x", "g"), "cv_deltas")
    invoke(cv_stage.cli, args, pool)
    second = read_table(pool.cv_deltas("x", "g"), "cv_deltas")
    pd.testing.assert_frame_equal(first.drop(columns="train_seconds"), second.drop(columns="train_seconds"))


def test_gbm_config_rejects_bad_values():
    from pipeline.ranker.gbm import GbmConfig
    with pytest.raises(ConfrankError, match="objective"):
        GbmConfig(objective="huber")


# ----------------------------------------------------------------------------- learned fusion, nested cv


FUSION = ["--model", "fusion", "--evidence", EVIDENCE, "--gbm-trees", "10", "--gbm-min-leaf", "3", "--workers", "1"]


def test_fusion_trains_and_fuses_and_refuses_rerank(pool):
    out = invoke(train_stage.cli, ["--datasets", "toy,toy2", "--detectors", "detA,detB", "--scales", "original",
                                   "--ranker", "f", *FUSION], pool)
    assert "fusion, 10 trees" in out
    invoke(fuse_stage.cli, ["--dataset", "toy", "--detectors", "detB,detA", "--scales", "original", "--method", "rank",
                            "--ranker", "f", "--name", "ab"], pool)
    final = read_table(pool.final("toy", "ab", "original", "rank-f"), "final")
    assert len(final) and final["score"].between(0, 1).all()
    assert read_metadata(pool.final("toy", "ab", "original", "rank-f"))["config"]["detectors"] == ["detB", "detA"]
    with pytest.raises(ConfrankError, match="fuses detA, detB; --detectors gave detA"):
        invoke(fuse_stage.cli, ["--dataset", "toy", "--detectors", "detA", "--scales", "original", "--method",
                                "rank-f", "--name", "a"], pool)
    with pytest.raises(ConfrankError, match="use `confrank fuse --method rank-RNAME`"):
        rerank_stage.run_rerank(pool, "toy", "detA", "original", "f", device="cpu")


def test_fusion_ignores_ground_truth_columns(pool):
    from pipeline.ranker.registry import load_ranker
    from stages.rankerio import ranker_shards

    invoke(train_stage.cli, ["--datasets", "toy", "--detectors", "detA,detB", "--scales", "original", "--ranker", "f",
                             *FUSION], pool)
    loaded = load_ranker(pool.ranker_model("f"))
    frames = [pd.concat([f for _, f, _ in ranker_shards(pool, loaded.kind, loaded.settings, "toy2", d, "original")])
              for d in ("detA", "detB")]
    sizes = {i: (200, 100) for i in frames[0]["image_id"].unique()}
    impl = loaded.kind.impl()
    first = impl.fuse(loaded.model, loaded.settings, frames, sizes)
    rng = np.random.default_rng(0)
    shuffled = [f.assign(oracle_iou=rng.permutation(f["oracle_iou"].to_numpy()),
                         gt_id=rng.permutation(f["gt_id"].to_numpy())) for f in frames]
    pd.testing.assert_frame_equal(first, impl.fuse(loaded.model, loaded.settings, shuffled, sizes))
    dropped = [f.drop(columns=["oracle_iou", "gt_id"]) for f in frames]
    pd.testing.assert_frame_equal(first, impl.fuse(loaded.model, loaded.settings, dropped, sizes))


def test_nested_cv_chooses_on_inner_folds_and_scores_held_out_images_only(pool, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("small: {gbm_trees: 3}\nlarger: {gbm_trees: 12, fusion_iou: 0.5}\n")
    args = ["run", "--name", "n", "--variant", "f", "--pool", "toy,toy2", "--detectors", "detA,detB", "--scales",
            "original", "--folds", "2", *FUSION, "--grid", str(grid), "--inner-folds", "2"]
    invoke(cv_stage.cli, args, pool)
    table = read_table(pool.cv_deltas("n", "f"), "cv_deltas")
    assert set(table["chosen"]) <= {"small", "larger"} and table["ap_wbf"].notna().all()
    search = pd.read_parquet(pool.cv_variant_dir("n", "f") / "search.parquet")
    assert sorted(search["fold"].unique()) == [1, 2] and set(search["candidate"]) == {"small", "larger"}
    # the fused boxes of a fusion ranker are the same for every detector evaluated
    both = table.pivot_table(index=["fold", "subset"], columns="detector", values="ap_rank")
    np.testing.assert_allclose(both["detA"], both["detB"])
    finals = read_table(pool.cv_variant_dir("n", "f") / "finals.parquet", "cv_finals")
    for fold in (1, 2):
        roles = pd.read_parquet(pool.cv_variant_dir("n", "f") / f"fold-{fold}" / "images.parquet")
        trained = set(zip(*roles[roles["role"] == "train"][["dataset", "image_id"]].to_numpy().T))
        evaluated = set(zip(*roles[roles["role"] == "evaluate"][["dataset", "image_id"]].to_numpy().T))
        assert trained and evaluated and not trained & evaluated
        scored = {tuple(i.split("/", 1)) for i in finals[finals["fold"] == fold]["image_id"].astype(str)}
        assert scored <= evaluated
    out = invoke(cv_stage.cli, ["summary", "--name", "n", "--resamples", "50"], pool)
    assert "rank − wbf" in out
    intervals = pd.read_parquet(pool.cv_dir("n") / "bootstrap.parquet")
    assert {("rank", "single"), ("rank", "wbf")} <= set(zip(intervals["a"], intervals["b"]))
    assert (intervals["ci_low"] <= intervals["delta"] + 1e-12).all() and (intervals["delta"] <= intervals["ci_high"] + 1e-12).all()


def test_a_fold_that_trains_on_a_held_out_image_is_refused(pool, monkeypatch):
    from stages import rankerio

    real = rankerio.training_data

    def leaky(layout, kind, settings, datasets, detectors, scales, chosen):  # trains on every image
        every = {d: set(read_table(layout.images(d), "images")["image_id"].astype(str)) for d in datasets}
        return real(layout, kind, settings, datasets, detectors, scales, every)

    monkeypatch.setattr(rankerio, "training_data", leaky)
    with pytest.raises(ConfrankError, match="was both trained on and evaluated"):
        invoke(cv_stage.cli, ["run", "--name", "x", "--variant", "g", "--pool", "toy", "--detectors", "detA",
                              "--scales", "original", "--folds", "2", "--model", "gbm", "--evidence", EVIDENCE,
                              "--gbm-trees", "3", "--gbm-min-leaf", "5", "--workers", "1"], pool)


def test_cv_scores_rows_without_ground_truth_columns(pool, monkeypatch):
    from pipeline.ranker.registry import LoadedRanker

    seen = []
    real = LoadedRanker.score

    def spy(self, frame, context):
        seen.append(set(frame.columns))
        return real(self, frame, context)

    monkeypatch.setattr(LoadedRanker, "score", spy)
    invoke(cv_stage.cli, ["run", "--name", "x", "--variant", "g", "--pool", "toy", "--detectors", "detA", "--scales",
                          "original", "--folds", "2", "--model", "gbm", "--evidence", EVIDENCE, "--gbm-trees", "3",
                          "--gbm-min-leaf", "5", "--workers", "1"], pool)
    assert seen and all(not cols & {"oracle_iou", "gt_id"} for cols in seen)


def test_features_do_not_depend_on_ground_truth_columns(pool):
    from pipeline.ranker.features import FEATURES, frame_features

    dets = read_table(pool.oracle("toy", "detA", "original", 0), "detections")
    evidence = {"detB": read_table(pool.oracle("toy", "detB", "original", 0), "detections")}
    sizes = {i: (200, 100) for i in dets["image_id"].astype(str).unique()}
    base = frame_features(dets, evidence, sizes)[list(FEATURES) + ["ensemble_score"]]
    rng = np.random.default_rng(1)
    permuted = dets.assign(oracle_iou=rng.permutation(dets["oracle_iou"].to_numpy()),
                           gt_id=rng.permutation(dets["gt_id"].to_numpy()))
    other = {"detB": evidence["detB"].assign(oracle_iou=0.0)}
    pd.testing.assert_frame_equal(base, frame_features(permuted, other, sizes)[base.columns])
    dropped = dets.drop(columns=["oracle_iou", "gt_id"])
    pd.testing.assert_frame_equal(base, frame_features(dropped, evidence, sizes)[base.columns])


def test_rerank_and_fuse_run_on_a_dataset_without_ground_truth(pool, tmp_path):
    """A dataset with detections only (no gt table, no oracle shards): what a user's own images are."""
    invoke(train_stage.cli, ["--datasets", "toy", "--detectors", "detA,detB", "--scales", "original", "--ranker", "g",
                             "--model", "gbm", "--evidence", EVIDENCE, "--gbm-trees", "5", "--gbm-min-leaf", "5",
                             "--workers", "1"], pool)
    invoke(train_stage.cli, ["--datasets", "toy", "--detectors", "detA,detB", "--scales", "original", "--ranker", "f",
                             *FUSION], pool)
    bare = Layout(tmp_path / "bare")
    for path in [pool.ranker_dir("g"), pool.ranker_dir("f")]:
        dest = bare.ranker_dir(path.name)
        dest.mkdir(parents=True)
        for f in path.iterdir():
            (dest / f.name).write_bytes(f.read_bytes())
    write_table(read_table(pool.images("toy2"), "images"), bare.images("new"), "images", read_metadata(pool.images("toy2")))
    for det in DETECTORS:
        for k in (0, 1):
            rows = read_table(pool.oracle("toy2", det, "original", k), "detections").drop(columns=["oracle_iou", "gt_id"])
            write_table(rows, bare.detections("new", det, "original", k), "detections", provenance("detect", {}),
                        sort_by=SORT)
    assert not bare.gt("new").exists()
    rerank_stage.run_rerank(bare, "new", "detA", "original", "g", device="cpu")
    invoke(fuse_stage.cli, ["--dataset", "new", "--detectors", "detA,detB", "--scales", "original", "--method",
                            "rank-f", "--name", "ab"], bare)
    assert len(read_table(bare.final("new", "ab", "original", "rank-f"), "final"))


def test_nms_and_voting_iou_is_pinned_to_0_4():
    import inspect

    from pipeline import boxes
    from pipeline.ranker.folds import NMS_IOU
    from stages.common import SCHEMA

    assert NMS_IOU == 0.4
    assert inspect.signature(boxes.nms).parameters["iou"].default == 0.4
    for command in (nms_stage.cli, fuse_stage.cli):
        assert {p.name: p for p in command.params}["iou"].default == 0.4
    assert yaml.safe_load(SCHEMA.read_text())["properties"]["postprocess"]["properties"]["iou"]["default"] == 0.4

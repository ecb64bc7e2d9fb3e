"""Per-box features, the ensemble baseline, cross-validation folds and the feature ranker."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from unittest import mock

from pipeline.iou import pairwise_iou
from pipeline.ranker import features as F
from pipeline.ranker.features import (EVIDENCE, FEATURES, NEIGHBOURS, OWN, box_features, ensemble_scores,
                                      evidence_features, frame_features, neighbour_features, overlap_pairs)
from pipeline.ranker.folds import assign_folds, fold_ids, parse_fold
from pipeline.ranker.gbm import GbmConfig, predict_gbm, relevance, train_gbm

BOXES = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 70]], np.float32)
SCORES = np.array([0.9, 0.5, 0.3], np.float32)


def col(name: str) -> int:
    return FEATURES.index(name)


# ----------------------------------------------------------------------------- folds


def test_folds_are_disjoint_cover_and_balanced():
    ids = [f"e/img_{i}" for i in range(23)]
    folds = assign_folds(ids, 5)
    assert set(folds) == set(ids) and set(folds.values()) == {1, 2, 3, 4, 5}
    sizes = np.bincount(list(folds.values()))[1:]
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 23
    parts = [fold_ids(ids, k, 5) for k in range(1, 6)]
    assert sorted(sum(parts, [])) == sorted(ids)
    assert fold_ids(ids, 2, 5, complement=True) == sorted(set(ids) - set(parts[1]))


def test_folds_do_not_depend_on_order_duplicates_or_process():
    ids = [f"0--Parade/0_Parade_{i}" for i in range(12)]
    assert assign_folds(ids, 3) == assign_folds(list(reversed(ids)) + ids[:4], 3)
    code = ("from pipeline.ranker.folds import assign_folds;"
            f"print(sorted(assign_folds({ids!r}, 3).items()))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert runs == {f"{sorted(assign_folds(ids, 3).items())}\n"}


def test_fold_assignment_is_the_sha256_deal():
    # the order is the sha256 of the id; fixed values, so a change of the rule fails here
    # sha256 order of a, b, c, d is d (18ac..), c (2e7d..), b (3e23..), a (ca97..)
    assert assign_folds(["a", "b", "c", "d"], 2) == {"d": 1, "c": 2, "b": 1, "a": 2}


@pytest.mark.parametrize("text", ["0/5", "6/5", "1/1", "a/5", "3", "1/2/3"])
def test_parse_fold_rejects(text):
    with pytest.raises(ValueError, match="expected"):
        parse_fold(text)


def test_parse_fold():
    assert parse_fold("2/5") == (2, 5)


# ----------------------------------------------------------------------------- features


def test_own_features_by_hand():
    f = box_features(BOXES, SCORES, 100, 200, [])
    assert f.shape == (3, len(FEATURES)) and f.dtype == np.float32
    assert f[:, col("conf")].tolist() == pytest.approx([0.9, 0.5, 0.3])
    assert f[0, col("conf_logit")] == pytest.approx(np.log(0.9 / 0.1), rel=1e-5)
    assert f[2, col("log_w")] == pytest.approx(np.log(10)) and f[2, col("log_h")] == pytest.approx(np.log(20))
    assert f[2, col("log_aspect")] == pytest.approx(np.log(2))
    assert f[2, col("log_rel_area")] == pytest.approx(np.log(200 / 20000), rel=1e-5)
    assert f[2, col("cx")] == pytest.approx(0.55) and f[2, col("cy")] == pytest.approx(0.3)
    assert f[:, col("rank_frac")].tolist() == pytest.approx([0, 1 / 3, 2 / 3])
    assert f[:, col("score_over_max")].tolist() == pytest.approx([1, 0.5 / 0.9, 0.3 / 0.9])
    assert f[0, col("log_confident")] == pytest.approx(np.log(3))  # two boxes >= 0.5
    assert f[0, col("top10_mean")] == pytest.approx(np.mean(SCORES))


def test_neighbour_features_by_hand():
    f = neighbour_features(BOXES, SCORES)
    # box 1 (0,0,10,5) lies inside box 0: IoU 0.5 with the higher-scored box 0
    assert f[1].tolist() == pytest.approx([0.5, 0.9, np.log(2), 0.9, 0.5])
    assert f[0].tolist() == pytest.approx([0.0, 0.0, np.log(2), 0.5, 0.5])  # nothing scores higher
    assert f[2].tolist() == pytest.approx([0, 0, 0, 0, 0])


def test_evidence_and_ensemble_by_hand():
    other = (np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32), np.array([0.8, 0.6], np.float32))
    weak = (np.array([[0, 0, 10, 8]], np.float32), np.array([0.2], np.float32))
    f = evidence_features(BOXES, [other, weak])
    # box 0: 0.8 from `other` (IoU 1) and 0.2 from `weak` (IoU 0.8)
    assert f[0].tolist() == pytest.approx([0.8, 0.5, 0.2, 1.0, 0.5, 0.5, (0.8 * 1.0 + 0.2 * 0) / 2])
    # box 2 (50,50,60,70) and (50,50,60,60): IoU 0.5 -> counts, score 0.6
    assert f[2, 0] == pytest.approx(0.6) and f[2, 3] == pytest.approx(0.5)
    assert ensemble_scores(SCORES, BOXES, [other, weak]).tolist() == pytest.approx([0.85, (0.5 + 0.8) / 2, 0.45])
    # the order of the other detectors never matters
    assert np.array_equal(box_features(BOXES, SCORES, 100, 100, [other, weak]),
                          box_features(BOXES, SCORES, 100, 100, [weak, other]))


def test_no_evidence_gives_zeros_and_the_own_score():
    f = box_features(BOXES, SCORES, 100, 100, [])
    assert not f[:, [col(n) for n in EVIDENCE]].any()
    assert np.array_equal(ensemble_scores(SCORES, BOXES, []), SCORES)
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    assert np.array_equal(ensemble_scores(SCORES, BOXES, [empty]), SCORES / 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 200), st.floats(0, 200), st.floats(1, 80), st.floats(1, 80), st.floats(0.02, 1)),
                min_size=1, max_size=30))
def test_features_are_finite_and_do_not_depend_on_row_order(rows):
    a = np.array(rows, np.float32)
    boxes = np.c_[a[:, :2], a[:, :2] + a[:, 2:4]].astype(np.float32)
    scores = a[:, 4]
    order = np.random.default_rng(0).permutation(len(rows))
    other = (boxes[::2] + 1, scores[::2])
    f = box_features(boxes, scores, 300, 300, [other])
    g = box_features(boxes[order], scores[order], 300, 300, [other])
    assert np.isfinite(f).all()
    # ties in score make rank features order-dependent; the rest is a function of the box
    stable = [col(n) for n in FEATURES if n not in ("rank_frac", "log_rank", "max_iou_higher", "score_of_max_higher")]
    np.testing.assert_allclose(f[order][:, stable], g[:, stable], rtol=1e-5, atol=1e-6)
    assert (f[:, [col(n) for n in OWN + NEIGHBOURS + EVIDENCE]] == f).all()


def test_frame_features_keeps_rows_and_groups_by_view():
    dets = pd.DataFrame({
        "image_id": ["b", "a", "a", "a"], "detector": "d", "scale": [0, 0, 0, 800], "flip": False,
        "x1": [0, 0, 0, 0], "y1": [0, 0, 0, 0], "x2": [10, 10, 10, 10], "y2": [10, 5, 10, 10],
        "score": np.array([0.4, 0.5, 0.9, 0.7], np.float32)})
    evidence = {"e": pd.DataFrame({"image_id": ["a"], "x1": [0.0], "y1": [0.0], "x2": [10.0], "y2": [10.0], "score": [0.6]})}
    out = frame_features(dets, evidence, {"a": (100, 100), "b": (50, 50)})
    assert out[list(dets.columns)].equals(dets)
    # row 3 is alone in its (image, scale, flip) view: no neighbours; rows 1 and 2 see each other
    assert out.loc[3, "log_overlaps"] == 0 and out.loc[1, "max_iou_higher"] == pytest.approx(0.5)
    # image b has no evidence: ensemble = score / 2; image a: mean with 0.6
    assert out["ensemble_score"].tolist() == pytest.approx([0.2, 0.55, 0.75, 0.65])


# ----------------------------------------------------------------------------- pair search vs dense


def dense():
    """The dense IoU matrices everywhere (the pair search never starts)."""
    return mock.patch.object(F, "SPARSE_MIN_PAIRS", 1 << 62)


def sparse(budget: int = 1 << 22, row_min: float = 128.0):
    """The pair search for every block, ``budget`` candidate pairs at a time."""
    patches = [mock.patch.object(F, "SPARSE_MIN_PAIRS", 0), mock.patch.object(F, "PAIR_BUDGET", budget),
               mock.patch.object(F._Grid, "ROW_MIN", row_min)]

    class Both:
        def __enter__(self):
            for p in patches:
                p.__enter__()

        def __exit__(self, *exc):
            for p in reversed(patches):
                p.__exit__(*exc)

    return Both()


def box_sets(max_size: int = 25):
    """(n, 4) float32 boxes on a coarse grid (duplicates, shared edges, touching and empty
    boxes are common) or anywhere, and (n,) float32 scores from a few values (ties)."""
    coord = st.one_of(st.integers(-4, 40).map(float), st.floats(-50, 300, width=32))
    side = st.one_of(st.integers(0, 12).map(float), st.floats(0, 120, width=32))
    row = st.tuples(coord, coord, side, side, st.sampled_from([0.0, 0.02, 0.3, 0.5, 0.5, 0.9, 1.0]))
    return st.lists(row, min_size=0, max_size=max_size).map(_as_boxes)


def _as_boxes(rows):
    a = np.array(rows, np.float32).reshape(-1, 5)
    boxes = np.c_[a[:, :2], a[:, :2] + a[:, 2:4]].astype(np.float32)
    return boxes, a[:, 4].copy()


def assert_pairs_are_the_nonzero_ious(a, b):
    i, j, iou = overlap_pairs(a, b)
    dense_iou = pairwise_iou(a, b)
    di, dj = np.nonzero(dense_iou)
    order = np.lexsort((j, i))
    assert np.array_equal(i[order], di) and np.array_equal(j[order], dj)
    assert np.array_equal(iou[order].view(np.uint32), dense_iou[di, dj].view(np.uint32))


@settings(max_examples=150, deadline=None)
@given(box_sets(), box_sets(), st.sampled_from([1, 5, 1 << 22]), st.sampled_from([1.0, 128.0]))
def test_pair_search_finds_exactly_the_nonzero_ious(a, b, budget, row_min):
    with sparse(budget, row_min):
        assert_pairs_are_the_nonzero_ious(a[0], b[0])
        assert_pairs_are_the_nonzero_ious(a[0], a[0])


def test_pair_search_with_huge_coordinates_and_degenerate_boxes():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 5, 20], [3e7, 0, 3.1e7, 10], [0, 0, 10, 10], [9, 9, 30, 30],
                      [10, 0, 20, 10], [np.inf, 0, np.inf, 5], [-2e9, -5, 2e9, 5]], np.float32)
    with np.errstate(invalid="ignore"):  # the dense reference's inf - inf
        assert_pairs_are_the_nonzero_ious(boxes, boxes)
        assert_pairs_are_the_nonzero_ious(boxes[:2], boxes)
        assert_pairs_are_the_nonzero_ious(boxes, boxes[:2])
        assert_pairs_are_the_nonzero_ious(boxes[:0], boxes)


@settings(max_examples=150, deadline=None)
@given(box_sets(), st.lists(box_sets(12), min_size=0, max_size=3), st.sampled_from([1, 7, 1 << 22]),
       st.sampled_from([1.0, 128.0]))
def test_pair_search_gives_the_dense_features_bit_for_bit(own, evidence, budget, row_min):
    boxes, scores = own
    with dense():
        want = F._box_features(boxes, scores, 320, 240, evidence)
        want_ens = ensemble_scores(scores, boxes, evidence)
        want_n, want_e = neighbour_features(boxes, scores), evidence_features(boxes, evidence)
    with sparse(budget, row_min):
        got = F._box_features(boxes, scores, 320, 240, evidence)
        got_ens = ensemble_scores(scores, boxes, evidence)
        got_n, got_e = neighbour_features(boxes, scores), evidence_features(boxes, evidence)
    assert np.array_equal(got[0].view(np.uint32), want[0].view(np.uint32))
    for (gs, gi), (ws, wi) in zip(got[1], want[1]):
        assert np.array_equal(gs.view(np.uint64), ws.view(np.uint64)) and np.array_equal(gi.view(np.uint64), wi.view(np.uint64))
    assert np.array_equal(got_ens.view(np.uint32), want_ens.view(np.uint32))
    assert np.array_equal(got_n.view(np.uint64), want_n.view(np.uint64))
    assert np.array_equal(got_e.view(np.uint64), want_e.view(np.uint64))


def test_negative_scores_keep_the_dense_path():
    # a row's implicit 0 could be its maximum: the pair search is not used
    other = (BOXES.copy(), np.array([-0.5, -0.2, -0.1], np.float32))
    with dense():
        want = F.best_evidence(BOXES, *other)
    with sparse():
        got = F.best_evidence(BOXES, *other)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[0].tolist() == [0, 0, 0]


def views_frame(rng, image_id: str, detector: str, views, n: int) -> pd.DataFrame:
    """Boxes of one detector on a 2000 x 1500 image, clustered around 15 faces, per view."""
    faces = rng.uniform(0, 1800, (15, 2))
    size = np.exp(rng.uniform(np.log(8), np.log(200), (15, 1)))
    faces = np.c_[faces, faces + size].astype(np.float32)
    parts = []
    for scale, flip in views:
        b = faces[rng.integers(0, 15, n)] + rng.normal(0, 3, (n, 4)).astype(np.float32)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        score = np.round(rng.uniform(0.02, 1, n), 2).astype(np.float32)  # ties
        parts.append(pd.DataFrame({"image_id": image_id, "detector": detector, "scale": scale, "flip": flip,
                                   "x1": b[:, 0], "y1": b[:, 1], "x2": b[:, 2], "y2": b[:, 3], "score": score}))
    return pd.concat(parts, ignore_index=True)


MULTI = [(4096, False), (4096, True), (2048, False)]


def test_evidence_is_the_same_view_of_the_other_detectors():
    rng = np.random.default_rng(3)
    dets = pd.concat([views_frame(rng, i, "a", MULTI, 60) for i in ("x", "y")], ignore_index=True)
    others = {d: pd.concat([views_frame(rng, i, d, MULTI, 50) for i in ("x", "y")], ignore_index=True) for d in ("b", "c")}
    others["c"] = others["c"][~((others["c"]["image_id"] == "y") & (others["c"]["scale"] == 2048))]  # a view missing
    sizes = {"x": (2000, 1500), "y": (2000, 1500)}
    out = frame_features(dets, others, sizes)
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    for (image_id, scale, flip), rows in dets.groupby(["image_id", "scale", "flip"]).indices.items():
        ev = []
        for d in ("b", "c"):
            f = others[d]
            f = f[(f["image_id"] == image_id) & (f["scale"] == scale) & (f["flip"] == flip)]
            ev.append((f[["x1", "y1", "x2", "y2"]].to_numpy(np.float32), f["score"].to_numpy(np.float32)) if len(f) else empty)
        boxes = dets.loc[rows, ["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
        scores = dets.loc[rows, "score"].to_numpy(np.float32)
        assert np.array_equal(out.loc[rows, list(FEATURES)].to_numpy(), box_features(boxes, scores, 2000, 1500, ev))
        assert np.array_equal(out.loc[rows, "ensemble_score"].to_numpy(), ensemble_scores(scores, boxes, ev))
    # frames without scale/flip: every view of the image is the evidence of every view (as before)
    columns = ["image_id", "x1", "y1", "x2", "y2", "score"]
    all_views = frame_features(dets, {d: f[columns] for d, f in others.items()}, sizes)
    rows = dets.index[(dets["image_id"] == "x") & (dets["scale"] == 4096) & ~dets["flip"]]
    ev = [(f.loc[f["image_id"] == "x", columns[1:5]].to_numpy(np.float32), f.loc[f["image_id"] == "x", "score"].to_numpy(np.float32))
          for f in others.values()]
    want = box_features(dets.loc[rows, columns[1:5]].to_numpy(np.float32), dets.loc[rows, "score"].to_numpy(np.float32),
                        2000, 1500, ev)
    assert np.array_equal(all_views.loc[rows, list(FEATURES)].to_numpy(), want)
    assert not np.array_equal(all_views[list(EVIDENCE)].to_numpy(), out[list(EVIDENCE)].to_numpy())


@pytest.mark.parametrize("views", [[(0, False)], MULTI], ids=["original", "multi-view"])
def test_frame_features_pair_search_equals_dense(views):
    # original: one view, so also the features as they were before views (evidence frames
    # without scale/flip, dense matrices) bit for bit
    rng = np.random.default_rng(4)
    dets = pd.concat([views_frame(rng, i, "a", views, 400) for i in ("x", "y")], ignore_index=True)
    others = {d: pd.concat([views_frame(rng, i, d, views, 300) for i in ("x", "y")], ignore_index=True) for d in ("b", "c")}
    sizes = {"x": (2000, 1500), "y": (2000, 1500)}
    columns = [*FEATURES, "ensemble_score"]
    got = frame_features(dets, others, sizes)[columns].to_numpy()
    with dense():
        want = frame_features(dets, others, sizes)[columns].to_numpy()
        before = frame_features(dets, {d: f.drop(columns=["scale", "flip"]) for d, f in others.items()}, sizes)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(got.view(np.uint32), before[columns].to_numpy().view(np.uint32)) == (len(views) == 1)


def test_features_config_marks_multi_view_evidence_only():
    from stages import featurestore

    single = featurestore._features_config("d", "a", "original", ["a", "b"])
    assert "evidence_view" not in single and featurestore._features_config("d", "a", "8k", ["b"]).get("evidence_view") is None
    multi = featurestore._features_config("d", "a", "8k-multi", ["a", "b"])
    assert multi["evidence_view"] == "same"
    # a multi-view shard written before evidence was per view is refused; a single-view one is served
    source_hash = "0" * 64
    for config, old_meta, valid in [(multi, {k: v for k, v in multi.items() if k != "evidence_view"}, False),
                                    (multi, multi, True), (single, single, True)]:
        meta = {"config": old_meta, "inputs": {"src": source_hash}}
        with mock.patch("pipeline.tables.read_metadata", return_value=meta), \
                mock.patch("pipeline.provenance.sha256_file", return_value=source_hash), \
                mock.patch("pathlib.Path.is_file", return_value=True):
            from pathlib import Path

            assert featurestore._cache_valid(Path("cached"), Path("src"), config) is valid


# ----------------------------------------------------------------------------- gbm


def test_relevance_grades():
    assert relevance(np.array([0, 0.29, 0.3, 0.5, 0.69, 0.7, 1])).tolist() == [0, 0, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("objective", ["cross_entropy", "binary", "lambdarank"])
def test_gbm_learns_a_signal_and_is_deterministic(objective):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3)).astype(np.float32)
    oracle = np.clip(0.5 + 0.3 * x[:, 0] + 0.05 * rng.normal(size=2000), 0, 1)
    groups = np.repeat(np.arange(100), 20)
    config = GbmConfig(objective=objective, trees=30, min_leaf=10)
    a = predict_gbm(train_gbm(x, oracle, config, groups, threads=1), x, config)
    b = predict_gbm(train_gbm(x, oracle, config, groups, threads=1), x, config)
    assert np.array_equal(a, b) and a.dtype == np.float32 and (0 <= a).all() and (a <= 1).all()
    assert spearmanr(a, oracle).statistic > 0.9


def test_neighbour_pair_accuracy_counts_ties_as_half():
    from pipeline.ranker.registry import neighbour_pair_accuracy

    group = np.array([0, 0, 0, 1, 1])
    score = np.array([0.9, 0.8, 0.7, 0.9, 0.1])
    oracle = np.array([0.1, 0.9, 0.5, 0.3, 0.3])  # pairs: (0,1) want -, (1,2) want +; group 1 tied: skipped
    assert neighbour_pair_accuracy(group, score, np.array([0.2, 0.8, 0.5, 0, 0]), oracle) == 1.0
    assert neighbour_pair_accuracy(group, score, np.array([0.9, 0.8, 0.5, 0, 0]), oracle) == 0.5
    assert neighbour_pair_accuracy(group, score, np.array([0.5, 0.5, 0.6, 0, 0]), oracle) == 0.25
    assert np.isnan(neighbour_pair_accuracy(group[3:], score[3:], score[3:], oracle[3:]))

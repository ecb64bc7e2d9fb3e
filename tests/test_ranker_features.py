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

from pipeline.ranker.features import (EVIDENCE, FEATURES, NEIGHBOURS, OWN, box_features, ensemble_scores,
                                      evidence_features, frame_features, neighbour_features)
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

"""Image weights in the WiderFace/VOC curves and the paired bootstrap of AP differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.bootstrap import paired_bootstrap, point_ap, resample_weights, resampled_aps
from pipeline.metrics import SUBSETS, WiderFaceEval
from tests.test_metrics import EXPECTED, _read_archive

ALL = (*SUBSETS, "all")


def _case(seed: int, n_images: int = 10, extremes: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Random faces (different keep lists per subset, some ``ignore``), jittered detections
    with many tied scores (within and across images), false positives, and an image without
    faces. With ``extremes`` that image holds the lowest and highest scores, so any resample
    of the face images keeps the full set's min-max normalisation."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for k in range(n_images):
        image = f"ev/{k}"
        n = int(rng.integers(1, 7))
        xy = rng.integers(0, 200, (n, 2)).astype(float)
        box = np.c_[xy, xy + rng.integers(4, 40, (n, 2))]
        hard = rng.random(n) < 0.85
        medium = hard & (rng.random(n) < 0.7)
        easy = medium & (rng.random(n) < 0.6)
        gts.append(pd.DataFrame({"image_id": image, "gt_id": np.arange(n), "x1": box[:, 0], "y1": box[:, 1], "x2": box[:, 2],
                                 "y2": box[:, 3], "easy": easy, "medium": medium, "hard": hard, "ignore": rng.random(n) < 0.15}))
        for i in range(n):
            for _ in range(int(rng.integers(0, 3))):
                dets.append((image, *(box[i] + rng.normal(0, 2.5, 4)), float(rng.choice([0.3, 0.7, round(rng.random(), 2)]))))
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 200, 2)
            dets.append((image, x, y, x + rng.uniform(3, 30), y + rng.uniform(3, 30), float(rng.choice([0.3, rng.random()]))))
    if extremes:
        dets += [("zz/no-faces", 0, 0, 10, 10, -0.5), ("zz/no-faces", 50, 50, 60, 60, 2.0)]
    return pd.concat(gts, ignore_index=True), pd.DataFrame(dets, columns=["image_id", "x1", "y1", "x2", "y2", "score"])


def _repeated(gt: pd.DataFrame, dets: pd.DataFrame, image_ids: np.ndarray, weights: np.ndarray):
    """The dataset with ground-truth image ``image_ids[i]`` physically present ``weights[i]``
    times (copies ``ID#k``, which sort right after ``ID``); other images' detections kept."""
    count = dict(zip(image_ids, weights))

    def repeat(table: pd.DataFrame, keep_others: bool) -> pd.DataFrame:
        parts = [table[~table["image_id"].isin(count)] if keep_others else table.iloc[:0]]
        for image, group in table.groupby("image_id", sort=False):
            parts += [group.assign(image_id=f"{image}#{k}") for k in range(count.get(image, 0))]
        return pd.concat(parts, ignore_index=True)

    return repeat(gt, False), repeat(dets, True)


def _same(a: float, b: float) -> bool:
    """Equal bit for bit, NaN included (a resample without faces has recall 0/0)."""
    return np.array_equal(a, b, equal_nan=True)


def _assert_same_curve(got, want):
    assert _same(got.ap, want.ap)
    np.testing.assert_array_equal(got.recall, want.recall)
    np.testing.assert_array_equal(got.precision, want.precision)
    np.testing.assert_array_equal(got.threshold, want.threshold)


def _check_weights(gt, dets, weights):
    e = WiderFaceEval(gt, dets).evaluate()
    dup = WiderFaceEval(*_repeated(gt, dets, e.image_ids, weights)).evaluate()
    for s in SUBSETS:
        _assert_same_curve(e.widerface_curve(e.keep_mask(s), weights=weights), dup.subset_curve(s))
        _assert_same_curve(e.widerface_curve(e.keep_mask(s), 0.7, weights=weights), dup.subset_curve(s, 0.7))
    _assert_same_curve(e.voc_curve(e.voc_keep_mask(), weights=weights), dup.voc_all_curve())
    # the vectorised resampled APs are the same numbers
    for s in ALL:
        assert _same(resampled_aps(e, s, weights[None])[0], point_ap(dup, s))


@pytest.mark.parametrize("seed", range(6))
def test_unit_weights_give_todays_curves_bit_for_bit(seed):
    gt, dets = _case(seed, extremes=seed % 2 == 0)
    e = WiderFaceEval(gt, dets).evaluate()
    ones = np.ones(len(e.image_ids), dtype=np.int64)
    for s in SUBSETS:
        _assert_same_curve(e.widerface_curve(e.keep_mask(s), weights=ones), e.subset_curve(s))
    _assert_same_curve(e.voc_curve(e.voc_keep_mask(), weights=ones), e.voc_all_curve())
    for s in ALL:
        assert resampled_aps(e, s, np.stack([ones, ones]))[1] == point_ap(e, s)


@pytest.mark.parametrize("seed", range(6))
def test_integer_weights_equal_physically_repeated_images(seed):
    gt, dets = _case(seed)
    n_images = gt["image_id"].nunique()
    for weights in [*resample_weights(n_images, 3, seed), np.full(n_images, 3)]:  # all 3: more TPs than twice the set's
        _check_weights(gt, dets, weights)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.lists(st.integers(0, 3), min_size=6, max_size=6))
def test_weights_property(seed, weights):
    gt, dets = _case(seed, n_images=6)
    _check_weights(gt, dets, np.array(weights))


def test_resampled_aps_equal_the_weighted_curves_for_many_resamples():
    gt, dets = _case(42, n_images=25, extremes=False)  # normalisation from images that may be dropped: still the full set's
    e = WiderFaceEval(gt, dets).evaluate()
    weights = resample_weights(len(e.image_ids), 60, 1)
    weights[0] = 0  # nothing drawn: no faces, recall 0/0 as for an empty dataset
    for s in SUBSETS:
        want = [e.widerface_curve(e.keep_mask(s), weights=w).ap for w in weights]
        np.testing.assert_array_equal(resampled_aps(e, s, weights), want)
    want = [e.voc_curve(e.voc_keep_mask(), weights=w).ap for w in weights]
    np.testing.assert_array_equal(resampled_aps(e, "all", weights), want)


def test_resample_weights():
    w = resample_weights(7, 500, 3)
    assert w.shape == (500, 7) and (w.sum(axis=1) == 7).all() and w.dtype.kind == "i"
    assert np.array_equal(w, resample_weights(7, 500, 3)) and not np.array_equal(w, resample_weights(7, 500, 4))
    assert abs(w.mean() - 1) < 0.05


def _methods(seed: int = 5):
    gt, dets = _case(seed, n_images=40)
    rng = np.random.default_rng(seed)
    noisy = dets.assign(score=np.clip(dets["score"] + rng.normal(0, 0.3, len(dets)), 0, 1))
    return {"a": WiderFaceEval(gt, dets), "b": WiderFaceEval(gt, noisy), "a2": WiderFaceEval(gt, dets.copy())}


@pytest.mark.parametrize("subset", ALL)
def test_paired_bootstrap_rows(subset):
    evals = _methods()
    table = paired_bootstrap(evals, [("a", "b"), ("b", "a"), ("a", "a2")], subset, n=300, seed=7)
    assert list(table.columns) == ["a", "b", "subset", "ap_a", "ap_b", "delta", "ci_low", "ci_high", "n", "seed"]
    ab, ba, same = (table.iloc[i] for i in range(3))
    assert ab.delta == point_ap(evals["a"], subset) - point_ap(evals["b"], subset) and ab.delta != 0
    assert ab.ci_low <= ab.delta <= ab.ci_high and ab.ci_low < ab.ci_high
    assert (ba.ci_low, ba.ci_high) == pytest.approx((-ab.ci_high, -ab.ci_low), abs=1e-15)
    # identical predictions (a separate evaluation of a copy): every resampled delta is 0
    assert (same.delta, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    assert (ab.n, ab.seed, ab.subset) == (300, 7, subset)


def test_paired_bootstrap_is_deterministic_by_seed():
    evals = _methods()
    one = paired_bootstrap(evals, [("a", "b")], "hard", n=200, seed=1)
    pd.testing.assert_frame_equal(one, paired_bootstrap(_methods(), [("a", "b")], "hard", n=200, seed=1))
    other = paired_bootstrap(evals, [("a", "b")], "hard", n=200, seed=2)
    assert other.delta[0] == one.delta[0] and other.ci_low[0] != one.ci_low[0]


def test_paired_bootstrap_is_paired():
    """The same draws for every method: the interval of the difference equals the
    percentiles of the per-resample differences of :func:`resampled_aps`."""
    evals = _methods()
    e_a, e_b = evals["a"].evaluate(), evals["b"].evaluate()
    w = resample_weights(len(e_a.image_ids), 100, 9)
    want = np.percentile(resampled_aps(e_a, "medium", w) - resampled_aps(e_b, "medium", w), [2.5, 97.5])
    got = paired_bootstrap(evals, [("a", "b")], "medium", n=100, seed=9)
    assert (got.ci_low[0], got.ci_high[0]) == tuple(want)


def test_paired_bootstrap_refuses_other_images_and_subsets():
    gt, dets = _case(1)
    other = gt[gt["image_id"] != gt["image_id"].iloc[0]]
    evals = {"a": WiderFaceEval(gt, dets), "b": WiderFaceEval(other, dets)}
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(evals, [("a", "b")], "easy", n=10)
    with pytest.raises(ValueError, match="subset"):
        paired_bootstrap(evals, [("a", "a")], "voc", n=10)
    with pytest.raises(KeyError):
        paired_bootstrap(evals, [("a", "c")], "easy", n=10)


@pytest.mark.parametrize("archive", sorted(EXPECTED), ids=lambda a: a[1])
def test_shared_submissions_unit_weights_and_resamples(official_gt, archive):
    """On the real submissions of tests/test_metrics.py: weights all 1 give the official APs
    bit for bit, and a resample gives the weighted curve's AP."""
    from tests.support import need_shared

    e = WiderFaceEval(official_gt, _read_archive(need_shared("widerface", *archive))).evaluate()
    weights = resample_weights(len(e.image_ids), 2, 0)
    weights[0] = 1
    got = {s: resampled_aps(e, s, weights) for s in ALL}
    assert [got[s][0] for s in SUBSETS] == list(EXPECTED[archive])  # bit for bit
    assert got["all"][0] == e.voc_all_curve().ap
    assert [got[s][1] for s in SUBSETS] == [e.widerface_curve(e.keep_mask(s), weights=weights[1]).ap for s in SUBSETS]
    assert got["all"][1] == e.voc_curve(e.voc_keep_mask(), weights=weights[1]).ap
    assert abs(got["hard"][1] - got["hard"][0]) < 0.02 and got["hard"][1] != got["hard"][0]


@pytest.fixture(scope="module")
def official_gt():
    from tests.support import need_shared
    from pipeline.widerface import parse_eval_mat

    return parse_eval_mat(need_shared("widerface", "ground_truth")).gt

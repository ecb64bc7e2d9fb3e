"""Paired bootstrap intervals for the difference in AP between methods evaluated on the same images.

A resample draws as many images as the ground truth has, with replacement, from its images
(:attr:`pipeline.metrics.WiderFaceEval.image_ids`); each image then counts as many times as
it was drawn. The same draws are used for every method (paired), so the interval is the one
of the difference, not of two independent APs.

A resampled AP is exactly the AP of a dataset in which the drawn images are physically
repeated (``WiderFaceEval.widerface_curve(..., weights=w)`` / ``voc_curve(..., weights=w)``),
except that the WiderFace score normalisation stays the one of the full prediction set:
resampling it would only move the 1000 score thresholds slightly, and keeping it keeps each
detection's threshold index cached. Detections in images without ground-truth faces are not
resampled (they matter to the VOC AP only, as false positives, and count once).

Speed: the per-image counts of proposals and true positives first passing each score
threshold (a sparse images x 1000 table) are taken once, so the WiderFace curves of all
resamples are one product of the (resamples x images) weights by that table and a cumulative
sum over thresholds. The VOC curve needs only its true positives: their rank in a resampled
ranking is the weighted count of proposals ranked before them (one more sparse product for
all resamples) plus their place among the copies. Counts are integers held in float64, so
the products are exact, and each resample's AP is :func:`pipeline.metrics.voc_ap`'s number
on the same recall and precision values as for the repeated dataset, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import sparse

from pipeline.metrics import SUBSETS, WiderFaceEval, voc_ap

BOOTSTRAP_SUBSETS = (*SUBSETS, "all")


def resample_weights(n_images: int, n: int, seed: int) -> np.ndarray:
    """``n`` bootstrap resamples of ``n_images`` images: (n, n_images) int64, how many times
    each image was drawn (each row sums to ``n_images``)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n, n_images))
    flat = (draws + n_images * np.arange(n)[:, None]).ravel()
    return np.bincount(flat, minlength=n * n_images).reshape(n, n_images)


def _evaluated(e: WiderFaceEval) -> WiderFaceEval:
    return e if e.matches is not None else e.evaluate()


def _widerface_aps(e: WiderFaceEval, keep: np.ndarray, weights: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """WiderFace AP for every row of ``weights`` ((R, images) int), as
    :meth:`WiderFaceEval.widerface_curve` with those weights."""
    m = e.matches
    proposal, tp = e._flags(keep, iou_threshold)
    n_images, n_t = len(e.image_ids), e.n_thresholds
    g = np.where(m.in_gt, m.gt_image, 0)
    w = weights.astype(np.float64)  # integer-valued: the products and sums below are exact

    def cumulative(flag: np.ndarray) -> np.ndarray:  # (resamples, thresholds)
        sel = m.in_gt & flag  # per image, the detections first passing each threshold (sparse)
        counts = sparse.csr_matrix((np.ones(int(sel.sum())), (g[sel], m.first[sel])), shape=(n_images, n_t + 1))
        return np.cumsum((counts.T @ w.T).T[:, :-1], axis=1)

    n_prop, n_tp = cumulative(proposal), cumulative(tp)
    count_face = w @ np.bincount(e.face_image()[keep], minlength=n_images).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = n_tp / n_prop
        recall = n_tp / count_face[:, None]
    return np.array([voc_ap(r, p) for r, p in zip(recall, precision)])


def _voc_aps(e: WiderFaceEval, keep: np.ndarray, weights: np.ndarray, iou_threshold: float = 0.5,
             chunk_elements: int = 1 << 21) -> np.ndarray:
    """VOC AP for every row of ``weights``, from the true positives of the ranked list only.

    The ranked proposals split into runs of one image and one score; a resample repeats
    each run as a block once per copy of its image. The k-th true positive of the resampled
    ranking has ``ctp = k`` and a rank that is the weighted number of proposals before its
    run (one sparse product for all resamples), plus its copy times the run size, plus its
    place in the run. A false positive only lowers the precision until the next true
    positive, so the precision envelope at the true positives and :func:`voc_ap`'s terms
    need nothing else.
    """
    m = e.matches
    n_images = len(e.image_ids)
    proposal, tp = e._flags(keep, iou_threshold)
    order = np.argsort(-m.score, kind="stable")
    order = order[proposal[order]]
    s, im, hit = m.score[order], m.image[order], tp[order]
    start = np.flatnonzero(np.r_[True, (im[1:] != im[:-1]) | ~((s[1:] == s[:-1]) | (np.isnan(s[1:]) & np.isnan(s[:-1])))])
    size = np.diff(np.r_[start, len(order)])
    run_of = np.repeat(np.arange(len(start)), size)
    tp_run = np.bincount(run_of[hit], minlength=len(start))
    has_tp = np.flatnonzero(tp_run)  # the runs holding true positives, in rank order
    size, tp_run, place = size[has_tp], tp_run[has_tp], np.flatnonzero(hit) - start[run_of[hit]] + 1  # 1-based place in the run
    first_tp = np.cumsum(tp_run) - tp_run  # index of each TP run's first TP in `place`
    image = np.where(m.gt_image[order] >= 0, m.gt_image[order], n_images)  # n_images: no faces, not resampled
    run_image = image[start[has_tp]]
    # proposals of each image before each TP run: counts per (image, gap between TP runs)
    gap = np.searchsorted(start[has_tp], np.arange(len(order)), side="right")
    before_table = sparse.csr_matrix((np.ones(len(order)), (gap, image)), shape=(len(has_tp) + 1, n_images + 1))
    face_count = np.bincount(e.face_image()[keep], minlength=n_images)
    single = bool((tp_run == 1).all())  # one TP per run (the usual case): no inner expansion
    run_place = place[first_tp]
    counts = np.arange(1, 2 * int(tp_run.sum()) + 2, dtype=np.float64)  # ctp = 1, 2, ... (grown on demand)
    out = np.empty(len(weights))
    step = max(1, chunk_elements // max(len(has_tp), 1))
    for lo in range(0, len(weights), step):
        chunk = np.c_[weights[lo:lo + step], np.ones(len(weights[lo:lo + step]), dtype=np.int64)]
        # rank of each TP run's first TP in its first copy, per resample: the weighted count of
        # proposals before the run plus the TP's place in it ((resamples, TP runs); integers: exact)
        first_rank = np.ascontiguousarray(np.cumsum(before_table @ chunk.T.astype(np.float64), axis=0)[:-1].T) + run_place
        for k, w in enumerate(chunk):
            npos = float(w[:-1] @ face_count)
            if npos == 0:  # recall 0/0: the generic path gives the repeated dataset's number
                out[lo + k] = e.voc_curve(keep, iou_threshold, weights=w[:-1]).ap
                continue
            reps = w[run_image]
            block = np.repeat(np.arange(len(has_tp)), reps)  # one block per (TP run, copy)
            copy = np.arange(len(block)) - np.repeat(np.cumsum(reps) - reps, reps)
            rank = first_rank[k, block] + copy * size[block]
            if not single:  # the other TPs of each run, after its first
                length = tp_run[block]
                inner = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
                rank = np.repeat(rank - run_place[block], length) + place[np.repeat(first_tp[block], length) + inner]
            if len(rank) > len(counts):
                counts = np.arange(1, 2 * len(rank) + 1, dtype=np.float64)
            ctp = counts[:len(rank)]
            recall = ctp / npos
            # voc_ap's terms: recall steps (k/npos - (k-1)/npos) times the precision envelope
            terms = np.diff(recall, prepend=0.0) * np.maximum.accumulate((ctp / rank)[::-1])[::-1]
            last = recall[-1] if len(recall) else 0.0
            out[lo + k] = np.sum(terms if last == 1.0 else np.append(terms, (1.0 - last) * 0.0))  # voc_ap's closing step
    return out


def resampled_aps(e: WiderFaceEval, subset: str, weights: np.ndarray) -> np.ndarray:
    """AP of ``subset`` (easy/medium/hard at IoU 0.5, or "all": :meth:`voc_all_curve`'s VOC AP)
    for every row of ``weights`` ((R, len(e.image_ids)) non-negative integers)."""
    if subset not in BOOTSTRAP_SUBSETS:
        raise ValueError(f"subset must be one of {BOOTSTRAP_SUBSETS}, got {subset!r}")
    e = _evaluated(e)
    weights = np.atleast_2d(np.asarray(weights))
    if (weights.ndim != 2 or weights.shape[1] != len(e.image_ids) or (weights < 0).any()
            or not np.array_equal(weights, np.round(weights))):
        raise ValueError(f"weights: (resamples, {len(e.image_ids)}) non-negative integers, got shape {weights.shape}")
    weights = weights.astype(np.int64)
    if subset == "all":
        return _voc_aps(e, e.voc_keep_mask(), weights)
    return _widerface_aps(e, e.keep_mask(subset), weights)


def point_ap(e: WiderFaceEval, subset: str) -> float:
    """The AP of ``subset`` on all images (the cached curve)."""
    e = _evaluated(e)
    return e.voc_all_curve().ap if subset == "all" else e.subset_curve(subset).ap


def paired_bootstrap(evals: Mapping[str, WiderFaceEval], pairs: list[tuple[str, str]], subset: str,
                     n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstrap 95 % intervals of AP(a) - AP(b) for each pair ``(a, b)`` of ``evals``.

    Every evaluation must share the same ground-truth images; one set of ``n`` image
    resamples (``seed``) is used for every method. Returns one row per pair: ``a``, ``b``,
    ``subset``, ``ap_a``, ``ap_b``, ``delta`` (= ap_a - ap_b, all images), ``ci_low`` and
    ``ci_high`` (the 2.5 % and 97.5 % percentiles of the resampled deltas, numpy's linear
    interpolation; NaN if a resample's AP is, e.g. one without faces of the subset), ``n``,
    ``seed``. The resamples are :func:`resample_weights` ``(len(image_ids), n, seed)``.
    """
    if subset not in BOOTSTRAP_SUBSETS:
        raise ValueError(f"subset must be one of {BOOTSTRAP_SUBSETS}, got {subset!r}")
    names = list(dict.fromkeys(name for pair in pairs for name in pair))
    missing = [name for name in names if name not in evals]
    if missing:
        raise KeyError(f"no evaluation for {missing}")
    images = None
    for name in names:
        ids = _evaluated(evals[name]).image_ids
        if images is None:
            images = ids
        elif not np.array_equal(ids, images):
            raise ValueError(f"{name!r} is evaluated on other ground-truth images than {names[0]!r}: a paired bootstrap needs the same images")
    columns = ["a", "b", "subset", "ap_a", "ap_b", "delta", "ci_low", "ci_high", "n", "seed"]
    if not names:
        return pd.DataFrame(columns=columns)
    if not len(images):
        raise ValueError("no ground-truth images to resample")
    weights = resample_weights(len(images), n, seed)
    point = {name: point_ap(evals[name], subset) for name in names}
    boot = {name: resampled_aps(evals[name], subset, weights) for name in names}
    rows = []
    for a, b in pairs:
        low, high = np.percentile(boot[a] - boot[b], [2.5, 97.5])
        rows.append((a, b, subset, point[a], point[b], point[a] - point[b], float(low), float(high), n, seed))
    return pd.DataFrame(rows, columns=columns)

"""Per-box features for the feature ranker, and the training-free ``ensemble`` score.

A box is described by what can be measured without the internals of the detector that made
it: its own confidence and geometry, the boxes around it from the same detector, and the
evidence of *other* detectors on the same image (the best confidence any of their boxes
gives the same place). Nothing depends on which detector made the box, so one model serves
every detector (seed 000's model-agnostic ranker).

Conventions: boxes are ``(n, 4)`` float32 ``x1, y1, x2, y2`` in original-image pixels,
scores ``(n,)`` float32 in [0, 1]; IoU is the continuous one of ``torchvision.ops.box_iou``
(:func:`pairwise_iou`).
An image's evidence is one ``(boxes, scores)`` pair per other detector (any order: the
features sort over detectors, so they do not depend on the order or on the detectors' names).
:func:`frame_features` describes each (image, scale, flip) view of a detector on its own, and
its evidence is the other detectors' boxes of the same image *and the same view* (one view at
``original``: all of the image's boxes; at ``8k-multi``, 6 views of up to 5000 boxes each, a
view is no longer compared with the 30,000 boxes of all six).

Speed: the neighbour and evidence features only look at pairs of boxes that overlap. Large
blocks (``n x m >=`` :data:`SPARSE_MIN_PAIRS`) find those pairs with a sort-based spatial index
(:func:`overlap_pairs`, one search per view for the neighbours and every evidence set) instead
of the dense ``n x m`` IoU matrix; small ones keep the dense matrix. Both give the same
features bit for bit (same float32 IoU arithmetic; reductions that the matrix's zeros do not
change), which the tests check against the dense path on random boxes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.iou import pairwise_iou
from pipeline.tables import Column, detection_columns, register_schema

#: IoU at which another detector's box counts as evidence for the same face
EVIDENCE_IOU = 0.5
#: boxes of another detector at or above this score count as a confident detection
CONFIDENT = 0.5
#: own-detector neighbours: IoU above which two boxes are duplicates of one another
NEIGHBOUR_IOU = 0.4
#: boxes at most this many in one IoU block (memory ``chunk x n`` floats)
CHUNK = 2048

OWN = ("conf", "conf_logit", "log_w", "log_h", "log_aspect", "log_rel_area", "cx", "cy", "rank_frac",
       "log_rank", "score_over_max", "log_confident", "top10_mean")
NEIGHBOURS = ("max_iou_higher", "score_of_max_higher", "log_overlaps", "overlap_score_sum", "max_iou_any")
EVIDENCE = ("ev_score_max", "ev_score_mean", "ev_score_min", "ev_iou_max", "ev_iou_mean", "ev_agree_frac",
            "ev_score_x_iou")
#: feature columns, in the order of :func:`box_features`' columns
FEATURES: tuple[str, ...] = OWN + NEIGHBOURS + EVIDENCE
#: the box feature groups by name (``image``, the image evidence, is pipeline.ranker.image_evidence's)
GROUPS: dict[str, tuple[str, ...]] = {"own": OWN, "neighbours": NEIGHBOURS, "evidence": EVIDENCE}


def feature_columns(groups: Sequence[str]) -> list[str]:
    """The feature columns of ``groups`` (any of ``own, neighbours, evidence, image``), in the
    fixed group order of :data:`pipeline.ranker.settings.FEATURE_GROUPS` whatever the order given."""
    from pipeline.ranker.settings import FEATURE_GROUPS

    columns: list[str] = []
    for name in FEATURE_GROUPS:
        if name not in groups:
            continue
        if name == "image":
            from pipeline.ranker.image_evidence import IMAGE_FEATURES

            columns += IMAGE_FEATURES
        else:
            columns += GROUPS[name]
    return columns


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) in float64, ``p`` clipped to [1e-6, 1 - 1e-6] first."""
    p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def own_features(boxes: np.ndarray, scores: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(n, len(OWN))``: confidence, its logit, log width/height in pixels, log(h/w), log of
    the area over the image area, centre over the image size, rank (own order by score),
    score over the image's best, log(1 + boxes >= 0.5) and the mean of the top 10 scores."""
    n = len(scores)
    w = np.maximum(boxes[:, 2] - boxes[:, 0], 1e-3).astype(np.float64)
    h = np.maximum(boxes[:, 3] - boxes[:, 1], 1e-3).astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, np.float64)
    rank[order] = np.arange(n)
    best = float(scores.max()) if n else 1.0
    top10 = float(np.sort(scores)[::-1][:10].mean()) if n else 0.0
    cols = [scores, logit(scores), np.log(w), np.log(h), np.log(h / w), np.log(w * h / (width * height)),
            (boxes[:, 0] + boxes[:, 2]) / (2 * width), (boxes[:, 1] + boxes[:, 3]) / (2 * height),
            rank / max(n, 1), np.log1p(rank), scores / max(best, 1e-6),
            np.full(n, np.log1p((scores >= CONFIDENT).sum())), np.full(n, top10)]
    return np.stack(cols, axis=1)


# ----------------------------------------------------------------------------- the pair search

#: blocks of at least this many box pairs (``n x m``) go through the pair search
#: (:func:`overlap_pairs`) instead of the dense IoU matrix; the two give the same numbers
SPARSE_MIN_PAIRS = 1 << 16
#: coordinates at or above this magnitude (or not finite) are tested against every box instead
SPARSE_LIMIT = float(1 << 24)
#: candidate pairs at most this many at once (memory about 40 bytes each)
PAIR_BUDGET = 1 << 22


def _runs(value: np.ndarray, count: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of ``count[e]`` consecutive integers from ``start[e]``: each item and its run's ``value[e]``."""
    ends = np.cumsum(count)
    item = np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(start - (ends - count), count)
    return np.repeat(value, count), item


class _Grid:
    """A sort-based spatial index of boxes (float64 ``x1, y1, x2, y2`` with positive width and
    height, coordinates below :data:`SPARSE_LIMIT` in magnitude).

    The boxes are split into size classes (the larger side in ``(c / 2, c]`` pixels,
    ``c = 2**k``); the boxes of a class are sorted by (row of ``y1``, ``x1``), rows
    ``max(c * ROW_FRACTION, ROW_MIN)`` pixels high. A box ``a`` can only intersect a box ``b``
    of a class whose widest box is ``wide`` and tallest ``tall`` when ``b.y1`` lies in
    ``(a.y1 - tall, a.y2)`` and ``b.x1`` in ``(a.x1 - wide, a.x2)``: a few rows, and in each
    row one run of the sorted keys (two binary searches). The runs are widened by a pixel, so
    float64 rounding can only add candidates; :class:`_PairSearch` tests every candidate
    exactly. (Row heights: measured on 8K-like images, any of 64-256 px does about as well.)
    """

    ROW_MIN = 128.0
    ROW_FRACTION = 0.5

    def __init__(self, boxes: np.ndarray, x_min: float, x_max: float) -> None:
        side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        k = np.ceil(np.log2(np.maximum(side, 1.0))).astype(np.int64)
        k += np.exp2(k) < side  # log2 rounded down across a power of two
        self.c_max = float(np.exp2(k.max()))
        self.x0 = np.floor(x_min) - self.c_max - 4.0  # keys of every box and query are > 0
        self.span = np.ceil(x_max) - self.x0 + 4.0  # an integer: row * span is exact
        self.x_lo, self.x_hi = np.floor(x_min) - 2.0, np.ceil(x_max) + 2.0
        self.classes = []
        for kk in np.unique(k):
            member = np.flatnonzero(k == kk)
            c = float(np.exp2(kk))
            row_h = max(c * self.ROW_FRACTION, self.ROW_MIN)
            rows = np.floor(boxes[member, 1] / row_h)
            key = rows * self.span + (boxes[member, 0] - self.x0)
            order = np.argsort(key, kind="stable")
            # the class's widest and tallest box (<= c): how far left of / above a box to look
            wide = float(np.max(boxes[member, 2] - boxes[member, 0]))
            tall = float(np.max(boxes[member, 3] - boxes[member, 1]))
            self.classes.append((wide, tall, row_h, key[order], member[order], rows.min(), rows.max()))

    def candidates(self, boxes: np.ndarray, budget: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(start, stop, i, j)`` for consecutive runs of ``boxes``: a superset of the pairs
        (``boxes[i]``, indexed box ``j``) that intersect, ``start <= i < stop``, about
        ``budget`` pairs at a time (all of a query box's pairs in one run)."""
        n = len(boxes)
        # a query beyond the indexed x range is clipped to it: no indexed box lies out there
        lo_off = np.maximum(boxes[:, 0], self.x_lo) - 1.0 - self.x0
        hi_off = np.minimum(boxes[:, 2], self.x_hi) + 1.0 - self.x0
        plans, per_box = [], np.zeros(n, np.int64)
        for wide, tall, row_h, keys, member, row_min, row_max in self.classes:
            r0 = np.maximum(np.floor((boxes[:, 1] - tall - 1.0) / row_h), row_min)
            r1 = np.minimum(np.floor((boxes[:, 3] + 1.0) / row_h), row_max)
            nrows = np.maximum(r1 - r0 + 1, 0).astype(np.int64)
            entry, row = _runs(np.arange(n), nrows, r0.astype(np.int64))
            base = row * self.span
            lo = np.searchsorted(keys, base + (lo_off[entry] - wide), "left")
            count = np.searchsorted(keys, base + hi_off[entry], "right") - lo
            some = np.flatnonzero(count > 0)  # (an index, not a mask: much faster to gather with)
            entry, lo, count = entry[some], lo[some], count[some]
            if len(entry):
                per_box += np.bincount(entry, weights=count, minlength=n).astype(np.int64)
                plans.append((entry, lo, count, member))
        total = np.cumsum(per_box)
        start = 0
        while start < n:
            done = total[start - 1] if start else 0
            stop = min(n, max(start + 1, int(np.searchsorted(total, done + budget, "right"))))
            out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
            for entry, lo, count, member in plans:
                p, q = np.searchsorted(entry, [start, stop])
                i, item = _runs(entry[p:q], count[p:q], lo[p:q])
                out_i.append(i)
                out_j.append(member[item])
            yield start, stop, np.concatenate(out_i), np.concatenate(out_j)
            start = stop


def _valid(boxes: np.ndarray) -> np.ndarray:
    return np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))


def _columns(boxes: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(boxes[:, k]) for k in range(4)]


class _PairSearch:
    """The boxes ``b`` indexed once (:class:`_Grid`); :meth:`pairs` finds the pairs of boxes
    ``a`` and ``b`` with a nonzero IoU, and that IoU as :func:`pairwise_iou` computes it."""

    def __init__(self, b: np.ndarray) -> None:
        b = np.asarray(b, np.float32).reshape(-1, 4)
        self.cols = _columns(b)
        x1, y1, x2, y2 = self.cols
        self.area = (x2 - x1) * (y2 - y1)
        self.valid = _valid(b)
        self.all_valid = len(self.valid) == len(b)
        self.grid = None
        if len(self.valid) and np.abs(b[self.valid]).max() < SPARSE_LIMIT:
            vb = b[self.valid].astype(np.float64)
            self.grid = _Grid(vb, float(vb[:, 0].min()), float(vb[:, 2].max()))

    def _candidates(self, a: np.ndarray, budget: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        valid = _valid(a)
        if not len(valid) or not len(self.valid):
            return
        va = a[valid]
        if self.grid is not None and np.abs(va).max() < SPARSE_LIMIT:
            same_a, same_b = len(valid) == len(a), self.all_valid
            for start, stop, i, j in self.grid.candidates(va.astype(np.float64), budget):
                yield (valid[start], valid[stop - 1] + 1, i if same_a else valid[i], j if same_b else self.valid[j])
            return
        # huge or non-finite coordinates: every valid pair is a candidate
        rows = max(1, budget // len(self.valid))
        for s in range(0, len(valid), rows):
            part = valid[s:s + rows]
            yield part[0], part[-1] + 1, np.repeat(part, len(self.valid)), np.tile(self.valid, len(part))

    def pairs(self, a: np.ndarray, budget: int | None = None) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """``(start, stop, i, j, iou)`` for consecutive runs ``start:stop`` of the rows of
        ``a``, with ``iou = pairwise_iou(a, b)[i, j]`` (float32, the same value bit for bit):
        every pair with a nonzero IoU and ``start <= i < stop`` once (and rarely a pair whose
        IoU is 0 all the same: an underflowing product), in no particular order. Rows of
        ``a`` with no pair may fall in no run."""
        a = np.asarray(a, np.float32).reshape(-1, 4)
        ax1, ay1, ax2, ay2 = _columns(a)
        area_a = (ax2 - ax1) * (ay2 - ay1)
        bx1, by1, bx2, by2 = self.cols
        for start, stop, i, j in self._candidates(a, PAIR_BUDGET if budget is None else budget):
            # pairwise_iou's float32 arithmetic, pair by pair
            w = np.minimum(ax2[i], bx2[j]) - np.maximum(ax1[i], bx1[j])
            h = np.minimum(ay2[i], by2[j]) - np.maximum(ay1[i], by1[j])
            keep = np.flatnonzero((w > 0) & (h > 0))  # the others' IoU is 0
            i, j, w, h = i[keep], j[keep], w[keep], h[keep]
            inter = w * h
            union = area_a[i] + self.area[j] - inter
            iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
            yield int(start), int(stop), i, j, iou


def overlap_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i, j, iou)``: the nonzero entries of :func:`pairwise_iou` ``(a, b)`` and their values
    (float32, bit for bit), found without the dense ``n x m`` matrix; in no particular order."""
    runs = [(i[iou > 0], j[iou > 0], iou[iou > 0]) for _, _, i, j, iou in _PairSearch(b).pairs(a)]
    if not runs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(r) for r in zip(*runs))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- neighbours and evidence


def _positions(scores: np.ndarray) -> np.ndarray:
    """Each box's place in the stable descending score order (higher-scored = earlier; ties:
    the earlier row)."""
    position = np.empty(len(scores), np.int64)
    position[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return position


def neighbour_features(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(n, len(NEIGHBOURS))``: the largest IoU with a higher-scored box of the same set (what
    greedy NMS looks at) and that box's score, log(1 + boxes overlapping at IoU > 0.4), the sum
    of their scores, and the largest IoU with any other box."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if len(scores) >= 2 and len(scores) ** 2 >= SPARSE_MIN_PAIRS and _sparse_ok([scores]):
        return _sparse_block(boxes, scores, [])[0]
    return _neighbour_features_dense(boxes, scores)


def _neighbour_features_dense(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """:func:`neighbour_features` from the dense IoU matrix, ``CHUNK`` rows at a time."""
    n = len(scores)
    out = np.zeros((n, len(NEIGHBOURS)), np.float64)
    if n < 2:
        return out
    scores = np.asarray(scores, np.float32)
    position = _positions(scores)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        iou = pairwise_iou(boxes[s:e], boxes)
        iou[np.arange(e - s), np.arange(s, e)] = 0.0
        higher = np.where(position[None, :] < position[s:e, None], iou, 0.0)
        arg = higher.argmax(axis=1)
        best = higher[np.arange(e - s), arg]
        overlap = iou > NEIGHBOUR_IOU
        out[s:e, 0] = best
        out[s:e, 1] = np.where(best > 0, scores[arg], 0.0)
        out[s:e, 2] = np.log1p(overlap.sum(axis=1))
        out[s:e, 3] = overlap @ scores.astype(np.float64)
        out[s:e, 4] = iou.max(axis=1)
    return out


def best_evidence(boxes: np.ndarray, other_boxes: np.ndarray, other_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``boxes``: the best score among ``other_boxes`` overlapping it at IoU >=
    :data:`EVIDENCE_IOU` (0 when none), and the largest IoU with an other box scoring >=
    :data:`CONFIDENT` (0 when none). Both ``(n,)`` float64."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) * len(other_boxes) >= SPARSE_MIN_PAIRS and _sparse_ok([other_scores]):
        return _sparse_block(boxes, None, [(other_boxes, other_scores)])[1][0]
    return _best_evidence_dense(boxes, other_boxes, other_scores)


def _best_evidence_dense(boxes: np.ndarray, other_boxes: np.ndarray, other_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`best_evidence` from the dense IoU matrix, ``CHUNK`` rows at a time."""
    n = len(boxes)
    score = np.zeros(n, np.float64)
    iou_conf = np.zeros(n, np.float64)
    if n == 0 or len(other_boxes) == 0:
        return score, iou_conf
    other_scores = np.asarray(other_scores, np.float32)
    confident = other_scores >= CONFIDENT
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        iou = pairwise_iou(boxes[s:e], other_boxes)
        score[s:e] = np.where(iou >= EVIDENCE_IOU, other_scores[None, :], 0.0).max(axis=1)
        iou_conf[s:e] = np.where(confident[None, :], iou, 0.0).max(axis=1)
    return score, iou_conf


def _sparse_ok(scores: Sequence[np.ndarray]) -> bool:
    """Whether the pair search may replace the dense matrices: scores finite and >= 0 (as
    detections' are; with a negative one, a row's implicit 0 could be its maximum)."""
    return all(bool(np.all(np.isfinite(s)) and np.all(np.asarray(s) >= 0)) for s in scores)


def _sparse_block(boxes: np.ndarray, scores: np.ndarray | None, evidence: Sequence[tuple[np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray | None, list[tuple[np.ndarray, np.ndarray]]]:
    """The neighbour features of ``boxes`` (when ``scores`` is given) and :func:`best_evidence`
    for each evidence set, from one pair search over all the sets at once: the same numbers as
    the dense matrices, bit for bit (scores finite and >= 0: :func:`_sparse_ok`).

    Only the pairs with a nonzero IoU are visited. The dense matrix's zeros change no maximum
    (IoUs and scores are >= 0), no count and no sum; the dense argmax (the first column
    reaching the row's maximum) is the smallest ``j`` among the pairs at the maximum. The sums
    of scores are float64 sums of float32 scores, exact in any order for scores above ~1e-5
    (as detections' are: the dense matrix product's order is not specified either). Masks
    multiply values and selections are index arrays: boolean indexing of long random masks
    is ten times slower.
    """
    n = len(boxes)
    sets = ([(boxes, scores)] if scores is not None else []) + list(evidence)
    sizes = [len(b) for b, _ in sets]
    union = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b, _ in sets])
    union_scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for _, s in sets])
    set_of = np.repeat(np.arange(len(sets)), sizes)
    confident = union_scores >= CONFIDENT
    top = np.zeros(len(sets) * n, np.float32)  # per (set, row): the best score at IoU >= 0.5
    iou_conf = np.zeros(len(sets) * n, np.float32)  # and the largest IoU with a confident box
    if scores is not None:
        union64 = union_scores.astype(np.float64)
        position = np.r_[_positions(scores), np.zeros(len(union) - n, np.int64)]
        best = np.zeros(n, np.float32)
        arg = np.full(n, n, np.int64)
        overlaps = np.zeros(n, np.int64)
        overlap_sum = np.zeros(n, np.float64)
        any_iou = np.zeros(n, np.float32)
    for _, _, i, j, iou in _PairSearch(union).pairs(boxes):
        sid = set_of[j]
        flat = sid * n + i
        np.maximum.at(top, flat, union_scores[j] * (iou >= EVIDENCE_IOU))
        np.maximum.at(iou_conf, flat, iou * confident[j])
        if scores is not None:
            own = (sid == 0) & (j != i)
            higher = iou * (own & (position[j] < position[i]))
            np.maximum.at(best, i, higher)
            k = np.flatnonzero((higher == best[i]) & (higher > 0))
            np.minimum.at(arg, i[k], j[k])
            k = np.flatnonzero(own & (iou > NEIGHBOUR_IOU))
            overlaps += np.bincount(i[k], minlength=n)
            overlap_sum += np.bincount(i[k], weights=union64[j[k]], minlength=n)
            np.maximum.at(any_iou, i, iou * own)
    neighbours = None
    if scores is not None:
        neighbours = np.zeros((n, len(NEIGHBOURS)), np.float64)
        neighbours[:, 0] = best
        neighbours[:, 1] = np.where(best > 0, scores[np.minimum(arg, n - 1)], 0.0)
        neighbours[:, 2] = np.log1p(overlaps)
        neighbours[:, 3] = overlap_sum
        neighbours[:, 4] = any_iou
    first = 1 if scores is not None else 0
    return neighbours, [(top[e * n:(e + 1) * n].astype(np.float64), iou_conf[e * n:(e + 1) * n].astype(np.float64))
                        for e in range(first, len(sets))]


def _summary(n: int, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    if not pairs:
        return np.zeros((n, len(EVIDENCE)), np.float64)
    score = np.stack([p[0] for p in pairs], axis=1)
    iou = np.stack([p[1] for p in pairs], axis=1)
    return np.stack([score.max(1), score.mean(1), score.min(1), iou.max(1), iou.mean(1),
                     (score >= CONFIDENT).mean(1), (score * iou).mean(1)], axis=1)


def evidence_features(boxes: np.ndarray, evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(n, len(EVIDENCE))`` summaries over the other detectors of :func:`best_evidence`:
    max / mean / min of the best overlapping score, max / mean of the IoU with a confident box,
    the share of detectors with a confident box at IoU >= 0.5, and the mean of score x IoU.
    All zeros when there is no other detector."""
    return _summary(len(boxes), [best_evidence(boxes, b, s) for b, s in evidence])


def _box_features(boxes: np.ndarray, scores: np.ndarray, width: int, height: int,
                  evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`box_features` and the :func:`best_evidence` of each evidence set. Large blocks
    (``n x (n + evidence boxes) >= SPARSE_MIN_PAIRS``) take one pair search for the
    neighbours and every evidence set, small ones the dense matrices: the same numbers."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    n = len(scores)
    if (n >= 2 and n * (n + sum(len(b) for b, _ in evidence)) >= SPARSE_MIN_PAIRS
            and _sparse_ok([scores, *(s for _, s in evidence)])):
        neighbours, pairs = _sparse_block(boxes, scores, evidence)
    else:
        neighbours = _neighbour_features_dense(boxes, scores)
        pairs = [_best_evidence_dense(boxes, b, s) for b, s in evidence]
    parts = [own_features(boxes, scores, width, height), neighbours, _summary(n, pairs)]
    return np.concatenate(parts, axis=1).astype(np.float32), pairs


def box_features(boxes: np.ndarray, scores: np.ndarray, width: int, height: int,
                 evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(n, len(FEATURES))`` float32 features of one image's boxes from one detector (one
    scale and flip group), with ``evidence`` the other detectors' boxes to compare them with."""
    return _box_features(boxes, scores, width, height, evidence)[0]


def _ensemble(scores: np.ndarray, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    scores = np.asarray(scores, np.float32).reshape(-1)
    if not pairs:
        return scores.copy()
    best = np.max(np.stack([p[0] for p in pairs], axis=1), axis=1)
    return ((scores + best) / 2).astype(np.float32)


def ensemble_scores(scores: np.ndarray, boxes: np.ndarray, evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The training-free baseline: the mean of each box's own score and the best score among
    the other detectors' boxes overlapping it at IoU >= 0.5 (0 when none); ``(n,)`` float32.
    With no other detector it is the box's own score."""
    return _ensemble(scores, [best_evidence(boxes, b, s) for b, s in evidence])


BOX = ["x1", "y1", "x2", "y2"]


#: the columns that name a view of an image (one (scale, flip) run of a detector)
VIEW = ["scale", "flip"]


def _groups(frame: pd.DataFrame, by_view: bool) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
    """``{key: (boxes, scores)}`` of a detections frame, rows in frame order; the key is
    ``(image_id,)``, or ``(image_id, scale, flip)`` when ``by_view``."""
    columns = ["image_id", *VIEW] if by_view else ["image_id"]
    keys = frame[columns].astype({"image_id": str})
    boxes = frame[BOX].to_numpy(np.float32)
    scores = frame["score"].to_numpy(np.float32)
    groups = keys.groupby(columns, sort=False).indices if len(frame) else {}
    return {_key(k, by_view): (boxes[rows], scores[rows]) for k, rows in groups.items()}


def _key(key, by_view: bool) -> tuple:
    if not isinstance(key, tuple):
        key = (key,)
    return (str(key[0]), int(key[1]), bool(key[2])) if by_view else (str(key[0]),)


def frame_features(dets: pd.DataFrame, evidence: dict[str, pd.DataFrame],
                   sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """``dets`` (a detections or oracle shard of one detector) with the :data:`FEATURES`
    columns and ``ensemble_score`` added (float32), rows and their order unchanged.

    Each (image, scale, flip) group of ``dets`` is described on its own; ``evidence`` maps
    every other detector to its detections of the same images (``image_id, x1, y1, x2, y2,
    score``, and ``scale, flip``); ``sizes[image_id]`` is (width, height) in pixels.

    A group's evidence is the other detector's boxes of the same image *and the same view*
    (``scale`` and ``flip``), when its frame has those columns: a detector run at the same
    input size is the natural comparison, and at a multi-view scale set (``8k-multi``: 6
    views of up to 5000 boxes) comparing with every view would cost six times as much. A
    frame without ``scale``/``flip`` gives every view of the image all of its boxes. At a
    single-view set (``original``, ``8k``) the two are the same boxes. An image (or view)
    missing from an evidence frame counts as that detector finding nothing there.
    """
    feats = np.zeros((len(dets), len(FEATURES)), np.float32)
    ens = np.zeros(len(dets), np.float32)
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    others = []
    for _, frame in sorted(evidence.items()):
        by_view = all(c in frame.columns for c in VIEW)
        others.append((by_view, _groups(frame, by_view)))
    keys = dets[["image_id", *VIEW]].astype({"image_id": str})
    boxes = dets[BOX].to_numpy(np.float32)
    scores = dets["score"].to_numpy(np.float32)
    for key, rows in keys.groupby(["image_id", *VIEW], sort=True).indices.items():
        image_id, scale, flip = _key(key, True)
        width, height = sizes[image_id]
        ev = [groups.get((image_id, scale, flip) if by_view else (image_id,), empty) for by_view, groups in others]
        feats[rows], pairs = _box_features(boxes[rows], scores[rows], width, height, ev)
        ens[rows] = _ensemble(scores[rows], pairs)
    added = pd.DataFrame(feats, columns=list(FEATURES), index=dets.index)
    added["ensemble_score"] = ens
    return pd.concat([dets.drop(columns=[*FEATURES, "ensemble_score"], errors="ignore"), added], axis=1)


# a detections (or oracle) shard plus the features and the ensemble score: ``confrank features``
register_schema("features", [*(c for c in detection_columns() if c.name != "rank_score"),
                             *(Column(name, pa.float32()) for name in FEATURES),
                             Column("ensemble_score", pa.float32())])

"""WiderFace AP (easy/medium/hard), AP@[.5:.95], plain VOC AP, AP by attribute, PR curves.

The WiderFace numbers equal the widely used Python port of the official evaluation toolkit
(the ``widerface_evaluate`` folder the RetinaFace repositories ship) on the same predictions:

* IoU with the +1 pixel convention (a box from x1 to x2 is ``x2 - x1 + 1`` pixels wide),
  computed in float64 with the port's order of operations (``pipeline.iou.iou_plus_one``);
* each detection is matched to the face with the highest IoU (first one on ties), whether
  or not that face was already matched; at IoU >= threshold it recalls the face if the face
  is in the subset's keep list and not yet recalled, is a false positive if the face was
  already recalled, and is *ignored* (neither TP nor FP) if the face is outside the keep
  list; below the threshold it is a false positive;
* scores are min-max normalised over the whole prediction set, with the port's initial
  values (``min = min(1, lowest score)``, ``max = max(0, highest score)``), then cut at the
  1000 thresholds ``1 - (t + 1) / 1000``;
* an image without ground-truth faces, or without predictions, adds nothing but its faces
  to the recall denominator; the subset's face count is the size of its keep lists;
* AP is the area under the precision envelope (VOC, all points).

Unlike the port, and like the official MATLAB tools, each image's boxes are sorted by score
(descending, stable) before matching, and an image without predictions is simply an image
with no predictions. On sorted input (every real submission) the port and this module agree.

The work is split as in pycocotools' COCOeval: :meth:`WiderFaceEval.evaluate` matches every
detection once (IoU with all faces of its image, cached), :meth:`WiderFaceEval.accumulate`
turns the matches into PR curves for any keep list and IoU threshold with counts and
cumulative sums (no per-threshold or per-face loop), and :meth:`WiderFaceEval.summarize`
reports APs.

Boxes are ``x1, y1, x2, y2`` in original-image pixels (WiderFace ``x2 = x + w``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.iou import iou_plus_one
from pipeline.tables import ATTRIBUTE_COLUMNS, BOX_COLUMNS

SUBSETS = ("easy", "medium", "hard")
N_THRESHOLDS = 1000
#: the IoU thresholds of the 2018 challenge metric AP@[.5:.95] (as pycocotools spells them)
COCO_IOUS = tuple(float(v) for v in np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1))


def score_thresholds(n: int = N_THRESHOLDS) -> np.ndarray:
    """The port's thresholds ``1 - (t + 1) / n`` for t = 0..n-1 (descending), float64."""
    return 1.0 - np.arange(1, n + 1, dtype=np.float64) / n


def normalise_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max normalisation over all predictions, with the port's initial min 1 and max 0.

    A constant score set divides by zero exactly as the port does (NaN scores, which pass
    no threshold).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return scores.copy()
    low = min(float(scores.min()), 1.0)
    high = max(float(scores.max()), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (scores - low) / (high - low)


def _previous_best(face: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """For each detection, the highest ``iou`` among the earlier ones (by position) with the
    same ``face``; -1 when there is none or ``face`` is -1. (D,) float64."""
    out = np.full(len(face), -1.0)
    idx = np.flatnonzero(face >= 0)
    idx = idx[np.argsort(face[idx], kind="stable")]  # by face, evaluation order within a face
    if not len(idx):
        return out
    f = face[idx]
    start = np.r_[True, f[1:] != f[:-1]]
    running = pd.Series(iou[idx]).groupby(f, sort=False).cummax().to_numpy()  # exact, per face
    previous = np.r_[-1.0, running[:-1]]
    previous[start] = -1.0
    out[idx] = previous
    return out


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (the port's ``voc_ap``; NaN precision propagates)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@dataclass
class Curve:
    """A PR curve: ``recall``/``precision`` per score ``threshold``, and its AP."""

    threshold: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    ap: float


@dataclass
class Matches:
    """The cached per-detection matching (detections in evaluation order).

    image: (D,) int image index into ``image_ids``; score: (D,) raw score, float64;
    norm_score: (D,) normalised score; iou: (D,) highest IoU with a face of the image (0
    when the image has no faces); face: (D,) row of that face in the gt table (-1 when none);
    in_gt: (D,) the image has ground-truth faces (WiderFace skips the others entirely);
    prev_iou: (D,) highest ``iou`` of the earlier detections (in evaluation order) matched
    to the same face, -1 when none: a detection recalls its face at IoU threshold t exactly
    when ``prev_iou < t <= iou``, so no threshold needs its own pass over the faces;
    first: (D,) index of the first of the descending score thresholds the normalised score
    passes (``n_thresholds`` when it passes none, NaN included); gt_image: (D,) index of
    the detection's image into :attr:`WiderFaceEval.image_ids`, -1 when the image has no
    ground-truth faces.
    """

    image: np.ndarray
    score: np.ndarray
    norm_score: np.ndarray
    iou: np.ndarray
    face: np.ndarray
    in_gt: np.ndarray
    prev_iou: np.ndarray
    first: np.ndarray
    gt_image: np.ndarray | None = None


@dataclass
class WiderFaceEval:
    """WiderFace evaluation of one prediction set against one ground truth.

    gt: a ``gt`` table (image_id, gt_id, x1..y2, easy/medium/hard, attributes, optional
    ignore). dets: image_id, x1..y2, score (any float dtype; one row per final box).
    """

    gt: pd.DataFrame
    dets: pd.DataFrame
    n_thresholds: int = N_THRESHOLDS
    matches: Matches | None = field(default=None, init=False)
    _subset_curves: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.gt = self.gt.reset_index(drop=True)
        ids = self.gt["image_id"].astype(str).to_numpy()
        #: gt rows in (image, gt_id) order; keep masks stay aligned with ``gt`` as given
        self._order = np.lexsort((self.gt["gt_id"].to_numpy(), ids))
        self._ids = ids[self._order]

    # -------------------------------------------------------------- evaluate (per image)

    def evaluate(self) -> "WiderFaceEval":
        """Match every detection to its best face (max IoU, first on ties); cached."""
        gt_ids = self._ids
        gt_start = np.flatnonzero(np.r_[True, gt_ids[1:] != gt_ids[:-1]]) if len(gt_ids) else np.zeros(0, int)
        gt_images = gt_ids[gt_start]
        gt_end = np.r_[gt_start[1:], len(gt_ids)]
        gt_boxes = self.gt[list(BOX_COLUMNS)].to_numpy(np.float64)[self._order]

        det_image, images = pd.factorize(self.dets["image_id"].astype(str), sort=True)
        images = np.asarray(images, dtype=object)
        score = self.dets["score"].to_numpy(np.float64)
        order = np.lexsort((-score, det_image))  # per image, score descending, stable
        det_image, score = det_image[order], score[order]
        boxes = self.dets[list(BOX_COLUMNS)].to_numpy(np.float64)[order]

        where = np.searchsorted(gt_images, images)
        where = np.minimum(where, max(len(gt_images) - 1, 0))
        has_gt = (gt_images[where] == images) if len(gt_images) else np.zeros(len(images), bool)
        iou = np.zeros(len(score))
        face = np.full(len(score), -1, dtype=np.int64)
        det_start = np.searchsorted(det_image, np.arange(len(images)))
        det_end = np.r_[det_start[1:], len(score)]
        for k in np.flatnonzero(has_gt):
            lo, hi = det_start[k], det_end[k]
            g0, g1 = gt_start[where[k]], gt_end[where[k]]
            overlaps = iou_plus_one(boxes[lo:hi], gt_boxes[g0:g1])
            best = overlaps.argmax(axis=1)
            iou[lo:hi] = overlaps[np.arange(hi - lo), best]
            face[lo:hi] = g0 + best
        norm = normalise_scores(score)
        self.matches = Matches(det_image, score, norm, iou, face, has_gt[det_image],
                               _previous_best(face, iou), self._first_threshold(norm),
                               gt_image=np.where(has_gt, where, -1)[det_image])
        self._subset_curves.clear()
        return self

    def _first_threshold(self, norm_score: np.ndarray) -> np.ndarray:
        """Index of the first threshold each normalised score passes (score >= threshold);
        ``n_thresholds`` for a score that passes none (NaN included)."""
        thresholds = score_thresholds(self.n_thresholds)
        passed = np.searchsorted(thresholds[::-1], norm_score, side="right")
        passed[np.isnan(norm_score)] = 0
        return self.n_thresholds - passed

    # -------------------------------------------------------------- image weights

    @property
    def image_ids(self) -> np.ndarray:
        """The images of the ground truth (those with faces), sorted: the population that
        image weights (and the bootstrap) index."""
        return self._ids[self._image_starts()]

    def _image_starts(self) -> np.ndarray:
        return np.flatnonzero(np.r_[True, self._ids[1:] != self._ids[:-1]]) if len(self._ids) else np.zeros(0, dtype=np.int64)

    def face_image(self) -> np.ndarray:
        """Index into :attr:`image_ids` of each ``gt`` row (rows as given)."""
        starts = np.zeros(len(self._ids), dtype=np.int64)
        starts[self._image_starts()[1:]] = 1
        face_image = np.empty(len(self._ids), dtype=np.int64)
        face_image[self._order] = np.cumsum(starts)
        return face_image

    def detection_weights(self, weights: np.ndarray) -> np.ndarray:
        """Integer multiplicity of each detection (evaluation order) for per-image
        ``weights`` (one non-negative integer per :attr:`image_ids`); detections of images
        without ground-truth faces are not resampled and keep multiplicity 1."""
        if self.matches is None:
            self.evaluate()
        w = np.asarray(weights)
        if w.shape != (len(self.image_ids),) or (w.dtype.kind not in "iu" and not np.array_equal(w, np.round(w))) or (w < 0).any():
            raise ValueError(f"weights: one non-negative integer per ground-truth image ({len(self.image_ids)}), got shape {w.shape}")
        return np.r_[w.astype(np.int64), 1][self.matches.gt_image]

    # -------------------------------------------------------------- accumulate (curves)

    def _flags(self, keep: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(proposal, true positive) flags per detection for a keep list and IoU threshold.

        A matched detection of a kept face recalls it when no earlier detection of that face
        reached the threshold; one of a face outside the keep list is no proposal.
        """
        m = self.matches
        keep = keep[self._order]
        matched = m.iou >= iou_threshold
        face_kept = np.zeros(len(m.face), dtype=bool)
        face_kept[matched] = keep[m.face[matched]]
        proposal = ~(matched & ~face_kept)
        tp = matched & face_kept & (m.prev_iou < iou_threshold)
        return proposal, tp

    def widerface_curve(self, keep: np.ndarray, iou_threshold: float = 0.5, weights: np.ndarray | None = None) -> Curve:
        """The port's PR curve and AP for faces ``keep`` (bool per row of ``gt``; others ignored).

        ``weights`` (one non-negative integer per :attr:`image_ids`) counts each image that
        many times: the curve of a dataset where those images are physically repeated (0:
        left out), except that the score normalisation stays the one of the full prediction
        set (so the matching and threshold indices stay cached).
        """
        if self.matches is None:
            self.evaluate()
        m = self.matches
        proposal, tp = self._flags(np.asarray(keep, dtype=bool), iou_threshold)
        thresholds = score_thresholds(self.n_thresholds)
        if weights is None:
            # per threshold: the detections whose score first passes it, then cumulative counts
            n_prop = np.cumsum(np.bincount(m.first[m.in_gt & proposal], minlength=self.n_thresholds + 1)[:-1]).astype(np.float64)
            n_tp = np.cumsum(np.bincount(m.first[m.in_gt & tp], minlength=self.n_thresholds + 1)[:-1]).astype(np.float64)
            count_face = float(np.count_nonzero(keep))
        else:
            wd = self.detection_weights(weights).astype(np.float64)  # integers: sums stay exact
            n_prop = np.cumsum(np.bincount(m.first[m.in_gt & proposal], wd[m.in_gt & proposal], minlength=self.n_thresholds + 1)[:-1])
            n_tp = np.cumsum(np.bincount(m.first[m.in_gt & tp], wd[m.in_gt & tp], minlength=self.n_thresholds + 1)[:-1])
            count_face = float(np.asarray(weights, dtype=np.int64)[self.face_image()[np.asarray(keep, dtype=bool)]].sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = n_tp / n_prop
            recall = n_tp / count_face
        return Curve(thresholds, recall, precision, voc_ap(recall, precision))

    def voc_curve(self, keep: np.ndarray | None = None, iou_threshold: float = 0.5, weights: np.ndarray | None = None) -> Curve:
        """Plain VOC AP (all points): detections of all images ranked by raw score.

        ``keep`` marks the faces that count (others are 'difficult': a detection matched to
        one is ignored); default every face. Detections in images without faces are false
        positives. ``threshold`` holds each detection's raw score in rank order.
        ``weights`` (one non-negative integer per :attr:`image_ids`) counts each image that
        many times, exactly as physically repeated copies placed right after it in image
        order would rank (tied scores: by image, then copy, then position in the image).
        """
        if self.matches is None:
            self.evaluate()
        m = self.matches
        keep = np.ones(len(self.gt), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
        proposal, tp = self._flags(keep, iou_threshold)
        order = np.argsort(-m.score, kind="stable")
        order = order[proposal[order]]
        npos = float(np.count_nonzero(keep))
        if weights is not None:
            # runs of equal score within one image, each repeated as a block per copy
            s, im = m.score[order], m.image[order]
            start = np.flatnonzero(np.r_[True, (im[1:] != im[:-1]) | ~((s[1:] == s[:-1]) | (np.isnan(s[1:]) & np.isnan(s[:-1])))])
            size = np.diff(np.r_[start, len(order)])
            copies = self.detection_weights(weights)[order[start]]
            block = np.repeat(np.arange(len(start)), copies)
            length = size[block]
            offset = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
            order = order[np.repeat(start[block], length) + offset]
            npos = float(np.asarray(weights, dtype=np.int64)[self.face_image()[keep]].sum())
        ctp = np.cumsum(tp[order]).astype(np.float64)
        cfp = np.cumsum(~tp[order]).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = ctp / npos
            precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
        return Curve(m.score[order], recall, precision, voc_ap(recall, precision))

    # -------------------------------------------------------------- summarize

    def has_subsets(self) -> bool:
        """True when the ground truth carries easy/medium/hard keep lists."""
        return all(s in self.gt for s in SUBSETS) and bool(self.gt[list(SUBSETS)].to_numpy().any())

    def voc_keep_mask(self) -> np.ndarray:
        """The faces :meth:`voc_all_curve` counts: every face not marked ``ignore``."""
        return ~self.gt["ignore"].to_numpy(bool) if "ignore" in self.gt else np.ones(len(self.gt), dtype=bool)

    def voc_all_curve(self) -> Curve:
        """:meth:`voc_curve` over every face not marked ``ignore``; computed once."""
        if "voc" not in self._subset_curves:
            self._subset_curves["voc"] = self.voc_curve(self.voc_keep_mask())
        return self._subset_curves["voc"]

    def subset_curve(self, subset: str, iou_threshold: float = 0.5) -> Curve:
        """:meth:`widerface_curve` of a subset's keep list, computed once per (subset, IoU)
        and shared by :meth:`summarize` and :meth:`pr_table`."""
        key = (subset, float(iou_threshold))
        if key not in self._subset_curves:
            self._subset_curves[key] = self.widerface_curve(self.keep_mask(subset), iou_threshold)
        return self._subset_curves[key]

    def keep_mask(self, subset: str) -> np.ndarray:
        """The keep list of ``subset`` as a bool per gt row."""
        return self.gt[subset].to_numpy(bool)

    def attribute_masks(self) -> dict[str, dict[str, np.ndarray]]:
        """Keep lists for AP by attribute value: ``{attribute: {value: mask}}``.

        A value's faces are those of the hard keep list (every face the protocol evaluates)
        with that value; ``invalid`` is taken over all faces, since no keep list holds an
        invalid face. Faces outside the mask are ignored, as outside a subset.
        """
        hard = self.keep_mask("hard")
        out: dict[str, dict[str, np.ndarray]] = {}
        for attr in ATTRIBUTE_COLUMNS:
            if attr not in self.gt:
                continue
            values = self.gt[attr].to_numpy()
            base = np.ones(len(values), bool) if attr == "invalid" else hard
            masks = {str(int(v)): base & (values == v) for v in np.unique(values[base]) if v >= 0}
            if masks:
                out[attr] = masks
        return out

    def summarize(self, ious: Sequence[float] = COCO_IOUS) -> dict:
        """All APs as a JSON-able dict; see :func:`evaluate_widerface` for the keys."""
        if self.matches is None:
            self.evaluate()
        result: dict = {"n_images": int(len(self.gt["image_id"].unique())), "n_faces": int(len(self.gt)),
                        "n_detections": int(len(self.matches.score))}
        result["voc_ap"] = self.voc_all_curve().ap
        if not self.has_subsets():
            return result
        result["ap"] = {s: self.subset_curve(s).ap for s in SUBSETS}
        result["ap_50_95"] = {s: float(np.mean([self.subset_curve(s, t).ap for t in ious])) for s in SUBSETS}
        result["ap_by_attribute"] = {
            attr: {v: self.widerface_curve(mask).ap for v, mask in masks.items()}
            for attr, masks in self.attribute_masks().items()
        }
        return result

    def pr_table(self, ious: Sequence[float] = COCO_IOUS) -> pd.DataFrame:
        """PR curves as a ``pr`` table: WiderFace subsets at every IoU of ``ious``, and VOC.

        One row per subset, IoU and score threshold (``voc`` rows: one per ranked detection).
        """
        frames = []
        curves = [("voc", 0.5, self.voc_all_curve())]
        if self.has_subsets():
            curves += [(s, t, self.subset_curve(s, t)) for s in SUBSETS for t in ious]
        for subset, iou, c in curves:
            frames.append(pd.DataFrame({"subset": subset, "iou": np.float32(iou), "threshold": c.threshold.astype(np.float32),
                                        "recall": c.recall, "precision": c.precision}))
        return pd.concat(frames, ignore_index=True)


def evaluate_widerface(gt: pd.DataFrame, dets: pd.DataFrame) -> dict:
    """WiderFace evaluation in one call.

    Returns ``ap`` ({easy, medium, hard} at IoU 0.5), ``ap_50_95`` (mean over IoU
    0.5:0.05:0.95 per subset), ``ap_by_attribute`` ({attribute: {value: AP}}), ``voc_ap``
    (plain VOC AP at IoU 0.5 over all non-ignored faces) and counts. Without keep lists in
    ``gt`` only ``voc_ap`` and the counts are returned.
    """
    return WiderFaceEval(gt, dets).evaluate().summarize()

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
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _logit(p: np.ndarray) -> np.ndarray:
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
    cols = [scores, _logit(scores), np.log(w), np.log(h), np.log(h / w), np.log(w * h / (width * height)),
            (boxes[:, 0] + boxes[:, 2]) / (2 * width), (boxes[:, 1] + boxes[:, 3]) / (2 * height),
            rank / max(n, 1), np.log1p(rank), scores / max(best, 1e-6),
            np.full(n, np.log1p((scores >= CONFIDENT).sum())), np.full(n, top10)]
    return np.stack(cols, axis=1)


def neighbour_features(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``(n, len(NEIGHBOURS))``: the largest IoU with a higher-scored box of the same set (what
    greedy NMS looks at) and that box's score, log(1 + boxes overlapping at IoU > 0.4), the sum
    of their scores, and the largest IoU with any other box."""
    n = len(scores)
    out = np.zeros((n, len(NEIGHBOURS)), np.float64)
    if n < 2:
        return out
    scores = np.asarray(scores, np.float32)
    # higher-scored = earlier in the stable descending order (ties: the earlier row)
    position = np.empty(n, np.int64)
    position[np.argsort(-scores, kind="stable")] = np.arange(n)
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


def evidence_features(boxes: np.ndarray, evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(n, len(EVIDENCE))`` summaries over the other detectors of :func:`best_evidence`:
    max / mean / min of the best overlapping score, max / mean of the IoU with a confident box,
    the share of detectors with a confident box at IoU >= 0.5, and the mean of score x IoU.
    All zeros when there is no other detector."""
    n = len(boxes)
    if not evidence:
        return np.zeros((n, len(EVIDENCE)), np.float64)
    pairs = [best_evidence(boxes, b, s) for b, s in evidence]
    score = np.stack([p[0] for p in pairs], axis=1)
    iou = np.stack([p[1] for p in pairs], axis=1)
    return np.stack([score.max(1), score.mean(1), score.min(1), iou.max(1), iou.mean(1),
                     (score >= CONFIDENT).mean(1), (score * iou).mean(1)], axis=1)


def box_features(boxes: np.ndarray, scores: np.ndarray, width: int, height: int,
                 evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """``(n, len(FEATURES))`` float32 features of one image's boxes from one detector (one
    scale and flip group), with ``evidence`` the other detectors' boxes of the same image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    parts = [own_features(boxes, scores, width, height), neighbour_features(boxes, scores),
             evidence_features(boxes, evidence)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def ensemble_scores(scores: np.ndarray, boxes: np.ndarray, evidence: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The training-free baseline: the mean of each box's own score and the best score among
    the other detectors' boxes overlapping it at IoU >= 0.5 (0 when none); ``(n,)`` float32.
    With no other detector it is the box's own score."""
    scores = np.asarray(scores, np.float32).reshape(-1)
    if not evidence:
        return scores.copy()
    best = np.max(np.stack([best_evidence(boxes, b, s)[0] for b, s in evidence], axis=1), axis=1)
    return ((scores + best) / 2).astype(np.float32)


BOX = ["x1", "y1", "x2", "y2"]


def _by_image(frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    ids = frame["image_id"].astype(str).to_numpy()
    boxes = frame[BOX].to_numpy(np.float32)
    scores = frame["score"].to_numpy(np.float32)
    order = np.argsort(ids, kind="stable")
    uniq, start = np.unique(ids[order], return_index=True)
    end = np.r_[start[1:], len(order)]
    return {u: (boxes[order[a:b]], scores[order[a:b]]) for u, a, b in zip(uniq, start, end)}


def frame_features(dets: pd.DataFrame, evidence: dict[str, pd.DataFrame],
                   sizes: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """``dets`` (a detections or oracle shard of one detector) with the :data:`FEATURES`
    columns and ``ensemble_score`` added (float32), rows and their order unchanged.

    Each (image, scale, flip) group of ``dets`` is described on its own; ``evidence`` maps
    every other detector to its detections of the same images (all its scales and flips:
    ``image_id, x1, y1, x2, y2, score``); ``sizes[image_id]`` is (width, height) in pixels.
    An image missing from an evidence frame counts as that detector finding nothing there.
    """
    out = dets.copy()
    feats = np.zeros((len(dets), len(FEATURES)), np.float32)
    ens = np.zeros(len(dets), np.float32)
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    others = [_by_image(frame) for _, frame in sorted(evidence.items())]
    keys = dets[["image_id", "scale", "flip"]].astype({"image_id": str})
    boxes = dets[BOX].to_numpy(np.float32)
    scores = dets["score"].to_numpy(np.float32)
    for (image_id, _, _), rows in keys.groupby(["image_id", "scale", "flip"], sort=True).indices.items():
        width, height = sizes[image_id]
        ev = [other.get(image_id, empty) for other in others]
        feats[rows] = box_features(boxes[rows], scores[rows], width, height, ev)
        ens[rows] = ensemble_scores(scores[rows], boxes[rows], ev)
    for j, name in enumerate(FEATURES):
        out[name] = feats[:, j]
    out["ensemble_score"] = ens
    return out


# a detections (or oracle) shard plus the features and the ensemble score: ``confrank features``
register_schema("features", [*(c for c in detection_columns() if c.name != "rank_score"),
                             *(Column(name, pa.float32()) for name in FEATURES),
                             Column("ensemble_score", pa.float32())])

"""The ``fusion`` ranker kind: a learned fusion of several detectors' boxes.

Where Weighted Boxes Fusion (:mod:`pipeline.fusion`) scores a cluster of the detectors' boxes
by a fixed rule (the mean of its members' scores, scaled down when a detector is missing), this
kind learns the cluster's confidence from what the cluster looks like:

1. **Per detector**, greedy NMS per image (IoU ``nms_iou``, 0.4, +1 convention, as ``confrank nms``),
   at most 750 boxes per image and detector.
2. **Clusters**: the union of the detectors' kept boxes of an image, best detector score first;
   each box not yet in a cluster starts one and takes every remaining box with IoU >=
   ``fusion_iou`` (continuous convention) to it. The fused box is the score-weighted mean of
   its members (as WBF).
3. **Cluster features** (:data:`CLUSTER_FEATURES`): how many detectors agree and the spread of
   their best scores, the members' count and agreement (IoU with the fused box, centre
   spread), the fused box's size and place, the cluster's rank in its image, and the per-box
   features (:mod:`pipeline.ranker.features`: own, neighbours, other detectors' evidence) of
   the cluster's best box. Nothing names a detector: the features sort over detectors, so a
   model trained on some detectors fuses others.
4. **Model**: gradient-boosted trees (:mod:`pipeline.ranker.gbm`) on the clusters; the label
   of a cluster is 1 when the score-weighted mean of its members' oracle IoUs is >= 0.5 (the
   fused box is the same weighted mean of their boxes).
5. **Output**: each cluster's fused box with the model's confidence, then greedy NMS per image
   (``nms_iou``) and the ``keep`` best per image.

Boxes are x1, y1, x2, y2 in original-image pixels. The rows of each detector are a features
frame (``confrank features``: ``image_id``, ``x1..y2``, ``score`` and the feature columns).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.boxes import nms
from pipeline.errors import ConfrankError
from pipeline.iou import paired_iou, pairwise_iou
from pipeline.ranker.features import FEATURES, logit
from pipeline.ranker.gbm import fitted, gbm_from_payload, gbm_payload, predict_gbm, train_gbm
from pipeline.ranker.registry import Fitted, FitRun, ScoreContext
from pipeline.ranker.folds import assign_folds
from pipeline.ranker.settings import FusionSettings, GbmConfig

BOX = ["x1", "y1", "x2", "y2"]
PAYLOAD_FORMAT = "confrank-ranker-fusion"
#: folds of the images over which the per-box model's training probabilities are out of fold
CROSS_FIT = 3
#: boxes kept per image and detector by the first NMS
PER_DETECTOR_KEEP = 750
CLUSTER_OWN = ("c_score_max", "c_score_second", "c_score_mean", "c_score_min", "c_logit_max", "c_detectors",
               "c_confident", "c_members", "c_wbf", "c_member_iou", "c_centre_spread", "c_log_w", "c_log_h",
               "c_log_rel_area", "c_log_aspect", "c_cx", "c_cy", "c_rank_frac", "c_log_rank", "c_image_confident",
               "c_dup_iou", "c_dup_score", "c_p_max", "c_p_second", "c_p_mean", "c_p_min", "c_p_wbf", "c_p_dup")
#: cluster feature columns: the cluster's own, then the per-box features of its best box
CLUSTER_FEATURES: tuple[str, ...] = CLUSTER_OWN + tuple(f"lead_{f}" for f in FEATURES)


def kept_boxes(frames: Sequence[pd.DataFrame], nms_iou: float) -> pd.DataFrame:
    """Every detector's rows after greedy NMS per image (at most :data:`PER_DETECTOR_KEEP` per
    image), concatenated with a ``det`` column (the frame's index in ``frames``)."""
    out = []
    for k, frame in enumerate(frames):
        if frame.empty:
            continue
        codes, _ = pd.factorize(frame["image_id"].astype(str), sort=True)
        index = nms(torch.from_numpy(frame[BOX].to_numpy(np.float64, copy=True)),
                    torch.from_numpy(frame["score"].to_numpy(np.float64, copy=True)),
                    torch.from_numpy(codes.astype(np.int64)), nms_iou, PER_DETECTOR_KEEP).numpy()
        out.append(frame.iloc[index].assign(det=k))
    if not out:
        raise ConfrankError("learned fusion: no boxes to fuse")
    rows = pd.concat(out, ignore_index=True)
    rows["image_id"] = rows["image_id"].astype(str)
    return rows


def cluster_image(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Cluster of each box ``(n,)`` int64 (0..C-1, in order of the clusters' best box): greedy,
    best score first, a box joins the first cluster whose best box it overlaps at IoU >= ``iou``."""
    order = np.argsort(-scores, kind="stable")
    overlap = pairwise_iou(boxes[order], boxes[order]) >= iou
    label = np.full(len(order), -1, np.int64)
    next_label = 0
    for i in range(len(order)):
        if label[i] >= 0:
            continue
        members = overlap[i] & (label < 0)
        label[members] = next_label
        next_label += 1
    out = np.empty(len(order), np.int64)
    out[order] = label
    return out


def clusters(rows: pd.DataFrame, n_det: int, sizes: Mapping[str, tuple[int, int]], iou: float) -> pd.DataFrame:
    """The clusters of every image of ``rows`` (:func:`kept_boxes` of ``n_det`` detectors, with the
    per-box model's ``p_box``) as a frame: ``image_id``, fused ``x1..y2``, :data:`CLUSTER_FEATURES`,
    and ``label_iou`` when the rows have ``oracle_iou``."""
    parts = []
    for image_id, index in rows.groupby("image_id", sort=True).indices.items():
        parts.append(_image_clusters(rows.iloc[index], image_id, sizes[image_id], n_det, iou))
    return pd.concat(parts, ignore_index=True)


def _image_clusters(rows: pd.DataFrame, image_id: str, size: tuple[int, int], n_det: int, iou: float) -> pd.DataFrame:
    boxes = rows[BOX].to_numpy(np.float32)
    scores = rows["score"].to_numpy(np.float64)
    det = rows["det"].to_numpy()
    label = cluster_image(boxes, scores, iou)
    n = label.max() + 1
    weight = np.maximum(scores, 1e-6)
    wsum = np.bincount(label, weight, n)
    fused = np.stack([np.bincount(label, weight * boxes[:, j], n) / wsum for j in range(4)], axis=1)
    # per cluster and detector: the detector's best score (0 when absent)
    best = np.zeros((n, n_det))
    np.maximum.at(best, (label, det), scores)
    ranked = -np.sort(-best, axis=1)
    present = (best > 0).sum(1)
    members = np.bincount(label, minlength=n)
    member_iou = paired_iou(boxes, fused[label])
    w = np.maximum(fused[:, 2] - fused[:, 0], 1e-3)
    h = np.maximum(fused[:, 3] - fused[:, 1], 1e-3)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    fcx, fcy = (fused[:, 0] + fused[:, 2]) / 2, (fused[:, 1] + fused[:, 3]) / 2
    spread = np.sqrt(np.bincount(label, ((cx - fcx[label]) / w[label]) ** 2 + ((cy - fcy[label]) / h[label]) ** 2, n)
                     / members)
    mean_score = best.sum(1) / n_det
    wbf = np.bincount(label, scores, n) / members * np.minimum(present, n_det) / n_det
    p = rows["p_box"].to_numpy(np.float64)
    best_p = np.zeros((n, n_det))
    np.maximum.at(best_p, (label, det), p)
    ranked_p = -np.sort(-best_p, axis=1)
    p_wbf = np.bincount(label, p, n) / members * np.minimum(present, n_det) / n_det
    by_wbf = np.argsort(-wbf, kind="stable")
    rank = np.empty(n)
    rank[by_wbf] = np.arange(n)
    # the cluster most like a duplicate of this one among those WBF ranks higher
    fused_iou = pairwise_iou(fused.astype(np.float32), fused.astype(np.float32))
    higher = np.where(rank[None, :] < rank[:, None], fused_iou, 0.0)
    dup = higher.argmax(axis=1)
    dup_iou = higher[np.arange(n), dup]
    width, height = size
    own = np.stack([
        ranked[:, 0], ranked[:, 1] if n_det > 1 else np.zeros(n), mean_score, ranked[:, -1], logit(ranked[:, 0]),
        present / n_det, (best >= 0.5).sum(1) / n_det, np.log(members), wbf,
        np.bincount(label, member_iou, n) / members, spread, np.log(w), np.log(h), np.log(w * h / (width * height)),
        np.log(h / w), fcx / width, fcy / height, rank / n, np.log1p(rank),
        np.full(n, np.log1p((ranked[:, 0] >= 0.5).sum())), dup_iou, np.where(dup_iou > 0, ranked[dup, 0], 0.0),
        ranked_p[:, 0], ranked_p[:, 1] if n_det > 1 else np.zeros(n), best_p.sum(1) / n_det, ranked_p[:, -1], p_wbf,
        np.where(dup_iou > 0, ranked_p[dup, 0], 0.0),
    ], axis=1)
    # the per-box features of each cluster's best box (the first of the cluster in score order)
    order = np.argsort(-scores, kind="stable")
    lead = np.full(n, -1)
    for i in order[::-1]:
        lead[label[i]] = i
    lead_feats = rows[list(FEATURES)].to_numpy(np.float32)[lead]
    out = pd.DataFrame(np.concatenate([own, lead_feats], axis=1).astype(np.float32), columns=list(CLUSTER_FEATURES))
    out.insert(0, "image_id", image_id)
    for j, c in enumerate(BOX):
        out.insert(1 + j, c, fused[:, j].astype(np.float32))
    if "oracle_iou" in rows.columns:
        out["label_iou"] = _labels(label, weight, wsum, rows, lead, by_wbf)
    return out


def _labels(label: np.ndarray, weight: np.ndarray, wsum: np.ndarray, rows: pd.DataFrame, lead: np.ndarray,
            by_wbf: np.ndarray) -> np.ndarray:
    """The training target of each cluster: the score-weighted mean of its members' oracle IoUs,
    except 0 for a cluster whose face (its best box's ``gt_id``) a cluster ranked higher by the
    WBF score already covers (a duplicate: the evaluation counts it as a false positive)."""
    n = len(wsum)
    target = np.bincount(label, weight * rows["oracle_iou"].to_numpy(np.float64), n) / wsum
    gt = rows["gt_id"].to_numpy()[lead] if "gt_id" in rows.columns else np.arange(n)
    claimed: set = set()
    for c in by_wbf:
        if target[c] < 0.5:
            continue
        if gt[c] in claimed:
            target[c] = 0.0
        claimed.add(gt[c])
    return target


@dataclass
class FusionModel:
    """The two models of a learned fusion: per box (``box``: P(box on a face) from its features)
    and per cluster (``cluster``: the fused box's confidence)."""

    box: Any
    cluster: Any


def _box_config(settings: FusionSettings) -> GbmConfig:
    """The per-box model's settings: the fusion's trees, binary, on the box feature groups."""
    return replace(settings.gbm, objective="binary", features=("own", "neighbours", "evidence"))


def fused_boxes(table: pd.DataFrame, scores: np.ndarray, nms_iou: float, keep: int) -> pd.DataFrame:
    """Final boxes (``image_id``, ``x1..y2``, ``score``) of scored clusters: greedy NMS per image."""
    codes, images = pd.factorize(table["image_id"], sort=True)
    boxes = torch.from_numpy(table[BOX].to_numpy(np.float64))
    index = nms(boxes, torch.from_numpy(np.asarray(scores, np.float64)), torch.from_numpy(codes.astype(np.int64)),
                nms_iou, keep).numpy()
    out = table.iloc[index][["image_id", *BOX]].reset_index(drop=True)
    out["score"] = np.asarray(scores, np.float32)[index]
    return out


class FusionRanker:
    """The ``fusion`` kind (:mod:`pipeline.ranker.registry`): reads the feature rows of every
    detector of its evidence set and fuses them (:meth:`fuse`); it does not re-score one
    detector's boxes on their own."""

    def describe(self, settings: FusionSettings) -> str:
        return f"fusion of {len(settings.gbm.evidence)} detectors at IoU {settings.fusion_iou}, {settings.gbm.objective}"

    def fit(self, rows: pd.DataFrame, settings: FusionSettings, run: FitRun) -> Fitted:
        """Train on the feature rows (with ``oracle_iou``) of every detector of the evidence set;
        ``dataset``, ``detector``, ``width`` and ``height`` columns say where each row comes from.

        The per-box model's probabilities that the cluster model trains on are out of fold
        (:data:`CROSS_FIT` folds of the images): on its own training boxes it would be more sure
        than it ever is on new images."""
        t0 = time.perf_counter()
        detectors = sorted(rows["detector"].unique())
        if len(detectors) < 2:
            raise ConfrankError(f"learned fusion trains on several detectors' boxes; got {detectors}")
        rows = rows.assign(image_id=rows["dataset"].astype(str) + "/" + rows["image_id"].astype(str))
        first = rows.groupby("image_id", sort=False).head(1)
        sizes = {i: (int(w), int(h)) for i, w, h in zip(first["image_id"], first["width"], first["height"])}
        kept = kept_boxes([rows[rows["detector"] == d] for d in detectors], settings.nms_iou)
        box_x = kept[list(FEATURES)].to_numpy(np.float32)
        box_oracle = kept["oracle_iou"].to_numpy(np.float64)
        fold = kept["image_id"].map(assign_folds(kept["image_id"].unique(), CROSS_FIT)).to_numpy()
        out_of_fold = np.zeros(len(kept), np.float32)
        for k in range(1, CROSS_FIT + 1):
            model = train_gbm(box_x[fold != k], box_oracle[fold != k], _box_config(settings), threads=run.workers)
            out_of_fold[fold == k] = predict_gbm(model, box_x[fold == k], _box_config(settings))
        box_model = train_gbm(box_x, box_oracle, _box_config(settings), threads=run.workers)
        table = clusters(kept.assign(p_box=out_of_fold), len(detectors), sizes, settings.fusion_iou)
        x = table[list(CLUSTER_FEATURES)].to_numpy(np.float32)
        oracle = table["label_iou"].to_numpy(np.float64)
        group = pd.factorize(table["image_id"])[0]
        score = table["c_score_max"].to_numpy(np.float64)
        booster = train_gbm(x, oracle, settings.gbm, group, threads=run.workers, score=score)
        return fitted(booster, x, oracle, group, score, settings.gbm, time.perf_counter() - t0, run.log_every,
                      FusionModel(box_model, booster))

    def fuse(self, model: FusionModel, settings: FusionSettings, frames: Sequence[pd.DataFrame],
             sizes: Mapping[str, tuple[int, int]], keep: int = 750) -> pd.DataFrame:
        """Final boxes of one dataset from every detector's feature rows (one frame per detector;
        ground-truth columns, when present, are not read)."""
        blind = [f.drop(columns=[c for c in ("oracle_iou", "gt_id") if c in f.columns]) for f in frames]
        kept = kept_boxes(blind, settings.nms_iou)
        p_box = predict_gbm(model.box, kept[list(FEATURES)].to_numpy(np.float32), _box_config(settings))
        table = clusters(kept.assign(p_box=p_box), len(frames), sizes, settings.fusion_iou)
        scores = predict_gbm(model.cluster, table[list(CLUSTER_FEATURES)].to_numpy(np.float32), settings.gbm)
        return fused_boxes(table, scores, settings.nms_iou, keep)

    def score(self, booster, settings: FusionSettings, frame: pd.DataFrame, context: ScoreContext) -> np.ndarray:
        raise ConfrankError("a fusion ranker fuses several detectors' boxes into final boxes: use "
                            "`confrank fuse --method rank-RNAME`, not rerank")

    def payload(self, model: FusionModel, settings: FusionSettings, extra: dict[str, Any]) -> dict[str, Any]:
        payload = gbm_payload(model.cluster, settings.gbm, extra)
        payload.update(format=PAYLOAD_FORMAT, box_booster=model.box.model_to_string(),
                       fusion={"fusion_iou": settings.fusion_iou, "nms_iou": settings.nms_iou})
        return payload

    def from_payload(self, payload: Mapping[str, Any], source: str, device: Any) -> tuple[FusionModel, FusionSettings]:
        import lightgbm as lgb

        if not isinstance(payload, Mapping) or payload.get("format") != PAYLOAD_FORMAT:
            raise ConfrankError(f"{source}: not a confrank fusion-ranker model")
        cluster, gbm = gbm_from_payload({**payload, "format": "confrank-ranker-gbm"}, source)
        return FusionModel(lgb.Booster(model_str=payload["box_booster"]), cluster), FusionSettings(gbm, **payload["fusion"])

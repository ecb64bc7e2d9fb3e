"""Fusion of several detectors' boxes of one dataset into final boxes (training-free baselines).

``wbf`` is Weighted Boxes Fusion as users run it with the ``ensemble-boxes`` package: greedy
NMS per detector and image first (IoU 0.4, ``pipeline.boxes.nms``, the +1 pixel convention of
``confrank nms``), then ``ensemble_boxes.weighted_boxes_fusion`` per image on the boxes
normalised by the image's width and height (clipped to [0, 1]), scaled back to pixels, and the
``keep`` best fused boxes of each image.

Boxes are ``x1, y1, x2, y2`` in original-image pixels everywhere in and out. The input of a
detector is a ``detections`` frame (``image_id``, ``x1..y2``, ``score``; ``scale`` and ``flip``
may be there and are ignored: every view of an image is one set of boxes for NMS). The output
is a ``final`` frame: ``image_id``, ``x1..y2``, ``score`` (float32), in no particular order.

:data:`FUSIONS` maps a method name to its function, so that ``confrank fuse`` dispatches on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from pipeline.boxes import nms
from pipeline.errors import ConfrankError

BOX_COLUMNS = ["x1", "y1", "x2", "y2"]
#: ``conf_type`` values of ``ensemble_boxes.weighted_boxes_fusion``
CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


def _detector_boxes(dets: pd.DataFrame, images: pd.Index, nms_iou: float, skip_box_thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One detector's boxes after NMS per image: (image codes (N,) int64 into ``images``,
    boxes (N, 4) float64, scores (N,) float64), sorted by image code then score descending.

    Boxes below ``skip_box_thr`` are dropped before NMS: WBF skips them anyway, and a box can
    only be suppressed by a higher-scored one, so the boxes at or above it keep the same fate.
    """
    scores = dets["score"].to_numpy(np.float64)
    chosen = scores >= skip_box_thr
    codes = images.get_indexer(dets["image_id"].astype(str).to_numpy()[chosen])
    if (codes < 0).any():
        raise ConfrankError("detections of an image without a size: " + repr(dets["image_id"].astype(str)[chosen][codes < 0].iloc[0]))
    boxes = torch.from_numpy(dets[BOX_COLUMNS].to_numpy(np.float64)[chosen])
    kept = nms(boxes, torch.from_numpy(scores[chosen]), torch.from_numpy(codes.astype(np.int64)), nms_iou, max(len(codes), 1)).numpy()
    return codes[kept].astype(np.int64), boxes.numpy()[kept], scores[chosen][kept]


def weighted_boxes_fusion(
    detections: Sequence[pd.DataFrame],
    sizes: Mapping[str, tuple[int, int]],
    nms_iou: float = 0.4,
    iou_thr: float = 0.55,
    skip_box_thr: float = 0.02,
    conf_type: str = "avg",
    keep: int = 750,
) -> pd.DataFrame:
    """Weighted Boxes Fusion of several detectors' boxes of one dataset.

    detections: one frame per detector (``image_id``, ``x1, y1, x2, y2`` in original-image
        pixels, ``score``; any other column is ignored); an image a detector has no row for
        is an image where it found nothing.
    sizes: ``{image_id: (width, height)}`` in pixels, for every image that has a box.
    nms_iou: greedy NMS of each detector per image first (suppress above, +1 convention).
    iou_thr, skip_box_thr, conf_type: ``ensemble_boxes.weighted_boxes_fusion``'s (boxes with a
        score below ``skip_box_thr`` are ignored; equal weights, one label).
    keep: fused boxes kept per image, best score first.

    Returns a ``final`` frame (image_id, x1, y1, x2, y2, score; float32 boxes and scores in
    original-image pixels), one row per fused box, images with no box left out. For each image
    the result is exactly the package's output on that image's NMS-ed, normalised boxes: the
    boxes it would skip (below ``skip_box_thr``, or of zero area once clipped) are dropped
    here first, which only saves its per-box Python loop the work.
    """
    from ensemble_boxes import weighted_boxes_fusion as wbf

    if conf_type not in CONF_TYPES:
        raise ConfrankError(f"conf_type {conf_type!r}: expected one of {', '.join(CONF_TYPES)}")
    if not detections:
        raise ConfrankError("weighted boxes fusion needs the boxes of at least one detector")
    images = pd.Index(sorted(sizes), dtype=object)
    wh = np.array([sizes[i] for i in images], dtype=np.float64).reshape(-1, 2)
    per_detector = []
    for dets in detections:
        codes, boxes, scores = _detector_boxes(dets, images, nms_iou, skip_box_thr)
        unit = np.clip(boxes / wh[codes][:, [0, 1, 0, 1]], 0.0, 1.0)
        nonzero = (unit[:, 2] - unit[:, 0]) * (unit[:, 3] - unit[:, 1]) != 0.0
        codes, unit, scores = codes[nonzero], unit[nonzero], scores[nonzero]
        bounds = np.searchsorted(codes, np.arange(len(images) + 1))
        per_detector.append((unit, scores, bounds))
    present = np.unique(np.concatenate([np.flatnonzero(np.diff(bounds) > 0) for _, _, bounds in per_detector]))
    out_codes, out_boxes, out_scores = [], [], []
    empty_boxes, empty = np.zeros((0, 4)), np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clipping is done above; nothing is left to warn about
        for code in present:
            boxes_list, scores_list, labels_list = [], [], []
            for unit, scores, bounds in per_detector:
                lo, hi = bounds[code], bounds[code + 1]
                boxes_list.append(unit[lo:hi] if hi > lo else empty_boxes)
                scores_list.append(scores[lo:hi] if hi > lo else empty)
                labels_list.append(np.zeros(hi - lo))
            fused, fused_scores, _ = wbf(boxes_list, scores_list, labels_list, iou_thr=iou_thr,
                                         skip_box_thr=skip_box_thr, conf_type=conf_type)
            n = min(len(fused), keep)
            if n:
                width, height = wh[code]
                out_boxes.append(np.asarray(fused[:n], np.float64) * (width, height, width, height))
                out_scores.append(np.asarray(fused_scores[:n], np.float64))
                out_codes.append(np.full(n, code))
    if not out_codes:
        return pd.DataFrame({"image_id": pd.Series([], dtype=object), **{c: np.zeros(0, np.float32) for c in BOX_COLUMNS},
                             "score": np.zeros(0, np.float32)})
    frame = pd.DataFrame(np.concatenate(out_boxes).astype(np.float32), columns=BOX_COLUMNS)
    frame.insert(0, "image_id", images.to_numpy()[np.concatenate(out_codes)])
    frame["score"] = np.concatenate(out_scores).astype(np.float32)
    return frame


#: method name -> fusion function (detections per detector, sizes, **settings) -> final boxes
FUSIONS: dict[str, Callable[..., pd.DataFrame]] = {"wbf": weighted_boxes_fusion}

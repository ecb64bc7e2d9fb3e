"""Post-processing of one set of detections into final boxes: NMS or box voting.

``fuse`` is what ``confrank nms`` runs per shard and what ``confrank cv`` runs on held-out
folds, so both give the same final boxes. Boxes are ``x1, y1, x2, y2`` in original-image
pixels; IoU uses the +1 pixel convention (``pipeline.boxes``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.boxes import box_voting, nms
from pipeline.errors import ConfrankError

BOX_COLUMNS = ("x1", "y1", "x2", "y2")

#: the confidence each method fuses on (``ensemble``: the training-free baseline of ``confrank features``)
SCORE_COLUMN = {"single": "score", "multi": "score", "oracle": "oracle_iou", "rank": "rank_score",
                "ensemble": "ensemble_score"}


def fuse(dets: pd.DataFrame, method: str, iou: float, keep: int, keep_singletons: bool, source: str = "<detections>") -> pd.DataFrame:
    """Final boxes (image_id, x1..y2, score) of one shard's detections.

    ``single`` needs one (scale, flip) per set; ``multi`` always votes; ``oracle``/``rank``
    vote when the set has several (scale, flip) pairs (a multi-scale set, ``ScaleSet.multi``)
    and run NMS otherwise (:func:`fusion_of`).
    """
    column = SCORE_COLUMN[method]
    if column not in dets:
        raise ConfrankError(f"{source}: method {method!r} needs a {column!r} column")
    views = dets[["scale", "flip"]].drop_duplicates()
    if method == "single" and len(views) > 1:
        pairs = sorted(map(tuple, views.to_numpy().tolist()))
        raise ConfrankError(f"{source}: method 'single' needs a one-scale set, got (scale, flip) pairs {pairs}; use --method multi")
    codes, images = pd.factorize(dets["image_id"].astype(str), sort=True)
    boxes = torch.from_numpy(dets[list(BOX_COLUMNS)].to_numpy(np.float64, copy=True))
    scores = torch.from_numpy(dets[column].to_numpy(np.float64, copy=True))
    groups = torch.from_numpy(codes.astype(np.int64))
    if fusion_of(method, multi=len(views) > 1) == "voting":
        out_boxes, out_scores, out_groups = box_voting(boxes, scores, groups, iou, keep, keep_singletons)
    else:
        index = nms(boxes, scores, groups, iou, keep)
        out_boxes, out_scores, out_groups = boxes[index], scores[index], groups[index]
    frame = pd.DataFrame(out_boxes.numpy(), columns=list(BOX_COLUMNS))
    frame.insert(0, "image_id", np.asarray(images, dtype=object)[out_groups.numpy()])
    frame["score"] = out_scores.numpy()
    return frame


def fusion_of(method: str, *, multi: bool) -> str:
    """``nms`` or ``voting``: what :func:`fuse` does for ``method`` on a one-view set
    (``multi`` False) or on a set of several (scale, flip) views (``multi`` True)."""
    return "voting" if method == "multi" or (method != "single" and multi) else "nms"

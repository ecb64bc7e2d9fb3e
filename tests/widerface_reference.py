"""A straightforward WiderFace evaluation, line by line as the common Python port does it.

This is the per-image, per-threshold implementation that ships with the RetinaFace
repositories (``widerface_evaluate/evaluation.py`` with its Cython ``bbox_overlaps``),
kept as plain Python/numpy. It is the oracle of the tests and the baseline of
``bench/evaluate.py``: slow on purpose, and faithful (file order, the min/max initial values
of the score normalisation, 0/0 precision, ``max_idx`` on all faces).

Inputs: ``preds`` maps ``"event/name"`` to an (N, 5) float64 array ``x y w h score``;
``gt`` maps ``"event/name"`` to ``(boxes (M, 4) x y w h, {setting: 1-based keep indices})``.
"""

from __future__ import annotations

import os

import numpy as np


def bbox_overlaps(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    n, k = boxes.shape[0], query_boxes.shape[0]
    overlaps = np.zeros((n, k), dtype=np.float64)
    for kk in range(k):
        box_area = (query_boxes[kk, 2] - query_boxes[kk, 0] + 1) * (query_boxes[kk, 3] - query_boxes[kk, 1] + 1)
        for nn in range(n):
            iw = min(boxes[nn, 2], query_boxes[kk, 2]) - max(boxes[nn, 0], query_boxes[kk, 0]) + 1
            if iw > 0:
                ih = min(boxes[nn, 3], query_boxes[kk, 3]) - max(boxes[nn, 1], query_boxes[kk, 1]) + 1
                if ih > 0:
                    ua = float((boxes[nn, 2] - boxes[nn, 0] + 1) * (boxes[nn, 3] - boxes[nn, 1] + 1) + box_area - iw * ih)
                    overlaps[nn, kk] = iw * ih / ua
    return overlaps


def bbox_overlaps_numpy(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """The same arithmetic as :func:`bbox_overlaps`, broadcast (for large images)."""
    box_area = (query_boxes[:, 2] - query_boxes[:, 0] + 1) * (query_boxes[:, 3] - query_boxes[:, 1] + 1)
    iw = np.minimum(boxes[:, None, 2], query_boxes[None, :, 2]) - np.maximum(boxes[:, None, 0], query_boxes[None, :, 0]) + 1
    ih = np.minimum(boxes[:, None, 3], query_boxes[None, :, 3]) - np.maximum(boxes[:, None, 1], query_boxes[None, :, 1]) + 1
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    ua = area[:, None] + box_area[None, :] - iw * ih
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((iw > 0) & (ih > 0), iw * ih / ua, 0.0)


def read_pred_file(filepath: str):
    with open(filepath) as f:
        lines = f.readlines()
        img_file = lines[0].rstrip("\n\r")
        lines = lines[2:]
    boxes = []
    for line in lines:
        line = line.rstrip("\r\n").split(" ")
        if line[0] == "":
            continue
        boxes.append([float(line[0]), float(line[1]), float(line[2]), float(line[3]), float(line[4])])
    return img_file.split("/")[-1], np.array(boxes)


def get_preds(pred_dir: str) -> dict[str, np.ndarray]:
    boxes = {}
    for event in os.listdir(pred_dir):
        event_dir = os.path.join(pred_dir, event)
        for imgtxt in os.listdir(event_dir):
            imgname, _boxes = read_pred_file(os.path.join(event_dir, imgtxt))
            boxes[f"{event}/{imgname.rstrip('.jpg')}"] = _boxes
    return boxes


def norm_score(pred: dict[str, np.ndarray]) -> None:
    max_score, min_score = 0, 1
    for v in pred.values():
        if len(v) == 0:
            continue
        max_score = max(np.max(v[:, -1]), max_score)
        min_score = min(np.min(v[:, -1]), min_score)
    diff = max_score - min_score
    for v in pred.values():
        if len(v) == 0:
            continue
        v[:, -1] = (v[:, -1] - min_score) / diff


def image_eval(pred, gt, ignore, iou_thresh, overlaps_fn=bbox_overlaps):
    _pred = pred.copy()
    _gt = gt.copy()
    pred_recall = np.zeros(_pred.shape[0])
    recall_list = np.zeros(_gt.shape[0])
    proposal_list = np.ones(_pred.shape[0])
    _pred[:, 2] = _pred[:, 2] + _pred[:, 0]
    _pred[:, 3] = _pred[:, 3] + _pred[:, 1]
    _gt[:, 2] = _gt[:, 2] + _gt[:, 0]
    _gt[:, 3] = _gt[:, 3] + _gt[:, 1]
    overlaps = overlaps_fn(_pred[:, :4], _gt)
    for h in range(_pred.shape[0]):
        gt_overlap = overlaps[h]
        max_overlap, max_idx = gt_overlap.max(), gt_overlap.argmax()
        if max_overlap >= iou_thresh:
            if ignore[max_idx] == 0:
                recall_list[max_idx] = -1
                proposal_list[h] = -1
            elif recall_list[max_idx] == 0:
                recall_list[max_idx] = 1
        r_keep_index = np.where(recall_list == 1)[0]
        pred_recall[h] = len(r_keep_index)
    return pred_recall, proposal_list


def img_pr_info(thresh_num, pred_info, proposal_list, pred_recall):
    pr_info = np.zeros((thresh_num, 2)).astype("float")
    for t in range(thresh_num):
        thresh = 1 - (t + 1) / thresh_num
        r_index = np.where(pred_info[:, 4] >= thresh)[0]
        if len(r_index) == 0:
            pr_info[t, 0] = 0
            pr_info[t, 1] = 0
        else:
            r_index = r_index[-1]
            p_index = np.where(proposal_list[: r_index + 1] == 1)[0]
            pr_info[t, 0] = len(p_index)
            pr_info[t, 1] = pred_recall[r_index]
    return pr_info


def dataset_pr_info(thresh_num, pr_curve, count_face):
    _pr_curve = np.zeros((thresh_num, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(thresh_num):
            _pr_curve[i, 0] = pr_curve[i, 1] / pr_curve[i, 0]
            _pr_curve[i, 1] = pr_curve[i, 1] / count_face
    return _pr_curve


def voc_ap(rec, prec):
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def evaluation(preds, gt, iou_thresh=0.5, settings=("easy", "medium", "hard"), overlaps_fn=bbox_overlaps):
    """{setting: AP}; ``preds`` is modified (scores normalised in place), as in the port."""
    norm_score(preds)
    thresh_num = 1000
    aps = {}
    for setting in settings:
        count_face = 0
        pr_curve = np.zeros((thresh_num, 2)).astype("float")
        for image_id, (gt_boxes, keep_lists) in gt.items():
            pred_info = preds.get(image_id, np.zeros((0, 5)))
            gt_boxes = np.asarray(gt_boxes, dtype=float)
            keep_index = np.asarray(keep_lists[setting], dtype=np.int64)
            count_face += len(keep_index)
            if len(gt_boxes) == 0 or len(pred_info) == 0:
                continue
            ignore = np.zeros(gt_boxes.shape[0])
            if len(keep_index) != 0:
                ignore[keep_index - 1] = 1
            pred_recall, proposal_list = image_eval(pred_info, gt_boxes, ignore, iou_thresh, overlaps_fn)
            pr_curve += img_pr_info(thresh_num, pred_info, proposal_list, pred_recall)
        pr_curve = dataset_pr_info(thresh_num, pr_curve, count_face)
        aps[setting] = float(voc_ap(pr_curve[:, 1], pr_curve[:, 0]))
    return aps


def preds_from_table(dets) -> dict:
    """The reference's ``preds`` mapping from a detections/final table, in the table's row
    order (x2 - x1 back to w, float64)."""
    preds = {}
    for image, g in dets.groupby("image_id", sort=False):
        b = g[["x1", "y1", "x2", "y2", "score"]].to_numpy(np.float64).copy()
        b[:, 2:4] -= b[:, :2]
        preds[image] = b
    return preds


def gt_from_table(gt) -> dict:
    """The reference's ``gt`` mapping from a ``gt`` table (x2 - x1 back to w)."""
    out = {}
    for image_id, g in gt.sort_values(["image_id", "gt_id"]).groupby("image_id", sort=False):
        boxes = g[["x1", "y1", "x2", "y2"]].to_numpy(np.float64).copy()
        boxes[:, 2:] -= boxes[:, :2]
        keep = {s: np.flatnonzero(g[s].to_numpy(bool)) + 1 for s in ("easy", "medium", "hard")}
        out[str(image_id)] = (boxes, keep)
    return out


def bbox_vote(det: np.ndarray, thr: float = 0.4, keep: int = 750) -> np.ndarray:
    """The RetinaFace ``bbox_vote`` loop (the reference of box voting for tests/test_multiscale.py and
    bench/nms.py) (``test_widerface.py`` of the
    Pytorch_Retinaface repository) on an (N, 5) ``x1 y1 x2 y2 score`` array, with a stable score sort in place of
    its ``argsort()[::-1]`` so that equal scores keep the shard's row order."""
    det = det[np.argsort(-det[:, 4], kind="stable")]
    out = []
    while det.shape[0] > 0:
        area = (det[:, 2] - det[:, 0] + 1) * (det[:, 3] - det[:, 1] + 1)
        xx1, yy1 = np.maximum(det[0, 0], det[:, 0]), np.maximum(det[0, 1], det[:, 1])
        xx2, yy2 = np.minimum(det[0, 2], det[:, 2]), np.minimum(det[0, 3], det[:, 3])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        o = inter / (area[0] + area[:] - inter)
        merge = np.where(o >= thr)[0]
        accu = det[merge, :]
        det = np.delete(det, merge, 0)
        if merge.shape[0] <= 1:
            if det.shape[0] == 0:
                out.append(accu[0])
            continue
        out.append(np.r_[(accu[:, :4] * accu[:, 4:]).sum(0) / accu[:, 4].sum(), accu[:, 4].max()])
    return np.array(out).reshape(-1, 5)[:keep]

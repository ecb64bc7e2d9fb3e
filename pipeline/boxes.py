"""Greedy NMS, box voting and oracle IoU on ``x1, y1, x2, y2`` boxes (original pixels).

All IoUs here use the +1 pixel convention of the RetinaFace/SSH reference code and of the
WiderFace evaluation (a box from x1 to x2 is ``x2 - x1 + 1`` pixels wide). They are computed
in float64 as torchvision does on boxes whose x2, y2 are shifted by +1 (``pipeline.iou``), so
that NMS (``torchvision.ops.batched_nms``), the voting clusters and the oracle agree exactly.

Groups (images, or image and scale) are integer codes; every function works on one flat
batch of boxes from many groups at once, on CPU or GPU tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torchvision.ops import batched_nms, box_iou
from torchvision.ops import nms as _torchvision_nms

from pipeline.iou import paired_iou_continuous, shift_plus_one
from pipeline.tables import BOX_COLUMNS

#: IoU matrix entries computed at once when assigning boxes to voting clusters
_CHUNK = 1 << 22
#: seeds per step of the voting assignment (it stops once ``keep`` clusters are certain)
_BLOCK = 256
#: boxes per image given to NMS at first when looking for voting seeds (doubled as needed)
_PREFIX = 1024


def _order(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Indices sorting by group, then score descending; stable (ties keep input order)."""
    by_score = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices
    by_group = torch.sort(groups[by_score], stable=True).indices
    return by_score[by_group]


def _top_per_group(index: torch.Tensor, groups: torch.Tensor, keep: int) -> torch.Tensor:
    """The first ``keep`` entries of ``index`` (already ordered within groups) per group."""
    g = groups[index]
    if len(g) == 0:
        return index
    start = torch.ones_like(g, dtype=torch.bool)
    start[1:] = g[1:] != g[:-1]
    first = torch.cummax(torch.where(start, torch.arange(len(g), device=g.device), 0), 0).values
    rank = torch.arange(len(g), device=g.device) - first
    return index[rank < keep]


def nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float = 0.4, keep: int = 750) -> torch.Tensor:
    """Greedy NMS per group: indices of the kept boxes, ordered by group then score.

    boxes: (N, 4) x1, y1, x2, y2; scores: (N,); groups: (N,) int64 group codes (an image,
    or an image and scale). A box is suppressed by a higher-scored kept box of its group
    with IoU > ``iou`` (+1 convention, as ``py_cpu_nms`` of the RetinaFace repositories).
    At most ``keep`` boxes per group are returned. Equal scores keep input order.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = _order(scores, groups)
    kept = batched_nms(shift_plus_one(boxes[order]), scores[order].to(torch.float64), groups[order], iou)
    kept = order[torch.sort(kept).values]  # back to (group, score) order
    return _top_per_group(kept, groups, keep)


def box_voting(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    iou: float = 0.4,
    keep: int = 750,
    keep_singletons: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Box voting per group (the multi-scale fusion of the RetinaFace/SSH test code).

    Within a group, boxes are taken by score (descending, stable); the top remaining box and
    every remaining box with IoU >= ``iou`` to it (+1 convention) form a cluster and are
    removed. A cluster becomes one box: its coordinates are the score-weighted mean of its
    members' coordinates and its score is the highest member score. A cluster of a single
    box is dropped, except the group's last cluster (the reference appends the box that is
    left when nothing else remains); ``keep_singletons=True`` keeps every single-box cluster
    as it is, as other public variants do. The first ``keep`` fused boxes per group are
    returned (cluster order = score order).

    No score threshold is applied here: the reference filters its detections at 0.02
    before voting, which our detect stage already does (``Detector.min_score``). For an
    empty group the reference emits a dummy box; this returns nothing.

    Returns (boxes (K, 4) float64, scores (K,) float64, groups (K,) int64).
    """
    device = boxes.device
    if len(boxes) == 0:
        return (torch.zeros(0, 4, dtype=torch.float64, device=device), torch.zeros(0, dtype=torch.float64, device=device),
                torch.zeros(0, dtype=torch.int64, device=device))
    order = _order(scores, groups)
    boxes, scores, groups = boxes[order].to(torch.float64), scores[order].to(torch.float64), groups[order]
    seeds, cluster = _clusters(boxes, groups, iou, keep, keep_singletons)
    member = cluster >= 0  # boxes of clusters beyond the first ``keep`` emitted are left out
    boxes, scores, groups, cluster = boxes[member], scores[member], groups[member], cluster[member]
    seeds = torch.searchsorted(torch.nonzero(member).flatten(), seeds)
    n_clusters = len(seeds)
    size = torch.bincount(cluster, minlength=n_clusters)
    weight_sum = torch.zeros(n_clusters, dtype=torch.float64, device=device).index_add_(0, cluster, scores)
    coords = torch.zeros(n_clusters, 4, dtype=torch.float64, device=device).index_add_(0, cluster, boxes * scores[:, None])
    fused = coords / weight_sum[:, None]
    singleton = size == 1
    fused[singleton] = boxes[seeds[singleton]]  # exact coordinates, not x * s / s
    seed_groups = groups[seeds]
    last_of_group = torch.ones_like(seed_groups, dtype=torch.bool)
    last_of_group[:-1] = seed_groups[1:] != seed_groups[:-1]
    emitted = torch.ones_like(last_of_group) if keep_singletons else ~singleton | last_of_group
    index = _top_per_group(torch.nonzero(emitted).flatten(), seed_groups, keep)
    return fused[index], scores[seeds[index]], seed_groups[index]


def _reach(boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) how far, in x centre, a box can be from one it overlaps with IoU > ``threshold``.

    IoU > t needs an x overlap of at least t * max(w_i, w_j), hence w_j <= w_i / t and
    |cx_i - cx_j| <= (1 - t) * max(w_i, w_j) <= (1 - t) / t * w_i; 1 % and one pixel of slack
    cover rounding. Degenerate boxes (w <= 0) overlap nothing and reach nowhere.
    """
    width = boxes[:, 2] - boxes[:, 0]
    return torch.where(width > 0, width * (1.01 * (1 - threshold) / threshold) + 1, -1.0)


def _assign_block(boxes: torch.Tensor, by_x: torch.Tensor, x_sorted: torch.Tensor, reach: torch.Tensor,
                  block: torch.Tensor, first: int, open_: torch.Tensor, local: torch.Tensor, threshold: float) -> None:
    """Give every open box that a seed of ``block`` (positions, rank order) covers (IoU >
    ``threshold``, seed ranked above it) the cluster ``first + i`` of the first such seed i;
    those boxes are closed. Only boxes whose x centre is within a seed's reach are compared,
    at most ``_CHUNK`` pairs at a time."""
    centre = (boxes[block, 0] + boxes[block, 2]) / 2
    lo = torch.searchsorted(x_sorted, centre - reach[block])
    hi = torch.searchsorted(x_sorted, centre + reach[block], right=True)
    counts = (hi - lo).clamp(min=0)
    ends = torch.cumsum(counts, 0)
    s0 = 0
    while s0 < len(block):
        # seeds s0..s1-1 hold at most _CHUNK candidate pairs (at least one seed per step)
        base = int(ends[s0 - 1]) if s0 else 0
        s1 = max(s0 + 1, int(torch.searchsorted(ends, base + _CHUNK, right=True)))
        n_pairs = int(ends[s1 - 1]) - base
        if n_pairs:
            seed = torch.repeat_interleave(torch.arange(s0, s1, device=boxes.device), counts[s0:s1])
            offset = torch.arange(n_pairs, device=boxes.device) - (ends[seed] - counts[seed] - base)
            cand = by_x[lo[seed] + offset]
            ok = open_[cand] & (cand > block[seed])
            cand, seed = cand[ok], seed[ok]
            hit = paired_iou_continuous(boxes[cand], boxes[block[seed]]) > threshold
            cand, seed = cand[hit], seed[hit]
            if len(cand):
                best = torch.full((len(open_),), len(block), dtype=torch.int64, device=boxes.device)
                best.scatter_reduce_(0, cand, seed, reduce="amin")
                won = torch.unique(cand)
                local[won] = first + best[won]
                open_[won] = False
        s0 = s1


def _clusters(boxes: torch.Tensor, groups: torch.Tensor, iou: float, keep: int, keep_singletons: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy clusters of boxes sorted by (group, score desc).

    Returns (seeds, cluster): the positions of the cluster seeds in order, and for every
    box the index of its cluster in ``seeds``. The seeds are the boxes that greedy NMS keeps
    when it suppresses at IoU >= ``iou`` (torchvision's ``nms`` suppresses at IoU > its
    threshold, so it gets the float64 just below ``iou``); a box belongs to the first seed
    ranked above it with IoU >= ``iou``, the one whose cluster removed it. Both use the same
    IoU arithmetic (torchvision's, on +1-shifted float64 boxes) so they agree exactly.

    Seeds are visited in blocks; once a group has ``keep`` clusters that will be emitted,
    its later seeds are not returned and its still unassigned boxes get cluster -1. A seed
    is compared only with the boxes near it in x (boxes sorted by x centre, see ``_reach``),
    so the work grows with the boxes around each seed rather than with all boxes of the image.
    """
    threshold = math.nextafter(iou, -math.inf)
    shifted = shift_plus_one(boxes)
    device = boxes.device
    cluster = torch.full((len(boxes),), -1, dtype=torch.int64, device=device)
    seeds = []
    n_seeds = 0
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool, device=device), groups[1:] != groups[:-1]])).flatten()
    ends = torch.cat([starts[1:], torch.tensor([len(groups)], device=device)])
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        group_boxes = shifted[lo:hi]
        n = hi - lo
        rank_scores = -torch.arange(n, dtype=torch.float64, device=device)  # keeps our (stable) order
        x_sorted, by_x = torch.sort((group_boxes[:, 0] + group_boxes[:, 2]) / 2, stable=True)
        reach = _reach(group_boxes, threshold)
        local = torch.full((n,), -1, dtype=torch.int64, device=device)
        open_ = torch.ones(n, dtype=torch.bool, device=device)  # neither a seed nor assigned yet
        used, emitted, prefix = 0, 0, min(n, max(_PREFIX, 4 * keep))
        while True:
            # greedy NMS decisions depend only on higher-ranked boxes: the seeds among the
            # first ``prefix`` boxes are those of NMS on that prefix
            kept = torch.sort(_torchvision_nms(group_boxes[:prefix], rank_scores[:prefix], threshold)).values
            local[kept[used:]] = torch.arange(used, len(kept), device=device)
            open_[kept] = False
            for b0 in range(used, len(kept), _BLOCK):
                block = kept[b0:b0 + _BLOCK]
                _assign_block(group_boxes, by_x, x_sorted, reach, block, b0, open_, local, threshold)
                sizes = torch.bincount(local[local >= b0] - b0)[: len(block)]
                emitted += len(block) if keep_singletons else int((sizes > 1).sum())
                used = b0 + len(block)
                if emitted >= keep:
                    break
            if emitted >= keep or prefix == n:
                break
            prefix = min(n, 2 * prefix)
        local[local >= used] = -1
        cluster[lo:hi] = torch.where(local >= 0, local + n_seeds, -1)
        seeds.append(kept[:used] + lo)
        n_seeds += used
    return torch.cat(seeds), cluster


def oracle_iou(
    boxes: torch.Tensor, groups: torch.Tensor, gt_boxes: torch.Tensor, gt_groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every detection, the IoU with the closest ground-truth box of its group and that box.

    boxes: (N, 4) detections, groups: (N,) int64 image codes; gt_boxes: (M, 4),
    gt_groups: (M,) int64 codes of the same images, **sorted** ascending. Returns
    (iou (N,) float64, index (N,) int64 row of ``gt_boxes``): the highest IoU (+1
    convention; the first face on ties) and its row, or 0 and -1 when the image has no face
    or no face overlaps the detection. This is the oracle confidence of seed 000 (Fig. 2).
    """
    best = torch.zeros(len(boxes), dtype=torch.float64, device=boxes.device)
    index = torch.full((len(boxes),), -1, dtype=torch.int64, device=boxes.device)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return best, index
    shifted, gt_shifted = shift_plus_one(boxes), shift_plus_one(gt_boxes)
    order = torch.sort(groups, stable=True).indices
    sorted_groups = groups[order]
    images, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    g_lo = torch.searchsorted(gt_groups, images).tolist()
    g_hi = torch.searchsorted(gt_groups, images, right=True).tolist()
    lo = 0
    for count, a, b in zip(counts.tolist(), g_lo, g_hi):
        rows = order[lo:lo + count]
        lo += count
        if a == b:
            continue
        step = max(1, _CHUNK // (b - a))
        for start in range(0, count, step):
            part = rows[start:start + step]
            value, arg = box_iou(shifted[part], gt_shifted[a:b]).max(dim=1)
            hit = value > 0
            best[part] = torch.where(hit, value, 0.0)
            index[part] = torch.where(hit, arg + a, -1)
    return best, index


def annotate_oracle(dets: pd.DataFrame, gt: pd.DataFrame) -> pd.DataFrame:
    """``dets`` (a detections table) with ``oracle_iou`` (float32: IoU, +1 convention, with the
    closest face of its image, 0 when none) and ``gt_id`` (int32: that face, -1 when none) columns,
    replacing old ones; ``gt`` is the ground-truth table (``image_id, gt_id, x1..y2``)."""
    dets = dets.drop(columns=[c for c in ("oracle_iou", "gt_id") if c in dets])
    image_ids = dets["image_id"].astype(str)
    gt = gt[gt["image_id"].isin(set(image_ids))]
    codes, _ = pd.factorize(pd.concat([image_ids, gt["image_id"]], ignore_index=True), sort=True)
    det_codes, gt_codes = codes[: len(dets)], codes[len(dets):]
    order = np.lexsort((gt["gt_id"].to_numpy(), gt_codes))
    gt_boxes = torch.from_numpy(gt[list(BOX_COLUMNS)].to_numpy(np.float64, copy=True)[order])
    iou, row = oracle_iou(
        torch.from_numpy(dets[list(BOX_COLUMNS)].to_numpy(np.float64, copy=True)), torch.from_numpy(det_codes.astype(np.int64)),
        gt_boxes, torch.from_numpy(gt_codes[order].astype(np.int64)),
    )
    row = row.numpy()
    gt_ids = gt["gt_id"].to_numpy()[order]
    out = dets.copy()
    out["oracle_iou"] = iou.numpy().astype(np.float32)
    out["gt_id"] = np.where(row >= 0, gt_ids[np.maximum(row, 0)] if len(gt_ids) else -1, -1).astype(np.int32)
    return out

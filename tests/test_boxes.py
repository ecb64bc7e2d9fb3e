"""NMS, box voting and oracle IoU against brute-force greedy implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.boxes as boxes_module
from pipeline.boxes import box_voting, nms, oracle_iou
from pipeline.iou import iou_plus_one_torch


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """+1 IoU of one box ``a`` (4,) with boxes ``b`` (N, 4), as the RetinaFace reference."""
    xx1, yy1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    xx2, yy2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / ((a[2] - a[0] + 1) * (a[3] - a[1] + 1) + area - inter)


def brute_nms(boxes, scores, thr, keep):
    order = list(np.argsort(-scores, kind="stable"))
    kept = []
    while order:
        i = order.pop(0)
        kept.append(i)
        order = [j for j in order if _iou(boxes[i], boxes[j:j + 1])[0] <= thr]
    return kept[:keep]


def brute_vote(boxes, scores, thr, keep=750, keep_singletons=False):
    """The RetinaFace ``bbox_vote`` loop."""
    order = np.argsort(-scores, kind="stable")
    det = np.c_[boxes[order], scores[order]]
    out = []
    while len(det):
        merge = np.flatnonzero(_iou(det[0, :4], det[:, :4]) >= thr)
        accu, det = det[merge], np.delete(det, merge, 0)
        if len(merge) <= 1:
            if len(det) == 0 or keep_singletons:
                out.append(accu[0])
            continue
        out.append(np.r_[(accu[:, :4] * accu[:, 4:]).sum(0) / accu[:, 4].sum(), accu[:, 4].max()])
    return np.array(out).reshape(-1, 5)[:keep]


def random_boxes(seed: int, n: int, integer: bool):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 120, (n, 2))
    wh = rng.uniform(4, 40, (n, 2))
    boxes = np.c_[xy, xy + wh]
    if integer:
        boxes = boxes.round()
    return boxes, rng.uniform(0.02, 1, n)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 120), st.booleans(), st.sampled_from([0.3, 0.4, 0.5]), st.integers(1, 40))
def test_nms_equals_brute_force_per_image(seed, n, integer, thr, keep):
    boxes, scores = random_boxes(seed, n, integer)
    groups = np.random.default_rng(seed + 1).integers(0, 3, n)
    got = nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(groups), thr, keep).numpy()
    want = []
    for g in range(3):
        members = np.flatnonzero(groups == g)
        want += [members[i] for i in brute_nms(boxes[members], scores[members], thr, keep)]
    assert got.tolist() == want


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 150), st.booleans(), st.booleans(), st.sampled_from([2, 5, 750]), st.sampled_from([1, 3, 256]))
def test_voting_equals_reference_loop(seed, n, integer, keep_singletons, keep, block):
    boxes, scores = random_boxes(seed, n, integer)
    groups = np.random.default_rng(seed + 1).integers(0, 3, n)
    # small blocks and prefixes exercise the early stop and the growing NMS prefix
    # (and a tiny pair budget splits a block's candidate pairs into many steps)
    saved = boxes_module._BLOCK, boxes_module._PREFIX, boxes_module._CHUNK
    small = block < 256
    boxes_module._BLOCK, boxes_module._PREFIX, boxes_module._CHUNK = block, 1 if small else 1024, 5 if small else 1 << 22
    try:
        got_boxes, got_scores, got_groups = box_voting(torch.tensor(boxes), torch.tensor(scores), torch.tensor(groups),
                                                       0.4, keep, keep_singletons)
    finally:
        boxes_module._BLOCK, boxes_module._PREFIX, boxes_module._CHUNK = saved
    for g in range(3):
        members = groups == g
        want = brute_vote(boxes[members], scores[members], 0.4, keep, keep_singletons) if members.any() else np.zeros((0, 5))
        mine = got_groups.numpy() == g
        np.testing.assert_allclose(got_boxes.numpy()[mine], want[:, :4], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(got_scores.numpy()[mine], want[:, 4])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 200), st.sampled_from([0.1, 0.4, 0.7]))
def test_voting_with_very_different_box_sizes(seed, n, iou):
    """Boxes from 0 to 400 px wide on one image: the x-centre window that limits the
    comparisons must never miss a member."""
    rng = np.random.default_rng(seed)
    wh = np.exp(rng.uniform(np.log(0.5), np.log(400), (n, 2)))
    xy = rng.uniform(0, 400, (n, 2))
    boxes = np.c_[xy, xy + wh].round(1)
    flat = rng.random(n) < 0.05
    boxes[flat, 2] = boxes[flat, 0]  # a few zero-size boxes (1 px wide in the +1 convention)
    scores = rng.uniform(0.02, 1, n)
    got_boxes, got_scores, _ = box_voting(torch.tensor(boxes), torch.tensor(scores), torch.zeros(n, dtype=torch.int64),
                                          iou, 750, True)
    want = brute_vote(boxes, scores, iou, 750, True)
    np.testing.assert_allclose(got_boxes.numpy(), want[:, :4], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(got_scores.numpy(), want[:, 4])


def test_voting_hand_made_clusters():
    boxes = torch.tensor([
        [0.0, 0, 9, 9], [1, 1, 10, 10],       # cluster A (IoU 81/119 > 0.4)
        [100, 100, 119, 119],                 # a lone box: dropped
        [50, 50, 59, 59], [52, 50, 61, 59],   # cluster B
        [300, 300, 309, 309],                 # the last box left: kept
    ])
    scores = torch.tensor([0.9, 0.3, 0.8, 0.6, 0.2, 0.1])
    out_boxes, out_scores, _ = box_voting(boxes, scores, torch.zeros(6, dtype=torch.int64))
    a = (0.9 * torch.tensor([0.0, 0, 9, 9]) + 0.3 * torch.tensor([1.0, 1, 10, 10])) / 1.2
    b = (0.6 * torch.tensor([50.0, 50, 59, 59]) + 0.2 * torch.tensor([52.0, 50, 61, 59])) / 0.8
    expected = torch.stack([a, b, torch.tensor([300.0, 300, 309, 309])]).double()
    torch.testing.assert_close(out_boxes, expected)
    assert out_scores.tolist() == pytest.approx([0.9, 0.6, 0.1])
    _, kept_scores, _ = box_voting(boxes, scores, torch.zeros(6, dtype=torch.int64), keep_singletons=True)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.1])


def test_voting_threshold_is_inclusive():
    # IoU exactly 0.4 with the +1 convention
    a = torch.tensor([[0.0, 0, 9, 9]])
    b = torch.tensor([[0.0, 0, 9, 3]])  # 10x4 inside a: IoU = 40 / 100 = 0.4
    assert iou_plus_one_torch(a, b).item() == 0.4
    boxes = torch.cat([a, b])
    scores = torch.tensor([0.9, 0.5])
    _, s, _ = box_voting(boxes, scores, torch.zeros(2, dtype=torch.int64), iou=0.4)
    assert s.tolist() == pytest.approx([0.9])  # one cluster of two
    kept = nms(boxes, scores, torch.zeros(2, dtype=torch.int64), iou=0.4)
    assert kept.tolist() == [0, 1]  # NMS suppresses only above 0.4, as py_cpu_nms


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 60), st.integers(0, 15))
def test_oracle_iou_equals_brute_force(seed, n, m):
    boxes, _ = random_boxes(seed, n, integer=bool(seed % 2))
    gt, _ = random_boxes(seed + 7, m, integer=True)
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, n)
    gt_groups = np.sort(rng.integers(0, 4, m))
    iou, row = oracle_iou(torch.tensor(boxes).reshape(-1, 4), torch.tensor(groups), torch.tensor(gt).reshape(-1, 4), torch.tensor(gt_groups))
    for i in range(n):
        rows = np.flatnonzero(gt_groups == groups[i])
        values = _iou(boxes[i], gt[rows]) if len(rows) else np.zeros(0)
        if len(values) == 0 or values.max() <= 0:
            assert (iou[i].item(), row[i].item()) == (0.0, -1)
        else:
            assert iou[i].item() == pytest.approx(values.max(), abs=1e-12)
            assert row[i].item() == rows[np.argmax(values)]


def test_empty_inputs():
    empty = torch.zeros(0, 4)
    none = torch.zeros(0, dtype=torch.int64)
    assert len(nms(empty, torch.zeros(0), none)) == 0
    assert all(len(t) == 0 for t in box_voting(empty, torch.zeros(0), none))
    iou, row = oracle_iou(torch.tensor([[0.0, 0, 5, 5]]), torch.tensor([0]), empty, none)
    assert (iou.item(), row.item()) == (0.0, -1)

"""pipeline.iou: properties of both pixel conventions, and agreement with torchvision and the
WiderFace evaluation port (tests/widerface_reference.py)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from pipeline.iou import iou_plus_one, iou_plus_one_torch, paired_iou, paired_iou_continuous, pairwise_iou, shift_plus_one
from tests.widerface_reference import bbox_overlaps

#: x, y, w, h with w, h >= 0 (a zero-size box is one pixel in the +1 convention, empty in the continuous one)
_BOX = st.tuples(st.floats(0, 200), st.floats(0, 200), st.floats(0, 80), st.floats(0, 80))
BOXES = st.lists(_BOX, min_size=1, max_size=12)
#: boxes with a positive area in both conventions
POSITIVE = st.lists(st.tuples(st.floats(0, 200), st.floats(0, 200), st.floats(0.5, 80), st.floats(0.5, 80)),
                    min_size=1, max_size=12)
#: integer pixel boxes, as WiderFace ground truth
PIXELS = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60), st.integers(0, 30), st.integers(0, 30)),
                  min_size=1, max_size=12)


def xyxy(rows, dtype=np.float64) -> np.ndarray:
    r = np.array(rows, np.float64)
    return np.c_[r[:, :2], r[:, :2] + r[:, 2:]].astype(dtype)


# ----------------------------------------------------------------------------- +1 pixel convention


@settings(max_examples=50, deadline=None)
@given(BOXES, BOXES)
def test_plus_one_is_symmetric_and_bounded(a, b):
    a, b = xyxy(a), xyxy(b)
    iou = iou_plus_one(a, b)
    assert iou.shape == (len(a), len(b)) and iou.dtype == np.float64
    np.testing.assert_array_equal(iou, iou_plus_one(b, a).T)
    assert ((iou >= 0) & (iou <= 1)).all()


@settings(max_examples=50, deadline=None)
@given(BOXES)
def test_plus_one_of_a_box_with_itself_is_one(a):
    a = xyxy(a)
    np.testing.assert_array_equal(np.diag(iou_plus_one(a, a)), 1.0)
    np.testing.assert_array_equal(torch.diagonal(iou_plus_one_torch(torch.from_numpy(a), torch.from_numpy(a))).numpy(), 1.0)


@settings(max_examples=50, deadline=None)
@given(st.one_of(PIXELS, BOXES), st.one_of(PIXELS, BOXES))
def test_plus_one_equals_the_evaluation_port(a, b):
    a, b = xyxy(a), xyxy(b)
    np.testing.assert_array_equal(iou_plus_one(a, b), bbox_overlaps(a, b))


@settings(max_examples=50, deadline=None)
@given(BOXES, BOXES)
def test_plus_one_numpy_and_torch_agree(a, b):
    a, b = xyxy(a), xyxy(b)
    t = iou_plus_one_torch(torch.from_numpy(a), torch.from_numpy(b))
    assert t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), iou_plus_one(a, b), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(t.numpy(), iou_plus_one_torch(torch.from_numpy(b), torch.from_numpy(a)).numpy().T)


def test_plus_one_counts_the_last_pixel():
    a = np.array([[0.0, 0, 9, 9]])  # 10 x 10 pixels
    b = np.array([[0.0, 0, 9, 3], [9.0, 9, 20, 20], [10.0, 0, 19, 9]])  # 10 x 4 inside; one shared pixel; touching
    np.testing.assert_array_equal(iou_plus_one(a, b), [[0.4, 1 / (100 + 144 - 1), 0.0]])
    assert iou_plus_one_torch(torch.tensor(a), torch.tensor(b[:1])).item() == 0.4
    assert pairwise_iou(a, b[2:]).item() == 0.0 and pairwise_iou(a, b[1:2]).item() == 0.0


def test_shift_plus_one_copies_and_shifts():
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float32)
    shifted = shift_plus_one(boxes)
    assert shifted.dtype == torch.float64 and shifted.tolist() == [[1.0, 2.0, 4.0, 5.0]]
    assert boxes.tolist() == [[1.0, 2.0, 3.0, 4.0]]


# ----------------------------------------------------------------------------- continuous convention


@settings(max_examples=50, deadline=None)
@given(BOXES, BOXES)
def test_pairwise_is_symmetric_and_bounded(a, b):
    a, b = xyxy(a, np.float32), xyxy(b, np.float32)
    iou = pairwise_iou(a, b)
    assert iou.shape == (len(a), len(b)) and iou.dtype == np.float32
    np.testing.assert_array_equal(iou, pairwise_iou(b, a).T)
    assert ((iou >= 0) & (iou <= 1)).all()


@settings(max_examples=50, deadline=None)
@given(POSITIVE)
def test_pairwise_of_a_box_with_itself_is_one(a):
    a = xyxy(a, np.float32)
    np.testing.assert_array_equal(np.diag(pairwise_iou(a, a)), 1.0)


@settings(max_examples=30, deadline=None)
@given(BOXES, BOXES)
def test_pairwise_iou_equals_torchvision(a, b):
    a, b = xyxy(a, np.float32), xyxy(b, np.float32)
    want = box_iou(torch.from_numpy(a), torch.from_numpy(b)).nan_to_num(0.0).numpy()
    np.testing.assert_allclose(pairwise_iou(a, b), want, rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(POSITIVE, st.randoms(use_true_random=False))
def test_paired_iou_is_the_diagonal_of_torchvision(a, rnd):
    a = torch.from_numpy(xyxy(a))
    b = a[torch.tensor([rnd.randrange(len(a)) for _ in range(len(a))])] + 0.5
    pairs = paired_iou_continuous(a, b)
    assert torch.equal(pairs, torch.diagonal(box_iou(a, b)))
    assert torch.equal(paired_iou_continuous(shift_plus_one(a), shift_plus_one(b)),
                       torch.diagonal(iou_plus_one_torch(a, b)))
    assert ((pairs >= 0) & (pairs <= 1)).all()


@settings(max_examples=50, deadline=None)
@given(BOXES, BOXES)
def test_paired_iou_is_the_diagonal_of_pairwise(a, b):
    a, b = xyxy(a, np.float32), xyxy(b, np.float32)
    n = min(len(a), len(b))
    np.testing.assert_array_equal(paired_iou(a[:n], b[:n]), np.diagonal(pairwise_iou(a[:n], b[:n])))

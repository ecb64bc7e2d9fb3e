"""Ranker inputs: box matrices, joint image/box augmentation, the step-indexed dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ranker.data import (IMAGENET_MEAN, IMAGENET_STD, AugmentParams, RankerDataset, TrainImage,
                                  augment_boxes, augment_image, box_groups, box_matrix, draw_augmentation,
                                  letterbox, split_half)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

NO_COLOUR = AugmentParams(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def test_box_matrix_normalises_pads_and_truncates():
    boxes = np.array([[10, 20, 30, 60], [0, 0, 100, 50], [5, 5, 6, 6]], np.float32)
    scores = np.array([0.9, 0.5, 0.1], np.float32)
    mat, mask = box_matrix(boxes, scores, 100, 200, 4)
    assert mat.dtype == np.float32 and mat.shape == (4, 5)
    np.testing.assert_allclose(mat[0], [0.1, 0.1, 0.2, 0.2, 0.9])
    np.testing.assert_allclose(mat[1], [0.0, 0.0, 1.0, 0.25, 0.5])
    assert mask.tolist() == [True, True, True, False] and not mat[3].any()
    mat, mask = box_matrix(boxes, scores, 100, 200, 2)
    assert mask.all() and mat[:, 4].tolist() == pytest.approx([0.9, 0.5])


def test_box_groups_sort_by_score_and_keep_row_positions():
    df = pd.DataFrame({
        "image_id": ["b", "a", "a", "a", "a"], "detector": ["d"] * 5, "scale": [0, 0, 0, 0, 1024],
        "flip": [False, False, False, True, False],
        "x1": [0.0, 1, 2, 3, 4], "y1": 0.0, "x2": 10.0, "y2": 10.0,
        "score": np.array([0.5, 0.2, 0.7, 0.9, 0.3], np.float32), "oracle_iou": np.float32(0.1),
    })
    groups = box_groups(df)
    assert [(g.image_id, g.scale, g.flip) for g in groups] == [("a", 0, False), ("a", 0, True), ("a", 1024, False), ("b", 0, False)]
    assert groups[0].rows.tolist() == [2, 1] and groups[0].scores.tolist() == pytest.approx([0.7, 0.2])
    assert groups[0].boxes[:, 0].tolist() == [2.0, 1.0]


def _white_box_image(w, h, box):
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), x1=st.integers(0, 70), y1=st.integers(0, 40),
       bw=st.integers(6, 50), bh=st.integers(6, 30))
def test_augmentation_keeps_boxes_on_their_pixels(seed, x1, y1, bw, bh):
    w, h = 128, 80
    box = (x1, y1, min(w, x1 + bw), min(h, y1 + bh))
    image = _white_box_image(w, h, box)
    aug = draw_augmentation(np.random.default_rng(seed), w, h, NO_COLOUR)
    out_boxes, keep = augment_boxes(aug, np.array([box], np.float32))
    out = augment_image(aug, image)
    assert out.shape == (aug.crop_h, aug.crop_w, 3)
    cx, cy = (box[0] + box[2]) / 2 - aug.x0, (box[1] + box[3]) / 2 - aug.y0
    inside = 0 <= cx < aug.crop_w and 0 <= cy < aug.crop_h
    assert keep.tolist() == ([0] if inside else [])
    if not inside:
        return
    bx1, by1, bx2, by2 = out_boxes[0].round().astype(int)
    assert (out[by1:by2, bx1:bx2] == 255).all()  # every pixel of the box is white
    white = np.argwhere(out[..., 0] == 255)
    assert white[:, 1].min() == bx1 and white[:, 1].max() == bx2 - 1
    assert white[:, 0].min() == by1 and white[:, 0].max() == by2 - 1
    assert len(white) == (bx2 - bx1) * (by2 - by1)  # and nothing outside it


def test_letterbox_keeps_normalised_boxes_aligned():
    image = _white_box_image(200, 100, (50, 20, 100, 60))
    mat, _ = box_matrix(np.array([[50, 20, 100, 60]], np.float32), np.ones(1, np.float32), 200, 100, 1)
    t = letterbox(image, 64, content=40)  # long side 200 -> 40 px: factor 0.2
    white = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    x, y, bw, bh = mat[0, :4]
    cw, ch = 40, 20
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t[0, round(y * ch):round((y + bh) * ch), round(x * cw):round((x + bw) * cw)], torch.tensor(white))
    assert (t[:, 20:, :] == 0).all() and (t[:, :, 40:] == 0).all()  # padding


def test_colour_jitter_changes_colours_not_geometry():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    params = AugmentParams(crop_min=1.0, flip_p=0.0)
    aug = draw_augmentation(np.random.default_rng(7), 60, 40, params)
    out = augment_image(aug, image)
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    assert augment_boxes(aug, np.array([[1, 2, 30, 20]], np.float32))[0].tolist() == [[1, 2, 30, 20]]


def _toy_images():
    from pipeline.ranker.data import BoxGroup

    images = []
    for i in range(3):
        groups = []
        for det in ("a", "b"):
            n = 5 + i
            boxes = np.stack([np.arange(n) * 3.0, np.arange(n) * 2.0, np.arange(n) * 3.0 + 10, np.arange(n) * 2.0 + 10], 1)
            scores = np.linspace(0.9, 0.1, n).astype(np.float32)
            groups.append(BoxGroup(f"img{i}", det, 0, False, boxes.astype(np.float32), scores,
                                   np.linspace(0, 1, n).astype(np.float32), np.arange(n)))
        images.append(TrainImage(f"img{i}", 60, 40, tuple(groups)))
    return images


def test_dataset_samples_depend_only_on_their_index():
    load = lambda key: np.full((40, 60, 3), int(key[-1]) * 50, np.uint8)  # noqa: E731
    ds = RankerDataset(_toy_images(), num_boxes=8, image_size=32, length=40, load_image=load, seed=5)
    a = [ds[t] for t in (7, 3, 11)]
    b = [ds[t] for t in (11, 7, 3)]
    for x, y in zip(a, [b[1], b[2], b[0]]):
        for key in x:
            assert torch.equal(x[key], y[key])
    assert a[0]["image"].shape == (3, 32, 32) and a[0]["boxes"].shape == (8, 5)
    # every image appears once per epoch of 3 samples
    seen = [ds._image_index(t) for t in range(6)]
    assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]
    box_only = RankerDataset(_toy_images(), 8, 32, 40, load_image=None, seed=5)
    assert box_only[7]["image"].numel() == 0 and torch.equal(box_only[7]["boxes"], a[0]["boxes"])


def test_split_half_is_deterministic_disjoint_and_complete():
    ids = [f"{e}--Event/img_{i}" for e in range(3) for i in range(5)]
    first, second = split_half(ids[::-1], "first"), split_half(ids, "second")
    assert not set(first) & set(second) and sorted(first + second) == sorted(ids)
    assert len(first) == 8 and {i.split("--")[0] for i in second} == {"0", "1", "2"}
    with pytest.raises(ValueError):
        split_half(ids, "third")

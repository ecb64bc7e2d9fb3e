"""Ranker inputs: detections -> N x 5 box matrices, joint image/box augmentation, dataset.

Storage convention: boxes are ``x1, y1, x2, y2`` float32 in original-image pixels. The
ranker's box matrix holds ``(x1, y1, w, h, confidence)`` with ``x1, w`` divided by the
image width and ``y1, h`` by the height (seed 000, 4.2), sorted by detector confidence
descending, truncated or zero-padded to N rows.

Images are RGB uint8 ``(H, W, 3)`` arrays. The network sees them letterboxed: resized so
the long side is ``image_size`` pixels (640 by default) and zero-padded at the bottom/right
to ``image_size x image_size`` (normalised with the ImageNet mean/std), so every batch has
one shape whatever the source resolution. Boxes from any detection scale (1024 or 8K)
are stored in original pixels, so they describe the same image the ranker sees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import torch
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BoxGroup:
    """The detections of one image from one detector at one (scale, flip).

    ``boxes`` ``(n, 4)`` float32 x1,y1,x2,y2 original pixels, ``scores`` and ``oracle`` ``(n,)``
    float32, ``rows`` ``(n,)`` int64 positions in the source DataFrame; all sorted by score,
    descending (stable). ``oracle`` is None for detections without oracle columns.
    """

    image_id: str
    detector: str
    scale: int
    flip: bool
    boxes: np.ndarray
    scores: np.ndarray
    oracle: np.ndarray | None
    rows: np.ndarray


def box_groups(df: pd.DataFrame) -> list[BoxGroup]:
    """Split a detections DataFrame into :class:`BoxGroup` s, ordered by
    (image_id, detector, scale, flip)."""
    if df.empty:
        return []
    keys = ["image_id", "detector", "scale", "flip"]
    frame = df[keys].astype({"image_id": str, "detector": str}).reset_index(drop=True)
    frame["_row"] = np.arange(len(df))
    frame["_neg"] = -df["score"].to_numpy(np.float32)
    frame = frame.sort_values([*keys, "_neg"], kind="stable")
    boxes = df[["x1", "y1", "x2", "y2"]].to_numpy(np.float32)
    scores = df["score"].to_numpy(np.float32)
    oracle = df["oracle_iou"].to_numpy(np.float32) if "oracle_iou" in df.columns else None
    groups = []
    for key, part in frame.groupby(keys, sort=False):
        rows = part["_row"].to_numpy(np.int64)
        groups.append(BoxGroup(str(key[0]), str(key[1]), int(key[2]), bool(key[3]), boxes[rows],
                               scores[rows], None if oracle is None else oracle[rows], rows))
    return groups


def box_matrix(boxes: np.ndarray, scores: np.ndarray, width: float, height: float,
               num_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(num_boxes, 5)`` float32 matrix and ``(num_boxes,)`` bool mask from boxes sorted by
    score (descending); rows beyond ``num_boxes`` are dropped, missing rows are zeros."""
    n = min(len(boxes), num_boxes)
    mat = np.zeros((num_boxes, 5), np.float32)
    b = boxes[:n].astype(np.float32)
    mat[:n, 0] = b[:, 0] / width
    mat[:n, 1] = b[:, 1] / height
    mat[:n, 2] = (b[:, 2] - b[:, 0]) / width
    mat[:n, 3] = (b[:, 3] - b[:, 1]) / height
    mat[:n, 4] = scores[:n]
    mask = np.zeros(num_boxes, bool)
    mask[:n] = True
    return mat, mask


def padded(values: np.ndarray, num_boxes: int) -> np.ndarray:
    """First ``num_boxes`` values as float32, zero-padded to ``num_boxes``."""
    out = np.zeros(num_boxes, np.float32)
    n = min(len(values), num_boxes)
    out[:n] = values[:n]
    return out


def letterbox(image: np.ndarray, size: int, content: int | None = None) -> torch.Tensor:
    """``(3, size, size)`` float32 normalised tensor: ``image`` (RGB uint8) resized so its long
    side is ``content`` (default ``size``) px, placed at the top-left, zero-padded."""
    content = content or size
    h, w = image.shape[:2]
    f = content / max(h, w)
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    canvas = torch.zeros(3, size, size)
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    canvas[:, :nh, :nw] = (x - mean) / std
    return canvas


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random augmentation (seed 000, 4.2): crop side fractions in
    [crop_min, 1], letterbox content scale in [scale_min, 1], horizontal mirror with
    probability ``flip_p``, colour factors 1 +- brightness/contrast/saturation, hue shift
    +- hue (fraction of the hue circle)."""

    crop_min: float = 0.5
    scale_min: float = 0.6
    flip_p: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.03


@dataclass(frozen=True)
class Augmentation:
    """One drawn augmentation for an image of ``width x height`` pixels."""

    x0: int
    y0: int
    crop_w: int
    crop_h: int
    mirror: bool
    scale: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


def draw_augmentation(rng: np.random.Generator, width: int, height: int, p: AugmentParams) -> Augmentation:
    """Draw one augmentation; the draw order is fixed so the same generator state gives the
    same augmentation whether or not the image is decoded."""
    u = rng.uniform(p.crop_min, 1.0, size=2)
    cw, ch = max(1, round(u[0] * width)), max(1, round(u[1] * height))
    x0 = int(rng.integers(0, width - cw + 1))
    y0 = int(rng.integers(0, height - ch + 1))
    mirror = bool(rng.random() < p.flip_p)
    scale = float(rng.uniform(p.scale_min, 1.0))
    b, c, s = rng.uniform(-1.0, 1.0, size=3)
    h = rng.uniform(-p.hue, p.hue)
    return Augmentation(x0, y0, cw, ch, mirror, scale, 1 + b * p.brightness, 1 + c * p.contrast,
                        1 + s * p.saturation, float(h))


def augment_boxes(aug: Augmentation, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the crop and mirror of ``aug`` to ``(n, 4)`` x1,y1,x2,y2 boxes.

    Boxes whose centre falls outside the crop are dropped; the others are clipped to it.
    Returns the boxes in crop pixels and the indices of the kept input rows (order kept).
    """
    b = boxes.astype(np.float32) - np.array([aug.x0, aug.y0, aug.x0, aug.y0], np.float32)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    keep = np.flatnonzero((cx >= 0) & (cx < aug.crop_w) & (cy >= 0) & (cy < aug.crop_h))
    b = b[keep]
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, aug.crop_w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, aug.crop_h)
    if aug.mirror:
        b[:, [0, 2]] = aug.crop_w - b[:, [2, 0]]
    return b, keep


def augment_image(aug: Augmentation, image: np.ndarray) -> np.ndarray:
    """Apply crop, mirror and colour jitter of ``aug`` to an RGB uint8 image."""
    out = image[aug.y0:aug.y0 + aug.crop_h, aug.x0:aug.x0 + aug.crop_w]
    if aug.mirror:
        out = out[:, ::-1]
    t = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
    t = TF.adjust_brightness(t, aug.brightness)
    t = TF.adjust_contrast(t, aug.contrast)
    t = TF.adjust_saturation(t, aug.saturation)
    t = TF.adjust_hue(t, aug.hue)
    return t.permute(1, 2, 0).numpy()


@dataclass(frozen=True)
class TrainImage:
    """One training image: its id, size in pixels and detections (one group per detector,
    scale and flip, each with oracle confidences)."""

    image_id: str
    width: int
    height: int
    groups: tuple[BoxGroup, ...]


class RankerDataset(torch.utils.data.Dataset):
    """Training samples as a pure function of their global index ``t``.

    Sample ``t`` (step ``t // batch``) takes image ``perm_e[t % n]`` of epoch ``e = t // n``
    (a seeded permutation per epoch), draws one detector at random, then one of its
    (scale, flip) groups, then an augmentation, all from a generator seeded with
    ``(seed, t)``. Nothing depends on worker count or on earlier samples, so training
    resumed at step s sees exactly the batches it would have seen.

    ``load_image(image_id)`` returns the RGB uint8 image; None for the box-only ranker (the
    image is then not decoded and the sample's ``image`` is an empty tensor).
    """

    def __init__(self, images: Sequence[TrainImage], num_boxes: int, image_size: int, length: int,
                 load_image: Callable[[str], np.ndarray] | None, seed: int = 0,
                 augment: AugmentParams | None = AugmentParams()):
        if not images:
            raise ValueError("no training images")
        self.images = list(images)
        self.num_boxes = num_boxes
        self.image_size = image_size
        self.length = length
        self.load_image = load_image
        self.seed = seed
        self.augment = augment

    def __len__(self) -> int:
        return self.length

    def _image_index(self, t: int) -> int:
        n = len(self.images)
        perm = np.random.default_rng([self.seed, 1, t // n]).permutation(n)
        return int(perm[t % n])

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        item = self.images[self._image_index(t)]
        rng = np.random.default_rng([self.seed, 2, t])
        detectors = sorted({g.detector for g in item.groups})
        det = detectors[int(rng.integers(len(detectors)))]
        options = [g for g in item.groups if g.detector == det]
        group = options[int(rng.integers(len(options)))]
        boxes, keep, w, h = group.boxes, np.arange(len(group.boxes)), item.width, item.height
        aug = draw_augmentation(rng, w, h, self.augment) if self.augment else None
        if aug is not None:
            boxes, keep = augment_boxes(aug, boxes)
            w, h = aug.crop_w, aug.crop_h
        mat, mask = box_matrix(boxes, group.scores[keep], w, h, self.num_boxes)
        sample = {"boxes": torch.from_numpy(mat), "mask": torch.from_numpy(mask),
                  "oracle": torch.from_numpy(padded(group.oracle[keep], self.num_boxes))}
        if self.load_image is None:
            sample["image"] = torch.zeros(0)
        else:
            image = self.load_image(item.image_id)
            content = None
            if aug is not None:
                image = augment_image(aug, image)
                content = max(1, round(self.image_size * aug.scale))
            sample["image"] = letterbox(image, self.image_size, content)
        return sample


#: names of the two halves of :func:`split_half` (its even and its odd positions)
HALVES = ("first", "second")


def split_half(image_ids: Sequence[str], half: str) -> list[str]:
    """One deterministic half of ``image_ids``: after sorting, ``first`` takes positions
    0, 2, 4, ... and ``second`` positions 1, 3, 5, ... (alternating, so both halves cover
    every WiderFace event instead of splitting the events in two)."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    return sorted(image_ids)[HALVES.index(half)::2]

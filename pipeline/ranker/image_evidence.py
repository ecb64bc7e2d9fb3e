"""Per-box image evidence: what a face-trained network sees at each box, for the ranker.

Seed 000's ranker looks at the image as well as at the boxes. On a CPU its image branch
cannot be trained (docs/ranker.md), so this module reads the image through a network that is
already trained on faces and loads offline: RetinaFace MobileNet-0.25 (the
``retinaface-mnet025`` detector of the registry, or another RetinaFace-family detector).
The network runs **once per image**, at the image's own size or downscaled so that its long
edge is at most :data:`MAX_SIDE` pixels (never upscaled), and every box of that image, from
any detector, scale or flip, is described by a few numbers read from the network's dense
outputs at the box:

- ``img_match_prob``: the best face probability among the anchors around the box centre
  whose regression-decoded box overlaps the box at IoU >= :data:`MATCH_IOU` (0 when none):
  "the face network finds a face here, of this extent";
- ``img_best_iou`` and ``img_best_iou_prob``: the largest IoU between the box and an anchor's
  decoded box (whatever its score), and that anchor's face probability;
- ``img_prob_x_iou``: the largest face probability x IoU over those anchors;
- ``img_centre_prob``: the best face probability of the anchors of the box's own level
  (:func:`box_levels`) in the 3x3 cells around its centre, whatever their boxes;
- ``img_region_prob_max`` / ``img_region_prob_mean``: the largest and the mean face
  probability over the box's area at its own level; ``img_region_prob_up``: the largest one
  at the next coarser level (high when the box is a part of a larger face);
- ``img_level``: where the box's size falls on the network's anchor pyramid: its level
  (0, 1, 2: strides 8, 16, 32; :meth:`ImageEvidence.box_levels`) plus the log-distance to
  that level's anchor size in units of the level spacing (for the RetinaFace anchors, 4x
  apart, this is log4(side / 22.6 px), side in network-input pixels);
- ``img_image_prob``: the image's largest face probability (the same for every box of it);
- ``img_input_scale``: the resize factor of the network input (1 when not resized);
- ``img_f00`` .. ``img_f15``: the network's SSH context features (64 channels) averaged over
  the box at its level (``torchvision.ops.roi_align``), reduced to 16 numbers by averaging
  groups of 4 consecutive channels.

Optionally (:class:`CropEvidence`), MTCNN's R-Net reads each box's square crop at 24 x 24 and
gives ``img_rnet_prob`` for the ``top_k`` boxes of each image by detector score
(``img_rnet_scored`` says which; the others are NaN): an independent second opinion, at a cost
per box instead of per image.

Anchors are the network's own (:class:`pipeline.detectors.priors.PriorConfig`): the prior
of cell ``(i, j)`` at stride ``s`` is centred at ``((j + 0.5) s, (i + 0.5) s)`` with side
``min_size``; decoding is :func:`pipeline.detectors.priors.decode_boxes`'s.

Conventions: images are HxWx3 uint8 **BGR** arrays (:func:`pipeline.imaging.decode_image`);
boxes are ``(n, 4)`` float32 ``x1, y1, x2, y2`` in original-image pixels; the outputs are
float32. Nothing here reads a file: the caller builds the network (through the detector
registry and the weights cache) and decodes the images. Results are deterministic for a
given device and torch thread count.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch import nn
from torchvision.ops import roi_align, roi_pool

from pipeline.detectors.priors import BGR_MEAN, PriorBoxDetector, PriorConfig
from pipeline.tables import BOX_COLUMNS, Column, register_schema

#: long edge of the network input: larger images are downscaled to it (never upscaled)
MAX_SIDE = 1024
#: IoU of an anchor's decoded box with the box for it to count as finding that face
MATCH_IOU = 0.5
#: SSH feature channels are averaged in groups of this many
GROUP = 4
#: the scalar evidence columns (the strong ones: see docs/ranker-evidence.md)
IMAGE_SCALARS = ("img_match_prob", "img_best_iou", "img_best_iou_prob", "img_prob_x_iou", "img_centre_prob",
           "img_region_prob_max", "img_region_prob_mean", "img_region_prob_up", "img_level",
           "img_image_prob", "img_input_scale")
#: pooled SSH feature columns (64 channels averaged in groups of :data:`GROUP`)
IMAGE_POOLED = tuple(f"img_f{k:02d}" for k in range(16))
#: every column :func:`box_evidence` computes, in order
IMAGE_FEATURES: tuple[str, ...] = IMAGE_SCALARS + IMAGE_POOLED
#: optional columns of :class:`CropEvidence` (MTCNN R-Net on each box's crop): its face
#: probability (NaN for a box beyond the top-k of its image) and whether it was evaluated (1/0)
RNET_FEATURES = ("img_rnet_prob", "img_rnet_scored")
#: boxes per image (highest detector scores first) that R-Net reads by default
RNET_TOP_K = 1000
#: R-Net's input side
RNET_SIZE = 24
#: the detectors of the registry whose networks this module can read (RetinaFace family)
EVIDENCE_NETS = ("retinaface-mnet025", "retinaface-mnet025-1mb", "retinaface-r50")
#: the rows' keys that an ``image_features`` table carries besides the features
KEY_COLUMNS = ("image_id", "scale", "flip", *BOX_COLUMNS, "score")
#: boxes per block of the per-box computation (bounds the memory of the gathers)
CHUNK = 8192


@dataclass(frozen=True)
class EvidenceMaps:
    """One image's network outputs, per level (stride 8, 16, 32 of the network input).

    ``prob[l]``: (A, h, w) face probability of each anchor; ``loc[l]``: (A, 4, h, w) box
    regression; ``feat[l]``: (1, C, h, w) SSH features; ``sx, sy``: network-input pixels per
    original pixel along x and y (the resize factor of each axis).
    """

    prob: tuple[torch.Tensor, ...]
    loc: tuple[torch.Tensor, ...]
    feat: tuple[torch.Tensor, ...]
    sx: float
    sy: float
    input_size: tuple[int, int]  # (width, height) of the network input


def input_size(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the network input: the image's own, or downscaled so that the long
    edge is ``max_side`` (sides rounded, at least 1 px)."""
    factor = min(1.0, max_side / max(width, height))
    if factor >= 1.0:
        return int(width), int(height)
    return max(1, round(width * factor)), max(1, round(height * factor))


class Prepared(NamedTuple):
    """An image ready for the network: ``pixels`` (HxWx3 uint8 BGR at :func:`input_size`)
    and the original ``width`` and ``height`` (the boxes' pixels)."""

    pixels: np.ndarray
    width: int
    height: int


def prepare(image: np.ndarray, max_side: int = MAX_SIDE) -> Prepared:
    """``image`` (HxWx3 uint8 BGR, original size) resized to :func:`input_size` with
    ``cv2.INTER_AREA`` (an area average: no aliasing when an 8K frame shrinks 7.5x), or
    as it is when it fits."""
    height, width = image.shape[:2]
    size = input_size(width, height, max_side)
    pixels = image if size == (width, height) else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return Prepared(pixels, int(width), int(height))


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """One torch intra-op thread inside the block (when ``active``), the count restored after."""
    before = torch.get_num_threads()
    if active and before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode with every BatchNorm2d that follows a Conv2d in an
    ``nn.Sequential`` folded into the convolution (``torch.nn.utils.fusion``): the same
    function up to float rounding (measured <= 3e-5 on the outputs), one pass over memory
    less per layer. ``net`` itself is left as it is (the detector keeps its modules)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            if isinstance(module[i], nn.Conv2d) and isinstance(module[i + 1], nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                module[i + 1] = nn.Identity()
    return net


class ImageEvidence:
    """A RetinaFace-family network read as per-box evidence (see the module docstring).

    ``net`` is a :class:`pipeline.detectors.retinaface.RetinaFace` (body, fpn, ssh1..3 and the
    class/box heads), ``config`` its anchors; :meth:`from_detector` takes both from a detector
    built by :func:`pipeline.detectors.registry.build`.
    """

    def __init__(self, net: nn.Module, config: PriorConfig, device: torch.device | str = "cpu",
                 max_side: int = MAX_SIDE):
        if len(config.steps) != 3:
            raise ValueError(f"expected a 3-level RetinaFace anchor layout, got steps {config.steps}")
        self.net = fold_batchnorm(net).to(device)
        self.config = config
        self.device = torch.device(device)
        self.max_side = int(max_side)
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        # geometric mean of each level's anchor sizes: the box size a level is for
        self._level_size = np.array([math.sqrt(min(s) * max(s)) for s in config.min_sizes], np.float64)

    @classmethod
    def from_detector(cls, detector: PriorBoxDetector, max_side: int = MAX_SIDE) -> "ImageEvidence":
        """The evidence model of a registry detector of the RetinaFace family."""
        net = detector.net
        if not all(hasattr(net, a) for a in ("body", "fpn", "ssh1", "ClassHead", "BboxHead")):
            raise ValueError(f"detector {detector.name!r} is not a RetinaFace-family network")
        return cls(net, detector.config, detector.device, max_side)

    def prepare(self, image: np.ndarray) -> "Prepared":
        """:func:`prepare` at this model's ``max_side``."""
        return prepare(image, self.max_side)

    def maps(self, image: "np.ndarray | Prepared") -> EvidenceMaps:
        """Run the network once on ``image``: HxWx3 uint8 BGR at its original size, or the
        :class:`Prepared` network input of :meth:`prepare` (decode and resize may then run
        elsewhere, e.g. in a thread ahead of the network)."""
        ready = image if isinstance(image, Prepared) else self.prepare(image)
        return self._maps(ready)

    @torch.inference_mode()
    def _maps(self, ready: "Prepared") -> EvidenceMaps:
        small = ready.pixels
        h, w = small.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(small)).to(self.device).permute(2, 0, 1)[None].float() - self._mean
        net = self.net
        pyramid = net.fpn(net.body(x))
        feats = (net.ssh1(pyramid[0]), net.ssh2(pyramid[1]), net.ssh3(pyramid[2]))
        probs, locs = [], []
        for level, f in enumerate(feats):
            logits = net.ClassHead[level].conv1x1(f)[0]  # (A * 2, h, w), anchor-major
            n_anchors = logits.shape[0] // 2
            logits = logits.view(n_anchors, 2, *logits.shape[1:])
            probs.append(torch.softmax(logits.float(), dim=1)[:, 1].contiguous())
            loc = net.BboxHead[level].conv1x1(f)[0]
            locs.append(loc.view(n_anchors, 4, *loc.shape[1:]).float().contiguous())
        return EvidenceMaps(tuple(probs), tuple(locs), tuple(f.float() for f in feats),
                            w / ready.width, h / ready.height, (w, h))

    def box_levels(self, sides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(level, log-distance): the level whose anchor size (geometric mean of its sizes) is
        nearest to ``sides`` (the geometric mean of width and height, network-input pixels)
        in log scale, and ``log(side / level size)``."""
        dist = np.log(np.maximum(sides, 1e-3))[:, None] - np.log(self._level_size)[None, :]
        level = np.abs(dist).argmin(axis=1)
        return level, dist[np.arange(len(sides)), level]

    @torch.inference_mode()
    def box_evidence(self, maps: EvidenceMaps, boxes: np.ndarray) -> np.ndarray:
        """``(n, len(IMAGE_FEATURES))`` float32 for ``boxes`` (n, 4) in original pixels.

        On the CPU this runs on one torch thread (:func:`one_thread`): its many small
        operations gain little from a second thread on an idle machine (21 vs 38 ms for
        5000 boxes) and stall when another process holds a core (1.9 s measured).
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = np.zeros((len(boxes), len(IMAGE_FEATURES)), np.float32)
        with one_thread(self.device.type == "cpu"):
            for start in range(0, len(boxes), CHUNK):
                out[start:start + CHUNK] = self._block(maps, boxes[start:start + CHUNK])
        return out

    def _block(self, maps: EvidenceMaps, boxes: np.ndarray) -> np.ndarray:
        n = len(boxes)
        scale = np.array([maps.sx, maps.sy, maps.sx, maps.sy], np.float32)
        b = torch.from_numpy(boxes * scale).to(self.device)
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 1e-3)
        sides = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).cpu().numpy().astype(np.float64)
        level, level_dist = self.box_levels(sides)
        level_t = torch.from_numpy(level).to(self.device)
        rois = torch.cat([b.new_zeros(n, 1), b], dim=1)

        # anchors around the centre at every level: decoded box, IoU, probability
        best_iou = b.new_zeros(n)
        best_iou_prob = b.new_zeros(n)
        match_prob = b.new_zeros(n)
        prob_x_iou = b.new_zeros(n)
        centre_prob = b.new_zeros(n)
        for lv, (prob, loc, step, sizes) in enumerate(zip(maps.prob, maps.loc, self.config.steps, self.config.min_sizes)):
            p, iou = self._neighbours(b, prob, loc, step, sizes)  # (n, K)
            top_iou, arg = iou.max(dim=1)
            better = top_iou > best_iou
            best_iou = torch.where(better, top_iou, best_iou)
            best_iou_prob = torch.where(better, p.gather(1, arg[:, None])[:, 0], best_iou_prob)
            match_prob = torch.maximum(match_prob, torch.where(iou >= MATCH_IOU, p, torch.zeros_like(p)).amax(dim=1))
            prob_x_iou = torch.maximum(prob_x_iou, (p * iou).amax(dim=1))
            centre_prob = torch.where(level_t == lv, p.amax(dim=1), centre_prob)

        # the box's area at its own level and at the next coarser one (the coarsest: itself)
        region_prob_max = b.new_zeros(n)
        region_prob_up = b.new_zeros(n)
        region_prob_mean = b.new_zeros(n)
        pooled = b.new_zeros(n, len(IMAGE_POOLED))
        levels = len(maps.prob)
        for lv, (prob, feat, step) in enumerate(zip(maps.prob, maps.feat, self.config.steps)):
            rows = torch.nonzero(level_t == lv).flatten()
            if len(rows) == 0:
                continue
            r = rois[rows]
            region_prob_max[rows] = roi_pool(prob[None], r, 1, 1.0 / step).flatten(1).amax(dim=1)
            up = min(lv + 1, levels - 1)
            region_prob_up[rows] = roi_pool(maps.prob[up][None], r, 1, 1.0 / self.config.steps[up]).flatten(1).amax(dim=1)
            mean = roi_align(prob[None], r, 1, 1.0 / step, sampling_ratio=2, aligned=True)
            region_prob_mean[rows] = mean.flatten(1).amax(dim=1)
            f = roi_align(feat, r, 1, 1.0 / step, sampling_ratio=2, aligned=True).flatten(1)  # (k, C)
            pooled[rows] = f.view(len(rows), -1, GROUP).mean(dim=2)[:, :len(IMAGE_POOLED)]

        image_prob = max(float(p.max()) for p in maps.prob)
        scalars = torch.stack([
            match_prob, best_iou, best_iou_prob, prob_x_iou, centre_prob, region_prob_max, region_prob_mean,
            region_prob_up,
            level_t.float() + torch.from_numpy(level_dist).float().to(self.device) / math.log(4.0),
            torch.full_like(best_iou, image_prob), torch.full_like(best_iou, min(maps.sx, maps.sy)),
        ], dim=1)
        return torch.cat([scalars, pooled], dim=1).cpu().numpy().astype(np.float32)

    @staticmethod
    def _neighbours(b: torch.Tensor, prob: torch.Tensor, loc: torch.Tensor, step: int,
                    sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Face probability and IoU with the box of the anchors in the 3x3 cells around each
        box centre at one level: (n, 9 * A) each; cells outside the map give 0 and 0."""
        n_anchors, _, h, w = loc.shape
        cx = (b[:, 0] + b[:, 2]) / 2
        cy = (b[:, 1] + b[:, 3]) / 2
        j0 = torch.floor(cx / step).long()
        i0 = torch.floor(cy / step).long()
        d = torch.tensor([-1, 0, 1], device=b.device)
        jj = (j0[:, None, None] + d[None, None, :]).expand(-1, 3, 3).reshape(len(b), 9)
        ii = (i0[:, None, None] + d[None, :, None]).expand(-1, 3, 3).reshape(len(b), 9)
        valid = (jj >= 0) & (jj < w) & (ii >= 0) & (ii < h)
        cell = (ii.clamp(0, h - 1) * w + jj.clamp(0, w - 1))  # (n, 9)
        p = prob.reshape(n_anchors, h * w)[:, cell].permute(1, 2, 0)  # (n, 9, A)
        r = loc.reshape(n_anchors, 4, h * w)[:, :, cell].permute(2, 3, 0, 1)  # (n, 9, A, 4)
        s = torch.tensor(sizes, dtype=b.dtype, device=b.device)[None, None, :]  # (1, 1, A)
        pcx = ((jj.clamp(0, w - 1).to(b.dtype) + 0.5) * step)[:, :, None]
        pcy = ((ii.clamp(0, h - 1).to(b.dtype) + 0.5) * step)[:, :, None]
        dcx = pcx + r[..., 0] * 0.1 * s
        dcy = pcy + r[..., 1] * 0.1 * s
        dw = s * torch.exp(r[..., 2] * 0.2)
        dh = s * torch.exp(r[..., 3] * 0.2)
        ix = (torch.minimum(dcx + dw / 2, b[:, None, None, 2]) - torch.maximum(dcx - dw / 2, b[:, None, None, 0])).clamp(min=0)
        iy = (torch.minimum(dcy + dh / 2, b[:, None, None, 3]) - torch.maximum(dcy - dh / 2, b[:, None, None, 1])).clamp(min=0)
        inter = ix * iy
        area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[:, None, None]
        iou = inter / (area + dw * dh - inter)
        p = torch.where(valid[:, :, None], p, torch.zeros_like(p))
        iou = torch.where(valid[:, :, None], iou, torch.zeros_like(iou))
        return p.reshape(len(b), -1), iou.reshape(len(b), -1)

    def image_evidence(self, image: "np.ndarray | Prepared", boxes: np.ndarray) -> np.ndarray:
        """:meth:`box_evidence` of ``boxes`` on ``image`` (one network pass; see :meth:`maps`)."""
        return self.box_evidence(self.maps(image), boxes)


class CropEvidence:
    """MTCNN R-Net's face probability on each box's crop (:data:`RNET_FEATURES`).

    The box is grown to a square about its centre (MTCNN's ``square``), cut from the network
    input of :func:`prepare` (<= 1024 px) with ``torchvision.ops.roi_align`` to 24 x 24
    (2 x 2 samples per output pixel, zeros outside the image) and scored by R-Net, in batches.
    Only the ``top_k`` boxes of an image with the highest detector scores are read (ties: row
    order); the others get NaN and ``img_rnet_scored`` 0. ``rnet`` is a
    :class:`pipeline.detectors.mtcnn.RNet` with its weights loaded.
    """

    def __init__(self, rnet: nn.Module, device: torch.device | str = "cpu", top_k: int = RNET_TOP_K,
                 batch: int = 4096):
        self.rnet = rnet.eval().to(device)
        self.device = torch.device(device)
        self.top_k = int(top_k)
        self.batch = int(batch)

    @torch.inference_mode()
    def crop_evidence(self, ready: Prepared, boxes: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        """``(n, 2)`` float32: R-Net's face probability (NaN when not read) and 1/0 read."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        out = np.full((len(boxes), 2), np.nan, np.float32)
        out[:, 1] = 0
        if scores is None:
            chosen = np.arange(min(len(boxes), self.top_k))
        else:
            chosen = np.argsort(-np.asarray(scores, np.float32), kind="stable")[: self.top_k]
        if len(chosen) == 0:
            return out
        h, w = ready.pixels.shape[:2]
        scale = np.array([w / ready.width, h / ready.height] * 2, np.float32)
        b = torch.from_numpy(boxes[chosen] * scale).to(self.device)
        centre = (b[:, :2] + b[:, 2:]) / 2
        half = (b[:, 2:] - b[:, :2]).amax(dim=1, keepdim=True).clamp(min=1.0) / 2
        rois = torch.cat([b.new_zeros(len(b), 1), centre - half, centre + half], dim=1)
        rgb = torch.from_numpy(np.ascontiguousarray(ready.pixels[..., ::-1])).to(self.device)
        rgb = rgb.permute(2, 0, 1)[None].float()
        probs = []
        for start in range(0, len(rois), self.batch):
            crops = roi_align(rgb, rois[start:start + self.batch], RNET_SIZE, 1.0, sampling_ratio=2, aligned=True)
            probs.append(self.rnet((crops - 127.5) * 0.0078125)[1].float())
        out[chosen, 0] = torch.cat(probs).cpu().numpy()
        out[chosen, 1] = 1
        return out


def frame_image_features(dets: pd.DataFrame, images: Mapping[str, np.ndarray | Prepared] | Callable[[str], np.ndarray | Prepared],
                         evidence: ImageEvidence, crops: CropEvidence | None = None) -> pd.DataFrame:
    """The :data:`KEY_COLUMNS` of ``dets`` (a detections or oracle shard) with the
    :data:`IMAGE_FEATURES` columns added (float32), and the :data:`RNET_FEATURES` columns
    when ``crops`` is given; rows and their order unchanged.

    Every image is passed through the network once, for all its rows (every scale and flip:
    boxes are in original pixels). ``images`` gives an image by ``image_id``: a mapping, or a
    function called once per image in sorted id order; an image is HxWx3 uint8 BGR at its
    original size, or :func:`prepare`'s network input.
    """
    get = images.__getitem__ if isinstance(images, Mapping) else images
    columns = IMAGE_FEATURES + (RNET_FEATURES if crops is not None else ())
    out = dets[[c for c in KEY_COLUMNS if c in dets.columns]].copy()
    feats = np.zeros((len(dets), len(columns)), np.float32)
    boxes = dets[list(BOX_COLUMNS)].to_numpy(np.float32)
    scores = dets["score"].to_numpy(np.float32)
    ids = dets["image_id"].astype(str)
    for image_id, rows in ids.groupby(ids, sort=True).indices.items():
        image = get(image_id)
        ready = image if isinstance(image, Prepared) else evidence.prepare(image)
        feats[rows, :len(IMAGE_FEATURES)] = evidence.image_evidence(ready, boxes[rows])
        if crops is not None:
            feats[rows, len(IMAGE_FEATURES):] = crops.crop_evidence(ready, boxes[rows], scores[rows])
    for j, name in enumerate(columns):
        out[name] = feats[:, j]
    return out.reset_index(drop=True)


def attach_image_features(dets: pd.DataFrame, image_features: pd.DataFrame,
                          columns: tuple[str, ...] | list[str] = IMAGE_FEATURES) -> pd.DataFrame:
    """``dets`` with the ``columns`` of ``image_features`` (an ``image_features`` table made
    from the same shard) added, after checking that both hold the same boxes in the same
    order (``image_id``, ``scale``, ``flip``, boxes, score); ValueError naming the first
    differing row otherwise."""
    if len(dets) != len(image_features):
        raise ValueError(f"image features have {len(image_features)} rows, the boxes {len(dets)}: "
                         "made from another version of the shard")
    for key in KEY_COLUMNS:
        a = dets[key].astype(str).to_numpy() if key == "image_id" else dets[key].to_numpy()
        b = image_features[key].astype(str).to_numpy() if key == "image_id" else image_features[key].to_numpy()
        diff = np.flatnonzero(a != b)
        if len(diff):
            raise ValueError(f"image features differ from the boxes in column {key!r} at row {diff[0]} "
                             f"({b[diff[0]]!r} vs {a[diff[0]]!r}): made from another version of the shard")
    out = dets.copy()
    for name in columns:
        out[name] = image_features[name].to_numpy(np.float32)
    return out


# one row per box of a detections / oracle shard: the keys to join on, and the evidence
register_schema("image_features", [
    Column("image_id", pa.string()), Column("detector", pa.string(), required=False),
    Column("scale", pa.int32()), Column("flip", pa.bool_()),
    *(Column(c, pa.float32()) for c in BOX_COLUMNS), Column("score", pa.float32()),
    *(Column(name, pa.float32()) for name in IMAGE_FEATURES),
    *(Column(name, pa.float32(), required=False) for name in RNET_FEATURES),
])

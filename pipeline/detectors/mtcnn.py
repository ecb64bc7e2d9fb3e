"""MTCNN (Zhang et al. 2016): the P-Net / R-Net / O-Net cascade in torch.

Weights are the plain state dicts of the ``facenet-pytorch`` 2.6.0 wheel (registry names
``mtcnn_pnet``, ``mtcnn_rnet``, ``mtcnn_onet``); the layer names and shapes below match them
key for key, so they load with ``strict=True``. The cascade follows facenet-pytorch's
``detect_face`` with three deliberate differences:

- coordinates are continuous pixels (a P-Net cell at output position ``j`` covers
  ``[2j, 2j + 12) / scale``), not MATLAB's 1-based integer boxes;
- crops for R-Net and O-Net are taken for all boxes at once with
  ``torchvision.ops.roi_align`` (adaptive sampling, i.e. an area average like the reference's
  per-box ``interpolate(mode="area")``); parts of a box outside the image read as zero, as in
  the original MTCNN, instead of the box being clipped and stretched;
- the final O-Net stage keeps every box above the last threshold with no NMS: the pipeline's
  NMS / box-voting stage runs after the detector, as for every other detector.

Thresholds: P-Net 0.6 and R-Net 0.7 (facenet-pytorch's defaults) keep the number of crops,
and so the cost, in check; the O-Net threshold defaults to the pipeline's ``min_score``
(0.02) instead of 0.7, so low-confidence candidates reach the ranker.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms, roi_align

from pipeline.detectors.base import Detector, RawDetections

#: facenet-pytorch's pyramid defaults
MIN_FACE = 20.0
FACTOR = 0.709
#: P-Net, R-Net, O-Net score thresholds (see the module docstring)
THRESHOLDS = (0.6, 0.7, 0.02)
#: NMS IoU within one pyramid level, across levels, after R-Net (facenet-pytorch's values)
NMS_LEVEL, NMS_PNET, NMS_RNET = 0.5, 0.7, 0.7
_CELL, _STRIDE = 12, 2
_CHUNK = 4096  # crops per R-Net / O-Net forward


class PNet(nn.Module):
    """Fully convolutional proposal net: 12x12 windows at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) normalised RGB -> (reg (B, 4, h, w), face probability (B, h, w))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)[:, 1]


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, 24, 24) -> (reg (N, 4), face probability (N,))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # the weights were converted from a column-major framework: flatten as (W, H, C)
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, score and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, 3, 48, 48) -> (reg (N, 4), landmarks (N, 10) as 5 x then 5 y, probability (N,))."""
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), self.dense6_3(x), F.softmax(self.dense6_1(x), dim=1)[:, 1]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """RGB 0..255 -> the nets' input range, (x - 127.5) / 128."""
    return (x - 127.5) * 0.0078125


def pyramid_scales(height: int, width: int, min_face: float = MIN_FACE, factor: float = FACTOR) -> list[float]:
    """Scales at which a 12 px P-Net window sees faces of ``min_face`` px and larger."""
    scale = _CELL / min_face
    side = min(height, width) * scale
    scales = []
    while side >= _CELL:
        scales.append(scale)
        scale *= factor
        side *= factor
    return scales


def regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN box regression: each corner moves by ``reg`` times the box width/height.

    boxes, reg: (N, 4) x1, y1, x2, y2 and dx1, dy1, dx2, dy2 -> (N, 4).
    """
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + reg * wh


def square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each (N, 4) box to a square of side max(w, h) about the same centre."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _cells(reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float):
    """P-Net output of one level -> (image index (K,), boxes (K, 4) in input px, scores, reg)."""
    b, y, x = torch.nonzero(prob >= threshold, as_tuple=True)
    origin = torch.stack([x, y, x, y], dim=1).to(reg.dtype) * _STRIDE
    boxes = (origin + torch.tensor([0, 0, _CELL, _CELL], dtype=reg.dtype, device=reg.device)) / scale
    return b, boxes, prob[b, y, x], reg[b, :, y, x]


def _nms_per_image(boxes: torch.Tensor, scores: torch.Tensor, image_idx: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by NMS run separately per image, sorted by score descending.

    Unlike ``batched_nms``'s coordinate-offset trick, this leaves each image's box coordinates
    untouched: P-Net windows on one grid overlap at IoU exactly 0.5, so offsetting them would
    let float rounding decide ties and make a batch differ from single images.
    """
    keep = [torch.nonzero(image_idx == i).flatten() for i in torch.unique(image_idx)]
    keep = [k[nms(boxes[k], scores[k], iou)] for k in keep]
    if not keep:
        return image_idx.new_zeros(0)
    keep = torch.cat(keep)
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


def _crops(rgb: torch.Tensor, image_idx: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, size, size) normalised crops of ``boxes`` from ``rgb`` (B, 3, H, W), 0 outside."""
    rois = torch.cat([image_idx[:, None].to(boxes.dtype), boxes], dim=1)
    return _normalise(roi_align(rgb, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True))


class MTCNN(Detector):
    """The three-stage cascade as a :class:`Detector` (inputs BGR 0..255, see ``base``)."""

    name = "mtcnn"

    def __init__(
        self,
        weights: dict[str, Path],
        device: torch.device,
        thresholds: tuple[float, float, float] = THRESHOLDS,
        min_face: float = MIN_FACE,
        factor: float = FACTOR,
    ) -> None:
        self.device = torch.device(device)
        self.thresholds = thresholds
        self.min_face = min_face
        self.factor = factor
        self.min_score = thresholds[2]
        nets = {"mtcnn_pnet": PNet(), "mtcnn_rnet": RNet(), "mtcnn_onet": ONet()}
        for key, net in nets.items():
            state = torch.load(weights[key], map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
            net.eval().to(self.device)
        self.pnet, self.rnet, self.onet = nets.values()

    @torch.inference_mode()
    def detect(self, images: torch.Tensor) -> list[RawDetections]:
        """(B, 3, H, W) BGR 0..255 -> B RawDetections in input pixels, with 5 landmarks."""
        rgb = images.to(self.device, torch.float32).flip(1).contiguous()
        idx, boxes = self._propose(rgb)
        idx, boxes = self._refine(rgb, idx, boxes)
        idx, boxes, scores, landmarks = self._output(rgb, idx, boxes)
        return [self._one(idx == i, boxes, scores, landmarks) for i in range(rgb.shape[0])]

    def _propose(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid -> (image index (K,), square boxes (K, 4))."""
        h, w = rgb.shape[2:]
        found = []
        for scale in pyramid_scales(h, w, self.min_face, self.factor):
            level = F.interpolate(rgb, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg, prob = self.pnet(_normalise(level))
            b, boxes, scores, offsets = _cells(reg, prob, scale, self.thresholds[0])
            keep = _nms_per_image(boxes, scores, b, NMS_LEVEL)
            found.append((b[keep], boxes[keep], scores[keep], offsets[keep]))
        if not found:
            return rgb.new_zeros(0, dtype=torch.long), rgb.new_zeros(0, 4)
        b, boxes, scores, offsets = (torch.cat(t) for t in zip(*found))
        keep = _nms_per_image(boxes, scores, b, NMS_PNET)
        return b[keep], square(regress(boxes[keep], offsets[keep]))

    def _run(self, net: nn.Module, crops: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = [net(crops[i:i + _CHUNK]) for i in range(0, len(crops), _CHUNK)]
        if not outs:
            return net(crops)
        return tuple(torch.cat(t) for t in zip(*outs))

    def _refine(self, rgb, idx, boxes) -> tuple[torch.Tensor, torch.Tensor]:
        """R-Net: score threshold, NMS, regression -> square boxes."""
        reg, prob = self._run(self.rnet, _crops(rgb, idx, boxes, 24))
        ok = prob > self.thresholds[1]
        idx, boxes, prob, reg = idx[ok], boxes[ok], prob[ok], reg[ok]
        keep = _nms_per_image(boxes, prob, idx, NMS_RNET)
        return idx[keep], square(regress(boxes[keep], reg[keep]))

    def _output(self, rgb, idx, boxes):
        """O-Net: score threshold, landmarks relative to the input box, regression."""
        reg, lm, prob = self._run(self.onet, _crops(rgb, idx, boxes, 48))
        ok = prob > self.thresholds[2]
        idx, boxes, prob, reg, lm = idx[ok], boxes[ok], prob[ok], reg[ok], lm[ok]
        wh = boxes[:, 2:] - boxes[:, :2]
        xs = boxes[:, 0:1] + lm[:, :5] * wh[:, 0:1]
        ys = boxes[:, 1:2] + lm[:, 5:] * wh[:, 1:2]
        landmarks = torch.stack([xs, ys], dim=2).flatten(1)  # x0, y0, ..., x4, y4
        return idx, regress(boxes, reg), prob, landmarks

    def _one(self, mask, boxes, scores, landmarks) -> RawDetections:
        scores = scores[mask]
        order = torch.sort(scores, descending=True, stable=True).indices[: self.top_k]
        return RawDetections(
            boxes[mask][order].float().contiguous(),
            scores[order].float().contiguous(),
            landmarks[mask][order].float().contiguous(),
        )


def build(weights: dict[str, Path], device: torch.device) -> MTCNN:
    """Registry factory: MTCNN with the default thresholds on ``device``."""
    return MTCNN(weights, device)

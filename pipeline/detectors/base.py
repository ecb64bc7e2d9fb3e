"""The interface every detector implements, and the result it returns.

A detector sees a batch of images already resized to the network input size and returns,
per image, boxes in *input* pixels. Undoing the resize and the flip, keeping the top-k and
writing shards is the detect stage's job (``pipeline.detect``), the same for every detector.
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import torch


class RawDetections(NamedTuple):
    """One image's detections in network-input pixels.

    boxes: (N, 4) float32, x1, y1, x2, y2. scores: (N,) float32 in [0, 1], sorted descending.
    landmarks: (N, 10) float32 as x0, y0, ..., x4, y4 (left eye, right eye, nose, left mouth
    corner, right mouth corner, from the subject's view as in RetinaFace), or None.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor | None


class Detector(abc.ABC):
    """A loaded face detector on one device.

    ``detect`` takes ``images``: (B, 3, H, W) float32 tensor on ``self.device``, channels in
    **BGR** order, values 0..255 (no mean subtracted: each detector applies its own
    pre-processing). It returns B :class:`RawDetections`, keeping only scores above
    ``min_score`` (the reference 0.02) and at most ``top_k`` boxes per image, before NMS.
    """

    name: str
    device: torch.device
    min_score: float = 0.02
    top_k: int = 5000
    #: True when ``detect`` can take B > 1 images of one size in one call
    batched: bool = True

    @abc.abstractmethod
    def detect(self, images: torch.Tensor) -> list[RawDetections]:
        """Detect faces in a batch; see the class docstring for shapes and conventions."""

"""OpenCV's frontal-face Haar cascade (Viola-Jones) as a CPU :class:`Detector`.

The cascade is ``haarcascade_frontalface_default.xml``, shipped inside the opencv-python 4.x
wheels (``cv2.data.haarcascades``); it needs no weights entry. OpenCV 5 removed
``cv2.CascadeClassifier``: there :func:`unavailable_reason` says so and the registry lists
the detector as unavailable; no OpenCV version is pinned for it.

Confidence: ``detectMultiScale3(..., outputRejectLevels=True)`` returns, per box, the weight
of the last cascade stage (its summed weak-classifier votes; larger is more face-like). The
score is ``sigmoid(weight / LEVEL_WEIGHT_SCALE)``: monotone, so OpenCV's order is kept, and in
[0, 1] as the pipeline expects (0.5 is a stage sum of 0). The scale 4 keeps float32 scores
distinct: the boxes OpenCV 4.14 returns on ``crowd_1024.jpg`` have weights 0.5 to 12.4, i.e.
scores 0.53 to 0.96, where a plain sigmoid would round the strongest ones to 1.0 and tie them.
It is not a calibrated probability.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.detectors.base import Detector, RawDetections
from pipeline.errors import ConfrankError

CASCADE = "haarcascade_frontalface_default.xml"
#: OpenCV's defaults (the facedetect sample): pyramid step and grouping
SCALE_FACTOR = 1.1
MIN_NEIGHBORS = 3
#: divisor of the last-stage weight before the sigmoid (see the module docstring)
LEVEL_WEIGHT_SCALE = 4.0


def cascade_path() -> Path | None:
    """Where this OpenCV build keeps the frontal-face cascade (None if it has no data folder)."""
    import cv2

    data = getattr(cv2, "data", None)
    folder = getattr(data, "haarcascades", None)
    return Path(folder) / CASCADE if folder else None


def unavailable_reason() -> str | None:
    """None when the cascade can run here, else why not (one line for ``confrank detectors``)."""
    try:
        import cv2
    except ImportError as exc:
        return f"OpenCV is not importable ({exc})"
    if not hasattr(cv2, "CascadeClassifier"):
        return (f"OpenCV {cv2.__version__} has no cv2.CascadeClassifier (removed in OpenCV 5); "
                "it needs an opencv-python(-headless) 4.x environment")
    path = cascade_path()
    if path is None or not path.is_file():
        return f"this OpenCV build ships no {CASCADE} (looked in {path.parent if path else 'cv2.data'})"
    return None


def level_weight_to_score(weights: np.ndarray) -> np.ndarray:
    """Last-stage weights (N,) -> scores in [0, 1]: ``sigmoid(w / LEVEL_WEIGHT_SCALE)`` (float32)."""
    w = np.asarray(weights, dtype=np.float64) / LEVEL_WEIGHT_SCALE
    return (1.0 / (1.0 + np.exp(-w))).astype(np.float32)


class HaarCascade(Detector):
    """Viola-Jones frontal faces on CPU; ``detect`` loops over the batch (no landmarks)."""

    name = "haar"
    batched = False

    def __init__(self, scale_factor: float = SCALE_FACTOR, min_neighbors: int = MIN_NEIGHBORS) -> None:
        import cv2

        reason = unavailable_reason()
        if reason:
            raise ConfrankError(reason)
        self.device = torch.device("cpu")
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self._cascade = cv2.CascadeClassifier(str(cascade_path()))
        if self._cascade.empty():
            raise ConfrankError(f"{cascade_path()}: OpenCV could not load the cascade")

    def detect(self, images: torch.Tensor) -> list[RawDetections]:
        """(B, 3, H, W) BGR 0..255 on CPU -> B RawDetections (boxes in input pixels)."""
        batch = images.detach().to("cpu").round().clamp(0, 255).to(torch.uint8)
        return [self._one(img.permute(1, 2, 0).numpy()) for img in batch]

    def _one(self, bgr: np.ndarray) -> RawDetections:
        import cv2

        gray = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY))
        rects, _, level_weights = self._cascade.detectMultiScale3(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, outputRejectLevels=True,
        )
        xywh = np.asarray(rects, dtype=np.float32).reshape(-1, 4)
        scores = level_weight_to_score(np.asarray(level_weights).reshape(-1))
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        keep = scores > self.min_score
        boxes, scores = boxes[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")[: self.top_k]
        return RawDetections(torch.from_numpy(boxes[order]), torch.from_numpy(scores[order]), None)


def build(weights: dict[str, Path], device: torch.device) -> HaarCascade:
    """Registry factory: the cascade needs no weights files and runs on CPU only."""
    return HaarCascade()

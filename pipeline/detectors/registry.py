"""The detector registry: name -> how to build it, which weights it needs, where it runs.

Building is lazy (``"module:factory"``), so listing detectors imports no network code.
A factory is called as ``factory(weights: dict[str, Path], device: torch.device)`` with the
verified local path of every weights entry the detector names, and returns a
:class:`pipeline.detectors.base.Detector`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pipeline.detectors.base import Detector
from pipeline.errors import ConfrankError


#: bytes per input pixel assumed for a detector without a measured value (an upper guess)
DEFAULT_BYTES_PER_PIXEL = 400.0


@dataclass(frozen=True)
class DetectorInfo:
    """What the registry knows about a detector before building it."""

    name: str
    factory: str  # "module:function"
    weights: tuple[str, ...]  # names in pipeline.detectors.weights.REGISTRY
    description: str
    cpu_only: bool = False
    #: "module:function" returning None when usable, else the reason it is not
    availability: str | None = None
    #: peak working memory of one network call per input pixel, bytes (CPU, float32, 8K;
    #: README "Memory at 8K"): sizes the batches that fit in the memory available
    bytes_per_pixel: float = DEFAULT_BYTES_PER_PIXEL

    def unavailable_reason(self) -> str | None:
        """None when this detector can run here, else why not (e.g. a missing OpenCV API)."""
        if self.availability is None:
            return None
        return _resolve(self.availability)()


DETECTORS: dict[str, DetectorInfo] = {
    info.name: info
    for info in (
        DetectorInfo(
            "retinaface-mnet025", "pipeline.detectors.retinaface:build_mnet025",
            ("retinaface_mobilenet0.25_Final",),
            "RetinaFace MobileNet-V1 x0.25, anchors 16..512 (Pytorch_Retinaface)", bytes_per_pixel=70,
        ),
        DetectorInfo(
            "retinaface-mnet025-1mb", "pipeline.detectors.retinaface:build_mnet025_1mb",
            ("retinaface_mnet025_1mb_Final",),
            "RetinaFace MobileNet-V1 x0.25, anchors 10..256 (Face-Detector-1MB retrain)", bytes_per_pixel=70,
        ),
        DetectorInfo(
            "retinaface-r50", "pipeline.detectors.retinaface:build_r50",
            ("Resnet50_Final",),
            "RetinaFace ResNet-50 (torchvision body, FPN 256); user-supplied weights",
        ),
        DetectorInfo(
            "slim", "pipeline.detectors.onemb:build_slim", ("slim_Final",),
            "Face-Detector-1MB slim", bytes_per_pixel=120,
        ),
        DetectorInfo(
            "rfb", "pipeline.detectors.onemb:build_rfb", ("RBF_Final",),
            "Face-Detector-1MB RFB", bytes_per_pixel=120,
        ),
        DetectorInfo(
            "mtcnn", "pipeline.detectors.mtcnn:build", ("mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"),
            "MTCNN cascade (weights from the facenet-pytorch 2.6.0 wheel)",
        ),
        DetectorInfo(
            "haar", "pipeline.detectors.haar:build", (),
            "OpenCV frontal-face Haar cascade (CPU only)",
            cpu_only=True, availability="pipeline.detectors.haar:unavailable_reason",
        ),
    )
}


def _resolve(ref: str) -> Callable:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def get_info(name: str) -> DetectorInfo:
    """The registry entry for ``name``; a clear error listing the known names otherwise."""
    try:
        return DETECTORS[name]
    except KeyError:
        raise ConfrankError(f"unknown detector {name!r}; known: {', '.join(sorted(DETECTORS))}") from None


def build(name: str, weights: dict[str, Path], device: torch.device) -> Detector:
    """Build detector ``name`` on ``device`` from verified local weight files."""
    info = get_info(name)
    reason = info.unavailable_reason()
    if reason:
        raise ConfrankError(f"detector {name!r} is unavailable: {reason}")
    if info.cpu_only and device.type != "cpu":
        raise ConfrankError(f"detector {name!r} runs on CPU only; use --device cpu")
    return _resolve(info.factory)(weights, device)

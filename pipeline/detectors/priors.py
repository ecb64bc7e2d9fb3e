"""Prior (anchor) boxes, box/landmark decoding, and the detector shell shared by the
RetinaFace and Face-Detector-1MB families.

Priors are ``(P, 4)`` float32 tensors ``(cx, cy, s_x, s_y)`` normalised by the network input
width and height, ordered level by level (strides ascending), then row, column, and anchor
size (the order the networks' heads emit). A prior at row ``i``, column ``j`` of a level with
stride ``step`` is centred at ``((j + 0.5) * step / W, (i + 0.5) * step / H)``; each level has
``ceil(H / step) x ceil(W / step)`` cells.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.detectors.base import Detector, RawDetections
from pipeline.errors import FormatError

#: BGR channel means subtracted before the network (no scaling), as in the reference configs
BGR_MEAN = (104.0, 117.0, 123.0)


@dataclass(frozen=True)
class PriorConfig:
    """Anchor layout of one network: strides, anchor sizes (px) per level, variances."""

    steps: tuple[int, ...]
    min_sizes: tuple[tuple[int, ...], ...]
    variances: tuple[float, float] = (0.1, 0.2)


def prior_boxes(height: int, width: int, config: PriorConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``(P, 4)`` priors for a ``height x width`` network input, built on ``device``.

    Vectorised and cached per (input size, config, device): repeated calls for one size
    return the same tensor (do not modify it in place). The cache keeps the 16 most recent
    sizes: an 8K input's priors take 30-40 MB, and every WiderFace image has its own 8K size,
    so a larger cache only holds memory (64 entries held up to 2.6 GB in an 8K run).
    """
    return _prior_boxes_cached(int(height), int(width), config, str(torch.device(device)))


@functools.lru_cache(maxsize=16)
def _prior_boxes_cached(height: int, width: int, config: PriorConfig, device: str) -> torch.Tensor:
    levels = []
    for step, sizes in zip(config.steps, config.min_sizes):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float64, device=device) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64, device=device) + 0.5) * step / width
        sizes_t = torch.tensor(sizes, dtype=torch.float64, device=device)
        n = len(sizes)
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")  # (rows, cols)
        level = torch.stack(
            [
                grid_x[..., None].expand(rows, cols, n),
                grid_y[..., None].expand(rows, cols, n),
                (sizes_t / width).expand(rows, cols, n),
                (sizes_t / height).expand(rows, cols, n),
            ],
            dim=-1,
        )
        levels.append(level.reshape(-1, 4))
    return torch.cat(levels).to(torch.float32)


def prior_boxes_loop(height: int, width: int, config: PriorConfig) -> torch.Tensor:
    """The same priors built with the reference implementation's Python loop (slow).

    Kept as the baseline of ``bench/detect.py`` and as the oracle of the vectorised version.
    """
    anchors: list[float] = []
    for step, sizes in zip(config.steps, config.min_sizes):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        for i, j in itertools.product(range(rows), range(cols)):
            for size in sizes:
                anchors += [(j + 0.5) * step / width, (i + 0.5) * step / height, size / width, size / height]
    return torch.tensor(anchors, dtype=torch.float32).view(-1, 4)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Regression ``loc`` (..., P, 4) against ``priors`` (P, 4) -> normalised x1, y1, x2, y2.

    centre = prior_c + loc[:2] * var0 * prior_s; size = prior_s * exp(loc[2:] * var1).
    """
    centre = priors[:, :2] + loc[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def decode_landmarks(landmarks: torch.Tensor, priors: torch.Tensor, variances: tuple[float, float]) -> torch.Tensor:
    """Landmark regression (..., P, 10) -> normalised x0, y0, ..., x4, y4."""
    shape = landmarks.shape
    points = landmarks.reshape(*shape[:-1], 5, 2)
    decoded = priors[:, None, :2] + points * variances[0] * priors[:, None, 2:]
    return decoded.reshape(shape)


def load_state_dict(path: Path, model: nn.Module) -> None:
    """Load a checkpoint into ``model`` with ``strict=True``, dropping a ``module.`` prefix.

    Raises :class:`FormatError` naming the file when keys or shapes do not match.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise FormatError(path, "a PyTorch checkpoint (state dict)", got=f"{type(exc).__name__}: {first}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FormatError(path, f"a {type(model).__name__} state dict", got=type(state).__name__)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise FormatError(path, f"a {type(model).__name__} state dict", got=" ".join(first[:3])[:300]) from exc


class PriorBoxDetector(Detector):
    """A single-shot network with (loc, class logits, landmarks) heads over prior boxes.

    ``net(x)`` takes (B, 3, H, W) mean-subtracted BGR and returns ``loc`` (B, P, 4), class
    logits (B, P, 2) and landmarks (B, P, 10) in prior order. Decoding runs on the device.
    """

    def __init__(self, name: str, net: nn.Module, config: PriorConfig, device: torch.device):
        self.name = name
        self.device = torch.device(device)
        self.config = config
        self.net = net.eval().to(self.device)
        self.amp_dtype: torch.dtype | None = None
        self.channels_last = False
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)

    def set_precision(self, amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> None:
        """Run the network under autocast with ``amp_dtype`` (None = float32), optionally
        in channels_last memory format. Decoding always runs in float32."""
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = self.net.to(memory_format=memory_format)

    @torch.inference_mode()
    def network(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network alone on (B, 3, H, W) BGR 0..255 images: loc (B, P, 4), class logits
        (B, P, 2) and landmarks (B, P, 10) in prior order (in the AMP dtype, if any)."""
        x = images.to(self.device, torch.float32) - self._mean
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            return self.net(x)

    @torch.inference_mode()
    def detect(self, images: torch.Tensor) -> list[RawDetections]:
        """Per image: the priors whose face score (softmax) exceeds ``min_score``, at most
        ``top_k``, sorted by score descending (ties in prior order); boxes and landmarks
        decoded for those priors only, in input pixels, float32.

        Only the kept priors are decoded (at 8K a network emits 1.6-2.5 M priors and keeps
        a few thousand): the same values as decoding every prior, at a small fraction of
        the cost.
        """
        _, _, height, width = images.shape
        loc, logits, landmarks = self.network(images)
        priors = prior_boxes(height, width, self.config, self.device)
        scale = torch.tensor([width, height], dtype=torch.float32, device=self.device)
        out = []
        for b in range(images.shape[0]):
            keep, scores = select_scores(logits[b], self.min_score, self.top_k)
            kept_priors = priors[keep]
            boxes = decode_boxes(loc[b, keep].float(), kept_priors, self.config.variances) * scale.repeat(2)
            points = decode_landmarks(landmarks[b, keep].float(), kept_priors, self.config.variances) * scale.repeat(5)
            out.append(RawDetections(boxes, scores, points))
        return out


#: slack on the log-odds pre-filter of :func:`select_scores`, far above float32 rounding
_LOGIT_SLACK = 0.01


def select_scores(logits: torch.Tensor, min_score: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's (P, 2) class logits -> (prior indices, face scores): the priors whose
    face score ``softmax(logits)[:, 1]`` exceeds ``min_score``, sorted by score descending
    (stable: ties in prior order), at most ``top_k``.

    The softmax runs only on the priors whose log-odds ``l1 - l0`` exceed
    ``log(min_score / (1 - min_score))`` less a small slack (a monotone test that keeps
    every prior the exact test keeps); the exact test is then applied to those.
    """
    logits = logits.float()
    floor = math.log(min_score / (1.0 - min_score)) - _LOGIT_SLACK
    candidates = torch.nonzero(logits[:, 1] - logits[:, 0] > floor).squeeze(1)
    scores = torch.softmax(logits[candidates], dim=-1)[:, 1]
    passed = scores > min_score
    candidates, scores = candidates[passed], scores[passed]
    order = torch.sort(scores, descending=True, stable=True).indices[:top_k]
    return candidates[order], scores[order]

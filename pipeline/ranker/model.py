"""Confidence ranker networks (seed 000, sections 3.4 and 4.3) and a box-only baseline.

Inputs, shared by every model:

- ``image``: ``(B, 3, S, S)`` float32, RGB normalised with the ImageNet mean/std, the image
  resized so its long side is ``S`` and zero-padded at the bottom/right
  (:func:`pipeline.ranker.data.letterbox`). The box-only model ignores it (``None`` is fine).
- ``boxes``: ``(B, N, 5)`` float32 rows ``(x1, y1, w, h, confidence)``; ``x1, w`` divided by
  the image width and ``y1, h`` by the image height (so in [0, 1]); rows sorted by detector
  confidence, descending.
- ``mask``: ``(B, N)`` bool, True for a real box, False for a padded slot.

Output: ``(B, N)`` float32 refined confidences ``c'`` in [0, 1]; padded slots are 0.

Padding guarantee (tested in tests/test_ranker_model.py): padded rows are replaced by zeros
before anything reads them and padded output slots are set to 0, so in evaluation mode the
output of a real slot depends only on the image, the real rows and which slots are real;
the values stored in padded rows never matter. (In training mode BatchNorm statistics mix
the samples of a batch, as in any CNN.)
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork, box_iou

from pipeline.errors import ConfrankError
from pipeline.ranker.settings import BACKBONE_NAMES, RankerConfig

PAYLOAD_FORMAT = "confrank-ranker"
PAYLOAD_VERSION = 1

#: backbone -> (torchvision constructor, weights enum name, nodes at strides 8/16/32, default width)
BACKBONES: dict[str, tuple[str, str, dict[str, str], int]] = {
    "resnet50": ("resnet50", "ResNet50_Weights", {"layer2": "0", "layer3": "1", "layer4": "2"}, 256),
    # torchvision has no MobileNet v1; v2 is the closest small backbone it ships
    "mobilenet": ("mobilenet_v2", "MobileNet_V2_Weights", {"features.6": "0", "features.13": "1", "features.17": "2"}, 64),
}
#: detector confidences are clamped to [_EPS, 1 - _EPS] before the logit
_EPS = 1e-6
assert tuple(BACKBONES) == BACKBONE_NAMES


def conf_width(config: RankerConfig) -> int:
    """The FPN / confidence-module width of ``config``: its ``width``, else the backbone's default."""
    return config.width or BACKBONES[config.backbone][3]


def _finish(residual: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor, output: str = "clip") -> torch.Tensor:
    """c' on real slots, 0 on padded ones. Shapes (B, N).

    ``clip``: clip(c + residual, 0, 1). ``logit``: sigmoid(logit(c) + residual), with c
    clamped to [1e-6, 1 - 1e-6] first (a detector score of exactly 0 or 1 stays finite).
    """
    conf = boxes[..., 4].float()
    if output == "logit":
        out = torch.sigmoid(torch.logit(conf.clamp(_EPS, 1 - _EPS)) + residual.float())
    else:
        out = (conf + residual.float()).clamp(0.0, 1.0)
    return out * mask.to(out.dtype)


def _masked(boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return boxes * mask.unsqueeze(-1).to(boxes.dtype)


class BoxProcessingNetwork(nn.Module):
    """BPN: ``(B, N, 5)`` -> one ``(B, C, N, 5)`` feature map every 3 layers.

    The first 3x5 convolution expands 1 -> C channels; every later layer is
    ``h + leaky_relu(conv(h))`` (skip connection), padding (1, 2) keeps the N x 5 size.
    """

    def __init__(self, channels: int = 64, layers: int = 9):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(1 if i == 0 else channels, channels, kernel_size=(3, 5), padding=(1, 2))
            for i in range(layers)
        )

    def forward(self, boxes: torch.Tensor) -> list[torch.Tensor]:
        h = boxes.unsqueeze(1)
        taps = []
        for i, conv in enumerate(self.convs):
            out = F.leaky_relu(conv(h), 0.1)
            h = out if i == 0 else h + out
            if (i + 1) % 3 == 0:
                taps.append(h)
        return taps


class ConfidenceHead(nn.Module):
    """3x3 conv -> ReLU -> global average pool -> FC to N (one per FPN scale)."""

    def __init__(self, width: int, num_boxes: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, num_boxes)
        nn.init.zeros_(self.fc.weight)  # start as the identity c' = c (residual of 0)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


class ConfRanker(nn.Module):
    """FPN (3 scales) on a torchvision backbone + BPN + per-scale confidence modules.

    BPN taps 1, 2, 3 are nearest-interpolated to the stride-8, 16, 32 backbone features and
    concatenated with them before the FPN; the three confidence modules' outputs are
    averaged into the residual added to the detector confidence.
    """

    def __init__(self, config: RankerConfig, pretrained: bool = False):
        super().__init__()
        self.config = config
        ctor_name, weights_name, nodes, _ = BACKBONES[config.backbone]
        weights = getattr(torchvision.models, weights_name).DEFAULT if pretrained else None
        trunk = getattr(torchvision.models, ctor_name)(weights=weights)
        self.body = create_feature_extractor(trunk, return_nodes=nodes)
        with torch.no_grad():
            probe = self.body(torch.zeros(1, 3, 64, 64))
        channels = [probe[k].shape[1] for k in sorted(probe)]
        taps = config.bpn_layers // 3
        if taps < len(channels):
            raise ConfrankError(f"bpn_layers={config.bpn_layers} gives {taps} taps; the FPN needs {len(channels)}")
        self.bpn = BoxProcessingNetwork(config.bpn_channels, config.bpn_layers)
        width = conf_width(config)
        self.fpn = FeaturePyramidNetwork([c + config.bpn_channels for c in channels], width)
        self.heads = nn.ModuleList(ConfidenceHead(width, config.num_boxes) for _ in channels)

    def forward(self, image: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        boxes = _masked(boxes, mask)
        feats = self.body(image)
        taps = self.bpn(boxes)
        merged = {}
        for i, key in enumerate(sorted(feats)):
            f = feats[key]
            tap = F.interpolate(taps[i], size=f.shape[-2:], mode="nearest").to(f.dtype)
            merged[key] = torch.cat([f, tap], dim=1)
        pyramid = self.fpn(merged)
        residual = torch.stack([head(pyramid[k]) for head, k in zip(self.heads, sorted(pyramid))]).mean(0)
        return _finish(residual, boxes, mask, self.config.output)


def box_statistics(boxes: torch.Tensor, mask: torch.Tensor, topk: int = 4, chunk: int = 1024) -> torch.Tensor:
    """Per-box features for :class:`BoxStatsRanker`: ``(B, N, 5)`` -> ``(B, N, 10 + 2*topk)``.

    For each real box: its row (x1, y1, w, h, c); log of its normalised size; its rank among
    the real boxes divided by their count; the top-``topk`` IoUs with the other real boxes and
    their mean (GFLV2's Top-k + mean statistic, applied to the cluster of overlapping
    detections), the confidences of those ``topk`` neighbours, the maximum IoU with a box of
    higher confidence (what greedy NMS looks at) and log(1 + number of boxes with IoU > 0.4).
    Only real boxes enter the statistics; padded rows get zero features. No gradient. IoUs
    are computed ``chunk`` rows at a time (memory ``chunk x N``).
    """
    b, n, _ = boxes.shape
    out = boxes.new_zeros(b, n, 10 + 2 * topk)
    with torch.no_grad():
        for i in range(b):
            real = mask[i].nonzero().squeeze(1)
            if real.numel():
                out[i, real] = _box_features(boxes[i, real].float(), topk, chunk).to(out.dtype)
    return out


def _box_features(rows: torch.Tensor, topk: int, chunk: int) -> torch.Tensor:
    """:func:`box_statistics` of the ``(m, 5)`` real rows of one image (sorted by confidence)."""
    m = rows.shape[0]
    xyxy = torch.cat([rows[:, :2], rows[:, :2] + rows[:, 2:4]], dim=1)
    k = min(topk, m - 1)
    top_iou = rows.new_zeros(m, topk)
    top_conf = rows.new_zeros(m, topk)
    max_higher = rows.new_zeros(m)
    crowd = rows.new_zeros(m)
    cols = torch.arange(m, device=rows.device)
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        iou = box_iou(xyxy[s:e], xyxy)
        own = torch.arange(s, e, device=rows.device).unsqueeze(1)
        iou.masked_fill_(cols == own, 0.0)
        if k > 0:
            vals, idx = iou.topk(k, dim=1)
            top_iou[s:e, :k] = vals
            top_conf[s:e, :k] = rows[idx, 4] * (vals > 0)
        crowd[s:e] = (iou > 0.4).sum(dim=1, dtype=rows.dtype)
        # rows are sorted by confidence: boxes ranked above box j are the columns < j
        max_higher[s:e] = iou.masked_fill_(cols >= own, 0.0).max(dim=1).values
    size = torch.log((rows[:, 2] * rows[:, 3]).clamp_min(1e-8)) / 10.0
    rank = torch.arange(m, device=rows.device, dtype=rows.dtype) / m
    return torch.cat([rows, size[:, None], rank[:, None], top_iou, top_iou.mean(1, keepdim=True), top_conf,
                      max_higher[:, None], torch.log1p(crowd)[:, None]], dim=1)


class BoxStatsRanker(nn.Module):
    """Image-free ranker: a per-box MLP (2 hidden layers) on :func:`box_statistics`.

    The residual output layer starts at zero, so an untrained model returns the detector
    confidence unchanged.
    """

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        n_in = 10 + 2 * config.stats_topk
        self.mlp = nn.Sequential(
            nn.Linear(n_in, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, config.hidden), nn.ReLU(),
            nn.Linear(config.hidden, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, image: torch.Tensor | None, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        boxes = _masked(boxes, mask)
        feats = box_statistics(boxes, mask, self.config.stats_topk)
        real = mask.nonzero(as_tuple=True)  # the MLP runs on real boxes only
        residual = boxes.new_zeros(mask.shape)
        residual[real] = self.mlp(feats[real]).squeeze(-1).to(residual.dtype)
        return _finish(residual, boxes, mask, self.config.output)


def build_ranker(config: RankerConfig, pretrained: bool = False) -> nn.Module:
    """The ranker ``config`` describes; ``pretrained`` loads torchvision's ImageNet weights
    for the backbone through its weights API (they must already be in the torch hub cache or
    downloadable)."""
    if not config.uses_image:
        return BoxStatsRanker(config)
    return ConfRanker(config, pretrained=pretrained)


def model_payload(model: nn.Module, config: RankerConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What model.pt holds: format tag, version, config, fp32 state dict, ``extra`` info."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION, "config": config.to_dict(),
            "state_dict": state, "extra": dict(extra or {})}


def model_from_payload(payload: Any, source: str) -> tuple[nn.Module, RankerConfig]:
    """Rebuild a ranker from :func:`model_payload` output; ConfrankError naming ``source``
    when it is not a confrank ranker (another checkpoint, a newer format, a bad config)."""
    if not isinstance(payload, dict) or payload.get("format") != PAYLOAD_FORMAT:
        raise ConfrankError(f"{source}: not a confrank ranker model (expected a model.pt written by `confrank train`)")
    if payload.get("version") != PAYLOAD_VERSION:
        raise ConfrankError(f"{source}: ranker format version {payload.get('version')!r}, this code reads {PAYLOAD_VERSION}")
    try:
        config = RankerConfig(**payload["config"])
    except TypeError as exc:
        raise ConfrankError(f"{source}: bad ranker config: {exc}") from exc
    model = build_ranker(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise ConfrankError(f"{source}: weights do not match the stored ranker config: {exc}") from exc
    return model, config

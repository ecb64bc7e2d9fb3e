"""Face-Detector-1MB "slim" and "RFB": depthwise-separable trunks with four detection levels.

Module names follow the authors' checkpoints (``conv1..conv14``, ``loc/conf/landm.{0..3}``)
so ``slim_Final.pth`` and ``RBF_Final.pth`` load with ``strict=True``. Strides 8/16/32/64,
anchors per location 3, 2, 2, 3, variances (0.1, 0.2).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.detectors.priors import PriorBoxDetector, PriorConfig, load_state_dict

ANCHORS = PriorConfig(steps=(8, 16, 32, 64), min_sizes=((10, 16, 24), (32, 48), (64, 96), (128, 192, 256)))


def conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU (no biases)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )


def depth_conv2d(inp: int, oup: int, kernel: int = 1, stride: int = 1, pad: int = 0) -> nn.Sequential:
    """Depthwise conv (with bias) + ReLU + 1x1 conv (with bias)."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, kernel, stride, pad, groups=inp), nn.ReLU(inplace=True), nn.Conv2d(inp, oup, 1)
    )


class BasicConv(nn.Sequential):
    """Conv (no bias) + BN(eps 1e-5, momentum 0.01) + optional ReLU, keys ``conv``/``bn``."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(inp, oup, kernel, stride, padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(oup, eps=1e-5, momentum=0.01)
        if relu:
            self.relu = nn.ReLU(inplace=True)


class BasicRFB(nn.Module):
    """Receptive-field block: three dilated branches (2, 3, 5) + 1x1 linear + 1x1 shortcut."""

    def __init__(self, inp: int, oup: int, scale: float = 1.0, map_reduce: int = 8, vision: int = 1):
        super().__init__()
        self.scale = scale
        inter = inp // map_reduce
        self.branch0 = nn.Sequential(
            BasicConv(inp, inter, 1, relu=False),
            BasicConv(inter, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 1, dilation=vision + 1, relu=False),
        )
        self.branch1 = nn.Sequential(
            BasicConv(inp, inter, 1, relu=False),
            BasicConv(inter, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 2, dilation=vision + 2, relu=False),
        )
        self.branch2 = nn.Sequential(
            BasicConv(inp, inter, 1, relu=False),
            BasicConv(inter, inter // 2 * 3, 3, padding=1),
            BasicConv(inter // 2 * 3, 2 * inter, 3, padding=1),
            BasicConv(2 * inter, 2 * inter, 3, padding=vision + 4, dilation=vision + 4, relu=False),
        )
        self.ConvLinear = BasicConv(6 * inter, oup, 1, relu=False)
        self.shortcut = BasicConv(inp, oup, 1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ConvLinear(torch.cat([self.branch0(x), self.branch1(x), self.branch2(x)], dim=1))
        return torch.relu(out * self.scale + self.shortcut(x))


class OneMB(nn.Module):
    """The slim network (``rfb=True`` swaps block 8 for a receptive-field block).

    Returns loc (B, P, 4), class logits (B, P, 2), landmarks (B, P, 10) in prior order.
    """

    def __init__(self, rfb: bool = False):
        super().__init__()
        self.conv1 = conv_bn(3, 16, 2)
        self.conv2 = conv_dw(16, 32, 1)
        self.conv3 = conv_dw(32, 32, 2)
        self.conv4 = conv_dw(32, 32, 1)
        self.conv5 = conv_dw(32, 64, 2)
        self.conv6 = conv_dw(64, 64, 1)
        self.conv7 = conv_dw(64, 64, 1)
        self.conv8 = BasicRFB(64, 64, scale=1.0) if rfb else conv_dw(64, 64, 1)
        self.conv9 = conv_dw(64, 128, 2)
        self.conv10 = conv_dw(128, 128, 1)
        self.conv11 = conv_dw(128, 128, 1)
        self.conv12 = conv_dw(128, 256, 2)
        self.conv13 = conv_dw(256, 256, 1)
        self.conv14 = nn.Sequential(
            nn.Conv2d(256, 64, 1), nn.ReLU(inplace=True), depth_conv2d(64, 256, 3, 2, 1), nn.ReLU(inplace=True)
        )
        channels, anchors = (64, 128, 256), (3, 2, 2)
        self.loc = self._heads(channels, anchors, 4)
        self.conf = self._heads(channels, anchors, 2)
        self.landm = self._heads(channels, anchors, 10)

    @staticmethod
    def _heads(channels: tuple[int, ...], anchors: tuple[int, ...], per_anchor: int) -> nn.Sequential:
        layers = [depth_conv2d(c, a * per_anchor, 3, 1, 1) for c, a in zip(channels, anchors)]
        layers.append(nn.Conv2d(256, 3 * per_anchor, 3, padding=1))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        for block in (self.conv2, self.conv3, self.conv4, self.conv5, self.conv6, self.conv7):
            x = block(x)
        f8 = self.conv8(x)
        f11 = self.conv11(self.conv10(self.conv9(f8)))
        f13 = self.conv13(self.conv12(f11))
        feats = (f8, f11, f13, self.conv14(f13))

        def flat(heads: nn.Sequential, width: int) -> torch.Tensor:
            outs = [h(f).permute(0, 2, 3, 1).reshape(f.shape[0], -1, width) for h, f in zip(heads, feats)]
            return torch.cat(outs, dim=1)

        return flat(self.loc, 4), flat(self.conf, 2), flat(self.landm, 10)


def build_slim(weights: dict[str, Path], device: torch.device) -> PriorBoxDetector:
    """Face-Detector-1MB slim from ``slim_Final.pth``."""
    net = OneMB(rfb=False)
    load_state_dict(weights["slim_Final"], net)
    return PriorBoxDetector("slim", net, ANCHORS, device)


def build_rfb(weights: dict[str, Path], device: torch.device) -> PriorBoxDetector:
    """Face-Detector-1MB RFB from ``RBF_Final.pth`` (the authors' spelling)."""
    net = OneMB(rfb=True)
    load_state_dict(weights["RBF_Final"], net)
    return PriorBoxDetector("rfb", net, ANCHORS, device)

"""RetinaFace (Deng et al., 2019): MobileNet-V1 x0.25 or ResNet-50 body, FPN, SSH, 2 anchors.

Module names follow the public Pytorch_Retinaface checkpoints (``body.stage1..3`` or
``body.conv1/layer1..4``, ``fpn.*``, ``ssh1..3.*``, ``ClassHead/BboxHead/LandmarkHead.{0,1,2}``),
so their state dicts load with ``strict=True``. Strides 8/16/32, variances (0.1, 0.2).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet50

from pipeline.detectors.priors import PriorBoxDetector, PriorConfig, load_state_dict

ANCHORS_RETINAFACE = PriorConfig(steps=(8, 16, 32), min_sizes=((16, 32), (64, 128), (256, 512)))
ANCHORS_1MB = PriorConfig(steps=(8, 16, 32), min_sizes=((10, 20), (32, 64), (128, 256)))


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    """3x3 conv (no bias) + BN + LeakyReLU(leaky)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.LeakyReLU(leaky, inplace=True)
    )


def conv_bn_no_relu(inp: int, oup: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN, no activation."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, 1, 1, bias=False), nn.BatchNorm2d(oup))


def conv_bn1x1(inp: int, oup: int, leaky: float = 0.0) -> nn.Sequential:
    """1x1 conv (no bias) + BN + LeakyReLU(leaky)."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.LeakyReLU(leaky, inplace=True)
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    """Depthwise 3x3 + BN + LeakyReLU, pointwise 1x1 + BN + LeakyReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.LeakyReLU(leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.LeakyReLU(leaky, inplace=True),
    )


class MobileNetV1x025(nn.Module):
    """MobileNet-V1 x0.25 trunk; returns stage outputs (64, 128, 256 ch at strides 8/16/32)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2), conv_dw(32, 32, 1),
            conv_dw(32, 64, 2), conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *(conv_dw(128, 128, 1) for _ in range(5)))
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.stage1(x)
        c4 = self.stage2(c3)
        return [c3, c4, self.stage3(c4)]


class ResNet50Body(nn.Module):
    """torchvision ResNet-50 trunk (random init, never downloaded) returning the layer2/3/4
    outputs (512, 1024, 2048 ch at strides 8/16/32); the pooling/classifier are dropped."""

    def __init__(self):
        super().__init__()
        trunk = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(trunk, name))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


class FPN(nn.Module):
    """1x1 laterals to ``out`` channels; top-down nearest upsampling + add + 3x3 merge."""

    def __init__(self, in_channels: tuple[int, int, int], out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.output1 = conv_bn1x1(in_channels[0], out, leaky)
        self.output2 = conv_bn1x1(in_channels[1], out, leaky)
        self.output3 = conv_bn1x1(in_channels[2], out, leaky)
        self.merge1 = conv_bn(out, out, leaky=leaky)
        self.merge2 = conv_bn(out, out, leaky=leaky)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """SSH context module: 3x3 (out/2) | 3x3-3x3 (out/4) | 3x3-3x3-3x3 (out/4), concat, ReLU."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.conv3X3 = conv_bn_no_relu(inp, out // 2)
        self.conv5X5_1 = conv_bn(inp, out // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_no_relu(out // 4, out // 4)
        self.conv7X7_2 = conv_bn(out // 4, out // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_no_relu(out // 4, out // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.conv5X5_1(x)
        c = self.conv7X7_2(b)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(b), self.conv7x7_3(c)], dim=1))


class Head(nn.Module):
    """1x1 conv to ``anchors * per_anchor`` channels, flattened to (B, H*W*anchors, per_anchor)."""

    def __init__(self, inp: int, anchors: int, per_anchor: int):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(inp, anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """Body -> FPN -> SSH x3 -> heads; returns loc (B,P,4), class logits (B,P,2), landmarks (B,P,10)."""

    def __init__(self, body: nn.Module, in_channels: tuple[int, int, int], out: int, anchors: int = 2):
        super().__init__()
        self.body = body
        self.fpn = FPN(in_channels, out)
        self.ssh1, self.ssh2, self.ssh3 = SSH(out, out), SSH(out, out), SSH(out, out)
        self.ClassHead = nn.ModuleList(Head(out, anchors, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(Head(out, anchors, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(Head(out, anchors, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.fpn(self.body(x))
        feats = [self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        cls = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        lms = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, cls, lms


def mobilenet025_net() -> RetinaFace:
    """The MobileNet-V1 x0.25 RetinaFace network (FPN/SSH width 64), random init."""
    return RetinaFace(MobileNetV1x025(), (64, 128, 256), 64)


def resnet50_net() -> RetinaFace:
    """The ResNet-50 RetinaFace network (FPN/SSH width 256), random init, no download."""
    return RetinaFace(ResNet50Body(), (512, 1024, 2048), 256)


def _build(name: str, net: nn.Module, weights_file: Path, config: PriorConfig, device: torch.device) -> PriorBoxDetector:
    load_state_dict(weights_file, net)
    return PriorBoxDetector(name, net, config, device)


def build_mnet025(weights: dict[str, Path], device: torch.device) -> PriorBoxDetector:
    """RetinaFace MobileNet-0.25 with the Pytorch_Retinaface anchors (16..512)."""
    return _build("retinaface-mnet025", mobilenet025_net(), weights["retinaface_mobilenet0.25_Final"],
                  ANCHORS_RETINAFACE, device)


def build_mnet025_1mb(weights: dict[str, Path], device: torch.device) -> PriorBoxDetector:
    """The same network retrained in Face-Detector-1MB, anchors 10..256."""
    return _build("retinaface-mnet025-1mb", mobilenet025_net(), weights["retinaface_mnet025_1mb_Final"],
                  ANCHORS_1MB, device)


def build_r50(weights: dict[str, Path], device: torch.device) -> PriorBoxDetector:
    """RetinaFace ResNet-50 from a user-supplied ``Resnet50_Final.pth`` (``module.`` prefix ok)."""
    return _build("retinaface-r50", resnet50_net(), weights["Resnet50_Final"], ANCHORS_RETINAFACE, device)

"""DeepLabV3 as the CIRKD family defines it (CIRKD ``models/deeplabv3.py`` and
``models/deeplabv3_mobile.py``), so that CIRKD's released DeepLabV3-ResNet101 Cityscapes teacher
and its students load strictly and compute the same function.

Architecture (output stride 8):

* backbone under ``pretrained.``: :class:`cwdseg.models.resnet.ResNetV1s` (ResNet-18 / 101) or
  :class:`cwdseg.models.mobilenetv2.MobileNetV2Dilated`;
* ``head`` (:class:`DeepLabHead`) on the last backbone map: ASPP with atrous rates (12, 24, 36)
  (the rates for output stride 8) and image pooling, 5 branches of ``C`` channels concatenated and
  projected back to ``C`` (1x1 conv, BN, ReLU, ``Dropout(0.5)``); then 3x3 conv ``C -> C``, BN,
  ReLU, ``Dropout(0.1)`` -- the *head feature* -- and a 1x1 classifier with bias. ``C`` = 128 on
  ResNet-18 and MobileNetV2, 256 on ResNet-101: the widths of the CIRKD code the released teacher
  and the published CIRKD-protocol students were trained with (``models/deeplabv3.py`` at 7e0d21f,
  March 2022). CIRKDV2 (August 2025) widened the ResNet heads to 512; those files do not load here;
* ``auxlayer`` (:class:`FCNHead`, ResNets only) on the layer3 map: 3x3 conv to in/4 channels, BN,
  ReLU, ``Dropout(0.1)``, 1x1 classifier with bias.

``forward(x, aux=True)`` returns ``(logits, aux_logits, head_feature)`` at stride 8, like
:class:`cwdseg.models.pspnet.PSPNet`; ``aux_logits`` is None with ``aux=False`` and always on
MobileNetV2 (CIRKD trains its MobileNetV2 students without an auxiliary head). BN is plain
``nn.BatchNorm2d``; dropout is element-wise ``nn.Dropout`` as in CIRKD (not ``Dropout2d``).

Keys: ``head.aspp.b0.{0,1}``, ``head.aspp.b{1,2,3}.block.{0,1}``, ``head.aspp.b4.gap.{1,2}``,
``head.aspp.project.{0,1}``, ``head.block.{0,1,4}``, ``auxlayer.block.{0,1,4}``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cwdseg.models.mobilenetv2 import MobileNetV2Dilated
from cwdseg.models.resnet import ResNetV1s, resnet18_v1s, resnet101_v1s

ASPP_RATES_OS8 = (12, 24, 36)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation if kernel_size == 3 else 0
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class ASPPConv(nn.Module):
    """One atrous branch: 3x3 conv with dilation = padding = ``rate``, BN, ReLU (keys ``block.{0,1}``)."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        self.block = nn.Sequential(*conv_bn_relu(in_channels, out_channels, 3, rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ASPPPooling(nn.Module):
    """Image pooling branch: global average -> 1x1 conv -> BN -> ReLU, broadcast back to H x W
    (bilinear from 1x1 with ``align_corners=True``: every position gets the pooled vector)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.gap(x), size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``b0`` (1x1), ``b1..b3`` (3x3 at ``rates``), ``b4`` (image
    pooling), concatenated in that order, then ``project`` (1x1 conv, BN, ReLU, Dropout(0.5))."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES_OS8) -> None:
        super().__init__()
        if len(rates) != 3:
            raise ValueError(f"ASPP takes three atrous rates, got {list(rates)}")
        self.b0 = nn.Sequential(*conv_bn_relu(in_channels, out_channels))
        self.b1 = ASPPConv(in_channels, out_channels, rates[0])
        self.b2 = ASPPConv(in_channels, out_channels, rates[1])
        self.b3 = ASPPConv(in_channels, out_channels, rates[2])
        self.b4 = ASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(*conv_bn_relu(5 * out_channels, out_channels), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        # Under autocast the pooled branch can come back in another dtype; cat needs one.
        return self.project(torch.cat([b.to(branches[0].dtype) for b in branches], dim=1))


class DeepLabHead(nn.Module):
    """ASPP, then ``block`` = 3x3 conv, BN, ReLU, Dropout(0.1) (the head feature), 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.block = nn.Sequential(*conv_bn_relu(channels, channels, 3), nn.Dropout(0.1),
                                   nn.Conv2d(channels, num_classes, kernel_size=1, bias=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.block[:4](self.aspp(x))
        return self.block[4](feature), feature


class FCNHead(nn.Module):
    """Auxiliary head: 3x3 conv (no bias) to in/4 channels, BN, ReLU, Dropout(0.1), 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        inter = in_channels // 4
        self.block = nn.Sequential(*conv_bn_relu(in_channels, inter, 3), nn.Dropout(0.1),
                                   nn.Conv2d(inter, num_classes, kernel_size=1, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DeepLabV3(nn.Module):
    """DeepLabV3 on a backbone whose ``forward`` gives ``(stage3 map or None, final map)``.

    Args:
        backbone: :class:`ResNetV1s` or :class:`MobileNetV2Dilated` (stored as ``pretrained``).
        num_classes: output channels of both classifiers.
        head_channels: ASPP / head width ``C`` (128 for ResNet-18 and MobileNetV2, 256 for ResNet-101).
        aux_head: build ``auxlayer`` on the stage-3 map (needs ``backbone.stage3_channels``).
    """

    def __init__(self, backbone: ResNetV1s | MobileNetV2Dilated, num_classes: int = 19,
                 head_channels: int = 128, aux_head: bool = True) -> None:
        super().__init__()
        self.pretrained = backbone
        self.head = DeepLabHead(backbone.out_channels, num_classes, head_channels)
        if aux_head and backbone.stage3_channels is None:
            raise ValueError(f"{type(backbone).__name__} has no stage-3 map for an auxiliary head")
        self.auxlayer = FCNHead(backbone.stage3_channels, num_classes) if aux_head else None
        self.num_classes = num_classes
        self.feature_channels = head_channels

    def forward(self, x: torch.Tensor, aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        c3, c4 = self.pretrained(x)
        logits, feature = self.head(c4)
        aux_logits = self.auxlayer(c3) if aux and self.auxlayer is not None else None
        return logits, aux_logits, feature


def deeplabv3_resnet18(num_classes: int = 19) -> DeepLabV3:
    """CIRKD's DeepLabV3-ResNet18 student (with its auxiliary FCN head)."""
    return DeepLabV3(resnet18_v1s(), num_classes, head_channels=128)


def deeplabv3_resnet101(num_classes: int = 19) -> DeepLabV3:
    """CIRKD's DeepLabV3-ResNet101 teacher (78.07 val mIoU released on Cityscapes)."""
    return DeepLabV3(resnet101_v1s(), num_classes, head_channels=256)


def deeplabv3_mobilenetv2(num_classes: int = 19) -> DeepLabV3:
    """CIRKD's DeepLabV3-MobileNetV2 student (``deeplab_mobile``; no auxiliary head)."""
    return DeepLabV3(MobileNetV2Dilated(), num_classes, head_channels=128, aux_head=False)

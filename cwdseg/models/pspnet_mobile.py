"""PSPNet on the stride-8 MobileNetV2, as the CIRKD family defines it (CIRKD ``models/psp_mobile.py``
at 7e0d21f), so that its files load strictly.

This is CIRKD's PSP head, not the original CWD code's (:class:`cwdseg.models.pspnet.PSPModule`):

* ``head.psp``: average pools to 1, 2, 3 and 6 bins, each followed by ``conv{1..4}`` = 1x1 conv
  ``C -> C/4``, BN, ReLU, upsampled back (bilinear, ``align_corners=True``) and concatenated *after*
  the input: ``[x, bin1, bin2, bin3, bin6]`` (2C channels);
* ``head.block``: 3x3 conv ``2C -> 128``, BN, ReLU, ``Dropout(0.1)`` -- the head feature;
* ``head.classifier``: 1x1 conv with bias.

With C = 320 (MobileNetV2): 4 x 80 pooled channels. No auxiliary head. BN is ``nn.BatchNorm2d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cwdseg.models.mobilenetv2 import MobileNetV2Dilated

PSP_BINS = (1, 2, 3, 6)


class PyramidPooling(nn.Module):
    """``avgpool{i}`` (parameter-free) and ``conv{i}`` = 1x1 conv, BN, ReLU for the bins 1, 2, 3, 6."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        out = in_channels // 4
        for i, b in enumerate(PSP_BINS, start=1):
            setattr(self, f"avgpool{i}", nn.AdaptiveAvgPool2d(b))
            setattr(self, f"conv{i}", nn.Sequential(nn.Conv2d(in_channels, out, 1, bias=False),
                                                    nn.BatchNorm2d(out), nn.ReLU(inplace=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        parts = [x]
        for i in range(1, len(PSP_BINS) + 1):
            pooled = getattr(self, f"conv{i}")(getattr(self, f"avgpool{i}")(x))
            parts.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True).to(x.dtype))
        return torch.cat(parts, dim=1)


class PSPHead(nn.Module):
    """CIRKD's ``_PSPHead``: pyramid pooling, ``block`` (3x3 conv to ``channels``, BN, ReLU,
    Dropout(0.1)), ``classifier``. ``forward`` returns ``(logits, head_feature)``."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 128) -> None:
        super().__init__()
        self.psp = PyramidPooling(in_channels)
        self.block = nn.Sequential(nn.Conv2d(2 * in_channels, channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.block(self.psp(x))
        return self.classifier(feature), feature


class PSPNetMobile(nn.Module):
    """PSPNet-MobileNetV2: ``pretrained`` (:class:`MobileNetV2Dilated`) + ``head`` (:class:`PSPHead`).

    ``forward(x, aux=True)`` returns ``(logits, None, head_feature)`` at stride 8 (no auxiliary head).
    """

    def __init__(self, num_classes: int = 19) -> None:
        super().__init__()
        self.pretrained = MobileNetV2Dilated()
        self.head = PSPHead(self.pretrained.out_channels, num_classes, 128)
        self.num_classes = num_classes
        self.feature_channels = 128

    def forward(self, x: torch.Tensor, aux: bool = True) -> tuple[torch.Tensor, None, torch.Tensor]:
        _, c4 = self.pretrained(x)
        logits, feature = self.head(c4)
        return logits, None, feature


def pspnet_mobilenetv2(num_classes: int = 19) -> PSPNetMobile:
    """CIRKD's PSPNet-MobileNetV2 (``psp_mobile``)."""
    return PSPNetMobile(num_classes)

"""PSPNet with a deep-stem dilated ResNet backbone: the teacher (ResNet-101) and student (ResNet-18)
of the original CWD / IFVD / SKD code (``networks/pspnet.py`` there), rebuilt on :class:`cwdseg.models.abn.ABN`.

Architecture (output stride 8):

* stem: three 3x3 convs (3->64 stride 2, 64->64, 64->128), each followed by BN and ReLU, then
  ``MaxPool2d(3, 2, 1, ceil_mode=True)``;
* layer1 (stride 1), layer2 (stride 2), layer3 (stride 1, dilation 2), layer4 (stride 1,
  dilation 4); every block of a dilated stage uses the full dilation;
* PSP head on layer4 (bins 1, 2, 3, 6), then a 1x1 classifier ``head``;
* auxiliary ``dsn`` head on layer3.

``forward`` returns ``(logits, aux_logits, psp_feature)``; a 512x512 input gives 65x65 maps.

The normalisation layer is :class:`cwdseg.models.abn.ABN`, which *computes* the InPlace-ABN scale
``|weight| + eps`` (no conversion of the weights when loading: the state_dict holds the values of the
original files, so a load -> save round trip is the identity). The backbone uses ``ABN(activation="none")``
followed by ``nn.ReLU``, exactly as the original; the heads use ABN's leaky ReLU (slope 0.01).

Module names are chosen so that ``state_dict()`` keys are exactly those of the released files
(150 keys for the student, 565 for the teacher): ``conv1..3``/``bn1..3``, ``layerL.B.conv*``/``bn*``,
``layerL.0.downsample.{0,1}``, ``pspmodule.stages.{0-3}.{1,2}``, ``pspmodule.bottleneck.{0,1}``,
``head.{weight,bias}``, ``dsn.{0,1,3}``. Parameter-free layers (ReLU, pooling, dropout) hold no keys,
which is why their positions inside the ``nn.Sequential`` containers matter.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cwdseg.models.abn import ABN
from cwdseg.models.resnet import BasicBlock, Bottleneck, backbone_norm, conv3x3

PSP_BINS = (1, 2, 3, 6)

__all__ = ["PSP_BINS", "BasicBlock", "Bottleneck", "PSPModule", "PSPNet", "backbone_norm", "conv3x3",
           "pspnet_resnet18", "pspnet_resnet101"]


class PSPModule(nn.Module):
    """Pyramid pooling: per bin AdaptiveAvgPool -> 1x1 conv -> ABN(leaky), upsampled back
    (bilinear, align_corners=True); concatenated as ``[bin1, bin2, bin3, bin6, feats]``, then
    3x3 conv -> ABN(leaky) -> Dropout2d(0.1).

    Keys: ``stages.i.1.weight`` (conv), ``stages.i.2.*`` (ABN), ``bottleneck.0.weight``, ``bottleneck.1.*``.
    """

    def __init__(self, in_channels: int, out_channels: int, bins: Sequence[int] = PSP_BINS) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d((b, b)),
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                ABN(out_channels),
            )
            for b in bins
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + len(bins) * out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            ABN(out_channels),
            nn.Dropout2d(0.1),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        size = feats.shape[-2:]
        priors = [F.interpolate(stage(feats), size=size, mode="bilinear", align_corners=True)
                  for stage in self.stages]
        # Under autocast the branches and feats can differ in dtype; cat needs one dtype.
        priors = [p.to(feats.dtype) for p in priors] + [feats]
        return self.bottleneck(torch.cat(priors, dim=1))


class PSPNet(nn.Module):
    """PSPNet on a deep-stem dilated ResNet (output stride 8).

    Args:
        block: :class:`BasicBlock` (ResNet-18) or :class:`Bottleneck` (ResNet-101).
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` or ``[3, 4, 23, 3]``.
        num_classes: output channels of ``head`` and ``dsn``.

    ``forward(x)`` with x of shape [N, 3, H, W] returns ``(logits, aux_logits, psp_feature)`` at
    stride 8 (ceil): [N, num_classes, h, w], [N, num_classes, h, w], [N, C_psp, h, w] with
    C_psp = 128 for ResNet-18 and 512 for ResNet-101. Logits are *not* upsampled to the input size.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int = 19) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {list(layers)}")
        self.inplanes = 128
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = backbone_norm(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = backbone_norm(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = backbone_norm(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)

        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], dilation=4)

        feat_channels = 512 * block.expansion           # 512 (R18) / 2048 (R101)
        psp_channels = feat_channels // 4                # 128 / 512
        self.pspmodule = PSPModule(feat_channels, psp_channels)
        self.head = nn.Conv2d(psp_channels, num_classes, kernel_size=1, bias=True)

        dsn_in = 256 * block.expansion                   # layer3 output: 256 / 1024
        dsn_mid = dsn_in // 2                            # 128 / 512
        self.dsn = nn.Sequential(
            nn.Conv2d(dsn_in, dsn_mid, kernel_size=3, padding=1, bias=True),
            ABN(dsn_mid),
            nn.Dropout2d(0.1),
            nn.Conv2d(dsn_mid, num_classes, kernel_size=1, bias=True),
        )
        self.num_classes = num_classes
        self.psp_channels = psp_channels

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                backbone_norm(planes * block.expansion),
            )
        # multi_grid in the original is (1, 1, 1): every block uses the stage's full dilation.
        stage = [block(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor, aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``aux=False`` skips the auxiliary head (its output is then None): the teacher's is never
        used, and it is ~7% of the ResNet-101's multiply-accumulates."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        aux_logits = self.dsn(x) if aux else None
        x = self.layer4(x)
        psp_feature = self.pspmodule(x)
        logits = self.head(psp_feature)
        return logits, aux_logits, psp_feature


def pspnet_resnet18(num_classes: int = 19) -> PSPNet:
    """The student: PSPNet on a deep-stem dilated ResNet-18 (13.07M parameters, 150 state_dict keys)."""
    return PSPNet(BasicBlock, [2, 2, 2, 2], num_classes)


def pspnet_resnet101(num_classes: int = 19) -> PSPNet:
    """The teacher: PSPNet on a deep-stem dilated ResNet-101 (70.44M parameters, 565 state_dict keys)."""
    return PSPNet(Bottleneck, [3, 4, 23, 3], num_classes)

"""Deep-stem dilated ResNet backbones (output stride 8), in two flavours that differ in small ways
that matter for loading their weights:

* the **original CWD / IFVD / SKD** backbone, used inside :class:`cwdseg.models.pspnet.PSPNet`
  (``networks/pspnet.py`` there): InPlace-ABN batch norm (:func:`backbone_norm`, scale ``|w| + eps``),
  ``MaxPool2d(3, 2, 1, ceil_mode=True)`` (a 512 input gives 65x65 maps) and *every* conv of a dilated
  stage at the stage's full dilation;
* the **CIRKD-family** ``resnet18_v1s`` / ``resnet101_v1s`` (:class:`ResNetV1s`, CIRKD
  ``models/base_models/resnetv1b.py``, GluonCV's "v1s" layout): plain ``nn.BatchNorm2d``,
  ``MaxPool2d(3, 2, 1)`` *without* ceil mode (a 512 input gives 64x64 maps), and the GluonCV
  dilation pattern: the first block of the stage of dilation 2 uses dilation 1 where the other
  blocks use 2, and the first block of the stage of dilation 4 uses 2 (see :class:`BasicBlock`).

Both have the same stem (3x3 convs 3->64 stride 2, 64->64, 64->128, each with BN and ReLU, then the
max pool) and the same state_dict key names (``conv1..3``, ``bn1..3``, ``layerL.B.conv*``/``bn*``,
``layerL.0.downsample.{0,1}``); the CIRKD BN layers add ``num_batches_tracked``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cwdseg.models.abn import ABN

NormFactory = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution without bias; padding = dilation keeps the size at stride 1."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     dilation=dilation, bias=False)


def backbone_norm(channels: int) -> ABN:
    """The backbone's BN: the original ``BatchNorm2d = partial(InPlaceABNSync, activation='none')``."""
    return ABN(channels, activation="none")


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs; the stride is on the first.

    ``dilation`` is the first conv's dilation, ``second_dilation`` the second's (default: the same,
    as in the original CWD code; CIRKD's ``BasicBlockV1b`` calls it ``previous_dilation``).
    ``norm`` builds the BN layers (:func:`backbone_norm` = InPlace-ABN, or ``nn.BatchNorm2d``).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: NormFactory = backbone_norm,
                 second_dilation: int | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, 1, dilation if second_dilation is None else second_dilation)
        self.bn2 = norm(planes)
        # inplace is safe: the ReLUs act on fresh BN outputs / sums, whose values backward does not need.
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    """ResNet-50/101 block: 1x1 -> 3x3 (stride and dilation here) -> 1x1 with 4x expansion.
    ``second_dilation`` is accepted for a common signature and unused (only the 3x3 is dilated)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: NormFactory = backbone_norm,
                 second_dilation: int | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


Block = type[BasicBlock] | type[Bottleneck]


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """The CIRKD family's BN: plain ``nn.BatchNorm2d`` (SyncBatchNorm under DDP), eps 1e-5, momentum 0.1."""
    return nn.BatchNorm2d(channels)


class ResNetV1s(nn.Module):
    """CIRKD's ``resnet18_v1s`` / ``resnet101_v1s`` (``ResNetV1b(deep_stem=True, dilated=True)``).

    ``forward(x)`` returns ``(c3, c4)``: the layer3 output (input of the auxiliary FCN head; 256 /
    1024 channels) and the layer4 output (512 / 2048 channels), both at stride 8 (floor):
    512x512 -> 64x64, 1024x2048 -> 128x256. There is no ``fc`` (commented out in CIRKD too).

    Dilations (GluonCV): layer3 blocks ``(1, 2), (2, 2), ...`` and layer4 blocks ``(2, 4), (4, 4), ...``
    as (first conv, second conv) for BasicBlock; for Bottleneck only the 3x3 is dilated, by the first
    number. Strides: layer2 2, layer3 and layer4 1.
    """

    def __init__(self, block: Block, layers: Sequence[int], norm: NormFactory = batch_norm) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {list(layers)}")
        self.inplanes = 128
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = norm(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = norm(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = norm(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # no ceil_mode (unlike the original)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, 1, norm)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, 1, norm)
        self.layer3 = self._make_layer(block, 256, layers[2], 1, 2, norm)
        self.layer4 = self._make_layer(block, 512, layers[3], 1, 4, norm)
        self.stage3_channels = 256 * block.expansion
        self.out_channels = 512 * block.expansion

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int, dilation: int,
                    norm: NormFactory) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm(planes * block.expansion),
            )
        # GluonCV: the first block of a dilated stage enters with half the dilation (1 for 2, 2 for 4).
        first = {1: 1, 2: 1, 4: 2}[dilation]
        stage = [block(self.inplanes, planes, stride, first, downsample, norm, second_dilation=dilation)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, 1, dilation, None, norm, second_dilation=dilation)
                  for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x = self.layer2(self.layer1(x))
        c3 = self.layer3(x)
        return c3, self.layer4(c3)


def resnet18_v1s() -> ResNetV1s:
    """CIRKD's deep-stem dilated ResNet-18 (11.2M parameters, the ``resnet18-imagenet.pth`` layout)."""
    return ResNetV1s(BasicBlock, [2, 2, 2, 2])


def resnet101_v1s() -> ResNetV1s:
    """CIRKD's deep-stem dilated ResNet-101 (the ``resnet101-imagenet.pth`` layout)."""
    return ResNetV1s(Bottleneck, [3, 4, 23, 3])

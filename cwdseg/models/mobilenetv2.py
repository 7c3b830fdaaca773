"""MobileNetV2 dilated to output stride 8, as the CIRKD family uses it (CIRKD
``models/base_models/mobilenetv2.py``: ``MobileNetV2Dilated(dilate_scale=8)``, itself the CSAIL
scene-parsing variant), so that ``mobilenetv2-imagenet.pth`` and CIRKD's students load strictly.

Layout (width 1.0, 18 ``features``; the final 1x1 conv to 1280 and the classifier are *not* built):

* ``features.0``: 3x3 conv 3->32 stride 2, BN, ReLU6 (keys ``features.0.{0,1}``);
* ``features.1..17``: inverted residual blocks with (expansion t, channels c, repeats n, stride s)
  = (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1).
  A block with t = 1 is ``conv.{0: dw 3x3, 1: BN, 2: ReLU6, 3: pw 1x1, 4: BN}``; with t > 1
  ``conv.{0: pw 1x1, 1: BN, 2: ReLU6, 3: dw 3x3, 4: BN, 5: ReLU6, 6: pw-linear 1x1, 7: BN}``.
  The residual is added when the block's *designed* stride is 1 and its input and output widths match.

Dilation to stride 8 (CIRKD's ``_nostride_dilate``): blocks 7..13 get dilation 2 and blocks 14..17
dilation 4, applied to their 3x3 (depthwise) convs only; a block whose designed stride is 2 (7 and
14) gets stride 1 and half the dilation (1 and 2). The output is 320 channels at stride 8:
512x512 -> 64x64, 1024x2048 -> 128x256. BN is plain ``nn.BatchNorm2d``.
"""
from __future__ import annotations

from torch import Tensor, nn

# (expansion t, output channels c, repeats n, stride s), MobileNetV2 paper Table 2.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
OUT_CHANNELS = 320
# Output stride 8: features[7:14] dilated by 2, features[14:] by 4 (CIRKD down_idx = [2, 4, 7, 14]).
DILATION_STARTS = ((7, 2), (14, 4))


def block_dilation(index: int) -> int:
    """The dilation CIRKD's stride-8 MobileNetV2 gives to the dw conv of ``features[index]`` before
    the stride-2 rule (which halves it for the first block of a dilated range)."""
    dilation = 1
    for start, d in DILATION_STARTS:
        if index >= start:
            dilation = d
    return dilation


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [pw 1x1 expand -> BN -> ReLU6] -> dw 3x3 -> BN -> ReLU6 -> pw 1x1 -> BN.

    ``stride`` is the designed stride (it decides the residual); ``dw_stride``/``dilation`` are those
    the depthwise conv really uses after dilation to output stride 8.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, dw_stride: int | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        dw_stride = stride if dw_stride is None else dw_stride
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, dw_stride, dilation, dilation=dilation, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Features(nn.Module):
    """The ``features`` of MobileNetV2 (keys ``features.*``, the ``mobilenetv2-imagenet.pth`` layout),
    dilated to output stride 8 when ``dilated`` (the default)."""

    def __init__(self, dilated: bool = True) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, 3, 2, 1, bias=False), nn.BatchNorm2d(STEM_CHANNELS),
                             nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = [stem]
        inp = STEM_CHANNELS
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                stride = s if i == 0 else 1
                index = len(blocks)
                d = block_dilation(index) if dilated else 1
                if d > 1:
                    # stride-2 block at the start of a dilated range: stride 1, half dilation
                    dw_stride, dilation = (1, d // 2) if stride == 2 else (1, d)
                else:
                    dw_stride, dilation = stride, 1
                blocks.append(InvertedResidual(inp, c, stride, t, dw_stride, dilation))
                inp = c
        self.features = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class MobileNetV2Dilated(nn.Module):
    """CIRKD's backbone wrapper: the features live under ``net`` (keys ``net.features.*``).

    ``forward(x)`` returns ``(None, c4)``, the same ``(stage-3 map, final map)`` pair as
    :class:`cwdseg.models.resnet.ResNetV1s`; MobileNetV2 students have no auxiliary head (as in CIRKD).
    """

    stage3_channels = None
    out_channels = OUT_CHANNELS

    def __init__(self) -> None:
        super().__init__()
        self.net = MobileNetV2Features(dilated=True)

    def forward(self, x: Tensor) -> tuple[None, Tensor]:
        return None, self.net(x)

"""The feature connector of CWD on the PSP feature (``--cwd-feat True``).

The student's PSP feature has 128 channels (R18), the teacher's 512 (R101): a 1x1 conv maps the
student to the teacher's width before the channel-wise distillation. For other pairs the widths come
from ``cwdseg.models.FEATURE_CHANNELS`` (e.g. 128 -> 256 for DeepLabV3-R18 <- DeepLabV3-R101). Layout of the original
``NetModel.linear``: ``Sequential(Conv2d(128, 512, 1, bias=False), InPlaceABNSync(512), ReLU)``,
so the state_dict keys are ``0.weight``, ``1.weight``, ``1.bias``, ``1.running_mean``,
``1.running_var``. (The original never saved it, nor decayed its learning rate.)
"""
from __future__ import annotations

from torch import nn

from cwdseg.models.abn import ABN


class FeatureConnector(nn.Sequential):
    """1x1 conv (no bias) -> ABN (leaky ReLU 0.01) -> ReLU, mapping [N, in, H, W] to [N, out, H, W].

    The ReLU after a leaky-ReLU ABN is redundant-looking but is what the original trained with: the
    result is a plain ReLU of the normalised conv output.
    """

    def __init__(self, in_channels: int = 128, out_channels: int = 512) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False),
            ABN(out_channels, activation="leaky_relu", slope=0.01),
            nn.ReLU(inplace=False),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels

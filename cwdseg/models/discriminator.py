"""The SAGAN-style critic of the original holistic (adversarial) distillation.

It scores a whole 19-channel logit map: the teacher's maps are "real", the student's "fake"
(WGAN-GP, see ``cwdseg.distill.adversarial``). Architecture as the original ``networks/sagan_models.py`` with
``preprocess_GAN_mode=1`` and ``imsize=65``::

    BatchNorm2d(19)                                   preprocess_additional
    SN-Conv(19->64,  k4 s2 p1) + LeakyReLU(0.1)       l1      65 -> 32
    SN-Conv(64->128, k4 s2 p1) + LeakyReLU(0.1)       l2      32 -> 16
    SN-Conv(128->256,k4 s2 p1) + LeakyReLU(0.1)       l3      16 -> 8
    SelfAttention(256)                                attn1
    SN-Conv(256->512,k4 s2 p1) + LeakyReLU(0.1)       l4       8 -> 4
    SelfAttention(512)                                attn2
    Conv(512->1, k4)                                  last     4 -> 1

Departures from the original (for the README):

* Spectral norm is ``torch.nn.utils.parametrizations.spectral_norm`` (one power iteration per
  forward *in train mode*; the stored u, v are used unchanged in eval mode) instead of the original
  custom module, which also iterated in eval mode. Key names differ accordingly
  (``l1.0.parametrizations.weight.original`` / ``...weight.0._u`` / ``._v`` instead of
  ``l1.0.module.weight_bar`` / ``weight_u`` / ``weight_v``); :func:`convert_original_state_dict`
  maps an original ``*_D.pth`` file.
* ``forward`` returns the scores as a [N] vector (the original returned ``[out [N,1,1,1], attn1,
  attn2]``). For inputs larger than 65x65 the final map has more than one position and the score
  is its mean (the original's ``-mean`` over the WGAN terms averaged them the same way).
* The forward runs in float32 with autocast disabled, whatever the caller's precision: the
  gradient penalty's double backward through attention and spectral norm is fragile in bf16/fp16,
  and D is tiny next to the segmentation networks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

# Four stride-2 convs (k4, p1) halve the side (floor), then a 4x4 valid conv: the side must be >= 64.
MIN_INPUT_SIZE = 64


class SelfAttention(nn.Module):
    """SAGAN self-attention: ``out = gamma * attention(x) + x`` with gamma initialised to 0.

    query/key: 1x1 convs to C // 8; value: 1x1 conv to C. The attention is a softmax over the H*W
    key positions for each query position.
    """

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        if in_dim < 8:
            raise ValueError(f"SelfAttention needs at least 8 channels (query/key use C // 8); got {in_dim}")
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q = self.query_conv(x).flatten(2).transpose(1, 2)  # [n, hw, c/8]
        k = self.key_conv(x).flatten(2)  # [n, c/8, hw]
        attention = torch.softmax(torch.bmm(q, k), dim=-1)  # [n, hw(query), hw(key)]
        v = self.value_conv(x).flatten(2)  # [n, c, hw]
        out = torch.bmm(v, attention.transpose(1, 2)).view(n, c, h, w)
        return self.gamma * out + x


def _sn_block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(spectral_norm(nn.Conv2d(in_ch, out_ch, 4, 2, 1)), nn.LeakyReLU(0.1))


class Discriminator(nn.Module):
    """WGAN critic on [N, in_channels, H, W] logit maps (H, W >= 64; 65x65 in the recipe).

    Args:
        in_channels: channels of the scored maps (19 classes).
        conv_dim: width of the first conv; the widths are conv_dim * (1, 2, 4, 8) (64..512).
        image_size: the side of the maps the critic is meant for (65 for a 512 crop); checked to be
            >= 64, recorded in ``repr``. Inputs of any size >= 64 are accepted.

    ``forward(x) -> Tensor [N]``: one score per sample, float32.
    """

    def __init__(self, in_channels: int = 19, conv_dim: int = 64, image_size: int = 65) -> None:
        super().__init__()
        if image_size < MIN_INPUT_SIZE:
            raise ValueError(
                f"Discriminator: image_size {image_size} is too small; the critic needs maps of at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (a 512x512 crop gives 65x65 logits)"
            )
        self.in_channels = in_channels
        self.conv_dim = conv_dim
        self.image_size = image_size
        # Key name of the original (preprocess_GAN_mode 1 = BatchNorm on the input).
        self.preprocess_additional = nn.BatchNorm2d(in_channels)
        self.l1 = _sn_block(in_channels, conv_dim)
        self.l2 = _sn_block(conv_dim, conv_dim * 2)
        self.l3 = _sn_block(conv_dim * 2, conv_dim * 4)
        self.l4 = _sn_block(conv_dim * 4, conv_dim * 8)
        self.last = nn.Sequential(nn.Conv2d(conv_dim * 8, 1, 4))
        self.attn1 = SelfAttention(conv_dim * 4)
        self.attn2 = SelfAttention(conv_dim * 8)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, conv_dim={self.conv_dim}, image_size={self.image_size}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Discriminator expects [N, {self.in_channels}, H, W] maps; got shape {tuple(x.shape)}")
        if min(x.shape[2], x.shape[3]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"Discriminator: input {tuple(x.shape)} is smaller than {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; the "
                "holistic (--adv) loss needs logit maps of at least 64x64, i.e. a crop of about 505x505 or more"
            )
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.preprocess_additional(x.float())
            out = self.l3(self.l2(self.l1(out)))
            out = self.attn1(out)
            out = self.attn2(self.l4(out))
            out = self.last(out)
            return out.flatten(1).mean(dim=1)


def convert_original_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an original ``city_*_D.pth`` state_dict (custom ``SpectralNorm`` wrapper) to this layout.

    ``lK.0.module.weight_bar`` -> ``lK.0.parametrizations.weight.original``,
    ``lK.0.module.weight_u`` / ``weight_v`` -> ``lK.0.parametrizations.weight.0._u`` / ``._v``,
    ``lK.0.module.bias`` -> ``lK.0.bias``; every other key is unchanged. Raises ``KeyError`` naming a
    key with the ``module.`` wrapper that it does not know.
    """
    renames = {
        "module.weight_bar": "parametrizations.weight.original",
        "module.weight_u": "parametrizations.weight.0._u",
        "module.weight_v": "parametrizations.weight.0._v",
        "module.bias": "bias",
    }
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, sep, rest = key.partition(".0.module.")
        if not sep:
            out[key] = value
            continue
        suffix = "module." + rest
        if suffix not in renames:
            raise KeyError(f"convert_original_state_dict: unexpected spectral-norm key {key!r}")
        out[f"{prefix}.0.{renames[suffix]}"] = value
    return out

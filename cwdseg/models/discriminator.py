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

Spectral norm is :class:`cwdseg.models.spectral_norm.SpectralNorm`, which reproduces the original's
(power-iteration order, one iteration per forward, the u, v of the last forward shared by the backward
passes of one step, the state_dict keys ``lK.0.module.weight_bar`` / ``weight_u`` / ``weight_v`` /
``bias``): an original ``*_D.pth`` loads strictly. Its module docstring lists what differs (u, v as
buffers; no iteration in eval mode).

Departures from the original (for the README):

* ``forward`` returns the scores as a [N] vector, the mean of each sample's output map (the original
  returned ``[out [N,1,h,w], attn1, attn2]``); :meth:`Discriminator.output_map` returns the map
  itself. The map is 1x1 for inputs up to 79x79 (crops up to 630 px; 65x65 for the recipe's 512),
  2x2 from 80x80, 3x3 at 96x96 / 97x97 (a 769 crop), 1x5 at 65x129 (a 512x1024 crop). The WGAN
  terms' mean over samples of per-sample means equals the original's mean over the whole map; the
  gradient penalty, which differentiates the *sum* of the map, uses the map
  (``cwdseg.distill.adversarial.gradient_penalty``).
* The forward runs in float32 with autocast disabled, whatever the caller's precision: the
  gradient penalty's double backward through attention and spectral norm is fragile in bf16/fp16,
  and D is tiny next to the segmentation networks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cwdseg.models.spectral_norm import SpectralNorm

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
    return nn.Sequential(SpectralNorm(nn.Conv2d(in_ch, out_ch, 4, 2, 1)), nn.LeakyReLU(0.1))


class Discriminator(nn.Module):
    """WGAN critic on [N, in_channels, H, W] logit maps (H, W >= 64; 65x65 in the recipe).

    Args:
        in_channels: channels of the scored maps (19 classes).
        conv_dim: width of the first conv; the widths are conv_dim * (1, 2, 4, 8) (64..512).
        image_size: the side of the maps the critic is meant for (65 for a 512 crop); checked to be
            >= 64, recorded in ``repr``. Inputs of any size >= 64 are accepted.

    ``forward(x) -> Tensor [N]``: one score per sample (the mean of its output map), float32.
    ``output_map(x) -> Tensor [N, 1, h, w]``: the output map itself, what the gradient penalty uses.
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

    def output_map(self, x: Tensor) -> Tensor:
        """The critic's output map [N, 1, h, w] in float32 (the original's ``out``: 1x1 for inputs up to
        79x79, 3x3 for 97x97). The gradient penalty differentiates its sum, as the original does."""
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
            return self.last(out)

    def forward(self, x: Tensor) -> Tensor:
        """Scores [N]: the mean of each sample's output map (the WGAN terms average the map the same way)."""
        return self.output_map(x).flatten(1).mean(dim=1)


# The key layout this project wrote before it had its own spectral norm (PyTorch's parametrization),
# mapped to the original's, which is ours.
_PARAMETRIZATION_KEYS = {
    "parametrizations.weight.original": "module.weight_bar",
    "parametrizations.weight.0._u": "module.weight_u",
    "parametrizations.weight.0._v": "module.weight_v",
}


def convert_original_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A discriminator state_dict in the layout of :class:`Discriminator`, which is the original's.

    An original ``city_*_D.pth`` needs no conversion and is returned unchanged (as a new dict); it
    loads with ``load_state_dict(..., strict=True)``. A file written by earlier versions of this
    project (PyTorch's spectral-norm parametrization: ``lK.0.parametrizations.weight.original`` /
    ``...weight.0._u`` / ``._v`` and ``lK.0.bias``) is renamed to ``lK.0.module.weight_bar`` /
    ``weight_u`` / ``weight_v`` / ``bias``. Raises ``KeyError`` naming a parametrization key it does
    not know.
    """
    legacy_layers = {key.partition(".0.parametrizations.")[0] for key in state_dict if ".0.parametrizations." in key}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        prefix, sep, rest = key.partition(".0.")
        if not sep or prefix not in legacy_layers:
            out[key] = value
        elif rest == "bias":
            out[f"{prefix}.0.module.bias"] = value
        elif rest in _PARAMETRIZATION_KEYS:
            out[f"{prefix}.0.{_PARAMETRIZATION_KEYS[rest]}"] = value
        else:
            raise KeyError(f"convert_original_state_dict: unexpected spectral-norm key {key!r}")
    return out

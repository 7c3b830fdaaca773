"""Masked generative distillation (MGD, Yang et al., ECCV 2022) and its random spatial mask."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size
from cwdseg.distill._pixel import wide
from cwdseg.distill.options import Option, resolve_options


def random_keep_mask(x: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """A [N, 1, H, W] 0/1 mask in ``x``'s dtype: u ~ U[0, 1) per position, kept (1) where u <= 1 - ratio.

    MGD's ``torch.where(rand > 1 - lambda_mgd, 0, 1)``: a fraction ``ratio`` of the positions is
    masked. With ``generator`` (a CPU ``torch.Generator``) the draw is reproducible.
    """
    n, _, h, w = x.shape
    if generator is None:
        u = torch.rand((n, 1, h, w), device=x.device)
    else:
        u = torch.rand((n, 1, h, w), generator=generator).to(x.device)
    return (u <= 1 - ratio).to(x.dtype)


def align_conv(student_channels: int, teacher_channels: int) -> nn.Module:
    """MGD's / Af-DCD's alignment: a 1x1 conv with bias from Cs to Ct, or the identity when they agree
    (MGD skips it then; Af-DCD's code has no layer at all then and crashes, fixed here)."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1)


def plain_generator(channels: int) -> nn.Sequential:
    """3x3 conv -> ReLU -> 3x3 conv, with biases, Ct -> Ct (MGD's ``generation``, Af-DCD's ``projetor``)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


class CriterionMGD(nn.Module):
    r"""MGD: mask the aligned student feature at random positions, regenerate the teacher feature.

    With a the 1x1 alignment conv (only when Cs != Ct), M a [N, 1, H, W] keep-mask (each position
    dropped with probability ``mask_ratio``) and G the generator (3x3 conv, ReLU, 3x3 conv):

    .. math:: L = \frac{\alpha}{N} \sum_{n,c,h,w} \big(G(a(S) \odot M) - T\big)^2_{n,c,h,w}

    a sum over all elements divided by the batch only (``MSELoss(reduction='sum') / N``), reference
    ``yzd-v/MGD`` ``seg/mmseg/distillation/losses/mgd.py`` ``FeatureLoss`` with its Cityscapes
    config (``alpha_mgd = 2e-5``, ``lambda_mgd = 0.75`` = ``mask_ratio``). The authors apply it to the
    last **backbone** stage (R18 512 -> R101 2048 channels) and add 3 x CWD (tau 4) on the logits.

    Owns ``align`` and ``generator`` (trainable; build with the two widths). The generator runs under
    the caller's autocast; the squared error is reduced in float32 (float64 stays float64). Pass
    ``mask=`` ([N,1,H,W], 1 = keep) to fix the draw, or give the module a ``torch.Generator``
    (attribute ``rng``).

    ``forward(s [N,Cs,h,w], t [N,Ct,H,W], labels=None, mask=None) -> scalar``.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "alpha": Option(2e-5, low=0, low_open=True, help="alpha_mgd, the weight of the summed squared error"),
        "mask_ratio": Option(0.75, low=0, high=1, high_open=True, help="lambda_mgd, the fraction of masked positions"),
    }

    def __init__(self, student_channels: int, teacher_channels: int, alpha: float = 2e-5,
                 mask_ratio: float = 0.75, rng: torch.Generator | None = None) -> None:
        super().__init__()
        o = resolve_options("CriterionMGD", self.OPTIONS, {"alpha": alpha, "mask_ratio": mask_ratio})
        self.alpha, self.mask_ratio = o["alpha"], o["mask_ratio"]
        self.align = align_conv(student_channels, teacher_channels)
        self.generator = plain_generator(teacher_channels)
        self.rng = rng

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, mask_ratio={self.mask_ratio}"

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        s = _match_size(s, t, True, "CriterionMGD")
        aligned = self.align(s)
        if mask is None:
            mask = random_keep_mask(aligned, self.mask_ratio, self.rng)
        new = self.generator(aligned * mask.to(aligned.dtype))
        with _fp32_region(s.device):
            return self.alpha * (wide(new) - wide(t.detach())).pow(2).sum() / t.shape[0]

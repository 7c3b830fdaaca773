"""Augmentation-free dense contrastive distillation (Af-DCD, Fan et al., NeurIPS 2023)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size
from cwdseg.distill._pixel import wide
from cwdseg.distill.mgd import align_conv, plain_generator, random_keep_mask
from cwdseg.distill.options import Option, resolve_options


class EnhancedProjector(nn.Module):
    """Af-DCD's ``EnhancedProjector``: two 3x3 conv+ReLU blocks, a 3x3 adaptor on each, averaged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.block_2 = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.adaptor_1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.adaptor_2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.block_1(x)
        x2 = self.block_2(x1)
        return (self.adaptor_1(x1) + self.adaptor_2(x2)) / 2


def patch_group_vectors(x: Tensor, groups: int, patch: int) -> Tensor:
    """[N, C, H, W] -> [N * (H/p) * (W/p), p*p*groups, C/groups]: inside each p x p patch, one vector
    per (position, channel group), position-major (row index = position * groups + group), the
    layout of Af-DCD's ``_to_ctr_format``. H and W must be multiples of p, C of ``groups``."""
    n, c, h, w = x.shape
    d = c // groups
    x = x.reshape(n, groups, d, h // patch, patch, w // patch, patch)
    # -> n, hp, wp, py, px, group, d
    x = x.permute(0, 3, 5, 4, 6, 1, 2)
    return x.reshape(n * (h // patch) * (w // patch), patch * patch * groups, d)


def omni_contrastive(preds: Tensor, targets: Tensor, groups: int, patch: int, pool: int, tau: float) -> Tensor:
    r"""Af-DCD's contrastive term: both maps max-pooled by ``pool`` (none at 0), cut into p x p patches;
    in each patch every (position, channel-group) vector of ``preds`` is an anchor whose positive is
    the ``targets`` vector at the same position and group and whose negatives are the ``targets``
    vectors of every *other* group at any position of the patch; similarity = minus the L1 distance:

    .. math:: L = \frac{1}{N h w} \sum_{\text{anchors } a} -\log
              \frac{e^{-\|x_a - y_a\|_1/\tau}}{e^{-\|x_a - y_a\|_1/\tau}
              + \sum_{b: g(b) \ne g(a)} e^{-\|x_a - y_b\|_1/\tau}}

    with h, w the pooled size (``CrossEntropyLoss(reduction='sum') / (H*W)`` then ``/ BS``). Pooled rows
    and columns beyond the last whole patch are dropped (the authors' ``view`` fails on them).
    """
    if pool:
        preds, targets = F.max_pool2d(preds, pool), F.max_pool2d(targets, pool)
    n, c, h, w = preds.shape
    h, w = h - h % patch, w - w % patch
    if h == 0 or w == 0:
        raise ValueError(f"Af-DCD contrast: the pooled map {tuple(preds.shape)} is smaller than one "
                         f"{patch}x{patch} patch")
    preds, targets = preds[:, :, :h, :w], targets[:, :, :h, :w]
    x = patch_group_vectors(preds, groups, patch)
    y = patch_group_vectors(targets, groups, patch)
    sim = -torch.cdist(x, y, p=1) / tau                                # [R, A, A]
    group = torch.arange(x.shape[1], device=x.device) % groups
    other_group = group[:, None] != group[None, :]                     # negatives; excludes the diagonal
    positive = sim.diagonal(dim1=1, dim2=2)                            # [R, A]
    negatives = sim.masked_fill(~other_group, float("-inf"))
    log_denominator = torch.logsumexp(torch.cat([positive[..., None], negatives], dim=2), dim=2)
    return (log_denominator - positive).sum() / (n * h * w)


class CriterionAfDCD(nn.Module):
    r"""Af-DCD: masked feature reconstruction (as MGD) plus the omni-contrastive term on the
    reconstruction, reference ``OSVAI/Af-DCD`` ``losses/ocmgd.py`` ``OmniContrastiveFeatureLoss``.

    With a the 1x1 alignment (Cs != Ct only), M the keep-mask (``mask_ratio`` of the positions
    dropped; ``rand_mask=False``: the central third of H and W dropped instead) and P the projector:

    .. math:: R = P(a(S) \odot M),\quad L_{fd} = \frac{1}{N}\sum (R - T)^2,\quad
              L_{ctr} = \text{omni\_contrastive}(R, T),\quad L = \lambda_{fd} L_{fd} + \lambda_{ctr} L_{ctr}

    (:func:`omni_contrastive`: 4x max-pool, 4x4 patches, 16 channel groups, tau 0.07). Cityscapes
    weights of the authors' script: ``fd`` = 2e-6, ``ctr`` = 0.005, next to pixel KD 1 at T = 1 and
    gradient clipping of this module's parameters at norm 15 (``GRAD_CLIP_NORM``, for the caller).
    Their feature is the backbone's last stage (c4). Their script's ``--rand_mask False
    --enhance_projector True`` are rejected by their own argparse (``--rand-mask``, ``--enhance-projector``),
    so the defaults here are what their parser uses: random mask, plain projector (both options).

    ``forward(s [N,Cs,h,w], t [N,Ct,H,W], labels=None, mask=None) -> scalar``; ``parts(...)`` returns
    ``{"fd", "ctr"}`` unweighted. Ct must be a multiple of ``groups``.
    """

    GRAD_CLIP_NORM: ClassVar[float] = 15.0
    OPTIONS: ClassVar[dict[str, Option]] = {
        "fd": Option(2e-6, low=0, help="lambda_fd, weight of the summed squared reconstruction error"),
        "ctr": Option(0.005, low=0, help="lambda_ctr, weight of the contrastive term"),
        "mask_ratio": Option(0.75, low=0, high=1, high_open=True, help="fraction of masked positions"),
        "tau": Option(0.07, low=0, low_open=True, help="temperature of the contrastive term"),
        "groups": Option(16, low=1, help="channel groups M"),
        "patch": Option(4, low=1, help="patch side (positions per patch = patch**2)"),
        "pool": Option(4, low=0, help="max-pool kernel before the contrast (0: none)"),
        "rand_mask": Option(True, help="random mask (else the central third)"),
        "projector": Option("plain", choices=("plain", "enhanced"), help="projector P"),
    }

    def __init__(self, student_channels: int, teacher_channels: int, rng: torch.Generator | None = None,
                 **options: object) -> None:
        super().__init__()
        o = resolve_options("CriterionAfDCD", self.OPTIONS, options)
        if teacher_channels % o["groups"]:
            raise ValueError(f"CriterionAfDCD: teacher channels {teacher_channels} are not a multiple of "
                             f"groups={o['groups']}; choose groups dividing {teacher_channels}")
        self.options = o
        self.align = align_conv(student_channels, teacher_channels)
        self.projector = (plain_generator(teacher_channels) if o["projector"] == "plain"
                          else EnhancedProjector(teacher_channels))
        self.rng = rng

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())

    def _mask(self, x: Tensor) -> Tensor:
        if self.options["rand_mask"]:
            return random_keep_mask(x, self.options["mask_ratio"], self.rng)
        n, _, h, w = x.shape
        mask = torch.ones((n, 1, h, w), dtype=x.dtype, device=x.device)
        mask[:, :, h // 3:2 * h // 3, w // 3:2 * w // 3] = 0
        return mask

    def parts(self, s: Tensor, t: Tensor, labels: Tensor | None = None,
              mask: Tensor | None = None) -> dict[str, Tensor]:
        s = _match_size(s, t, True, "CriterionAfDCD")
        aligned = self.align(s)
        if mask is None:
            mask = self._mask(aligned)
        rec = self.projector(aligned * mask.to(aligned.dtype))
        o = self.options
        with _fp32_region(s.device):
            rec, t = wide(rec), wide(t.detach())
            fd = (rec - t).pow(2).sum() / t.shape[0]
            ctr = omni_contrastive(rec, t, o["groups"], o["patch"], o["pool"], o["tau"])
        return {"fd": fd, "ctr": ctr}

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        p = self.parts(s, t, labels, mask)
        return self.options["fd"] * p["fd"] + self.options["ctr"] * p["ctr"]

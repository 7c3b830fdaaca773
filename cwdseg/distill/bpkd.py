"""Boundary-privileged KD (BPKD, Liu et al., WACV 2024): an edge loss on the label boundaries and a
body loss inside the regions, written from the paper (its authors released evaluation code only)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size
from cwdseg.distill._pixel import pixel_kl, wide
from cwdseg.distill.options import Option, resolve_options

EDGE_NORMS = ("mass", "count", "pixels")


def edge_band(labels: Tensor, num_classes: int, ignore_label: int, kernel: int, size: tuple[int, int],
              dtype: torch.dtype = torch.float32) -> Tensor:
    """The soft edge mask [N, 1, h, w] in [0, 1]: per class, dilation minus erosion of the one-hot label
    with a ``kernel`` x ``kernel`` window (stride 1; the image border neither dilates nor erodes), the
    maximum over classes (1 on a band around every class boundary), then area-averaged to ``size``
    (``adaptive_avg_pool2d``, the logit size). Ignored pixels belong to no class (a zero one-hot), so
    the border of an ignored region is an edge too."""
    if labels.dim() != 3:
        raise ValueError(f"BPKD: labels must be [N, H, W]; got shape {tuple(labels.shape)}")
    lab = labels.long()
    valid = (lab != ignore_label) & (lab >= 0) & (lab < num_classes)
    onehot = F.one_hot(torch.where(valid, lab, 0), num_classes).permute(0, 3, 1, 2).to(dtype)
    onehot = onehot * valid[:, None]
    pad = kernel // 2
    dilated = F.max_pool2d(onehot, kernel, stride=1, padding=pad)
    eroded = -F.max_pool2d(-onehot, kernel, stride=1, padding=pad)
    band = (dilated - eroded).amax(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(band, size)


class CriterionBPKD(nn.Module):
    r"""BPKD's edge and body losses on the logits (paper: Liu et al., "BPKD: Boundary Privileged
    Knowledge Distillation for Semantic Segmentation", WACV 2024; ``AkideLiu/BPKD`` has no training
    code, so this follows the paper's description and its reported settings).

    With m the soft edge mask of :func:`edge_band` (7-pixel window, at the logit size):

    * edge loss, per-pixel KL on edge-masked logits, weighted by the mask again:

      .. math:: L_{edge} = \alpha\, T^2 \frac{\sum_i m_i\, \mathrm{KL}\big(\mathrm{softmax}(m_i z^T_i / T)
                \,\|\, \mathrm{softmax}(m_i z^S_i / T)\big)}{D}

      with D = ``edge_norm``: ``"mass"`` sum of m (default), ``"count"`` number of pixels with m > 0,
      ``"pixels"`` N*H*W (public ports disagree; 0 when the mask is empty). The paper's "class weight"
      alpha = 2 is applied here as a factor of the edge loss (its role is not specified further);
    * body loss, CWD (channel softmax over H*W at T, KL, T**2 / (N*K)) on (1 - m) * z for both maps.

    :math:`L = \lambda_{edge} L_{edge} + \lambda_{body} L_{body}`, reported λ_edge = 50, λ_body = 20, T = 1.

    ``forward(s [N,K,h,w], t [N,K,H,W], labels [N,H0,W0]) -> scalar``; ``parts`` gives both, unweighted.
    Teacher detached; float32 (float64 stays) with autocast off.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "edge": Option(50.0, low=0, help="lambda_edge"),
        "body": Option(20.0, low=0, help="lambda_body"),
        "alpha": Option(2.0, low=0, help="the paper's class weight, a factor of the edge loss"),
        "T": Option(1.0, low=0, low_open=True, help="temperature of both losses"),
        "kernel": Option(7, low=1, help="window of the dilation / erosion (odd)"),
        "edge_norm": Option("mass", choices=EDGE_NORMS, help="denominator of the edge loss"),
    }

    def __init__(self, num_classes: int, ignore_label: int = 255, **options: object) -> None:
        super().__init__()
        o = resolve_options("CriterionBPKD", self.OPTIONS, options)
        if o["kernel"] % 2 == 0:
            raise ValueError(f"CriterionBPKD: option kernel must be odd, got {o['kernel']}")
        self.options, self.num_classes, self.ignore_label = o, int(num_classes), int(ignore_label)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, " + ", ".join(f"{k}={v}" for k, v in self.options.items())

    def parts(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        if labels is None:
            raise ValueError("CriterionBPKD needs the labels (its edge band comes from them); pass labels=")
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"CriterionBPKD: class counts differ: student {tuple(s.shape)} "
                             f"vs teacher {tuple(t.shape)}")
        o, T = self.options, self.options["T"]
        with _fp32_region(s.device):
            t = wide(t.detach())
            s = _match_size(wide(s), t, True, "CriterionBPKD")
            n, k, h, w = t.shape
            m = edge_band(labels.to(t.device), self.num_classes, self.ignore_label, o["kernel"], (h, w), t.dtype)
            kl = pixel_kl(m * s, m * t, T) * m[:, 0]
            denominator = {"mass": m.sum(), "count": (m > 0).sum().to(t.dtype),
                           "pixels": torch.tensor(float(n * h * w), dtype=t.dtype, device=t.device)}[o["edge_norm"]]
            edge = o["alpha"] * T ** 2 * kl.sum() / denominator.clamp(min=torch.finfo(t.dtype).tiny)
            bs, bt = ((1 - m) * s).flatten(2) / T, ((1 - m) * t).flatten(2) / T
            ls, lt = F.log_softmax(bs, dim=2), F.log_softmax(bt, dim=2)
            body = (lt.exp() * (lt - ls)).sum() * T ** 2 / (n * k)
        return {"edge": edge, "body": body}

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        p = self.parts(s, t, labels)
        return self.options["edge"] * p["edge"] + self.options["body"] * p["body"]

"""Attention transfer ("AT" in the CWD paper's Table 2; Zagoruyko & Komodakis, ICLR 2017)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size


class CriterionAT(nn.Module):
    r"""Attention transfer on one map (logits or head feature), CIRKD's normalisation.

    The spatial attention of a map z [N, C, H, W] is the channel mean of its p-th power, flattened
    and L2-normalised over the H*W positions:

    .. math:: a_{n} = \frac{q_n}{\lVert q_n \rVert_2},\quad q_{n,i} = \frac{1}{C}\sum_c z_{n,c,i}^p

    .. math:: L = \frac{1}{N H W} \sum_{n,i} (a^S_{n,i} - a^T_{n,i})^2

    Reference: ``winycg/CIRKD`` ``losses/at.py`` (mean of the squared difference of the normalised
    maps, p = 2, used with lambda_at = 10000 there). The AT paper writes ``beta/2 * ||a_S - a_T||_p``
    per layer with beta = 1000 and no mean; the literature disagrees on the normalisation, and we
    follow CIRKD because it is the segmentation implementation the later tables were run with.
    Channels need not agree (the attention is a channel mean); the registry still puts a connector
    before it on features of different widths, because the CWD paper's Table 2 marks AT so. Teacher detached;
    float32 with autocast off.

    ``forward(s [N,Cs,H,W], t [N,Ct,H',W'], labels=None) -> scalar``; ``resize=True`` resizes the
    student map to the teacher's spatial size when they differ.
    """

    def __init__(self, p: float = 2.0, resize: bool = True) -> None:
        super().__init__()
        if not p > 0:
            raise ValueError(f"CriterionAT: p must be > 0, got {p!r}")
        self.p, self.resize = float(p), resize

    def extra_repr(self) -> str:
        return f"p={self.p}, resize={self.resize}"

    def attention(self, x: Tensor) -> Tensor:
        """The normalised attention [N, H*W] of a map [N, C, H, W]."""
        return F.normalize(x.pow(self.p).mean(dim=1).flatten(1), p=2, dim=1)

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        with _fp32_region(s.device):
            t = t.detach().float()
            s = _match_size(s.float(), t, self.resize, "CriterionAT")
            return (self.attention(s) - self.attention(t)).pow(2).mean()

"""Local similarity distillation ("LOCAL" in the CWD paper's Table 2; Xie et al., BMVC 2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size

# The 8-neighbourhood, as (dy, dx) offsets.
NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


class CriterionLocal(nn.Module):
    r"""Local similarity: the Euclidean distances between each pixel and its 8 neighbours, matched.

    For a map z [N, C, H, W] and every interior position (h, w) (1 <= h <= H-2, 1 <= w <= W-2, so
    that all 8 neighbours exist) and offset k = (dy, dx) of the 8-neighbourhood:

    .. math:: d_{n,k,h,w} = \lVert z_{n,:,h,w} - z_{n,:,h+dy,w+dx} \rVert_2

    .. math:: L = \frac{1}{8 N (H-2)(W-2)} \sum_{n,k,h,w} (d^S_{n,k,h,w} - d^T_{n,k,h,w})^2

    The CWD paper describes [34] as "the Euclidean distance between the center pixel and the
    8-neighborhood pixels is used as knowledge"; no reference implementation was published, so the
    choices here are ours and said: the raw distance (``normalize=True`` first L2-normalises each
    pixel's vector over channels, which makes maps of different widths comparable), interior
    positions only (no padding), mean of the squared differences. No connector (distances compare
    maps of any channel count). Teacher detached; float32 with autocast off.

    ``forward(s [N,Cs,H,W], t [N,Ct,H',W'], labels=None) -> scalar``; maps need H, W >= 3.
    """

    def __init__(self, normalize: bool = False, resize: bool = True) -> None:
        super().__init__()
        self.normalize, self.resize = bool(normalize), resize

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, resize={self.resize}"

    def distances(self, x: Tensor) -> Tensor:
        """[N, 8, H-2, W-2]: the distance of each interior pixel to each of its 8 neighbours."""
        n, c, h, w = x.shape
        if h < 3 or w < 3:
            raise ValueError(f"CriterionLocal needs maps of at least 3x3; got {tuple(x.shape)}")
        if self.normalize:
            x = F.normalize(x, p=2, dim=1)
        centre = x[:, :, 1:h - 1, 1:w - 1]
        out = [torch.linalg.vector_norm(centre - x[:, :, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx], dim=1)
               for dy, dx in NEIGHBOURS]
        return torch.stack(out, dim=1)

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        with _fp32_region(s.device):
            t = t.detach().float()
            s = _match_size(s.float(), t, self.resize, "CriterionLocal")
            return (self.distances(s) - self.distances(t)).pow(2).mean()

"""Pair-wise affinity distillation ("PA" in the CWD paper's Table 2; SKD, Liu et al., CVPR 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size


class CriterionPairWise(nn.Module):
    r"""SKD's pair-wise similarity over max-pooled nodes (``CriterionPairWiseforWholeFeatAfterPool``).

    Both maps are max-pooled with a square-ish window of ``(int(H*scale), int(W*scale))`` (stride the
    same, ``ceil_mode=True``; H, W the teacher's), giving M = H'*W' nodes. Each node's vector is
    divided by its L2 norm over channels (+1e-8); the affinity is a_{n,i,j} = f_{n,:,i} . f_{n,:,j}:

    .. math:: L = \frac{1}{N M^2} \sum_{n,i,j} (a^T_{n,i,j} - a^S_{n,i,j})^2

    Reference: ``irfanICMLL/structure_knowledge_distillation`` ``utils/criterion.py``
    (``sim_dis_compute``: squared error / (H'W')^2 / N, summed), scale 0.5 and lambda_pa = 0.5 in
    its ``run_train_val.sh``; for a 65x65 map the window is 32 and M = 3x3 = 9. As there, the norm
    the vectors are divided by is *detached* (it is a constant in the backward pass); CIRKD's
    ``losses/skd.py`` instead uses ``F.normalize`` with gradient and a fixed 2x2 window, and a
    plain mean. No connector (affinities compare maps of any channel count). Teacher detached;
    float32 with autocast off.

    ``forward(s [N,Cs,H,W], t [N,Ct,H',W'], labels=None) -> scalar``.
    """

    def __init__(self, scale: float = 0.5, resize: bool = True) -> None:
        super().__init__()
        if not 0 < scale <= 1:
            raise ValueError(f"CriterionPairWise: scale must be in (0, 1], got {scale!r}")
        self.scale, self.resize = float(scale), resize

    def extra_repr(self) -> str:
        return f"scale={self.scale}, resize={self.resize}"

    @staticmethod
    def affinity(x: Tensor) -> Tensor:
        """[N, M, M] cosine affinities of the M positions of x [N, C, H', W'] (norm detached, as SKD)."""
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).detach() + 1e-8
        f = (x / norm).flatten(2)
        return torch.bmm(f.transpose(1, 2), f)

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        with _fp32_region(s.device):
            t = t.detach().float()
            s = _match_size(s.float(), t, self.resize, "CriterionPairWise")
            h, w = t.shape[2:]
            kernel = (max(1, int(h * self.scale)), max(1, int(w * self.scale)))
            ps = F.max_pool2d(s, kernel, stride=kernel, ceil_mode=True)
            pt = F.max_pool2d(t, kernel, stride=kernel, ceil_mode=True)
            m = pt.shape[2] * pt.shape[3]
            return (self.affinity(pt) - self.affinity(ps)).pow(2).sum() / (m * m) / t.shape[0]

"""DIST: inter- and intra-class relations of the predictions (Huang et al., NeurIPS 2022)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a and b [R, K] (DIST's ``cosine`` of centred rows, eps 1e-8)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1) + eps)


class CriterionDIST(nn.Module):
    r"""DIST on segmentation logits: every pixel is a sample, the classes are its prediction.

    With p^X = softmax_c(z^X / tau) arranged as a matrix P^X of R = N*H*W rows (pixels) by K
    columns (classes), and rho the Pearson correlation:

    .. math:: L_{inter} = 1 - \frac{1}{R}\sum_r \rho(P^S_{r,:}, P^T_{r,:}),\qquad
              L_{intra} = 1 - \frac{1}{K}\sum_k \rho(P^S_{:,k}, P^T_{:,k})

    .. math:: L = \tau^2 (\beta L_{inter} + \gamma L_{intra})

    Reference: ``hunto/DIST_KD`` ``segmentation/losses/dist_kd.py`` (beta = gamma = 1, softmax with
    no temperature, weight 1; it also adds 0.4x the same loss on the auxiliary logits, which is left
    out here: terms compare the main maps). The tau**2 factor is DIST's classification form; at the
    segmentation value tau = 1 it changes nothing. No ignore mask (as the reference). Teacher
    detached; float32 with autocast off.

    ``forward(s [N,K,H,W], t [N,K,H',W'], labels=None) -> scalar``.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, resize: bool = True) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"CriterionDIST: tau must be > 0, got {tau!r}")
        self.beta, self.gamma, self.tau, self.resize = float(beta), float(gamma), float(tau), resize

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, resize={self.resize}"

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"CriterionDIST: class counts differ: student {tuple(s.shape)} "
                             f"vs teacher {tuple(t.shape)}")
        with _fp32_region(s.device):
            t = t.detach().float()
            s = _match_size(s.float(), t, self.resize, "CriterionDIST")
            k = t.shape[1]
            ps = torch.softmax(s / self.tau, dim=1).permute(0, 2, 3, 1).reshape(-1, k)
            pt = torch.softmax(t / self.tau, dim=1).permute(0, 2, 3, 1).reshape(-1, k)
            inter = 1 - pearson_rows(ps, pt).mean()
            intra = 1 - pearson_rows(ps.t(), pt.t()).mean()
            return self.tau ** 2 * (self.beta * inter + self.gamma * intra)

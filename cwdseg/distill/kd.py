"""Pixel-wise knowledge distillation ("PI" in the CWD paper's Table 2)."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _check_4d, _first_map, _fp32_region, _match_size


# --------------------------------------------------------------------------------------------------
# Pixel-wise knowledge distillation
# --------------------------------------------------------------------------------------------------
class CriterionKD(nn.Module):
    r"""Pixel-wise KD of the original: KL(teacher || student) over classes on the raw logit maps.

    .. math:: L = \frac{T^2}{N C H W} \sum_{n,c,h,w} p^T (\log p^T - \log p^S),\quad
              p^X = \mathrm{softmax}_c(z^X / T)

    i.e. ``nn.KLDivLoss()`` with its legacy ``'mean'`` reduction (over all N*C*H*W elements), not
    ``'batchmean'``. The recipe weight (lambda_kd = 10) is applied by the caller. The original did
    not multiply by T**2; identical at its T = 1. Teacher detached; float32 with autocast off.

    ``forward(preds_S, preds_T) -> scalar``: logit maps [N, C, H, W] of the same shape, or model
    output tuples (their element 0 is used, as the original's ``CriterionKD`` did).
    """

    def __init__(self, temperature: float = 1.0, resize: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"CriterionKD: temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.resize = resize  # the student map resized to the teacher's when they differ (other pairs)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, preds_S: Tensor | Sequence[Tensor], preds_T: Tensor | Sequence[Tensor],
                labels: Tensor | None = None) -> Tensor:
        """``labels``: the terms' common signature; KD does not use them."""
        s = _first_map(preds_S, "CriterionKD preds_S")
        t = _first_map(preds_T, "CriterionKD preds_T")
        if self.resize:
            s = _match_size(s, t, True, "CriterionKD")
        _check_4d(s, "CriterionKD student logits")
        _check_4d(t, "CriterionKD teacher logits")
        if s.shape != t.shape:
            raise ValueError(f"CriterionKD: student and teacher logits differ in shape: "
                             f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        T = self.temperature
        with _fp32_region(s.device):
            ls = F.log_softmax(s.float() / T, dim=1)
            lt = F.log_softmax(t.detach().float() / T, dim=1)
            return (lt.exp() * (lt - ls)).sum() / t.numel() * (T ** 2)

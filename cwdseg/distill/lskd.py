"""Logit-standardised pixel KD (Sun et al., CVPR 2024) and the plain per-pixel KD of CIRKD."""
from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from cwdseg.distill._common import _fp32_region, _match_size
from cwdseg.distill._pixel import pixel_kl, valid_mask, wide
from cwdseg.distill.options import Option, resolve_options


def standardize(z: Tensor, eps: float = 1e-7) -> Tensor:
    r"""Each pixel's class vector z-scored: (z - mean_k z) / (eps + std_k z), std **unbiased** (K - 1).

    The authors' ``normalize`` works on the last axis of a [B, K] matrix; on a segmentation map
    [N, K, H, W] that axis would be W, so here it runs over the class axis (dim 1) instead.
    """
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True)  # unbiased, as torch.Tensor.std in the reference
    return (z - mean) / (eps + std)


class CriterionLSKD(nn.Module):
    r"""Pixel KD on logits, optionally logit-standardised (LS-KD, Sun et al., "Logit standardization
    in knowledge distillation", CVPR 2024).

    With :math:`\hat z = z` or :math:`\hat z = (z - \bar z)/(\epsilon + \sigma(z))` per pixel
    (``standardize``; :func:`standardize`, eps = 1e-7 added to the unbiased std) and
    :math:`p^X = \mathrm{softmax}_k(\hat z^X / T)`:

    .. math:: L = \frac{T^2}{|\Omega|} \sum_{(n,h,w) \in \Omega} \sum_k p^T_k (\log p^T_k - \log p^S_k)

    i.e. KL summed over classes, mean over pixels :math:`\Omega` -- every pixel of the N*H*W
    (reference ``sunshangquan/logit-standardization-KD`` ``mdistiller/distillers/KD.py`` ``kd_loss``:
    ``kl_div(reduction='none').sum(1).mean() * T**2``, each pixel a sample), or with ``ignore_mask``
    only the pixels whose label is not ``ignore_label`` (an extension; 0 when none is valid).
    Authors' setting: T = 2, weight 9 (README). With ``standardize=False`` and T = 1 this is CIRKD's
    ``losses/kd.py`` ``CriterionKD`` (``kl_div(batchmean)`` over the N*H*W pixel rows, T**2), which
    is K times the toolkit's ``kd`` term (a mean over N*K*H*W elements).

    Shapes: ``forward(s [N,K,h,w], t [N,K,H,W], labels [N,H0,W0] | None) -> scalar``; the student map
    is resized bilinearly to the teacher's size. Teacher detached; float32 (float64 inputs stay
    float64) with autocast off.
    """

    OPTIONS: ClassVar[dict[str, Option]] = {
        "T": Option(2.0, low=0, low_open=True, help="softmax temperature"),
        "standardize": Option(True, help="z-score each pixel's logits before the softmax"),
        "ignore_mask": Option(False, help="average over pixels whose label is not ignored only"),
    }

    def __init__(self, T: float = 2.0, standardize: bool = True, ignore_mask: bool = False,
                 ignore_label: int = 255) -> None:
        super().__init__()
        o = resolve_options("CriterionLSKD", self.OPTIONS, {"T": T, "standardize": standardize,
                                                             "ignore_mask": ignore_mask})
        self.T, self.standardize, self.ignore_mask = o["T"], o["standardize"], o["ignore_mask"]
        self.ignore_label = int(ignore_label)

    def extra_repr(self) -> str:
        return f"T={self.T}, standardize={self.standardize}, ignore_mask={self.ignore_mask}"

    def forward(self, s: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if s.shape[1] != t.shape[1]:
            raise ValueError(f"CriterionLSKD: class counts differ: student {tuple(s.shape)} "
                             f"vs teacher {tuple(t.shape)}")
        with _fp32_region(s.device):
            t = wide(t.detach())
            s = _match_size(wide(s), t, True, "CriterionLSKD")
            if self.standardize:
                s, t = standardize(s), standardize(t)
            kl = pixel_kl(s, t, self.T) * self.T ** 2
            if not self.ignore_mask:
                return kl.mean()
            valid = valid_mask(labels, t.shape[-2:], self.ignore_label, "CriterionLSKD with ignore_mask")
            return (kl * valid).sum() / valid.sum().clamp(min=1)

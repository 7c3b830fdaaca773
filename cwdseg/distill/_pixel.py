"""Small pieces shared by the post-CWD terms: the loss dtype and the per-pixel class KL."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cwdseg.distill._common import _labels_at


def wide(x: Tensor) -> Tensor:
    """``x`` in the dtype a loss is reduced in: float64 stays float64 (so tests can compare with
    closed forms), every other dtype (bf16/fp16 under autocast, fp32) becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def pixel_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    r"""KL(p^T || p^S) per pixel over the classes (dim 1) at ``temperature``: [N, K, H, W] -> [N, H, W].

    .. math:: \mathrm{kl}_{n,h,w} = \sum_k p^T_k (\log p^T_k - \log p^S_k),\quad p^X = \mathrm{softmax}_k(z^X / T)

    ``log_softmax`` on both sides (no log of an underflowed probability).
    """
    ls = F.log_softmax(s / temperature, dim=1)
    lt = F.log_softmax(t / temperature, dim=1)
    return (lt.exp() * (lt - ls)).sum(dim=1)


def valid_mask(labels: Tensor | None, size: tuple[int, int], ignore_label: int, what: str) -> Tensor:
    """Bool [N, h, w]: True where the label (nearest-resized to ``size``) is not ``ignore_label``."""
    if labels is None:
        raise ValueError(f"{what} needs the labels (it masks the ignored pixels); pass labels=")
    return _labels_at(labels, size) != ignore_label

"""The segmentation task loss: cross-entropy on the main and auxiliary logits (the original CriterionDSN)."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from cwdseg.distill._common import _check_4d, _fp32_region


# --------------------------------------------------------------------------------------------------
# Segmentation cross-entropy with the auxiliary (deep supervision) head
# --------------------------------------------------------------------------------------------------
class CriterionDSN(nn.Module):
    """Cross-entropy on the main logits plus ``aux_weight`` x cross-entropy on the auxiliary logits.

    Both logit maps are upsampled bilinearly (``align_corners=True``) to the label size; pixels
    labelled ``ignore_index`` are skipped; each CE is the mean over valid pixels (0 if none).
    Computed in float32 with autocast off.

    ``forward(preds, target, return_parts=False)``: ``preds`` is the model output tuple
    ``(logits [N,K,h,w], aux_logits [N,K,h',w'] or None, ...)`` (None: a network without an auxiliary
    head; the total is then ``ce_main`` alone); ``target`` is an integer [N, H, W] (long
    or uint8). Returns the scalar total ``ce_main + aux_weight * ce_aux``; with ``return_parts=True``
    returns ``(total, {"ce_main": ce_main, "ce_aux": ce_aux})`` with the two *unweighted* CEs.
    """

    def __init__(self, ignore_index: int = 255, aux_weight: float = 0.4) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.aux_weight = aux_weight

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, aux_weight={self.aux_weight}"

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = F.interpolate(logits.float(), size=target.shape[1:], mode="bilinear", align_corners=True)
        total = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
        n_valid = (target != self.ignore_index).sum().clamp_min(1)
        return total / n_valid

    def forward(
        self, preds: Sequence[Tensor], target: Tensor, return_parts: bool = False
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(preds, (tuple, list)) or len(preds) < 2:
            raise TypeError("CriterionDSN needs the model output tuple (logits, aux_logits, ...); "
                            f"got {type(preds).__name__}")
        if target.dim() != 3:
            raise ValueError(f"CriterionDSN: target must be [N, H, W]; got shape {tuple(target.shape)}")
        if target.is_floating_point():
            raise TypeError(f"CriterionDSN: target must be an integer tensor of class ids; got {target.dtype}")
        logits, aux = preds[0], preds[1]
        for name, x in (("logits", logits), ("aux_logits", aux)):
            if x is None and name == "aux_logits":
                continue  # a network without an auxiliary head (MobileNetV2 students, as in CIRKD)
            _check_4d(x, f"CriterionDSN {name}")
            if x.shape[0] != target.shape[0]:
                raise ValueError(f"CriterionDSN: batch sizes differ: {name} {tuple(x.shape)} "
                                 f"vs target {tuple(target.shape)}")
        target = target.long()
        with _fp32_region(logits.device):
            ce_main = self._ce(logits, target)
            if aux is None:
                ce_aux = ce_main.new_zeros(())
                total = ce_main
            else:
                ce_aux = self._ce(aux, target)
                total = ce_main + self.aux_weight * ce_aux
        if return_parts:
            return total, {"ce_main": ce_main, "ce_aux": ce_aux}
        return total

"""Helpers shared by the loss modules: an fp32 region and input checks."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import Tensor


def _fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``device``, so ops run in the inputs' dtype (fp32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _first_map(preds: Tensor | Sequence[Tensor], what: str) -> Tensor:
    """The logit map of ``preds``: the tensor itself, or element 0 of a model output tuple."""
    if isinstance(preds, Tensor):
        return preds
    if isinstance(preds, (tuple, list)) and len(preds) > 0 and isinstance(preds[0], Tensor):
        return preds[0]
    raise TypeError(f"{what} must be a Tensor [N,C,H,W] or a model output tuple (logits, ...); got {type(preds)!r}")


def _check_4d(x: Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} must be a 4-D map [N, C, H, W]; got shape {tuple(x.shape)}")

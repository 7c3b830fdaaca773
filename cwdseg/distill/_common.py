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


def _match_size(s: Tensor, t: Tensor, resize: bool, what: str) -> Tensor:
    """``s`` at ``t``'s spatial size: unchanged when they agree; resized bilinearly
    (``align_corners=True``, as everywhere in the original) when ``resize``; else a ``ValueError``.

    Different architectures can give maps one pixel apart (64 vs 65 for a 512 crop), hence the option.
    """
    _check_4d(s, f"{what} student map")
    _check_4d(t, f"{what} teacher map")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{what}: batch sizes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if s.shape[2:] == t.shape[2:]:
        return s
    if not resize:
        raise ValueError(f"{what}: spatial sizes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
                         "pass resize=True to resize the student map to the teacher's size")
    return torch.nn.functional.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=True)


def _labels_at(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Integer labels [N, H0, W0] nearest-resized to ``size`` (PyTorch ``mode="nearest"``, as IFVD did)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [N, H, W]; got shape {tuple(labels.shape)}")
    if labels.shape[1:] == tuple(size):
        return labels.long()
    return torch.nn.functional.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()

"""Precision: the ``--amp`` choices, their dtypes, and the one autocast-or-not switch every forward uses."""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``--amp`` -> a key of :data:`AMP_DTYPES`: ``auto`` is bf16 on a CUDA GPU that has it, else none (fp32)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    return amp


def amp_dtype(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """An ``--amp`` name, a dtype or None -> the autocast dtype (None: full precision)."""
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    return AMP_DTYPES[resolve_amp(amp, device)]


def autocast_context(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op context when ``dtype`` is None (fp32).

    A fresh context each call: use it as ``with autocast_context(dev, dt): ...``.
    """
    device_type = device if isinstance(device, str) else device.type
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)

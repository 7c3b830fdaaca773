"""The input normalisation of an export: :class:`cwdseg.data.transforms.Normalization` as JSON, and applied
to decoded images.

The normalisation belongs to the weights (the CWD files: BGR minus the Caffe mean, no std,
:data:`cwdseg.data.transforms.CAFFE_BGR`), so it travels with an export: in its metadata JSON and in the
ONNX file's metadata, as ``{"name", "channel_order", "mean", "std", ...}``. :func:`apply` uses the record's
lookup tables ``float32((float64(v) - mean) / std)``; for CAFFE_BGR these are exactly the values of the
training/evaluation pipeline, so ``predict.py`` feeds the network bit-identical inputs to ``evaluate.py``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cwdseg.data.transforms import CAFFE_BGR, NORMALIZATIONS, Normalization

ORIGINAL = CAFFE_BGR  # the CWD/IFVD/SKD weights: BGR minus mean, no std
CHANNEL_ORDERS = ("BGR", "RGB")


def channel_order(norm: Normalization) -> str:
    return "RGB" if norm.rgb else "BGR"


def make(order: str, mean: Sequence[float], std: Sequence[float] = (1.0, 1.0, 1.0)) -> Normalization:
    """A checked record: ``order`` BGR/RGB, three means and three positive stds (0..255 units, network order);
    a known record (e.g. ``caffe_bgr``) when the values are its own."""
    if order not in CHANNEL_ORDERS:
        raise ValueError(f"channel order must be one of {CHANNEL_ORDERS}, got {order!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)} and {list(std)}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std values must be positive, got {list(std)}")
    mean3 = tuple(float(m) for m in mean)
    std3 = tuple(float(s) for s in std)
    for known in NORMALIZATIONS.values():
        if known.rgb == (order == "RGB") and known.mean == mean3 and tuple(known.std) == std3:
            return known
    return Normalization("custom", rgb=order == "RGB", mean=mean3, std=std3)  # type: ignore[arg-type]


def to_dict(norm: Normalization) -> dict[str, Any]:
    return {"name": norm.name, "channel_order": channel_order(norm), "mean": list(norm.mean),
            "std": [float(s) for s in norm.std], "value_range": "0..255", "layout": "NCHW float32"}


def from_dict(d: dict[str, Any]) -> Normalization:
    try:
        return make(str(d["channel_order"]), tuple(d["mean"]), tuple(d.get("std", (1.0, 1.0, 1.0))))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a normalisation record (channel_order, mean, std): {d!r}") from exc


def describe(norm: Normalization) -> str:
    std = "no std" if tuple(norm.std) == (1.0, 1.0, 1.0) else f"divided by std {list(norm.std)}"
    return f"{channel_order(norm)} 0..255 minus mean {[round(m, 4) for m in norm.mean]}, {std}"


def apply(norm: Normalization, image_bgr: np.ndarray, luts: np.ndarray | None = None) -> np.ndarray:
    """A decoded ``(H, W, 3)`` uint8 BGR image (OpenCV's order) -> the ``(3, H, W)`` float32 network input."""
    if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 BGR image, got {image_bgr.dtype} {image_bgr.shape}")
    luts = norm.lut() if luts is None else luts
    planes = image_bgr.transpose(2, 0, 1)
    if norm.rgb:
        planes = planes[::-1]
    return np.stack([luts[c][planes[c]] for c in range(3)])

"""The input normalisation a set of weights expects, and applying it to decoded images.

The original CWD weights (and every file this toolkit trains) take **BGR** images minus the mean
``(104.00698793, 116.66876762, 122.67891434)``, with no division by a standard deviation
(:mod:`cwdseg.data.transforms`). Other weight families (e.g. ImageNet-style RGB with mean/std) differ,
so the normalisation is a value that travels with an export (its metadata JSON, the ONNX file's
metadata) instead of a constant.

:meth:`Normalization.apply` uses per-channel lookup tables ``float32((float64(v) - mean) / std)``; for
the original normalisation these are exactly the values of the training/evaluation pipeline, so
``predict.py`` feeds the network bit-identical inputs to ``evaluate.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cwdseg.data.transforms import IMG_MEAN_BGR

CHANNEL_ORDERS = ("BGR", "RGB")


@dataclass(frozen=True)
class Normalization:
    """``x[c] = (pixel[c] - mean[c]) / std[c]`` on 0..255 values, channels in ``channel_order``.

    ``mean`` and ``std`` are given in the network's channel order (for BGR: blue first).
    """

    channel_order: str = "BGR"
    mean: tuple[float, float, float] = IMG_MEAN_BGR
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {list(self.mean)} and {list(self.std)}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {list(self.std)}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict[str, Any]:
        return {"channel_order": self.channel_order, "mean": list(self.mean), "std": list(self.std),
                "value_range": "0..255", "layout": "NCHW float32"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalization":
        try:
            return cls(str(d["channel_order"]), tuple(d["mean"]), tuple(d.get("std", (1.0, 1.0, 1.0))))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a normalisation record (channel_order, mean, std): {d!r}") from exc

    def describe(self) -> str:
        std = "no std" if self.std == (1.0, 1.0, 1.0) else f"divided by std {list(self.std)}"
        return f"{self.channel_order} 0..255 minus mean {[round(m, 4) for m in self.mean]}, {std}"

    def luts(self) -> np.ndarray:
        """(3, 256) float32: ``lut[c, v] = float32((float64(v) - mean[c]) / std[c])``, network channel order."""
        values = np.arange(256, dtype=np.float64)
        return np.stack([((values - np.float64(m)) / np.float64(s)).astype(np.float32)
                         for m, s in zip(self.mean, self.std)])

    def apply(self, image_bgr: np.ndarray, luts: np.ndarray | None = None) -> np.ndarray:
        """A decoded ``(H, W, 3)`` uint8 BGR image (OpenCV's order) -> the ``(3, H, W)`` float32 network input."""
        if image_bgr.dtype != np.uint8 or image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 BGR image, got {image_bgr.dtype} {image_bgr.shape}")
        luts = self.luts() if luts is None else luts
        planes = image_bgr.transpose(2, 0, 1)
        if self.channel_order == "RGB":
            planes = planes[::-1]
        return np.stack([luts[c][planes[c]] for c in range(3)])


ORIGINAL = Normalization()  # the CWD/IFVD/SKD weights: BGR minus mean, no std

"""Colour overlays of class-id maps on photos, with a legend of the classes present.

Everything is drawn with OpenCV on BGR uint8 images (what ``cv2.imread`` and ``VideoCapture`` give), so
that video frames can be annotated at decoding speed. Colours are given as RGB (as in the Cityscapes
table, :data:`cwdseg.data.labels.TRAIN_ID_COLORS`) and converted here; class names and colours are
parameters, so any dataset's table works.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from cwdseg.data.labels import CLASS_NAMES, IGNORE_LABEL, TRAIN_ID_COLORS


def _bgr_table(colors_rgb: np.ndarray | Sequence) -> np.ndarray:
    colors = np.asarray(colors_rgb, dtype=np.uint8).reshape(-1, 3)
    table = np.zeros((256, 3), np.uint8)
    table[:len(colors)] = colors[:, ::-1]
    return table


def blend(image_bgr: np.ndarray, ids: np.ndarray, colors_rgb: np.ndarray | Sequence = TRAIN_ID_COLORS,
          alpha: float = 0.5, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colour[id]`` per pixel (BGR uint8); ``ignore_label`` pixels keep the image."""
    if image_bgr.shape[:2] != ids.shape:
        raise ValueError(f"image {image_bgr.shape[:2]} and class map {ids.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colored = _bgr_table(colors_rgb)[ids.astype(np.uint8, copy=False)]
    out = cv2.addWeighted(image_bgr, 1.0 - alpha, colored, alpha, 0.0)
    keep = ids == ignore_label
    if keep.any():
        out[keep] = image_bgr[keep]
    return out


def classes_present(ids: np.ndarray, num_classes: int) -> list[int]:
    """The class ids occurring in ``ids``, largest area first (ties: smaller id first)."""
    counts = np.bincount(ids.ravel().astype(np.int64), minlength=256)[:num_classes]
    return [int(c) for c in sorted(np.flatnonzero(counts), key=lambda c: (-counts[c], c))]


def draw_legend(image_bgr: np.ndarray, ids: np.ndarray, class_names: Sequence[str] = CLASS_NAMES,
                colors_rgb: np.ndarray | Sequence = TRAIN_ID_COLORS) -> np.ndarray:
    """A copy of ``image_bgr`` with a legend box (top left): a swatch and the name of each class present,
    largest area first; entries that do not fit the height are summarised as ``+N more``."""
    out = image_bgr.copy()
    present = classes_present(ids, len(class_names))
    if not present:
        return out
    height, width = out.shape[:2]
    scale = max(0.4, min(1.2, height / 900))
    thick = 1 if scale < 0.8 else 2
    row = int(round(26 * scale))
    pad = max(2, row // 4)
    fits = max(1, (height - 2 * pad) // row)
    shown = present if len(present) <= fits else present[:fits - 1]
    more = [f"+{len(present) - len(shown)} more"] if len(shown) < len(present) else []
    labels = [class_names[c] for c in shown] + more
    font = cv2.FONT_HERSHEY_SIMPLEX
    text_w = max(cv2.getTextSize(t, font, 0.6 * scale, thick)[0][0] for t in labels)
    box_w = min(width, pad * 3 + row + text_w)
    box_h = min(height, pad * 2 + row * len(labels))
    region = out[:box_h, :box_w]
    region[:] = (region.astype(np.uint16) * 2 // 5).astype(np.uint8)  # darken behind the text
    table = _bgr_table(colors_rgb)
    for k, text in enumerate(labels):
        y = pad + k * row
        if k < len(shown):
            color = tuple(int(v) for v in table[shown[k]])
            cv2.rectangle(out, (pad, y + 2), (pad + row - 4, y + row - 2), color, thickness=-1)
        cv2.putText(out, text, (2 * pad + row, y + int(row * 0.72)), font, 0.6 * scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    return out


def overlay_with_legend(image_bgr: np.ndarray, ids: np.ndarray, class_names: Sequence[str] = CLASS_NAMES,
                        colors_rgb: np.ndarray | Sequence = TRAIN_ID_COLORS, alpha: float = 0.5,
                        legend: bool = True) -> np.ndarray:
    """:func:`blend` then :func:`draw_legend`: the picture ``predict.py`` writes (same size as the image)."""
    out = blend(image_bgr, ids, colors_rgb, alpha)
    return draw_legend(out, ids, class_names, colors_rgb) if legend else out

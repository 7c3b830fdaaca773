"""Prediction images: trainIds coloured with the official Cityscapes palette, and id PNGs.

The palette is ``dataset.labels.TRAIN_ID_COLORS`` (the colours of ``cityscapesscripts.helpers.labels``),
not the VOC bit-pattern palette the original wrote. PNGs are written with OpenCV, which expects BGR,
so colour images are converted from RGB before writing. The other datasets pass their own palette
(``DatasetInfo.colors``: VOC colour map, ADE20K benchmark colours, SegNet's CamVid colours, a folder
dataset's ``classes.json``) through the ``colors`` / ``lut`` arguments.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from cwdseg.data.labels import TRAIN_ID_COLORS, TRAIN_ID_TO_LABEL_ID

IGNORE_COLOR = (0, 0, 0)


def _as_uint8_ids(train_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    ids = np.asarray(train_ids)
    if ids.ndim != 2:
        raise ValueError(f"expected an [H, W] map of trainIds, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"trainIds must be in [0, 255], got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8, copy=False)


def colorize(train_ids: np.ndarray | torch.Tensor, colors: np.ndarray | None = None) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 RGB image of an ``[H, W]`` trainId map; ignore (and unknown ids) are black.

    ``colors``: the ``(num_classes, 3)`` RGB palette of another dataset (``DatasetInfo.colors``);
    default the Cityscapes trainId colours.
    """
    ids = _as_uint8_ids(train_ids)
    colors = TRAIN_ID_COLORS if colors is None else np.asarray(colors, dtype=np.uint8)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = IGNORE_COLOR
    lut[:len(colors)] = colors
    return lut[ids]


def train_ids_to_label_ids(train_ids: np.ndarray | torch.Tensor, lut: np.ndarray | None = None) -> np.ndarray:
    """The labelIds (7 = road, ..., 33 = bicycle) of an ``[H, W]`` trainId map, uint8; 255 becomes 0.

    ``lut``: another dataset's class -> label-file value table (``DatasetInfo.class_to_file()``).
    """
    return (TRAIN_ID_TO_LABEL_ID if lut is None else lut)[_as_uint8_ids(train_ids)]


def _write_png(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path} (is the folder writable and the name a .png?)")
    return path


def save_color_png(path: str | Path, train_ids: np.ndarray | torch.Tensor, colors: np.ndarray | None = None) -> Path:
    """Write the palette-coloured trainId map as an RGB PNG (converted to BGR for OpenCV)."""
    return _write_png(path, cv2.cvtColor(colorize(train_ids, colors), cv2.COLOR_RGB2BGR))


def save_train_id_png(path: str | Path, train_ids: np.ndarray | torch.Tensor) -> Path:
    """Write the trainIds as a single-channel uint8 PNG."""
    return _write_png(path, _as_uint8_ids(train_ids))


def save_label_id_png(path: str | Path, train_ids: np.ndarray | torch.Tensor, lut: np.ndarray | None = None) -> Path:
    """Write the trainIds mapped to labelIds as a single-channel uint8 PNG (what the benchmark server reads);
    with ``lut``, mapped to another dataset's label-file values instead."""
    return _write_png(path, train_ids_to_label_ids(train_ids, lut))


ERROR_COLOR_BGR = (0, 0, 255)  # red: a labelled pixel predicted wrong


def image_from_network_input(image: np.ndarray | torch.Tensor, mean_bgr) -> np.ndarray:
    """The ``[H, W, 3]`` uint8 BGR picture behind a network input ``[3, H, W]``.

    ``mean_bgr`` is the BGR mean that was subtracted (the original's convention), or any object with a
    ``to_bgr_uint8`` method (a :class:`cwdseg.data.transforms.Normalization`).
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    if hasattr(mean_bgr, "to_bgr_uint8"):
        return mean_bgr.to_bgr_uint8(image)
    bgr = image.transpose(1, 2, 0) + np.asarray(mean_bgr, dtype=np.float32)
    return np.clip(np.rint(bgr), 0, 255).astype(np.uint8)


def make_panel(image_bgr: np.ndarray, gt_train_ids: np.ndarray | torch.Tensor,
               pred_train_ids: np.ndarray | torch.Tensor, scale: float = 0.5,
               colors: np.ndarray | None = None) -> np.ndarray:
    """Image | ground truth | prediction | errors, side by side (BGR uint8, resized by ``scale``).

    The error panel is the darkened image with wrongly predicted labelled pixels in red; pixels
    labelled ignore (255) are black in the ground truth and never count as errors.
    """
    gt, pred = _as_uint8_ids(gt_train_ids), _as_uint8_ids(pred_train_ids)
    if image_bgr.shape[:2] != gt.shape or gt.shape != pred.shape:
        raise ValueError(f"panel parts differ in size: image {image_bgr.shape[:2]}, gt {gt.shape}, pred {pred.shape}")
    errors = (image_bgr // 3).copy()
    errors[(pred != gt) & (gt != 255)] = ERROR_COLOR_BGR
    parts = [image_bgr, cv2.cvtColor(colorize(gt, colors), cv2.COLOR_RGB2BGR),
             cv2.cvtColor(colorize(pred, colors), cv2.COLOR_RGB2BGR), errors]
    panel = np.concatenate(parts, axis=1)
    if scale != 1.0:
        panel = cv2.resize(panel, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    return panel


def save_panel(path: str | Path, image_bgr: np.ndarray, gt_train_ids, pred_train_ids, scale: float = 0.5,
               colors: np.ndarray | None = None) -> Path:
    """Write :func:`make_panel` as a JPEG (small files for browsing a whole split)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panel = make_panel(image_bgr, gt_train_ids, pred_train_ids, scale, colors)
    if not cv2.imwrite(str(path), panel, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"could not write {path}")
    return path

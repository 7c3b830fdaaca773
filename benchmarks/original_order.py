"""The original code's training-sample pipeline, re-implemented operation by operation as a reference.

The original ``CSTrainValSet.__getitem__`` decodes, maps labels with a 35-step dict loop, scales (uint8),
converts to float, subtracts a float64 mean, pads, crops, transposes and mirrors -- in that order.
``bench_loader.py`` (next to this file) times it next to :mod:`cwdseg.data.cityscapes` and checks both give the
same sample. (The test suite keeps its own independent copy: it must not trust this one.)
"""
from __future__ import annotations

import cv2
import numpy as np

_MEAN = np.array([104.00698793, 116.66876762, 122.67891434])  # float64, as in the original
_ID_TO_TRAINID = {-1: 255, 0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255,
                  11: 2, 12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9,
                  23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18}


def original_sample(image_path: str, label_path: str, crop: tuple[int, int], scale: bool, mirror: bool,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The original ``CSTrainValSet.__getitem__``: decode, dict-loop label mapping, [uint8 scale], float,
    minus float64 mean, pad, crop, CHW, [mirror]. Random draws from ``rng`` in our documented order."""
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
    label_copy = label.copy()
    for k, v in _ID_TO_TRAINID.items():
        label_copy[label == k] = v
    label = label_copy
    if scale:
        f = 0.7 + int(rng.integers(0, 15)) / 10.0
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32)
    image = image - _MEAN
    crop_h, crop_w = crop
    img_h, img_w = label.shape
    pad_h, pad_w = max(crop_h - img_h, 0), max(crop_w - img_w, 0)
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(255,))
    img_h, img_w = label.shape
    h_off = int(rng.integers(0, img_h - crop_h + 1))
    w_off = int(rng.integers(0, img_w - crop_w + 1))
    image = np.asarray(image[h_off:h_off + crop_h, w_off:w_off + crop_w], np.float32)
    label = np.asarray(label[h_off:h_off + crop_h, w_off:w_off + crop_w], np.float32)
    image = image.transpose((2, 0, 1))
    if mirror:
        flip = -1 if int(rng.integers(0, 2)) == 0 else 1
        image, label = image[:, :, ::flip], label[:, ::flip]
    return image.copy(), label.copy()

"""The Cityscapes label table and the lookup tables derived from it.

The table is written out here (instead of imported from ``cityscapesscripts.helpers.labels``) so that the
data pipeline has no import-time dependency on cityscapesscripts; ``tests/test_dataset.py`` checks every
row against cityscapesscripts' own ``labels`` list.

Conventions:
- labelId: the id stored in ``*_gtFine_labelIds.png`` (0..33; ``license plate`` has id -1 and never
  appears in label images, because cityscapesscripts skips polygons with a negative id when drawing).
- trainId: 0..18 for the 19 evaluated classes, ``IGNORE_LABEL`` (255) for everything else.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

NUM_CLASSES = 19
IGNORE_LABEL = 255
# Largest labelId that can appear in a Cityscapes labelIds image; anything above is not a labelId.
MAX_LABEL_ID = 33


class CityscapesLabel(NamedTuple):
    """One row of the official Cityscapes label table (the fields this project uses)."""

    name: str
    id: int
    train_id: int  # 255 = ignored in training and evaluation, -1 = license plate (never drawn)
    has_instances: bool
    color: tuple[int, int, int]  # RGB, as in cityscapesscripts


LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, False, (0, 0, 0)),
    CityscapesLabel("ego vehicle", 1, 255, False, (0, 0, 0)),
    CityscapesLabel("rectification border", 2, 255, False, (0, 0, 0)),
    CityscapesLabel("out of roi", 3, 255, False, (0, 0, 0)),
    CityscapesLabel("static", 4, 255, False, (0, 0, 0)),
    CityscapesLabel("dynamic", 5, 255, False, (111, 74, 0)),
    CityscapesLabel("ground", 6, 255, False, (81, 0, 81)),
    CityscapesLabel("road", 7, 0, False, (128, 64, 128)),
    CityscapesLabel("sidewalk", 8, 1, False, (244, 35, 232)),
    CityscapesLabel("parking", 9, 255, False, (250, 170, 160)),
    CityscapesLabel("rail track", 10, 255, False, (230, 150, 140)),
    CityscapesLabel("building", 11, 2, False, (70, 70, 70)),
    CityscapesLabel("wall", 12, 3, False, (102, 102, 156)),
    CityscapesLabel("fence", 13, 4, False, (190, 153, 153)),
    CityscapesLabel("guard rail", 14, 255, False, (180, 165, 180)),
    CityscapesLabel("bridge", 15, 255, False, (150, 100, 100)),
    CityscapesLabel("tunnel", 16, 255, False, (150, 120, 90)),
    CityscapesLabel("pole", 17, 5, False, (153, 153, 153)),
    CityscapesLabel("polegroup", 18, 255, False, (153, 153, 153)),
    CityscapesLabel("traffic light", 19, 6, False, (250, 170, 30)),
    CityscapesLabel("traffic sign", 20, 7, False, (220, 220, 0)),
    CityscapesLabel("vegetation", 21, 8, False, (107, 142, 35)),
    CityscapesLabel("terrain", 22, 9, False, (152, 251, 152)),
    CityscapesLabel("sky", 23, 10, False, (70, 130, 180)),
    CityscapesLabel("person", 24, 11, True, (220, 20, 60)),
    CityscapesLabel("rider", 25, 12, True, (255, 0, 0)),
    CityscapesLabel("car", 26, 13, True, (0, 0, 142)),
    CityscapesLabel("truck", 27, 14, True, (0, 0, 70)),
    CityscapesLabel("bus", 28, 15, True, (0, 60, 100)),
    CityscapesLabel("caravan", 29, 255, True, (0, 0, 90)),
    CityscapesLabel("trailer", 30, 255, True, (0, 0, 110)),
    CityscapesLabel("train", 31, 16, True, (0, 80, 100)),
    CityscapesLabel("motorcycle", 32, 17, True, (0, 0, 230)),
    CityscapesLabel("bicycle", 33, 18, True, (119, 11, 32)),
    CityscapesLabel("license plate", -1, -1, False, (0, 0, 142)),
)

NAME_TO_LABEL: dict[str, CityscapesLabel] = {label.name: label for label in LABELS}
ID_TO_LABEL: dict[int, CityscapesLabel] = {label.id: label for label in LABELS}


def _label_id_to_train_id() -> np.ndarray:
    # A 256-entry table so that any uint8 label image maps with one cv2.LUT / fancy-index call.
    # Ids without a trainId (255 or -1) and values that are not labelIds at all map to IGNORE_LABEL;
    # labelId -1 cannot be stored in a uint8 image, so it needs no entry.
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for label in LABELS:
        if label.id >= 0 and 0 <= label.train_id < NUM_CLASSES:
            lut[label.id] = label.train_id
    return lut


def _train_id_to_label_id() -> np.ndarray:
    # Inverse for test-set submissions (trainId 0..18 -> labelId); everything else -> 0 ("unlabeled").
    lut = np.zeros(256, dtype=np.uint8)
    for label in LABELS:
        if label.id >= 0 and 0 <= label.train_id < NUM_CLASSES:
            lut[label.train_id] = label.id
    return lut


LABEL_ID_TO_TRAIN_ID: np.ndarray = _label_id_to_train_id()
TRAIN_ID_TO_LABEL_ID: np.ndarray = _train_id_to_label_id()

_TRAIN_LABELS = sorted((lbl for lbl in LABELS if 0 <= lbl.train_id < NUM_CLASSES), key=lambda lbl: lbl.train_id)
CLASS_NAMES: tuple[str, ...] = tuple(lbl.name for lbl in _TRAIN_LABELS)
TRAIN_ID_COLORS: np.ndarray = np.array([lbl.color for lbl in _TRAIN_LABELS], dtype=np.uint8)  # (19, 3) RGB

# Read-only so that no caller can corrupt the shared tables by accident.
for _table in (LABEL_ID_TO_TRAIN_ID, TRAIN_ID_TO_LABEL_ID, TRAIN_ID_COLORS):
    _table.setflags(write=False)

assert len(CLASS_NAMES) == NUM_CLASSES and TRAIN_ID_COLORS.shape == (NUM_CLASSES, 3)

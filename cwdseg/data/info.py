"""What a dataset's labels mean: class names, colours, how label-file values become class indices.

Every dataset module (``cityscapes``, ``voc``, ``ade20k``, ``camvid``, ``folder``) describes itself with one
:class:`DatasetInfo`; training, evaluation and the prediction pictures take the class count, names and
palette from it instead of from Cityscapes constants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

IGNORE_INDEX = 255  # the class index of ignored pixels after mapping (the loss and the metric skip it)


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """The label convention of one dataset.

    ``file_to_class[v]`` is the class index (0..num_classes-1) of value ``v`` in a label file, or
    ``IGNORE_INDEX`` for a value that is ignored (VOC's 255 borders, ADE20K's 0 "other", ...).
    ``valid_values[v]`` is False for values that cannot occur in a correct label file of this dataset;
    such a value is reported as a damaged or foreign label, naming the file. ``colors`` are RGB.
    """

    name: str
    class_names: tuple[str, ...]
    colors: np.ndarray                       # (num_classes, 3) uint8 RGB
    file_to_class: np.ndarray                # (256,) uint8
    valid_values: np.ndarray                 # (256,) bool
    counts: dict[str, int] = field(default_factory=dict)   # official image count per split
    ignore_description: str = "255"
    label_description: str = ""

    def __post_init__(self) -> None:
        n = len(self.class_names)
        if self.colors.shape != (n, 3) or self.colors.dtype != np.uint8:
            raise ValueError(f"{self.name}: colours must be ({n}, 3) uint8, "
                             f"got {self.colors.shape} {self.colors.dtype}")
        if self.file_to_class.shape != (256,) or self.valid_values.shape != (256,):
            raise ValueError(f"{self.name}: lookup tables must have 256 entries")
        for table in (self.colors, self.file_to_class, self.valid_values):
            table.setflags(write=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_lut(self, ignore_label: int = IGNORE_INDEX) -> np.ndarray:
        """(256,) uint8 table from label-file values to class indices, ignored values -> ``ignore_label``."""
        lut = self.file_to_class.copy()
        lut[lut == IGNORE_INDEX] = ignore_label
        return lut

    def class_to_file(self) -> np.ndarray:
        """(256,) uint8 inverse table: class index -> its value in a label file (for prediction PNGs).

        Indices without a class (255 = ignore and anything >= num_classes) map to the first ignored
        file value, or 0 when the dataset ignores none.
        """
        ignored = [v for v in range(256) if self.valid_values[v] and self.file_to_class[v] == IGNORE_INDEX]
        lut = np.full(256, ignored[0] if ignored else 0, np.uint8)
        for value in range(256):
            index = int(self.file_to_class[value])
            if self.valid_values[value] and index != IGNORE_INDEX:
                lut[index] = value
        return lut

    def palette(self, ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
        """(256, 3) uint8 RGB colours of class indices; every other index gets ``ignore_color``."""
        lut = np.empty((256, 3), np.uint8)
        lut[:] = ignore_color
        lut[: self.num_classes] = self.colors
        return lut


def offset_table(num_classes: int, first_value: int, ignored: Sequence[int],
                 max_value: int) -> tuple[np.ndarray, np.ndarray]:
    """``file_to_class`` / ``valid_values`` for files storing class ``k`` as ``first_value + k``.

    ``ignored`` values map to ``IGNORE_INDEX``; values above ``max_value`` (that are not ignored) are invalid.
    """
    file_to_class = np.full(256, IGNORE_INDEX, np.uint8)
    file_to_class[first_value:first_value + num_classes] = np.arange(num_classes, dtype=np.uint8)
    valid = np.zeros(256, bool)
    valid[first_value:first_value + num_classes] = True
    valid[: max_value + 1] = True
    for value in ignored:
        valid[value] = True
        file_to_class[value] = IGNORE_INDEX
    return file_to_class, valid


def voc_bit_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: the bits of index ``i`` spread over R, G, B from the high bit down."""
    palette = np.zeros((n, 3), np.uint8)
    for index in range(n):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette

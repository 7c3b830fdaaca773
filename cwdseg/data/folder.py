"""The user's own data: ``images/``, ``labels/``, a small classes file and the train/val splits.

Layout under ``root``::

    classes.json               {"classes": [{"name": "road", "value": 0, "color": [128, 64, 128]}, ...],
                                "ignore": [255]}
    images/<stem>.<jpg|jpeg|png|bmp|tif|tiff>
    labels/<stem>.png          one class value per pixel (greyscale or palette PNG)
    splits/train.txt           one <stem> per line (also val.txt, test.txt, any <split>.txt)

Instead of ``splits/``, the images and labels of a split may sit in sub-folders: ``images/<split>/`` and
``labels/<split>/``. The class count is the number of entries in ``classes.json``; class ``k`` is the
``k``-th entry and is stored in label files as its ``value``; the ``ignore`` values are left out of the
loss and the metric. Any other value in a label file is an error naming the file and the classes file.
``value`` defaults to the entry's position and ``color`` (RGB, for prediction pictures) to a fixed
pseudo-random colour per position.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cwdseg.data.base import SegmentationDataset, build_split, missing_message, pair_files, refuse_ram_cache
from cwdseg.data.cityscapes import DatasetError, _check_root
from cwdseg.data.info import IGNORE_INDEX, DatasetInfo

CLASSES_FILE = "classes.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
LAYOUT = ('  <root>/classes.json        {"classes": [{"name": ..., "value": 0, "color": [r, g, b]}, ...], '
          '"ignore": [255]}\n'
          "  <root>/images/<stem>.jpg|png ...\n"
          "  <root>/labels/<stem>.png             (class values, as classes.json names them)\n"
          "  <root>/splits/train.txt, val.txt     (one <stem> per line)\n"
          "  or, instead of splits/: <root>/images/<split>/ and <root>/labels/<split>/")


def _fail(path: Path, message: str) -> DatasetError:
    return DatasetError(f"{path}: {message}. Expected: {LAYOUT.splitlines()[0].strip()}")


def load_classes(root: str | os.PathLike) -> DatasetInfo:
    """Read and check ``<root>/classes.json`` into a :class:`DatasetInfo`."""
    path = _check_root(root) / CLASSES_FILE
    if not path.is_file():
        raise DatasetError(f"classes file not found: {path}. A folder dataset needs one. Expected layout:\n{LAYOUT}")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("classes"), list) or not spec["classes"]:
        raise _fail(path, 'expected an object with a non-empty "classes" list')
    ignore = spec.get("ignore", [])
    if isinstance(ignore, int):
        ignore = [ignore]
    if not isinstance(ignore, list) or not all(isinstance(v, int) and 0 <= v <= 255 for v in ignore):
        raise _fail(path, f'"ignore" must be a value or a list of values in 0..255, got {ignore!r}')
    names, colors, values = [], [], []
    for k, entry in enumerate(spec["classes"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _fail(path, f'class {k}: expected {{"name": str, "value": int, "color": [r, g, b]}}, got {entry!r}')
        value = entry.get("value", k)
        color = entry.get("color")
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise _fail(path, f"class {entry['name']!r}: value must be an int in 0..255, got {value!r}")
        if color is None:
            color = [int(c) for c in np.random.default_rng(k).integers(0, 256, 3)]  # a fixed colour per index
        if not (isinstance(color, list) and len(color) == 3
                and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise _fail(path, f"class {entry['name']!r}: color must be [r, g, b] with ints in 0..255, got {color!r}")
        names.append(entry["name"])
        values.append(value)
        colors.append(color)
    for what, items in (("class names", names), ("class values", values)):
        dupes = sorted({x for x in items if items.count(x) > 1})
        if dupes:
            raise _fail(path, f"duplicate {what}: {dupes}")
    both = sorted(set(values) & set(ignore))
    if both:
        raise _fail(path, f"values {both} are both a class and ignored")
    if len(names) >= IGNORE_INDEX:
        raise _fail(path, f"{len(names)} classes; at most {IGNORE_INDEX - 1} fit in 8-bit labels")
    file_to_class = np.full(256, IGNORE_INDEX, np.uint8)
    valid = np.zeros(256, bool)
    for index, value in enumerate(values):
        file_to_class[value] = index
        valid[value] = True
    valid[ignore] = True
    mapping = ", ".join(f"{v}->{i}" for i, v in enumerate(values)) if len(values) <= 8 else f"{len(values)} values"
    return DatasetInfo(
        name="folder", class_names=tuple(names), colors=np.array(colors, np.uint8), file_to_class=file_to_class,
        valid_values=valid, ignore_description=", ".join(map(str, ignore)) or "none",
        label_description=f"classes from {path} ({mapping}; ignored: {ignore or 'none'})",
    )


def _find_image(folder: Path, stem: str) -> str | None:
    for ext in IMAGE_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return str(candidate)
    return None


def scan_split(root: str | os.PathLike, split: str) -> list:
    """The samples of ``splits/<split>.txt``, or of ``images/<split>/`` when there is no such list."""
    root_path = _check_root(root)
    list_file = root_path / "splits" / f"{split}.txt"
    if list_file.is_file():
        image_dir, label_dir = root_path / "images", root_path / "labels"
        stems = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        if not stems:
            raise DatasetError(f"split list {list_file} holds no names.")
        images, missing = [], []
        for stem in stems:
            image = _find_image(image_dir, stem)
            if image is None:
                missing.append(f"{image_dir / stem}.{{{','.join(e[1:] for e in IMAGE_EXTENSIONS)}}}")
            images.append(image)
        if missing:
            raise DatasetError(missing_message(f"images listed in {list_file} are missing", missing, len(stems),
                                               f"Put them in {image_dir}, or fix the list."))
        source = str(list_file)
    elif (root_path / "images" / split).is_dir():
        image_dir, label_dir = root_path / "images" / split, root_path / "labels" / split
        images = sorted(str(image_dir / f) for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise DatasetError(f"empty split: no images in {image_dir}. Expected layout:\n{LAYOUT}")
        source = str(image_dir)
    else:
        raise DatasetError(f"no split {split!r} in {root_path}: expected {list_file} or the folder "
                           f"{root_path / 'images' / split}. Expected layout:\n{LAYOUT}")
    return pair_files(images, lambda im: str(label_dir / (Path(im).stem + ".png")), f"folder split {split} ({source})",
                      f"Every image needs <stem>.png in {label_dir}.")


def build(root, split: str = "train", list_path=None, *, cache_images: bool = False, verbose: bool = True,
          **kwargs) -> SegmentationDataset:
    """The folder dataset's split as a :class:`SegmentationDataset` (classes from ``classes.json``)."""
    refuse_ram_cache(cache_images, "folder datasets")
    root_path = _check_root(root)
    return build_split(load_classes(root_path), root_path, split, list_path, scan_split, verbose=verbose, **kwargs)

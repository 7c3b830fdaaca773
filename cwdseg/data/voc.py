"""PASCAL VOC 2012 with the SBD augmentation ("VOC aug"), as the segmentation literature uses it.

Layout under ``root`` (the ``VOC2012`` folder of ``VOCdevkit``, with the ``SegmentationClassAug`` labels
and ``train_aug.txt`` list of the SBD-augmented release)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png               class values 0..20 (0 = background), 255 = object borders
    ImageSets/Segmentation/train_aug.txt        10 582 ids (VOC train + SBD, minus VOC val)
    ImageSets/Segmentation/val.txt              1 449 ids

Labels may be palette PNGs (as VOC's own ``SegmentationClass``) or greyscale PNGs (as most released
``SegmentationClassAug`` folders); both hold the class value per pixel. 255 is ignored in training and
evaluation. Counts and lists: CIRKD ``dataset/list/voc/{train_aug,val}.txt``; mmsegmentation's converter
``voc_aug.py`` (``AUG_LEN = 10582``) calls the same list ``aug.txt``.

CIRKD's own layout is accepted as well: its id lists live outside the root (``--data-list
dataset/list/voc/val.txt``, one bare id per line) and its val labels come from VOC's ``SegmentationClass/``
(palette PNGs of the same values); the label folder is found per split (:data:`LABEL_DIRS`).
"""
from __future__ import annotations

import os
from pathlib import Path

from cwdseg.data.base import SegmentationDataset, check_dir, count_note, missing_message, pair_files, refuse_ram_cache
from cwdseg.data.cityscapes import DatasetError, _check_root, read_list_file
from cwdseg.data.info import DatasetInfo, offset_table, voc_bit_palette

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
BORDER = 255
_file_to_class, _valid = offset_table(len(CLASS_NAMES), 0, [BORDER], len(CLASS_NAMES) - 1)
INFO = DatasetInfo(
    name="pascal_voc", class_names=CLASS_NAMES, colors=voc_bit_palette()[: len(CLASS_NAMES)].copy(),
    file_to_class=_file_to_class, valid_values=_valid, counts={"train": 10582, "val": 1449},
    ignore_description="255 (object borders)", label_description="values 0..20 used directly, 255 (borders) ignored",
)
SPLIT_LISTS = {"train": "train_aug.txt", "val": "val.txt"}
IMAGE_DIR, LABEL_DIR, LIST_DIR = "JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"
# Label folders tried in order per split: CIRKD trains on SegmentationClassAug/ and scores val on VOC's own
# SegmentationClass/ (dataset/voc.py: VOCDataTrainSet / VOCDataValSet); either serves val.
LABEL_DIRS = {"train": (LABEL_DIR,), "val": (LABEL_DIR, "SegmentationClass")}
LAYOUT = """  <root>/JPEGImages/<id>.jpg
  <root>/SegmentationClassAug/<id>.png      (0..20, 255 = border)
  <root>/ImageSets/Segmentation/train_aug.txt, val.txt   (one id per line)
  where <root> is VOCdevkit/VOC2012 with the SBD-augmented labels unpacked into it.
  CIRKD's layout works too: val labels in <root>/SegmentationClass/, the id lists outside the root
  (--data-list dataset/list/voc/train_aug.txt or val.txt)."""


def _resolve_root(root: Path) -> Path:
    if (root / IMAGE_DIR).is_dir():
        return root
    for sub in ("VOC2012", "VOCdevkit/VOC2012"):
        if (root / sub / IMAGE_DIR).is_dir():
            raise DatasetError(f"{root} is not a VOC root, but {root / sub} looks like one: pass "
                               f"--data-dir {root / sub}. Expected layout:\n{LAYOUT}")
    raise DatasetError(f"{root / IMAGE_DIR} not found: {root} is not a Pascal VOC root. Expected layout:\n{LAYOUT}")


def label_dir(root: Path, split: str, ids: list[str]) -> Path:
    """Where the labels of ``split`` are: the first folder of :data:`LABEL_DIRS` that holds every id's PNG
    (``SegmentationClassAug/``, the SBD-augmented release; for val also VOC's own ``SegmentationClass/``,
    from which CIRKD's ``VOCDataValSet`` reads, the same values), else the first that exists (its
    missing files are then named)."""
    candidates = [root / name for name in LABEL_DIRS.get(split, (LABEL_DIR,))]
    existing = [folder for folder in candidates if folder.is_dir()]
    for folder in existing:
        if all((folder / f"{image_id}.png").is_file() for image_id in ids):
            return folder
    return existing[0] if existing else check_dir(candidates[0], "label folder", LAYOUT)


def is_id_list(list_path: str | os.PathLike) -> bool:
    """Whether a list file holds bare VOC ids (``2007_000032`` per line, CIRKD's ``dataset/list/voc/*.txt``)
    rather than ``image<TAB>label`` paths."""
    lines = [line.split() for line in Path(list_path).read_text().splitlines() if line.strip()]
    return bool(lines) and all(len(f) == 1 and "/" not in f[0] and "." not in f[0] for f in lines)


def samples_from_ids(root_path: Path, ids: list[str], split: str, list_file: Path) -> list:
    """``JPEGImages/<id>.jpg`` paired with ``<label folder>/<id>.png`` (:func:`label_dir`) for each id."""
    if not ids:
        raise DatasetError(f"split list {list_file} holds no ids.")
    labels = label_dir(root_path, split, ids)
    images = [str(root_path / IMAGE_DIR / f"{image_id}.jpg") for image_id in ids]
    missing = [image for image in images if not os.path.isfile(image)]
    if missing:
        raise DatasetError(missing_message(f"images listed in {list_file} are missing", missing, len(ids),
                                           "Unpack the VOC2012 JPEGImages into the root."))
    return pair_files(images, lambda im: str(labels / (Path(im).stem + ".png")),
                      f"pascal_voc {split} ({list_file})",
                      f"Unpack the SBD-augmented SegmentationClassAug labels (or VOC's SegmentationClass for "
                      f"val) into {root_path}.")


def _read_ids(list_file: Path) -> list[str]:
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def scan_split(root: str | os.PathLike, split: str) -> list:
    """The samples of ``ImageSets/Segmentation/<list>.txt`` (``train`` -> train_aug.txt, ``val`` -> val.txt)."""
    root_path = _resolve_root(_check_root(root))
    if split not in SPLIT_LISTS:
        raise DatasetError(f"pascal_voc has the splits {sorted(SPLIT_LISTS)}, not {split!r}")
    list_file = root_path / LIST_DIR / SPLIT_LISTS[split]
    if not list_file.is_file():
        raise DatasetError(f"split list not found: {list_file}; put it there, or pass the id list with "
                           f"--data-list (CIRKD's layout: --data-list dataset/list/voc/{SPLIT_LISTS[split]}). "
                           f"Expected layout:\n{LAYOUT}")
    return samples_from_ids(root_path, _read_ids(list_file), split, list_file)


def build(root, split: str = "train", list_path=None, *, cache_images: bool = False, verbose: bool = True,
          **kwargs) -> SegmentationDataset:
    """The VOC-aug split as a :class:`SegmentationDataset`. ``list_path``: a list of bare ids (CIRKD's
    ``dataset/list/voc/{train_aug,val}.txt``, which live outside the root) or ``image<TAB>label`` lines."""
    refuse_ram_cache(cache_images, "pascal_voc")
    if list_path is None:
        root_path = _resolve_root(_check_root(root))
        samples = scan_split(root_path, split)
        source = f"{root_path / LIST_DIR / SPLIT_LISTS[split]}{count_note(INFO, root_path, split, len(samples))}"
    elif Path(list_path).is_file() and is_id_list(list_path):
        root_path = _resolve_root(_check_root(root))
        samples = samples_from_ids(root_path, _read_ids(Path(list_path)), split, Path(list_path))
        source = f"id list {list_path}, labels from {Path(samples[0].label).parent.name}/"
    else:
        root_path = _check_root(root)
        samples = read_list_file(list_path, root_path)
        source = f"list {list_path}"
    return SegmentationDataset(INFO, samples, root_path, split, source=source, verbose=verbose, **kwargs)

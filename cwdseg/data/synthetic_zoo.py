"""Small synthetic datasets in the exact official layout of every registered dataset.

``python -m cwdseg.data.synthetic_zoo OUT_DIR --dataset pascal_voc --train 8 --val 2 --seed 0``

Each image is a grid of convex objects on a background, one class per object, textured with a colour
per class plus noise, so a network can learn it. Deterministic per seed (every image draws from
``numpy.random.default_rng([seed, split, index])``); in every val image each class of the dataset
occurs at least once, and the dataset's ignored values occur too (VOC: 255 borders around every
object; ADE20K: the 0 "other" background; CamVid: a void object; folder: an object with the first
ignore value). ``cityscapes`` is the polygon generator of :mod:`cwdseg.data.synthetic`.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cwdseg.data import ade20k, camvid, voc
from cwdseg.data.info import voc_bit_palette
from cwdseg.data.synthetic import MARKER_FILE, holds_previous_synthetic  # one marker: counts are what was asked for

GENERATOR_VERSION = 1
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
DEFAULT_SIZES = {"cityscapes": (256, 512), "pascal_voc": (96, 128), "ade20k": (128, 176), "camvid": (90, 120),
                 "folder": (64, 96)}
# The folder demo: 5 classes stored as non-consecutive values, so the value -> class mapping is exercised.
FOLDER_CLASSES = {
    "classes": [
        {"name": "background", "value": 0, "color": [0, 0, 0]},
        {"name": "crop", "value": 10, "color": [0, 200, 0]},
        {"name": "weed", "value": 20, "color": [200, 0, 0]},
        {"name": "soil", "value": 30, "color": [140, 90, 40]},
        {"name": "stone", "value": 40, "color": [128, 128, 128]},
    ],
    "ignore": [255],
}
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95]
_NOISE_SIGMA = 6.0


def _value_styles() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed BGR colour, stripe angle and period for each of the 256 label values."""
    rng = np.random.default_rng(20260101)
    colors = rng.uniform(30, 225, (256, 3)).astype(np.float32)
    angles = rng.uniform(0, np.pi, 256).astype(np.float32)
    periods = rng.uniform(4, 12, 256).astype(np.float32)
    return colors, angles, periods


_COLORS, _ANGLES, _PERIODS = _value_styles()


def _grid(n_cells: int, height: int, width: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n_cells * width / height)))
    return math.ceil(n_cells / cols), cols


def _scene(rng: np.random.Generator, height: int, width: int, class_values: list[int], background: int,
           extra_values: list[int], all_classes: bool, border: int | None = None) -> np.ndarray:
    """A label image: ``background`` with one convex object per grid cell, values from ``class_values``.

    With ``all_classes`` every class value and every ``extra_values`` entry gets a cell; otherwise the
    cells draw at random. ``border``: a value drawn along each object's outline (VOC's 255).
    """
    n_needed = len(class_values) + len(extra_values)
    n_cells = max(n_needed, 6)
    rows, cols = _grid(n_cells, height, width)
    n_cells = rows * cols
    if all_classes:
        values = list(class_values) + list(extra_values)
        values += [class_values[int(rng.integers(len(class_values)))] for _ in range(n_cells - len(values))]
    else:
        values = [class_values[int(rng.integers(len(class_values)))] for _ in range(n_cells)]
    values = [values[i] for i in rng.permutation(n_cells)]
    label = np.full((height, width), background, np.uint8)
    cell_h, cell_w = height / rows, width / cols
    for k, value in enumerate(values):
        row, col = divmod(k, cols)
        cx, cy = (col + 0.5) * cell_w, (row + 0.5) * cell_h
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radius = rng.uniform(0.32, 0.48, n)
        pts = np.stack([cx + cell_w * radius * np.cos(angles), cy + cell_h * radius * np.sin(angles)], 1)
        pts = np.round(pts).astype(np.int32)
        cv2.fillPoly(label, [pts], int(value))
        if border is not None:
            cv2.polylines(label, [pts], True, int(border), 1)
    return label


def _render(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The BGR image of a label map: a colour and stripe texture per value, plus noise."""
    height, width = label.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = _ANGLES[label]
    stripes = 12.0 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / _PERIODS[label])
    image = _COLORS[label] + stripes[..., None]
    image += rng.standard_normal(image.shape, dtype=np.float32) * _NOISE_SIGMA
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write(path: Path, array: np.ndarray, ext: str = ".png") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(ext, array, _JPEG_PARAMS if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def _write_palette_png(path: Path, label: np.ndarray, palette: np.ndarray) -> None:
    """An indexed-colour PNG (as VOC's label files): pixels are the values, the palette gives colours."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", (label.shape[1], label.shape[0]), np.ascontiguousarray(label).tobytes())
    img.putpalette(palette.reshape(-1).tolist())
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def _prepare(root: Path) -> None:
    if holds_previous_synthetic(root):
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _samples(seed: int, split: str, count: int):
    for index in range(count):
        yield index, np.random.default_rng([seed, _SPLIT_CODE[split], index])


def _voc(root: Path, counts: dict, size, seed: int) -> None:
    classes = list(range(voc.INFO.num_classes))
    palette = voc_bit_palette()
    lists = root / voc.LIST_DIR
    lists.mkdir(parents=True, exist_ok=True)
    for split, year in (("train", 2007), ("val", 2008)):
        ids = []
        for index, rng in _samples(seed, split, counts[split]):
            image_id = f"{year}_{index:06d}"
            label = _scene(rng, *size, classes[1:], 0, [], split == "val", border=voc.BORDER)
            _write(root / voc.IMAGE_DIR / f"{image_id}.jpg", _render(label, rng), ".jpg")
            _write_palette_png(root / voc.LABEL_DIR / f"{image_id}.png", label, palette)
            ids.append(image_id)
        (lists / voc.SPLIT_LISTS[split]).write_text("".join(f"{i}\n" for i in ids))


def _ade20k(root: Path, counts: dict, size, seed: int) -> None:
    release = root / ade20k.RELEASE_DIR
    values = list(range(1, ade20k.INFO.num_classes + 1))
    for split, tag in (("train", "train"), ("val", "val")):
        folder = ade20k.SPLIT_DIRS[split]
        for index, rng in _samples(seed, split, counts[split]):
            name = f"ADE_{tag}_{index + 1:08d}"
            label = _scene(rng, *size, values, ade20k.OTHER, [], split == "val")
            _write(release / "images" / folder / f"{name}.jpg", _render(label, rng), ".jpg")
            _write(release / "annotations" / folder / f"{name}.png", label)
    (release / MARKER_FILE).write_text(json.dumps({"generator": __name__, "see": f"../{MARKER_FILE}"}) + "\n")


def _camvid(root: Path, counts: dict, size, seed: int) -> None:
    values = list(range(camvid.INFO.num_classes))
    prefixes = {"train": "0001TP_{:06d}", "val": "0016E5_{:05d}", "test": "Seq05VD_f{:05d}"}
    for split in camvid.SPLITS:
        for index, rng in _samples(seed, split, counts[split]):
            name = prefixes[split].format(index * 30)
            label = _scene(rng, *size, values[1:], 0, [camvid.VOID], split != "train")
            _write(root / split / f"{name}.png", _render(label, rng))
            _write(root / f"{split}annot" / f"{name}.png", label)


def _folder(root: Path, counts: dict, size, seed: int, classes: dict | None = None) -> None:
    spec = classes or FOLDER_CLASSES
    values = [c["value"] for c in spec["classes"]]
    ignore = list(spec.get("ignore", []))
    (root / "classes.json").write_text(json.dumps(spec, indent=2) + "\n")
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        stems = []
        for index, rng in _samples(seed, split, counts[split]):
            stem = f"{split}_{index:04d}"
            label = _scene(rng, *size, values[1:], values[0], ignore[:1], split == "val")
            _write(root / "images" / f"{stem}.jpg", _render(label, rng), ".jpg")
            _write(root / "labels" / f"{stem}.png", label)
            stems.append(stem)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))


_WRITERS = {"pascal_voc": _voc, "ade20k": _ade20k, "camvid": _camvid, "folder": _folder}
DATASET_NAMES = ("cityscapes", *_WRITERS)


def generate_dataset(name: str, out_dir: str | Path, n_train: int = 8, n_val: int = 2, n_test: int = 1,
                     size: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """Write a synthetic copy of dataset ``name`` in its official layout to ``out_dir``; returns the root
    to pass as ``--data-dir`` (``out_dir`` itself). ``size`` is (height, width); test images only where
    the dataset has a labelled test split (cityscapes' dummy labels, camvid)."""
    if name == "cityscapes":
        from cwdseg.data.synthetic import generate

        return generate(out_dir, n_train, n_val, n_test, tuple(size or DEFAULT_SIZES[name]), seed)
    if name not in _WRITERS:
        raise ValueError(f"no synthetic generator for {name!r}; choose one of {list(DATASET_NAMES)}")
    height, width = (int(s) for s in (size or DEFAULT_SIZES[name]))
    if min(height, width) < 32:
        raise ValueError(f"size must be at least 32x32 (h, w), got {size}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test) if name == "camvid" else 0}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"image counts must be >= 0, got {counts}")
    root = Path(out_dir).expanduser().resolve()
    _prepare(root)
    _WRITERS[name](root, counts, (height, width), seed)
    marker = {"generator": __name__, "dataset": name, "version": GENERATOR_VERSION, "seed": seed,
              "size": [height, width], "counts": counts}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic dataset in a registered dataset's layout.")
    parser.add_argument("out_dir", help="output folder (new, empty, or a previous synthetic dataset)")
    parser.add_argument("--dataset", default="cityscapes", choices=DATASET_NAMES, help="layout (default: %(default)s)")
    parser.add_argument("--train", type=int, default=8, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=2, help="validation images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=1,
                        help="test images, where the layout has them (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help=f"image height and width (default per dataset: {DEFAULT_SIZES})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate_dataset(args.dataset, args.out_dir, args.train, args.val, args.test, args.size, args.seed)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote synthetic {args.dataset} to {root} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

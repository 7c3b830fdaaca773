"""A small synthetic dataset in the exact Cityscapes layout, for the demo, the tests and the benchmarks.

``python -m cwdseg.data.synthetic OUT_DIR --train 24 --val 6 --test 4 --size 256 512 --seed 0``

Writes, per image (``<city>_<seq>_000019`` names, cities of its own: synthville/mockburg for train,
validton for val, testhaven for test)::

    leftImg8bit/<split>/<city>/<name>_leftImg8bit.png          BGR street-like scene
    gtFine/<split>/<city>/<name>_gtFine_polygons.json          the objects, as cityscapesscripts reads them
    gtFine/<split>/<city>/<name>_gtFine_labelIds.png           uint8 labelIds
    gtFine/<split>/<city>/<name>_gtFine_instanceIds.png        uint16, labelId*1000+k for instance classes
    gtFine/<split>/<city>/<name>_gtFine_color.png              RGBA in the official label colours

plus ``synthetic.json`` (the parameters; it marks the folder as ours, so a rerun may replace it).

Each scene is sky, a building skyline, road and sidewalks, an "ego vehicle" band at the bottom, an
unlabelled strip, and a grid of convex polygons of other classes. The label images are the polygons drawn
in order with PIL, exactly as cityscapesscripts' ``json2labelImg`` draws the json (so its
``createTrainIdLabelImgs`` reproduces our labels). Every val image holds all 19 train classes and the
ignored labelIds 0 (unlabeled), 1 (ego vehicle) and 4 (static); each image also has a "license plate"
polygon (labelId -1), which, as in Cityscapes, is in the json but never drawn. Test labels are dummies
(ego vehicle only), as in Cityscapes.

Pixels are learnable from local evidence: region colour = a per-class base colour + a per-region offset,
plus a per-class stripe texture (orientation, period, amplitude) and pixel noise. Output is a pure function
of (counts, size, seed): the same seed gives byte-identical files.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from cwdseg.data.labels import LABELS, NAME_TO_LABEL, NUM_CLASSES

__all__ = ["generate", "SPLIT_CITIES", "MARKER_FILE", "main"]

SPLIT_CITIES: dict[str, tuple[str, ...]] = {
    "train": ("synthville", "mockburg"),
    "val": ("validton",),
    "test": ("testhaven",),
}
MARKER_FILE = "synthetic.json"
GENERATOR_VERSION = 1
_FRAME = 19  # Cityscapes' annotated frame of each sequence is the 20th, index 000019
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]

_TRAIN_CLASS_NAMES = tuple(
    lbl.name for lbl in sorted(LABELS, key=lambda lbl: lbl.train_id) if 0 <= lbl.train_id < NUM_CLASSES)
# Ignored classes that may fill a grid cell (like Cityscapes' static clutter, parking lots, ...).
_IGNORED_CELL_NAMES = ("static", "dynamic", "ground", "parking", "rail track", "guard rail", "caravan", "trailer")
_GRID_ROWS, _GRID_COLS = 3, 8
_NOISE_SIGMA = 1.0  # pixel noise in grey levels; 1024x2048 PNGs come out near the real ~2.5 MB


def _class_styles() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-labelId base colour (BGR), stripe angle (rad), stripe period (px at width 512), amplitude."""
    color = np.full((256, 3), 60.0, np.float32)
    angle = np.zeros(256, np.float32)
    period = np.full(256, 8.0, np.float32)
    amplitude = np.zeros(256, np.float32)
    for label in LABELS:
        if label.id < 0:
            continue
        if 0 <= label.train_id < NUM_CLASSES:
            t = label.train_id
            # Hues around the wheel, two brightness levels: neighbouring classes differ in hue and value.
            r, g, b = colorsys.hsv_to_rgb(t / NUM_CLASSES, 0.55 + 0.35 * (t % 2), 0.95 - 0.35 * ((t // 2) % 2))
            color[label.id] = (255 * b, 255 * g, 255 * r)
            angle[label.id] = np.deg2rad((t * 47) % 180)
            period[label.id] = 4.0 + 3.0 * (t % 5)
            amplitude[label.id] = 14.0 + 3.0 * (t % 3)
        else:
            grey = 35.0 + 6.0 * label.id
            color[label.id] = (grey, grey * 0.9, grey * 0.8)
            angle[label.id] = np.deg2rad(30.0 * (label.id % 6))
            period[label.id] = 6.0
            amplitude[label.id] = 6.0
    return color, angle, period, amplitude


_BASE_BGR, _ANGLE, _PERIOD, _AMPLITUDE = _class_styles()


def _convex_polygon(rng: np.random.Generator, x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    """A random convex-ish polygon inside the box (x0, y0, w, h), in pixels (floats)."""
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radius = rng.uniform(0.3, 0.45, n)
    cx = x0 + w * (0.5 + rng.uniform(-0.04, 0.04))
    cy = y0 + h * (0.5 + rng.uniform(-0.04, 0.04))
    return [(cx + w * r * np.cos(a), cy + h * r * np.sin(a)) for a, r in zip(angles, radius)]


def _scene(rng: np.random.Generator, height: int, width: int, all_classes: bool) -> list[tuple[str, list]]:
    """The objects of one scene in drawing order: (label name, polygon in float pixels)."""
    H, W = height - 1, width - 1  # last pixel coordinate
    horizon = rng.uniform(0.30, 0.40) * H
    road_top = rng.uniform(0.62, 0.70) * H
    building_bottom = road_top - rng.uniform(0.03, 0.06) * H  # the gap stays unlabelled (labelId 0)
    objects: list[tuple[str, list]] = [
        ("sky", [(0, 0), (W, 0), (W, horizon + rng.uniform(-0.05, 0.05) * H), (0, horizon)]),
    ]
    skyline = [(0.0, building_bottom)]
    x = 0.0
    while x < W:
        top = rng.uniform(0.08, 0.30) * H
        skyline += [(x, top), (min(W, x + rng.uniform(0.08, 0.22) * W), top)]
        x = skyline[-1][0]
    skyline.append((W, building_bottom))
    objects.append(("building", skyline))
    objects.append(("road", [(0, road_top), (W, road_top), (W, H), (0, H)]))
    for edge, inward in ((0, 1), (W, -1)):  # a sidewalk triangle on each side of the road
        reach = rng.uniform(0.15, 0.3) * W
        objects.append(("sidewalk", [(edge, road_top), (edge + inward * reach, road_top),
                                     (edge, rng.uniform(0.8, 0.9) * H)]))

    # Grid of objects between y = 0.10 H and 0.90 H; cells never overlap, so every chosen class stays visible.
    n_cells = _GRID_ROWS * _GRID_COLS
    if all_classes:
        names = list(_TRAIN_CLASS_NAMES) + ["static"]
        names += [_pick_cell_class(rng) for _ in range(n_cells - len(names))]
        names = [names[i] for i in rng.permutation(n_cells)]
    else:
        names = [_pick_cell_class(rng) for _ in range(n_cells - 1)] + ["static"]
        names = [names[i] for i in rng.permutation(n_cells)]
    cell_h, cell_w = 0.80 * H / _GRID_ROWS, W / _GRID_COLS
    instance_cells = []
    for k, name in enumerate(names):
        row, col = divmod(k, _GRID_COLS)
        box = (col * cell_w, 0.10 * H + row * cell_h, cell_w, cell_h)
        objects.append((name, _convex_polygon(rng, *box)))
        instance_cells.append(box)
    # A license plate (labelId -1): in the json, never drawn, exactly as in Cityscapes.
    x0, y0, cw, ch = instance_cells[int(rng.integers(n_cells))]
    objects.append(("license plate", [(x0 + 0.4 * cw, y0 + 0.6 * ch), (x0 + 0.6 * cw, y0 + 0.6 * ch),
                                      (x0 + 0.6 * cw, y0 + 0.7 * ch), (x0 + 0.4 * cw, y0 + 0.7 * ch)]))
    objects.append(("ego vehicle", _ego_vehicle(rng, H, W)))
    return objects


def _pick_cell_class(rng: np.random.Generator) -> str:
    if rng.random() < 0.8:
        return _TRAIN_CLASS_NAMES[int(rng.integers(NUM_CLASSES))]
    return _IGNORED_CELL_NAMES[int(rng.integers(len(_IGNORED_CELL_NAMES)))]


def _ego_vehicle(rng: np.random.Generator, H: int, W: int) -> list:
    """The bonnet at the bottom: a band below 0.91 H whose top edge is an arc."""
    top = rng.uniform(0.92, 0.95) * H
    xs = np.linspace(0, W, 17)
    arc = top + 0.04 * H * ((xs - W / 2) / (W / 2)) ** 2
    return [(0, H)] + [(float(x), float(y)) for x, y in zip(xs, arc)] + [(W, H)]


def _to_int_polygon(points: list) -> list[list[int]]:
    # Integer vertices, as in the Cityscapes json; both our renderer and json2labelImg draw these exact points.
    return [[int(round(x)), int(round(y))] for x, y in points]


def _render(objects: list[tuple[str, list[list[int]]]], height: int, width: int, rng: np.random.Generator):
    """labelIds (uint8), instanceIds (uint16) and the BGR image of a scene."""
    canvas = Image.new("L", (width, height), 0)  # region 0 = background, labelId 0 ("unlabeled")
    draw = ImageDraw.Draw(canvas)
    region_label = [0]
    region_instance = [0]
    next_instance: dict[int, int] = {}
    for name, polygon in objects:
        label = NAME_TO_LABEL[name]
        if label.id < 0:  # cityscapesscripts skips these polygons too
            continue
        draw.polygon([tuple(p) for p in polygon], fill=len(region_label))
        region_label.append(label.id)
        if label.has_instances:
            k = next_instance.get(label.id, 0)
            next_instance[label.id] = k + 1
            region_instance.append(label.id * 1000 + k)
        else:
            region_instance.append(label.id)
    regions = np.asarray(canvas)
    label_ids = np.asarray(region_label, np.uint8)[regions]
    instance_ids = np.asarray(region_instance, np.uint16)[regions]

    # Colour per region (class base + offset), then a per-class stripe texture and pixel noise.
    offsets = rng.uniform(-12, 12, (len(region_label), 3)).astype(np.float32)
    region_color = _BASE_BGR[np.asarray(region_label)] + offsets
    image = region_color[regions]
    scale = width / 512.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = _ANGLE[label_ids]
    phase = (xx * np.cos(theta) + yy * np.sin(theta)) / (_PERIOD[label_ids] * scale)
    image += (_AMPLITUDE[label_ids] * np.sin(2 * np.pi * phase))[..., None]
    image += rng.standard_normal(image.shape, dtype=np.float32) * _NOISE_SIGMA
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return label_ids, instance_ids, image


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array, _PNG_PARAMS)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def _write_frame(root: Path, split: str, city: str, name: str, objects, label_ids, instance_ids, image,
                 height: int, width: int) -> None:
    image_dir = root / "leftImg8bit" / split / city
    label_dir = root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    _write_png(image_dir / f"{name}_leftImg8bit.png", image)
    _write_png(label_dir / f"{name}_gtFine_labelIds.png", label_ids)
    _write_png(label_dir / f"{name}_gtFine_instanceIds.png", instance_ids)
    color_rgb = np.zeros((256, 3), np.uint8)
    for label in LABELS:
        if label.id >= 0:
            color_rgb[label.id] = label.color
    rgb = color_rgb[label_ids]
    bgra = np.concatenate([rgb[..., ::-1], np.full(label_ids.shape + (1,), 255, np.uint8)], axis=-1)
    _write_png(label_dir / f"{name}_gtFine_color.png", bgra)
    annotation = {
        "imgHeight": height,
        "imgWidth": width,
        "objects": [
            {"date": "", "deleted": 0, "id": k, "label": label, "polygon": polygon, "user": "synthetic",
             "verified": 1}
            for k, (label, polygon) in enumerate(objects)
        ],
    }
    (label_dir / f"{name}_gtFine_polygons.json").write_text(json.dumps(annotation, indent=4) + "\n")


def holds_previous_synthetic(root: Path) -> bool:
    """Whether ``root`` holds an earlier synthetic dataset (to clear); a file, or a non-empty folder without
    its marker, is refused: the generators never write into (or clear) a foreign folder."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root} exists and is not a folder; choose another output path.")
    if not (root.is_dir() and any(root.iterdir())):
        return False
    if not (root / MARKER_FILE).is_file():
        raise FileExistsError(f"{root} is not empty and holds no {MARKER_FILE}: refusing to write a synthetic "
                              "dataset into it. Choose an empty or new folder.")
    return True


def _prepare_out_dir(root: Path) -> None:
    """Refuse to write into a foreign non-empty folder; clear a previous synthetic dataset."""
    if holds_previous_synthetic(root):
        for sub in ("leftImg8bit", "gtFine"):
            shutil.rmtree(root / sub, ignore_errors=True)
        (root / MARKER_FILE).unlink()
    root.mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | Path,
    n_train: int = 24,
    n_val: int = 6,
    n_test: int = 4,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
) -> Path:
    """Write a synthetic Cityscapes-layout dataset to ``out_dir`` and return its root (absolute Path).

    ``size`` is (height, width). ``out_dir`` must be new, empty, or a previous output of this function
    (which is replaced). The files are a pure function of the arguments.
    """
    height, width = int(size[0]), int(size[1])
    if height < 32 or width < 64:
        raise ValueError(f"size must be at least 32x64 (h, w) to fit the scene, got {size}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"image counts must be >= 0, got {counts}")
    root = Path(out_dir).expanduser().resolve()
    _prepare_out_dir(root)
    for split, count in counts.items():
        cities = SPLIT_CITIES[split]
        per_city = -(-count // len(cities)) if count else 0
        for index in range(count):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
            city = cities[index // per_city]
            name = f"{city}_{index % per_city:06d}_{_FRAME:06d}"
            objects = [(n, _to_int_polygon(p)) for n, p in _scene(rng, height, width, all_classes=split == "val")]
            label_ids, instance_ids, image = _render(objects, height, width, rng)
            if split == "test":
                # Dummy labels, as Cityscapes ships for test: only the ego vehicle is annotated.
                objects = [o for o in objects if o[0] == "ego vehicle"]
                label_ids, instance_ids, _ = _render(objects, height, width, np.random.default_rng(0))
            _write_frame(root, split, city, name, objects, label_ids, instance_ids, image, height, width)
    marker = {"generator": "cwdseg.data.synthetic", "version": GENERATOR_VERSION, "seed": seed,
              "size": [height, width], "counts": counts, "cities": SPLIT_CITIES}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return root


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic dataset in the Cityscapes layout.")
    parser.add_argument("out_dir", help="output folder (new, empty, or a previous synthetic dataset)")
    parser.add_argument("--train", type=int, default=24, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=6, help="validation images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=4, help="test images (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"),
                        help="image height and width (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        root = generate(args.out_dir, args.train, args.val, args.test, tuple(args.size), args.seed)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote synthetic Cityscapes to {root}: train {args.train}, val {args.val}, test {args.test} images "
          f"of {args.size[0]}x{args.size[1]} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

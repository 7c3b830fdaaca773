"""Cityscapes in its official layout: sample lists, decoding with checks, the Dataset and its DataLoader.

Layout under ``root`` (what the Cityscapes downloads unpack to, and what ``cwdseg.data.synthetic`` writes)::

    leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (optional, cityscapesscripts'
                                                                          createTrainIdLabelImgs makes it)

Which label file is used: by default ``*_labelIds.png`` mapped through the official labelId -> trainId table
(``dataset.labels.LABEL_ID_TO_TRAIN_ID``), as the original code does. With ``label_type="labelTrainIds"``
the ``*_labelTrainIds.png`` files are read and used as they are. Per file, the encoding follows the file
name: a name ending in ``_labelTrainIds.png`` holds trainIds, any other name holds labelIds.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cwdseg.data.cache import open_image_cache
from cwdseg.data.errors import DatasetError
from cwdseg.data.labels import IGNORE_LABEL, LABEL_ID_TO_TRAIN_ID, MAX_LABEL_ID, NUM_CLASSES
from cwdseg.data.sampling import sample_key
from cwdseg.data.transforms import CAFFE_BGR, IMG_MEAN_BGR, Normalization, preprocess

__all__ = [
    "IMG_MEAN_BGR", "DatasetError", "Sample", "read_list_file", "scan_split", "read_image", "read_label",
    "CityscapesDataset", "worker_init_fn", "build_loader",
]

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_TYPES = ("labelIds", "labelTrainIds")
TRAIN_IDS_SUFFIX = "_labelTrainIds.png"
_SHOW_MISSING = 5  # how many missing files an error message names
# Image counts of the official release; a scan that finds other numbers says so (a partial unpack?).
CITYSCAPES_COUNTS = {"train": 2975, "val": 500, "test": 1525}


@dataclass
class Sample:
    """One image of a split: absolute paths, and the name used for outputs (``aachen_000000_000019``)."""

    image: str
    label: str | None
    name: str


def _sample_name(image_path: str) -> str:
    base = os.path.basename(image_path)
    return base[: -len(IMAGE_SUFFIX)] if base.endswith(IMAGE_SUFFIX) else os.path.splitext(base)[0]


def _label_dir(split: str) -> str:
    # The 20k extra training images of Cityscapes only have coarse labels.
    return "gtCoarse" if split == "train_extra" else "gtFine"


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"dataset root not found: {path}. Pass the folder that holds leftImg8bit/ and gtFine/ "
            "(e.g. --data-dir /data/cityscapes), or make a synthetic one with "
            "`python -m cwdseg.data.synthetic OUT_DIR`."
        )
    return path.resolve()


def _missing_message(what: str, missing: Sequence[str], total: int, hint: str) -> str:
    shown = "\n  ".join(missing[:_SHOW_MISSING])
    more = f"\n  ... and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    return f"{len(missing)} of {total} {what}:\n  {shown}{more}\n{hint}"


def read_list_file(list_path: str | os.PathLike, root: str | os.PathLike, split: str | None = None) -> list[Sample]:
    """Parse an original-format list file: ``image<TAB>label`` per line (image only for test splits).

    Paths are relative to ``root`` (absolute paths are kept). Fields may be separated by any whitespace,
    as the original's ``line.split()``; blank lines are skipped. Every listed file must exist. Given a
    ``split`` other than ``test``, every line must name its label (an image-only line there would be
    scored as all-ignored and give mIoU 0 without a word).
    """
    root_path = _check_root(root)
    list_file = Path(list_path).expanduser()
    if not list_file.is_file():
        raise DatasetError(f"list file not found: {list_file}. Pass an existing --data-list, or leave it out "
                           "to scan the split folders under the root.")
    samples: list[Sample] = []
    missing: list[str] = []
    for line_no, line in enumerate(list_file.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DatasetError(f"{list_file}:{line_no}: expected 'image<TAB>label' or 'image', got {len(fields)} "
                               f"fields: {line!r}")
        if len(fields) == 1 and split is not None and split != "test":
            raise DatasetError(f"{list_file}:{line_no}: the {split} split needs 'image<TAB>label' on every line, "
                               f"this line has no label column: {line!r}; add the label path (only test lists "
                               "may be image-only)")
        image = str(root_path / fields[0])
        label = str(root_path / fields[1]) if len(fields) == 2 else None
        for path in (image, label):
            if path is not None and not os.path.isfile(path):
                missing.append(f"line {line_no}: {path}")
        samples.append(Sample(image=image, label=label, name=_sample_name(image)))
    if missing:
        raise DatasetError(_missing_message(
            f"files listed in {list_file} are missing", missing, len(samples),
            f"Check that --data-dir ({root_path}) is the folder the list's paths are relative to."))
    if not samples:
        raise DatasetError(f"list file {list_file} holds no samples.")
    return samples


def scan_split(root: str | os.PathLike, split: str, label_type: str = "labelIds") -> list[Sample]:
    """List ``leftImg8bit/<split>/*/*_leftImg8bit.png`` under ``root``, sorted by path, with their labels.

    Labels are ``gtFine/<split>/<city>/<name>_gtFine_<label_type>.png`` (gtCoarse for ``train_extra``);
    every image must have one. The ``test`` split gets ``label=None``: Cityscapes ships only dummy test labels.
    """
    if label_type not in LABEL_TYPES:
        raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
    root_path = _check_root(root)
    image_root = root_path / "leftImg8bit"
    split_dir = image_root / split
    if not split_dir.is_dir():
        found = sorted(p.name for p in image_root.iterdir() if p.is_dir()) if image_root.is_dir() else []
        raise DatasetError(f"split folder not found: {split_dir} (splits present: {found or 'none'}). "
                           "Check --data-dir and the split name, or pass --data-list.")
    image_paths = sorted(
        str(city_dir / entry)
        for city_dir in split_dir.iterdir() if city_dir.is_dir()
        for entry in os.listdir(city_dir) if entry.endswith(IMAGE_SUFFIX)
    )
    if not image_paths:
        raise DatasetError(f"empty split: no *{IMAGE_SUFFIX} files in {split_dir}/<city>/. "
                           "Check that the leftImg8bit archive was unpacked into the root.")
    samples: list[Sample] = []
    missing: list[str] = []
    label_dir = _label_dir(split)
    for image in image_paths:
        name = _sample_name(image)
        label = None
        if split != "test":
            city = os.path.basename(os.path.dirname(image))
            label = str(root_path / label_dir / split / city / f"{name}_{label_dir}_{label_type}.png")
            if not os.path.isfile(label):
                missing.append(label)
        samples.append(Sample(image=image, label=label, name=name))
    if missing:
        hint = (f"Unpack the {label_dir} archive into {root_path}"
                + (", and run cityscapesscripts' createTrainIdLabelImgs" if label_type == "labelTrainIds" else "")
                + ", or pass a --data-list naming the pairs.")
        raise DatasetError(_missing_message(f"images of split '{split}' have no label file", missing,
                                            len(image_paths), hint))
    return samples


def _to_train_id_files(samples: list[Sample], source: str) -> list[Sample]:
    """Point list-file labels at the ``*_labelTrainIds.png`` next to each ``*_labelIds.png``."""
    converted, missing = [], []
    for sample in samples:
        label = sample.label
        if label is not None and not label.endswith(TRAIN_IDS_SUFFIX):
            if not label.endswith("_labelIds.png"):
                raise DatasetError(f"label_type='labelTrainIds' needs *_labelIds.png or *_labelTrainIds.png "
                                   f"labels in {source}, got {label}")
            label = label[: -len("_labelIds.png")] + TRAIN_IDS_SUFFIX
            if not os.path.isfile(label):
                missing.append(label)
        converted.append(Sample(sample.image, label, sample.name))
    if missing:
        raise DatasetError(_missing_message("labelTrainIds files are missing", missing, len(samples),
                                            "Run cityscapesscripts' createTrainIdLabelImgs, or use "
                                            "label_type='labelIds'."))
    return converted


# ----------------------------------------------------------------------------------------------- decoding

try:  # optional, faster PNG decoding (see read_image)
    import pyspng
except ImportError:
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_bytes(path: str, what: str) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}. Check the path and permissions.") from exc
    if data.size == 0:
        raise DatasetError(f"empty {what} file: {path}. Re-download or regenerate it.")
    return data


def _decode(data: np.ndarray, flags: int, path: str, what: str) -> np.ndarray:
    array = cv2.imdecode(data, flags)
    if array is None:
        raise DatasetError(f"cannot decode {what} {path} (truncated or not an image). Re-download or "
                           "regenerate it.")
    return array


def read_image(path: str) -> np.ndarray:
    """Decode an image as OpenCV's ``imread(path, IMREAD_COLOR)`` does: (H, W, 3) uint8 BGR.

    8-bit RGB PNGs (every Cityscapes image) go through libspng when the optional ``pyspng`` is
    installed (``pip install -e ".[fast-png]"``): identical pixels, ~1.4x faster, and PNG decoding is
    most of a training sample's cost. Every other file, or without pyspng, is decoded by OpenCV.
    """
    data = _read_bytes(path, "image")
    if pyspng is not None and data[:8].tobytes() == PNG_SIGNATURE:
        try:
            rgb = pyspng.load(data.tobytes())
        except Exception as exc:  # pyspng raises plain exceptions for damaged files
            raise DatasetError(f"cannot decode image {path} (truncated or not an image: {exc}). Re-download or "
                               "regenerate it.") from exc
        if rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8:
            return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return _decode(data, cv2.IMREAD_COLOR, path, "image")


def read_label(path: str) -> np.ndarray:
    """Decode a label image: (H, W) uint8, single channel (colour or 16-bit files are refused)."""
    label = _decode(_read_bytes(path, "label"), cv2.IMREAD_UNCHANGED, path, "label")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(f"label {path} is {label.dtype} with shape {label.shape}; expected a single-channel "
                           "8-bit *_labelIds.png (or *_labelTrainIds.png), not the colour or instance image.")
    return label


def _is_train_id_file(path: str) -> bool:
    return path.endswith(TRAIN_IDS_SUFFIX)


def _check_label_values(label: np.ndarray, path: str) -> None:
    """Refuse values that cannot occur in the file's encoding (a trainId image under a labelIds name, ...)."""
    if _is_train_id_file(path):
        # trainIds are 0..18 plus the ignore value (255 in createTrainIdLabelImgs' output).
        bad = cv2.countNonZero(cv2.inRange(label, NUM_CLASSES, 254)) if label.max() >= NUM_CLASSES else 0
        if bad:
            values = sorted(set(np.unique(label).tolist()) - set(range(NUM_CLASSES)) - {255})
            raise DatasetError(f"label {path} holds values {values[:10]} that are not trainIds (0..18, 255).")
    elif label.max() > MAX_LABEL_ID:
        raise DatasetError(f"label {path} holds value {int(label.max())}, not a Cityscapes labelId (0..33). "
                           "If it holds trainIds, name it *_labelTrainIds.png or use label_type='labelTrainIds'.")


def _label_lut(train_ids: bool, ignore_label: int) -> np.ndarray:
    """(256,) uint8 table from the file's values to trainIds with ``ignore_label``."""
    if train_ids:
        lut = np.full(256, ignore_label, np.uint8)
        lut[:NUM_CLASSES] = np.arange(NUM_CLASSES, dtype=np.uint8)
        return lut
    lut = LABEL_ID_TO_TRAIN_ID.copy()
    lut[lut == IGNORE_LABEL] = ignore_label
    return lut


def check_pair_sizes(sample: Sample, image: np.ndarray, label: np.ndarray) -> None:
    """A label must have its image's size (every dataset layout checks its pairs with this)."""
    if label.shape != image.shape[:2]:
        raise DatasetError(f"label {sample.label} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                           f"{sample.image} is {image.shape[1]}x{image.shape[0]}; the pair does not belong "
                           "together. Fix the list file or regenerate the label.")


def _load_checked_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode an image and its label (None for unlabelled samples), checking sizes and label values."""
    image = read_image(sample.image)
    if sample.label is None:
        return image, None
    label = read_label(sample.label)
    check_pair_sizes(sample, image, label)
    _check_label_values(label, sample.label)
    return image, label


def _load_pair(image_path: str, label_path: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """``_load_checked_pair`` by paths: the decoder an image cache stores the output of."""
    return _load_checked_pair(Sample(image_path, label_path, _sample_name(image_path)))


def _quiet(*_args: object) -> None:
    pass


def _png_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a PNG's IHDR chunk without decoding; None when the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


# ------------------------------------------------------------------------------------------------ caching

class _DecodedCache:
    """Decoded uint8 images and trainId labels of a whole split in one contiguous, read-only buffer.

    It is filled in the constructor (before any DataLoader worker starts), with a thread pool (OpenCV's
    decoder releases the GIL). With the ``fork`` start method, workers share its pages copy-on-write; the
    buffer is one allocation that is never written after filling, so the pages stay shared and the memory
    is paid once (about 6 MB per 1024x2048 image plus 2 MB per label, ~24 GB for Cityscapes train).
    ``build_loader`` insists on ``fork`` for a cached dataset, since other start methods pickle a copy
    into every worker.
    """

    def __init__(self, samples: list[Sample], ignore_label: int, threads: int) -> None:
        self.ignore_label = ignore_label
        shapes = [self._shape(s.image) for s in samples]
        sizes = [h * w * 3 + (h * w if s.label is not None else 0) for (h, w), s in zip(shapes, samples)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.shapes = shapes
        self.labelled = [s.label is not None for s in samples]
        self.buffer = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(self._fill, range(len(samples)), samples))
        self.buffer.setflags(write=False)

    @staticmethod
    def _shape(path: str) -> tuple[int, int]:
        size = _png_size(path)
        if size is None:
            # Non-PNG (a custom list): decoding once is the only format-independent way to get the size.
            size = read_image(path).shape[:2]
        return size

    def _fill(self, index: int, sample: Sample) -> None:
        image, label = _load_checked_pair(sample)
        height, width = self.shapes[index]
        if image.shape[:2] != (height, width):
            raise DatasetError(f"image {sample.image} decodes to {image.shape[:2]}, its header says "
                               f"{(height, width)}; the file is damaged.")
        start = int(self.offsets[index])
        self.buffer[start:start + image.size] = image.reshape(-1)
        if label is not None:
            mapped = cv2.LUT(label, _label_lut(_is_train_id_file(sample.label), self.ignore_label))
            self.buffer[start + image.size:start + image.size + label.size] = mapped.reshape(-1)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Read-only views: image (H, W, 3) BGR uint8 and label (H, W) trainIds, or None."""
        height, width = self.shapes[index]
        start = int(self.offsets[index])
        image = self.buffer[start:start + height * width * 3].reshape(height, width, 3)
        if not self.labelled[index]:
            return image, None
        label_start = start + height * width * 3
        return image, self.buffer[label_start:label_start + height * width].reshape(height, width)

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)


# ------------------------------------------------------------------------------------------------ dataset

class CityscapesDataset(Dataset):
    """Cityscapes images with trainId labels, preprocessed exactly as the original CWD code.

    ``dataset[i]`` or ``dataset[(i, seed)]`` returns ``(image, label, name)``: image float32 [3, H, W]
    (or, with ``uint8_images=True``, uint8 [4, H, W]: the picture in the network's channel order and a
    content mask, 255 image / 0 padding, which ``normalization.to_float_tensor`` turns on the device into
    exactly the float32 image)
    (by default BGR minus ``IMG_MEAN_BGR``, as the original; see ``normalization``; padding 0.0), label
    uint8 [H, W] of trainIds with ``ignore_label``
    (all ``ignore_label`` for an unlabelled test image), and the sample name. With a seed, every random
    choice (scale, crop offset, mirror) draws from ``np.random.default_rng(seed)``, so a key gives the same
    sample in any process. With a plain index, the seed is drawn from torch's global generator, which
    DataLoader seeds per worker from the loader's generator.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        list_path: str | os.PathLike | None = None,
        crop_size: tuple[int, int] | None = (512, 512),
        random_scale: bool = False,
        random_mirror: bool = False,
        ignore_label: int = IGNORE_LABEL,
        cache_images: bool = False,
        *,
        label_type: str = "labelIds",
        verbose: bool = True,
        cache_threads: int | None = None,
        normalization: Normalization = CAFFE_BGR,
        image_cache: str | os.PathLike | None = None,
        uint8_images: bool = False,
    ) -> None:
        if crop_size is not None:
            if len(crop_size) != 2 or any(int(c) != c or c < 1 for c in crop_size):
                raise ValueError(f"crop_size must be two positive ints (h, w) or None, got {crop_size!r}")
            crop_size = (int(crop_size[0]), int(crop_size[1]))
        if not 0 <= ignore_label <= 255:
            raise ValueError(f"ignore_label must fit in uint8, got {ignore_label}")
        if label_type not in LABEL_TYPES:
            raise ValueError(f"label_type must be one of {LABEL_TYPES}, got {label_type!r}")
        self.root = str(_check_root(root))
        self.split = split
        self.crop_size = crop_size
        self.random_scale = random_scale
        self.random_mirror = random_mirror
        self.ignore_label = ignore_label
        self.label_type = label_type
        if list_path is None:
            self.samples = scan_split(self.root, split, label_type)
            source = f"scanned {self.root}"
            expected = CITYSCAPES_COUNTS.get(split)
            # synthetic.json marks a cwdseg.data.synthetic output, whose counts are whatever was asked for.
            if expected not in (None, len(self.samples)) and not (Path(self.root) / "synthetic.json").is_file():
                source += f"; the full Cityscapes {split} split has {expected}"
        else:
            self.samples = read_list_file(list_path, self.root, split)
            if label_type == "labelTrainIds":
                self.samples = _to_train_id_files(self.samples, str(list_path))
            source = f"list {list_path}"
        self.normalization = normalization  # the weights' input convention (default: the original's)
        # (4, H, W) uint8 out, normalised on the device (Normalization.to_float_tensor)
        self.uint8_images = uint8_images
        self._mean_lut = normalization.lut()
        self._luts = {train_ids: _label_lut(train_ids, ignore_label) for train_ids in (False, True)}
        self._cache: _DecodedCache | None = None
        if cache_images and image_cache is not None:
            raise DatasetError("cache_images (RAM) and image_cache (disk) are alternatives; pass one of them.")
        if cache_images:
            threads = cache_threads or min(8, os.cpu_count() or 1)
            self._cache = _DecodedCache(self.samples, ignore_label, threads)
            source += f"; {self._cache.nbytes / 2**30:.2f} GiB decoded in RAM"
        self._image_cache = None  # decoded pairs memory-mapped from disk (cwdseg.data.cache)
        if image_cache is not None:
            self._image_cache = open_image_cache(image_cache, [(s.image, s.label) for s in self.samples],
                                                 _load_pair, threads=cache_threads, log=print if verbose else _quiet)
            source += f"; {self._image_cache.nbytes / 2**30:.2f} GiB decoded, memory-mapped from {image_cache}"
        if verbose:
            print(f"cityscapes {split}: {len(self.samples)} images ({source}; labels: {self.label_description()})")

    def label_description(self) -> str:
        """Which label files are read and how they become trainIds (for logs)."""
        labels = [s.label for s in self.samples if s.label is not None]
        if not labels:
            return "none, all pixels ignored"
        n_train = sum(_is_train_id_file(p) for p in labels)
        if n_train == len(labels):
            return "*_labelTrainIds.png used directly"
        if n_train == 0:
            return "*_labelIds.png -> trainIds by the official table"
        return f"{n_train} *_labelTrainIds.png used directly, {len(labels) - n_train} labelIds mapped"

    region_resize = True  # False: the random scale resizes the whole image (the previous path; benchmarks set it)

    @property
    def cached(self) -> bool:
        """True when decoded images are held in RAM (``cache_images=True``)."""
        return self._cache is not None

    @property
    def image_cache(self):
        """The memory-mapped ``cwdseg.data.cache.ImageCache`` (``image_cache=DIR``), or None."""
        return self._image_cache

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Decoded image (H, W, 3) BGR uint8, raw label (H, W) uint8 or None, and the LUT to trainIds."""
        if self._cache is not None:
            image, label = self._cache.get(index)
            return image, label, None  # cached labels are already trainIds
        sample = self.samples[index]
        if self._image_cache is not None:  # same arrays as _load_checked_pair, decoded once at build time
            image, label = self._image_cache.read(sample.image, sample.label)
        else:
            image, label = _load_checked_pair(sample)
        lut = None if sample.label is None else self._luts[_is_train_id_file(sample.label)]
        return image, label, lut

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        needs_rng = self.random_scale or self.random_mirror or self.crop_size is not None
        index, rng = sample_key(key, len(self), needs_rng)
        image, label, lut = self.load_raw(index)
        image, label = preprocess(image, label, rng, self.crop_size, self.random_scale, self.random_mirror,
                                  lut, self.ignore_label, self._mean_lut, self.normalization.rgb,
                                  region_resize=self.region_resize, uint8_output=self.uint8_images)
        return torch.from_numpy(image), torch.from_numpy(label), self.samples[index].name


# ------------------------------------------------------------------------------------------------ loading

def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker setup: OpenCV single-threaded, so N workers use N cores, not N x cores.

    Workers ignore SIGINT, SIGUSR1/2 and any SIGTERM that does not come from their main process:
    Ctrl-C and a scheduler's SIGTERM reach the whole process group, and the main process still needs
    its workers to finish the step before it saves (``cwdseg.engine.signals``). A SIGTERM from the
    main process (how it shuts workers down at exit) still ends the worker, as torch's own handler
    does; the sender is known only to ``sigwaitinfo``, hence the blocked signal and the small thread.
    """
    cv2.setNumThreads(0)
    cv2.ocl.setUseOpenCL(False)
    for name in ("SIGINT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere torch's default (die on SIGTERM) stays
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_parent_sigterm, args=(os.getppid(),), daemon=True,
                         name="sigterm-from-parent").start()


def _exit_on_parent_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)


def default_num_workers() -> int:
    """Loader processes per training process: the cores this process may use, shared among local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // max(1, local_procs) - 1))


def build_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | Iterable | None = None,
    shuffle: bool = False,
    num_workers: int | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    prefetch_factor: int = 4,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader set up so that loading keeps up with the GPU.

    Pinned memory when CUDA is available (``pin_memory=None``), persistent workers and ``prefetch_factor``
    batches in flight per worker when ``num_workers > 0``, ``worker_init_fn`` (OpenCV single-threaded).
    ``num_workers=None`` picks ``default_num_workers()``. A dataset with ``cache_images=True`` gets the
    ``fork`` start method so that workers share the cache instead of each receiving a copy.
    """
    if num_workers is None:
        num_workers = default_num_workers()
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs: dict = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=worker_init_fn)
        if getattr(dataset, "cached", False):
            if "fork" not in multiprocessing.get_all_start_methods():
                raise DatasetError("cache_images=True with worker processes needs the 'fork' start method, "
                                   "which this platform lacks; use num_workers=0 or cache_images=False.")
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      sampler=sampler, num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
                      generator=generator, **kwargs)

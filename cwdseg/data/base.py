"""The dataset class shared by every non-Cityscapes layout: index labels + a lookup table, then the
same uint8-first preprocessing as Cityscapes (``cwdseg.data.transforms.preprocess``).

One function reads a sample, :func:`load_pair` (image, raw label, both checked); the datasets call only
it, so a decoded-image cache can hook in at one place.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cwdseg.data.cache import open_image_cache
from cwdseg.data.cityscapes import (
    DatasetError,
    Sample,
    _decode,
    _read_bytes,
    check_pair_sizes,
    read_image,
    read_list_file,
)
from cwdseg.data.info import IGNORE_INDEX, DatasetInfo
from cwdseg.data.sampling import sample_key
from cwdseg.data.transforms import CAFFE_BGR, Normalization, preprocess

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3  # IHDR colour type of an indexed-colour PNG
_SHOW_MISSING = 5


def read_index_label(path: str) -> np.ndarray:
    """Decode a label image to its stored values: (H, W) uint8.

    Indexed-colour ("palette") PNGs, as VOC's ``SegmentationClass``, are read as their palette indices
    with Pillow (OpenCV would turn them into colours); every other file with OpenCV, unchanged. Colour
    (3-channel) and 16-bit labels are refused, naming the file.
    """
    data = _read_bytes(path, "label")
    raw = data[:26].tobytes()
    if len(raw) >= 26 and raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR" and raw[25] == _PNG_PALETTE:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data.tobytes())) as img:
                img.load()
                label = np.asarray(img)
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise DatasetError(f"cannot decode label {path} (truncated or not an image: {exc}). Re-download or "
                               "regenerate it.") from exc
    else:
        label = _decode(data, cv2.IMREAD_UNCHANGED, path, "label")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(f"label {path} is {label.dtype} with shape {label.shape}; expected a single-channel "
                           "8-bit PNG of class values (palette or greyscale), not a colour rendering.")
    return label


def check_label_values(label: np.ndarray, path: str, info: DatasetInfo, source: str = "") -> None:
    """Refuse label values that the dataset's convention does not allow (one LUT pass, no Python loop)."""
    invalid = (~info.valid_values).astype(np.uint8)
    if cv2.countNonZero(cv2.LUT(label, invalid)):
        values = sorted(v for v in np.unique(label).tolist() if not info.valid_values[v])
        where = f" by {source}" if source else ""
        raise DatasetError(f"label {path} holds values {values[:10]} that are neither classes nor ignored values "
                           f"of {info.name}{where} ({info.label_description}). The file is damaged or belongs to "
                           "another dataset.")


def load_pair(sample: Sample, info: DatasetInfo, source: str = "") -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one sample: image (H, W, 3) BGR uint8 and its raw label (H, W) uint8 (None if unlabelled)."""
    image = read_image(sample.image)
    if sample.label is None:
        return image, None
    label = read_index_label(sample.label)
    check_pair_sizes(sample, image, label)
    check_label_values(label, sample.label, info, source)
    return image, label


def missing_message(what: str, missing: Sequence[str], total: int, hint: str) -> str:
    shown = "\n  ".join(missing[:_SHOW_MISSING])
    more = f"\n  ... and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    return f"{len(missing)} of {total} {what}:\n  {shown}{more}\n{hint}"


def check_dir(path: Path, what: str, layout: str) -> Path:
    """``path`` if it is a folder, else a DatasetError naming it and the expected layout."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}. Expected layout:\n{layout}")
    return path


def pair_files(image_paths: Sequence[str], label_for, split_desc: str, hint: str) -> list[Sample]:
    """Samples for ``image_paths`` whose label path is ``label_for(image)``; every label must exist."""
    samples, missing = [], []
    for image in image_paths:
        label = label_for(image)
        if not os.path.isfile(label):
            missing.append(label)
        samples.append(Sample(image=image, label=label, name=os.path.splitext(os.path.basename(image))[0]))
    if missing:
        raise DatasetError(missing_message(f"images of {split_desc} have no label file", missing, len(samples), hint))
    return samples


def count_note(info: DatasetInfo, root: Path, split: str, found: int) -> str:
    """'' when ``found`` is the official count of the split (or the root is synthetic), else a note."""
    expected = info.counts.get(split)
    if expected in (None, found) or (root / "synthetic.json").is_file():
        return ""
    return f"; the full {info.name} {split} split has {expected}"


class SegmentationDataset(Dataset):
    """Images with class-index labels for any layout; ``dataset[i]`` / ``dataset[(i, seed)]`` returns
    ``(image, label, name)`` exactly as :class:`cwdseg.data.CityscapesDataset` does (same preprocessing,
    same random draws per seed): image float32 [3, H, W] in ``normalization`` (uint8 [4, H, W] with
    ``uint8_images``, see :meth:`cwdseg.data.transforms.Normalization.to_float_tensor`), label uint8 [H, W] of
    class indices with ``ignore_label``, and the sample name.
    """

    def __init__(
        self,
        info: DatasetInfo,
        samples: list[Sample],
        root: str | os.PathLike,
        split: str,
        crop_size: tuple[int, int] | None = (512, 512),
        random_scale: bool = False,
        random_mirror: bool = False,
        ignore_label: int = IGNORE_INDEX,
        *,
        source: str = "",
        verbose: bool = True,
        normalization: Normalization = CAFFE_BGR,
        eval_short_side: int | None = None,
        image_cache: str | os.PathLike | None = None,
        uint8_images: bool = False,
    ) -> None:
        if crop_size is not None:
            if len(crop_size) != 2 or any(int(c) != c or c < 1 for c in crop_size):
                raise ValueError(f"crop_size must be two positive ints (h, w) or None, got {crop_size!r}")
            crop_size = (int(crop_size[0]), int(crop_size[1]))
        if not 0 <= ignore_label <= 255:
            raise ValueError(f"ignore_label must fit in uint8, got {ignore_label}")
        if not samples:
            raise DatasetError(f"{info.name} {split}: no samples ({source})")
        if eval_short_side is not None and (crop_size is not None or random_scale or random_mirror
                                            or eval_short_side < 1):
            raise ValueError("eval_short_side (a positive size) is for evaluation: no crop, scale or mirror")
        self.eval_short_side = eval_short_side
        self.info = info
        self.samples = samples
        self.root = str(root)
        self.split = split
        self.crop_size = crop_size
        self.random_scale = random_scale
        self.random_mirror = random_mirror
        self.ignore_label = ignore_label
        self.normalization = normalization
        # (4, H, W) uint8 out, normalised on the device (Normalization.to_float_tensor)
        self.uint8_images = uint8_images
        self._mean_lut = normalization.lut()
        self._lut = info.label_lut(ignore_label)
        self._source = source
        self._image_cache = None  # decoded pairs memory-mapped from disk (cwdseg.data.cache), as for Cityscapes
        if image_cache is not None:
            self._image_cache = open_image_cache(
                image_cache, [(s.image, s.label) for s in samples], lambda image, label: load_pair(
                    Sample(image, label, ""), info, source), log=print if verbose else (lambda _m: None))
            source += f"; {self._image_cache.nbytes / 2**30:.2f} GiB decoded, memory-mapped from {image_cache}"
            self._source = source
        if verbose:
            print(f"{info.name} {split}: {len(samples)} images ({source}; labels: {info.label_description})")

    cached = False  # no RAM cache for these layouts (build_loader asks)
    region_resize = True  # False: the random scale resizes the whole image (the previous path; benchmarks set it)

    def __len__(self) -> int:
        return len(self.samples)

    def load_raw(self, index: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Decoded image (H, W, 3) BGR uint8, raw label (H, W) uint8 or None, and the LUT to class indices."""
        sample = self.samples[index]
        if self._image_cache is not None:
            image, label = self._image_cache.read(sample.image, sample.label)
        else:
            image, label = load_pair(sample, self.info, self._source)
        return image, label, None if label is None else self._lut

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
        needs_rng = self.random_scale or self.random_mirror or self.crop_size is not None
        index, rng = sample_key(key, len(self), needs_rng)
        image, label, lut = self.load_raw(index)
        if self.eval_short_side is not None:
            return (*self._resized_for_eval(image, label, lut), self.samples[index].name)
        image, label = preprocess(image, label, rng, self.crop_size, self.random_scale, self.random_mirror,
                                  lut, self.ignore_label, self._mean_lut, self.normalization.rgb,
                                  region_resize=self.region_resize, uint8_output=self.uint8_images)
        return torch.from_numpy(image), torch.from_numpy(label), self.samples[index].name

    def _resized_for_eval(self, image: np.ndarray, label: np.ndarray | None, lut: np.ndarray | None):
        """The image resized as mmsegmentation's test ``Resize(scale=(2048, S), keep_ratio=True)``, the label
        kept at full resolution (predictions are resized back to it before scoring)."""
        height, width = image.shape[:2]
        factor = min(4 * self.eval_short_side / max(height, width), self.eval_short_side / min(height, width))
        size = (int(width * factor + 0.5), int(height * factor + 0.5))  # mmcv's rounding, (w, h)
        resized = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        out, _ = preprocess(resized, None, None, None, False, False, None, self.ignore_label, self._mean_lut,
                            self.normalization.rgb, uint8_output=self.uint8_images)
        if label is None:
            full = np.full((height, width), self.ignore_label, np.uint8)
        else:
            full = cv2.LUT(label, lut)
        return torch.from_numpy(out), torch.from_numpy(full)


def refuse_ram_cache(cache_images: bool, name: str) -> None:
    """The RAM cache (``--cache-images``) is Cityscapes-only; the disk cache serves every layout."""
    if cache_images:
        raise DatasetError(f"--cache-images (decoded images in RAM) is only available for cityscapes so far; drop it "
                           f"for {name}, or use --image-cache DIR (decoded images memory-mapped from disk)")


def build_split(info: DatasetInfo, root_path: Path, split: str, list_path, scan, *, cache_images: bool = False,
                verbose: bool = True, **kwargs) -> SegmentationDataset:
    """The shared part of each layout's ``build``: the split from ``scan(root_path, split)`` (its official
    layout) or from an image<TAB>label list, as a :class:`SegmentationDataset` (kwargs pass through)."""
    refuse_ram_cache(cache_images, info.name)
    if list_path is None:
        samples = scan(root_path, split)
        source = f"scanned {root_path}{count_note(info, root_path, split, len(samples))}"
    else:
        samples = read_list_file(list_path, root_path)
        source = f"list {list_path}"
    return SegmentationDataset(info, samples, root_path, split, source=source, verbose=verbose, **kwargs)

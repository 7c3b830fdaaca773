"""Training/evaluation preprocessing of one (image, label) pair, bit-identical to the original CWD code.

The original ``CSTrainValSet.__getitem__`` (TorchDistiller ``SemSeg-distill/dataset/datasets.py``) does, in order:

1. ``cv2.imread`` (BGR uint8) and a 35-step dict loop labelId -> trainId;
2. optional random scale of the **uint8** image and label: ``f = 0.7 + random.randint(0, 14) / 10.0``,
   ``cv2.resize(image, None, fx=f, fy=f, INTER_LINEAR)``, label with ``INTER_NEAREST``;
3. ``np.asarray(image, np.float32) - np.array(MEAN)``: the mean is a float64 array, so the subtraction is
   done in float64 and the result is cast back to float32 at the crop;
4. pad bottom/right to the crop size (image 0.0, label 255), random crop;
5. HWC -> CHW, optional horizontal mirror (``flip = np.random.choice(2) * 2 - 1``).

Here the same result comes out at a fraction of the cost (about 0.45x per 1024x2048 sample, where the
PNG decode is most of what is left):

- the crop is taken from the uint8 image *before* any float conversion (mean subtraction is per pixel, so
  crop and subtraction commute), and the float conversion is a 256-entry lookup table per channel whose
  entries are ``float32(float64(v) - mean_c)``: exactly the values of step 3, computed once. (A plain
  float32 subtraction differs from the original in the last bit for about a third of the pixels.);
- the random scale resizes the uint8 image, as the original does, so it stays exact; with a crop, only the
  source region the crop reads is resized (:mod:`cwdseg.data.region_resize`, bit-identical to resizing the
  whole image and cropping: about 1-3 ms instead of 10-55 ms for a 512x512 crop of a 1024x2048 image);
- label ids map through a lookup table after the crop (nearest-neighbour resize and crops only move
  pixels, so they commute with a per-pixel mapping);
- mirroring the padded crop equals mirroring the content and putting the padding on the left.

Random draws, in this order, all from one ``numpy.random.Generator``: scale step k in 0..14 (when
``random_scale``), row offset, column offset (when cropping), mirror bit (when ``random_mirror``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from cwdseg.data.labels import IGNORE_LABEL
from cwdseg.data.region_resize import model_holds, scaled_crop, scaled_label_crop, scaled_size

# BGR order, as in the original; there is no division by a standard deviation.
IMG_MEAN_BGR: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)

SCALE_STEPS = 15  # f = 0.7 + k / 10 for k = 0..14, i.e. 0.7 .. 2.1


def scale_factor(step: int) -> float:
    """The original's scale for step ``k``: ``0.7 + k / 10.0`` (same float expression, so same value)."""
    if not 0 <= step < SCALE_STEPS:
        raise ValueError(f"scale step must be in 0..{SCALE_STEPS - 1}, got {step}")
    return 0.7 + step / 10.0


def mean_subtraction_lut(mean_bgr: tuple[float, float, float] = IMG_MEAN_BGR) -> np.ndarray:
    """Per-channel tables ``lut[c, v] = float32(float64(v) - mean_bgr[c])``, shape (3, 256), float32.

    These are exactly the values the original produces for a uint8 pixel ``v`` in channel ``c``.
    """
    values = np.arange(256, dtype=np.float64)
    lut = np.stack([(values - np.float64(m)).astype(np.float32) for m in mean_bgr])
    lut.setflags(write=False)
    return lut


_DEFAULT_MEAN_LUT = mean_subtraction_lut()


@dataclass(frozen=True)
class Normalization:
    """How a family of weights expects its input: channel order, then ``(v - mean) / std`` per channel.

    ``mean`` and ``std`` are in 0..255 units and in the *network's* channel order (RGB when ``rgb``).
    The normalisation belongs to the weights, not to the dataset: the original's files expect BGR minus
    the Caffe mean and no std (:data:`CAFFE_BGR`); ImageNet-normalised RGB weights expect
    :data:`IMAGENET_RGB`. With ``std == 1`` the table is exactly the original's float64 subtraction.
    """

    name: str
    rgb: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def lut(self) -> np.ndarray:
        """(3, 256) float32 tables in the network's channel order: ``float32((float64(v) - mean) / std)``."""
        values = np.arange(256, dtype=np.float64)
        lut = np.stack([((values - np.float64(m)) / np.float64(s)).astype(np.float32)
                        for m, s in zip(self.mean, self.std)])
        lut.setflags(write=False)
        return lut

    def to_bgr_uint8(self, image: np.ndarray) -> np.ndarray:
        """The uint8 BGR picture (H, W, 3) behind a network input (3, H, W) in this normalisation."""
        planes = image.transpose(1, 2, 0) * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        if self.rgb:
            planes = planes[..., ::-1]
        return np.clip(np.rint(planes), 0, 255).astype(np.uint8)

    def to_float_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 batch on its own device: (N, 4, H, W) uint8 -> (N, 3, H, W) float32.

        ``batch`` is what a dataset built with ``uint8_images=True`` yields, collated: channels 0-2 the
        picture in the network's channel order, channel 3 the content mask (255 image, 0 padding). The
        result equals the float32 batch of ``uint8_images=False`` bit for bit: each value is looked up in
        :meth:`lut` (the same float64-computed table), and padding is 0.0.
        """
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 4:
            raise ValueError(f"expected an (N, 4, H, W) uint8 batch (picture + content mask), got {batch.dtype} "
                             f"{tuple(batch.shape)}")
        table = torch.tensor(self.lut(), device=batch.device).reshape(-1)  # (3 * 256,)
        offsets = torch.arange(0, 3 * 256, 256, device=batch.device).view(1, 3, 1, 1)
        out = table[batch[:, :3].long() + offsets]
        return out.masked_fill_(batch[:, 3:] == 0, 0.0)


CAFFE_BGR = Normalization("caffe_bgr", rgb=False, mean=IMG_MEAN_BGR)
IMAGENET_RGB = Normalization("imagenet_rgb", rgb=True, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
NORMALIZATIONS: dict[str, Normalization] = {n.name: n for n in (CAFFE_BGR, IMAGENET_RGB)}


def _region_resize_exact() -> bool:
    if model_holds():
        return True
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"OpenCV {cv2.__version__}'s resize differs from the fixed-point model of "
                      "cwdseg.data.region_resize; the random scale resizes whole images (exact, but slower).",
                      stacklevel=2)
    return False


_WARNED: list[bool] = []


def random_scale_pair(
    image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize uint8 image (INTER_LINEAR) and label (INTER_NEAREST) by a random original-recipe factor."""
    f = scale_factor(int(rng.integers(0, SCALE_STEPS)))
    return _resize_pair(image, label, f)


def _resize_pair(image: np.ndarray, label: np.ndarray | None, f: float) -> tuple[np.ndarray, np.ndarray | None]:
    image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    return image, label


def preprocess(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator | None,
    crop_size: tuple[int, int] | None = (512, 512),
    random_scale: bool = False,
    random_mirror: bool = False,
    label_lut: np.ndarray | None = None,
    ignore_label: int = IGNORE_LABEL,
    mean_lut: np.ndarray = _DEFAULT_MEAN_LUT,
    rgb: bool = False,
    *,
    region_resize: bool = True,
    uint8_output: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Augment, crop and normalise one sample; the original's output, computed cheaply.

    Args:
        image: (H, W, 3) uint8 BGR, as decoded by OpenCV.
        label: (H, W) uint8 label ids (mapped through ``label_lut``), or None (output all ``ignore_label``).
        rng: source of every random draw; may be None only when nothing random is requested.
        crop_size: (h, w) random crop, padded bottom/right when the image is smaller; None = whole image.
        random_scale, random_mirror: the original's optional augmentations.
        label_lut: (256,) uint8 table applied to label values (e.g. labelId -> trainId); None = identity.
        ignore_label: label value of padded pixels.
        mean_lut: (3, 256) float32 from ``mean_subtraction_lut`` or ``Normalization.lut()``, in the
            network's channel order.
        rgb: output channels in RGB order (the input is BGR as decoded by OpenCV); False = BGR, the original.
        region_resize: with ``random_scale`` and a crop, resize only the source region the crop reads
            (:func:`cwdseg.data.region_resize.scaled_crop`, bit-identical); False resizes the whole image.
        uint8_output: return the picture un-normalised, (4, h, w) uint8: channels 0-2 in the network's
            order, channel 3 the content mask (255 image, 0 padding), for ``Normalization.to_float_tensor``.

    Returns:
        image (3, h, w) float32 C-contiguous (normalised, padding 0.0), or (4, h, w) uint8 with
        ``uint8_output``, and label (h, w) uint8.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a (H, W, 3) uint8 BGR image, got {image.dtype} {image.shape}")
    if label is not None and label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.shape[:2]}")
    needs_rng = random_scale or random_mirror or crop_size is not None
    if needs_rng and rng is None:
        raise ValueError("a numpy Generator is needed for random scale, mirror or crop")

    f = scale_factor(int(rng.integers(0, SCALE_STEPS))) if random_scale else 1.0
    by_region = random_scale and region_resize and crop_size is not None and _region_resize_exact()
    if random_scale and not by_region:
        image, label = _resize_pair(image, label, f)
    height, width = scaled_size(*image.shape[:2], f) if by_region else image.shape[:2]

    if crop_size is None:
        crop_h, crop_w, h_off, w_off = height, width, 0, 0
    else:
        crop_h, crop_w = crop_size
        # Offsets over the padded extent, as the original: 0 along a padded dimension.
        h_off = int(rng.integers(0, max(height, crop_h) - crop_h + 1))
        w_off = int(rng.integers(0, max(width, crop_w) - crop_w + 1))
    mirror = bool(random_mirror and rng.integers(0, 2) == 0)  # original: flip = -1 when choice(2) == 0

    # The part of the crop that holds image content (the rest is padding).
    rows = min(crop_h, height - h_off)
    cols = min(crop_w, width - w_off)
    if by_region:
        content = scaled_crop(image, f, h_off, w_off, rows, cols)
        label_content = None if label is None else scaled_label_crop(label, f, h_off, w_off, rows, cols)
    else:
        content = image[h_off:h_off + rows, w_off:w_off + cols]
        label_content = None if label is None else label[h_off:h_off + rows, w_off:w_off + cols]
    # Padding sits bottom/right; after a mirror of the padded crop it sits bottom/left.
    col0 = crop_w - cols if mirror else 0
    if mirror:
        content = cv2.flip(content, 1)
        if label_content is not None:
            label_content = cv2.flip(label_content, 1)

    padded = rows < crop_h or cols < crop_w
    if uint8_output and not padded:
        out = np.empty((4, crop_h, crop_w), np.uint8)
        cv2.split(content, [out[2], out[1], out[0]] if rgb else [out[0], out[1], out[2]])  # straight into place
        out[3].fill(255)
        planes = ()
    else:
        # Into arrays of our own: cv2.split allocating its outputs costs ~6x the split itself.
        split = np.empty((3, rows, cols), np.uint8)
        cv2.split(content, [split[0], split[1], split[2]])
        planes = split[::-1] if rgb else split
    if uint8_output and padded:
        out = np.zeros((4, crop_h, crop_w), np.uint8)
        out[:3, :rows, col0:col0 + cols] = planes
        out[3, :rows, col0:col0 + cols] = 255
    elif not uint8_output:
        out = np.zeros((3, crop_h, crop_w), np.float32) if padded else np.empty((3, crop_h, crop_w), np.float32)
        for channel, plane in enumerate(planes):
            table = mean_lut[channel].reshape(256, 1)
            if padded:
                out[channel, :rows, col0:col0 + cols] = cv2.LUT(plane, table)
            else:
                cv2.LUT(plane, table, dst=out[channel])  # writes into the contiguous output plane

    out_label = np.full((crop_h, crop_w), ignore_label, np.uint8)
    if label_content is not None:
        mapped = label_content if label_lut is None else cv2.LUT(label_content, label_lut)
        out_label[:rows, col0:col0 + cols] = mapped
    return out, out_label

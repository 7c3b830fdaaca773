"""Full-resolution logits of a segmentation network: whole image or sliding tiles, scales, flip.

The protocols of the original ``utils/evaluate.py``:

- **whole** (``predict_whole``, used for every published number, "singleAndWhole"): one forward of
  the full image; the logits are upsampled bilinearly with ``align_corners=True`` to the image size.
- **sliding** (``predict_sliding``): tiles of ``tile`` pixels with stride ``ceil(tile * (1 - overlap))``
  (342 for 512 and 1/3); ``rows = ceil((H - tile_h) / stride) + 1`` (at least 1), likewise columns; a
  tile starts at ``row * stride`` and is shifted back so that it ends at the border. A tile smaller than
  ``tile`` (image smaller than the tile) is zero-padded at the bottom/right — zero in the mean-subtracted
  image, as the original. Each tile's logits are upsampled to the tile size, cropped to the real tile,
  summed into the full map and divided by how many tiles covered each pixel. Tiles go through the
  network ``tile_batch`` at a time.
- **scales / flip** (``predict_multiscale``): the image is resized to ``round(s * H), round(s * W)``
  (bilinear, ``align_corners=True``; the original used ``ndimage.zoom(order=1)``, also linear and
  corner-aligned), predicted, and the logits resized back to ``H x W``; with flip, the horizontally
  mirrored image is predicted too and its logits mirrored back. The result is the mean over all
  (scale, flip) passes. Logits, not probabilities, are averaged, as the original.

Differences from the original, on purpose: the vertical and horizontal strides each come from their
own tile side (the original used ``tile_size[0]`` for both; identical for square tiles), and an image
smaller than a tile gets one tile instead of none.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cwdseg.data.transforms import Normalization
from cwdseg.engine.precision import autocast_context
from cwdseg.export.normalization import apply


def parse_overlap(value: str | float) -> float:
    """``"1/3"``, ``"0.25"`` or a number -> a float in [0, 1)."""
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                result = float(num) / float(den)
            else:
                result = float(text)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"overlap {value!r} is not a number or a fraction like 1/3") from exc
    else:
        result = float(value)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {value!r}")
    return result


def tile_stride(tile: Sequence[int], overlap: float) -> tuple[int, int]:
    """``(stride_h, stride_w) = ceil(tile * (1 - overlap))``; 342 for a 512 tile and overlap 1/3."""
    # round() first so that 512 * (1 - 1/3) = 341.3333 lands on 342, not on a float artefact.
    return tuple(max(1, math.ceil(round(t * (1.0 - overlap), 6))) for t in tile)  # type: ignore[return-value]


def sliding_windows(height: int, width: int, tile: Sequence[int], overlap: float) -> list[tuple[int, int, int, int]]:
    """The tile boxes ``(y1, y2, x1, x2)`` covering an ``height x width`` image, row by row."""
    tile_h, tile_w = int(tile[0]), int(tile[1])
    stride_h, stride_w = tile_stride((tile_h, tile_w), overlap)
    rows = max(1, math.ceil((height - tile_h) / stride_h) + 1)
    cols = max(1, math.ceil((width - tile_w) / stride_w) + 1)
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + tile_h, height)
            x2 = min(col * stride_w + tile_w, width)
            boxes.append((max(y2 - tile_h, 0), y2, max(x2 - tile_w, 0), x2))
    return boxes


def _network_logits(model: nn.Module, x: torch.Tensor, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """The main logits of one forward: the first element of a (logits, aux, feature) tuple, in float32."""
    with autocast:
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise TypeError(f"the model must return logits [N,C,h,w] or a tuple starting with them, got {type(out).__name__}")
    return out.float()


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _predict_whole(model, image, out_size, num_classes, autocast) -> torch.Tensor:
    logits = _network_logits(model, image, autocast)
    _check_classes(logits, num_classes)
    return _resize(logits, out_size)


def _predict_sliding(model, image, tile, overlap, num_classes, tile_batch, autocast) -> torch.Tensor:
    n, _, height, width = image.shape
    tile_h, tile_w = int(tile[0]), int(tile[1])
    boxes = sliding_windows(height, width, (tile_h, tile_w), overlap)
    total = torch.zeros(n, num_classes, height, width, dtype=torch.float32, device=image.device)
    count = torch.zeros(1, 1, height, width, dtype=torch.float32, device=image.device)
    # Every (image, box) pair is one tile; batching them keeps the network busy on a GPU.
    jobs = [(i, box) for i in range(n) for box in boxes]
    for chunk in _chunks(jobs, max(1, tile_batch)):
        tiles = []
        for i, (y1, y2, x1, x2) in chunk:
            crop = image[i:i + 1, :, y1:y2, x1:x2]
            tiles.append(F.pad(crop, (0, tile_w - (x2 - x1), 0, tile_h - (y2 - y1))))
        logits = _network_logits(model, torch.cat(tiles), autocast)
        _check_classes(logits, num_classes)
        logits = _resize(logits, (tile_h, tile_w))
        for k, (i, (y1, y2, x1, x2)) in enumerate(chunk):
            total[i, :, y1:y2, x1:x2] += logits[k, :, : y2 - y1, : x2 - x1]
    for y1, y2, x1, x2 in boxes:
        count[..., y1:y2, x1:x2] += 1
    return total / count


def _check_classes(logits: torch.Tensor, num_classes: int) -> None:
    if logits.shape[1] != num_classes:
        raise ValueError(f"the model outputs {logits.shape[1]} classes but num_classes={num_classes}")


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    image: torch.Tensor,
    mode: str = "whole",
    tile: Sequence[int] = (512, 512),
    overlap: float = 1 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    num_classes: int = 19,
    tile_batch: int = 4,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits ``[N, num_classes, H, W]`` (float32) of ``image`` ``[N, 3, H, W]`` under one protocol.

    ``mode`` is ``"whole"`` or ``"sliding"`` (with ``tile``, ``overlap``, ``tile_batch``); the mean is
    taken over ``scales`` and, with ``flip``, over the mirrored passes (see the module docstring).
    ``amp_dtype`` (``torch.bfloat16``/``torch.float16``) runs only the network under autocast; resizing
    and averaging stay in float32. The caller puts the model in eval mode.
    """
    if mode not in ("whole", "sliding"):
        raise ValueError(f"mode must be 'whole' or 'sliding', got {mode!r}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [N, 3, H, W], got {tuple(image.shape)}")
    if not scales:
        raise ValueError("scales must name at least one scale")
    if mode == "sliding" and (len(tile) != 2 or min(int(t) for t in tile) < 1):
        raise ValueError(f"tile must be two positive sizes (h, w), got {tuple(tile)}")
    overlap = parse_overlap(overlap)
    autocast = autocast_context(image.device, amp_dtype)
    height, width = image.shape[-2:]
    total = None
    passes = 0
    for scale in scales:
        if scale <= 0:
            raise ValueError(f"scales must be positive, got {scale}")
        size = (int(round(height * scale)), int(round(width * scale)))
        scaled = _resize(image, size)
        for mirrored in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if mirrored else scaled
            if mode == "whole":
                # Straight to full size, as the original predict_whole (no detour via the scaled size).
                logits = _predict_whole(model, x, (height, width), num_classes, autocast)
            else:
                logits = _resize(_predict_sliding(model, x, tile, overlap, num_classes, tile_batch, autocast),
                                 (height, width))
            if mirrored:
                logits = logits.flip(-1)
            total = logits if total is None else total + logits
            passes += 1
    return total / passes if passes > 1 else total


def network_input(images_bgr: Sequence[np.ndarray], normalization: Normalization,
                  luts: np.ndarray | None = None) -> torch.Tensor:
    """``[N, 3, H, W]`` float32 network input of decoded ``(H, W, 3)`` uint8 BGR images of one size,
    normalised through ``normalization``'s lookup tables: the values the evaluation datasets produce."""
    luts = normalization.lut() if luts is None else luts
    return torch.from_numpy(np.stack([apply(normalization, image, luts) for image in images_bgr]))


def predict_ids(model: nn.Module, image: torch.Tensor, **protocol) -> torch.Tensor:
    """Class ids ``[N, H, W]`` (int64): the argmax over classes of :func:`predict_logits` (same keywords),
    as the evaluation loop scores them."""
    return predict_logits(model, image, **protocol).argmax(dim=1)


def predict_probabilities(model: nn.Module, image: torch.Tensor, **protocol) -> torch.Tensor:
    """Soft-max over classes ``[N, C, H, W]`` (float32) of :func:`predict_logits` (same keywords)."""
    return torch.softmax(predict_logits(model, image, **protocol), dim=1)

"""The random-scale crop of the training recipe without resizing the whole image, bit-identical to it.

The recipe resizes the whole uint8 image by ``f`` (``cv2.resize(image, None, fx=f, fy=f, INTER_LINEAR)``,
the label with ``INTER_NEAREST``) and then crops 512x512 out of it: at ``f = 1.4`` on a 1024x2048 image
that is 4.1 M resized pixels for 0.26 M kept. :func:`scaled_crop` returns the same crop from the source
region the crop reads.

Why it is exact. OpenCV's ``INTER_LINEAR`` for uint8 (``resizeGeneric`` with ``INTER_RESIZE_COEF_BITS = 11``;
checked on OpenCV 5.1) is separable and position-independent once two tables are known:

- per output column ``x``: ``c = float32((x + 0.5) * (1/f) - 0.5)``, ``sx = floor(c)``, ``a = c - sx``;
  clamped to ``sx = 0, a = 0`` left of the image and ``sx = W - 1, a = 0`` right of it; weights
  ``a0 = rint(2048 * float32(1 - a))``, ``a1 = rint(2048 * a)``;
- per output row ``y``: the same without the clamp (rows outside the image are clipped to its border
  rows instead, with the unclamped weights);
- pixel: ``h = src[sy, sx] * a0 + src[sy, sx + 1] * a1`` per source row (exact int), then
  ``out = ((b0 * (h0 >> 4)) >> 16) + ((b1 * (h1 >> 4)) >> 16) + 2) >> 2``.

:func:`linear_tables` and :func:`resize_exact` restate this in numpy; the tests check them against
``cv2.resize`` on many sizes and every scale of the recipe. An output pixel depends only on its row's and
its column's table entries and on the source pixels they name. So the crop is ``cv2.resize`` (same
``fx``, hence the same ``1/f``) of a source region aligned on a period of ``f`` (``S0 = Q m`` source,
``D0 = P m`` output, ``f = P / Q``), with a margin so that the region's own border clamps fall outside
the crop; the region's tables are compared with the full image's, entry by entry, and the rows and
columns whose entries differ (the float32 coordinate of a far column rounds more coarsely than the same
coordinate counted from the region's start) are recomputed by :func:`resize_exact` with the full
image's tables -- or, along an axis where that costs more, the region starts at the image's origin, where
the tables agree. Labels are gathered through the full image's nearest-neighbour tables directly.

The model is OpenCV's implementation, not its documentation: :func:`model_holds` checks it against the
installed ``cv2.resize`` once per process, and ``preprocess`` resizes the whole image (with a warning)
where it does not hold.

One exception: at ``f = 0.5`` exactly, ``cv2.resize`` switches INTER_LINEAR to 2x2 averaging
(INTER_AREA); :func:`scaled_crop` then resizes the whole image (0.5 is not a scale of the recipe).
"""
from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import cv2
import numpy as np

COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE = 1 << 11
_MAX_PERIOD = 64  # alignment period searched for f = P / Q; any f is still exact, only slower
_MAX_FIXUP = 0.25  # above this share of rows + columns to recompute, resize the whole region exactly
_COLUMN_COST, _ROW_COST = 12.0, 28.0  # recomputing a column / a row costs about this many resized lines


def scaled_size(height: int, width: int, f: float) -> tuple[int, int]:
    """``cv2.resize(src, None, fx=f, fy=f)``'s output size (h, w): ``saturate_cast<int>(n * f)``, round-half-even."""
    return int(np.rint(height * f)), int(np.rint(width * f))


@lru_cache(maxsize=256)
def linear_tables(n_src: int, n_dst: int, f: float, clamp: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's INTER_LINEAR tables along one axis: (s0, s1, w0, w1), each (n_dst,) int32, read-only.

    ``s0``/``s1`` are the source indices (clipped to the image), ``w0``/``w1`` the 11-bit weights.
    ``clamp`` is the column rule (weights clamped at the borders); rows are not clamped.
    """
    coord = ((np.arange(n_dst, dtype=np.float64) + 0.5) * (1.0 / f) - 0.5).astype(np.float32)
    start = np.floor(coord)
    frac = (coord - start).astype(np.float32)
    start = start.astype(np.int64)
    if clamp:
        low, high = start < 0, start >= n_src - 1
        frac[low | high] = 0
        start[low] = 0
        start[high] = n_src - 1
    w0 = np.rint((np.float32(1) - frac) * np.float32(COEF_SCALE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(COEF_SCALE)).astype(np.int32)
    out = (np.clip(start, 0, n_src - 1).astype(np.int32), np.clip(start + 1, 0, n_src - 1).astype(np.int32), w0, w1)
    for a in out:
        a.setflags(write=False)
    return out


@lru_cache(maxsize=256)
def nearest_table(n_src: int, n_dst: int, f: float) -> np.ndarray:
    """OpenCV's INTER_NEAREST source index per output index: ``min(floor(x * (1/f)), n_src - 1)``."""
    table = np.minimum(np.floor(np.arange(n_dst, dtype=np.float64) * (1.0 / f)), n_src - 1).astype(np.intp)
    table.setflags(write=False)
    return table


def resize_exact(image: np.ndarray, rows: tuple[np.ndarray, ...], cols: tuple[np.ndarray, ...]) -> np.ndarray:
    """INTER_LINEAR output pixels of ``image`` (H, W, C) uint8 for the given row and column table entries,
    in OpenCV's fixed-point arithmetic: (len(rows[0]), len(cols[0]), C) uint8."""
    ys0, ys1, b0, b1 = rows
    xs0, xs1, a0, a1 = cols
    # The horizontal pass once per source row read: h = src[x0] * a0 + src[x1] * a1, then h >> 4. Only the
    # columns read are copied (a few scattered columns of a tall band, or a few rows of the crop's width).
    c0, c1 = int(xs0.min()), int(xs1.max()) + 1
    r0, r1 = int(ys0.min()), int(ys1.max()) + 1
    needed = np.concatenate([ys0, ys1])
    if 2 * len(ys0) < r1 - r0:  # few scattered rows: gather them
        sources, inverse = np.unique(needed, return_inverse=True)
        band = np.take(image[:, c0:c1], sources, axis=0)
    else:  # a band of rows: read it in place
        band, inverse = image[r0:r1, c0:c1], needed - r0
    h = np.take(band, xs0 - c0, axis=1).astype(np.int32)
    h *= a0[:, None]
    second = np.take(band, xs1 - c0, axis=1).astype(np.int32)
    second *= a1[:, None]
    h += second
    h >>= 4
    # The vertical pass: ((b0 * q0) >> 16) + ((b1 * q1) >> 16) + 2) >> 2.
    out = np.take(h, inverse[:len(ys0)], axis=0)
    out *= b0[:, None, None]
    out >>= 16
    second = np.take(h, inverse[len(ys0):], axis=0)
    second *= b1[:, None, None]
    second >>= 16
    out += second
    out += 2
    out >>= 2
    return out.astype(np.uint8)


@lru_cache(maxsize=1)
def model_holds() -> bool:
    """True when this OpenCV's resize is the fixed-point model above: whole images of two odd sizes at every
    recipe scale, and crops at the far corner of a wide and a tall strip, against ``cv2.resize`` (~10 ms)."""
    rng = np.random.default_rng(0)
    for shape in ((37, 53), (16, 2048), (2048, 12)):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        for step in range(15):
            f = 0.7 + step / 10.0  # the recipe's factors (transforms.scale_factor)
            whole = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
            rows, cols = min(40, whole.shape[0]), min(40, whole.shape[1])
            top, left = whole.shape[0] - rows, whole.shape[1] - cols
            if shape == (37, 53) and whole.shape[:2] != shape:
                exact = resize_exact(image, linear_tables(shape[0], whole.shape[0], f, False),
                                     linear_tables(shape[1], whole.shape[1], f, True))
                if not np.array_equal(exact, whole):
                    return False
            if not np.array_equal(scaled_crop(image, f, top, left, rows, cols),
                                  whole[top:top + rows, left:left + cols]):
                return False
    return True


def _period(f: float) -> tuple[int, int]:
    frac = Fraction(f).limit_denominator(_MAX_PERIOD)
    return frac.numerator, frac.denominator


def _mismatches(full: tuple[np.ndarray, ...], first: int, count: int, n_src: int, f: float, clamp: bool,
                s0: int, d0: int) -> np.ndarray | None:
    """Indices (within the crop) whose table entries differ between the whole image's resize and the resize of
    source span [s0, stop) (stop: a margin past the crop); None when that resize does not cover the crop."""
    stop = min(n_src, int((first + count) / f) + 3)
    n_out = int(np.rint((stop - s0) * f))
    if first + count - d0 > n_out:
        return None
    region = linear_tables(stop - s0, n_out, f, clamp)
    lo = first - d0
    differ = np.zeros(count, bool)
    for whole, part, shift in zip(full, region, (s0, s0, 0, 0)):
        differ |= whole[first:first + count] - shift != part[lo:lo + count]
    return np.flatnonzero(differ)


def _span(full: tuple[np.ndarray, ...], first: int, count: int, n_src: int, f: float, clamp: bool,
          line_cost: float) -> tuple[int, int, np.ndarray | None]:
    """(source start, output start, mismatched indices or None) of the cheaper of two spans along one axis.

    Either aligned on a period of ``f`` one period before the crop (little to resize, but the region's
    float32 coordinates are finer than the whole image's far from the origin, so some lines differ and are
    recomputed), or from the image's origin (nothing differs, more to resize). ``line_cost``: the cost of
    recomputing one line, in resized output lines (measured: ~12 for a column, ~28 for a row).
    """
    p, q = _period(f)
    m = max(0, first // p - 1)
    bad = _mismatches(full, first, count, n_src, f, clamp, q * m, p * m)
    if m and (bad is None or p * m < line_cost * len(bad)):
        origin = _mismatches(full, first, count, n_src, f, clamp, 0, 0)
        if origin is not None and (bad is None or len(origin) < len(bad)):
            return 0, 0, origin
    return q * m, p * m, bad


def scaled_crop(image: np.ndarray, f: float, top: int, left: int, rows: int, cols: int) -> np.ndarray:
    """``cv2.resize(image, None, fx=f, fy=f, interpolation=INTER_LINEAR)[top:top+rows, left:left+cols]``,
    bit for bit, resizing only the region the crop reads. ``image`` (H, W, 3) uint8."""
    height, width = image.shape[:2]
    out_h, out_w = scaled_size(height, width, f)
    if not (0 <= top and top + rows <= out_h and 0 <= left and left + cols <= out_w and rows > 0 and cols > 0):
        raise ValueError(f"crop {rows}x{cols} at ({top}, {left}) is outside the {out_h}x{out_w} scaled image")
    if (out_h, out_w) == (height, width):  # cv2.resize copies
        return image[top:top + rows, left:left + cols].copy()
    if 1.0 / f == 2.0:  # cv2.resize halves by 2x2 averaging (INTER_AREA) here; not a recipe scale, so no fast path
        return cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)[top:top + rows, left:left + cols]
    full_y = linear_tables(height, out_h, f, False)
    full_x = linear_tables(width, out_w, f, True)
    y0, dy0, bad_r = _span(full_y, top, rows, height, f, False, _ROW_COST)
    x0, dx0, bad_c = _span(full_x, left, cols, width, f, True, _COLUMN_COST)
    rows_y = tuple(t[top:top + rows] for t in full_y)
    cols_x = tuple(t[left:left + cols] for t in full_x)
    region = image[y0:min(height, int((top + rows) / f) + 3), x0:min(width, int((left + cols) / f) + 3)]
    if (bad_r is None or bad_c is None or scaled_size(*region.shape[:2], f) == region.shape[:2]
            or len(bad_r) + len(bad_c) > _MAX_FIXUP * (rows + cols)):
        return resize_exact(image, rows_y, cols_x)
    out = cv2.resize(region, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    out = out[top - dy0:top - dy0 + rows, left - dx0:left - dx0 + cols]
    if len(bad_c):
        out[:, bad_c] = resize_exact(image, rows_y, tuple(t[bad_c] for t in cols_x))
    if len(bad_r):
        out[bad_r] = resize_exact(image, tuple(t[bad_r] for t in rows_y), cols_x)
    return out


def scaled_label_crop(label: np.ndarray, f: float, top: int, left: int, rows: int, cols: int) -> np.ndarray:
    """``cv2.resize(label, None, fx=f, fy=f, interpolation=INTER_NEAREST)[top:top+rows, left:left+cols]``."""
    height, width = label.shape[:2]
    out_h, out_w = scaled_size(height, width, f)
    ys = nearest_table(height, out_h, f)[top:top + rows]
    xs = nearest_table(width, out_w, f)[left:left + cols]
    first = int(xs[0])  # the table is non-decreasing: copy only the columns the crop reads
    return np.take(np.take(label[:, first:int(xs[-1]) + 1], ys, axis=0), xs - first, axis=1)

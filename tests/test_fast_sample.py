"""The recipe's sample without a whole-image resize, and uint8 batches normalised on the device.

References are computed independently of the code under test: ``cv2.resize`` of the whole image followed
by a crop (exactly what the pipeline did before, and what the original does), and float64 tables built in
the test for the normalisation.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cwdseg.data.cityscapes import CityscapesDataset
from cwdseg.data.region_resize import linear_tables, resize_exact, scaled_crop, scaled_label_crop
from cwdseg.data.synthetic import generate
from cwdseg.data.transforms import CAFFE_BGR, IMAGENET_RGB, SCALE_STEPS, preprocess, scale_factor

RECIPE = [scale_factor(k) for k in range(SCALE_STEPS)]
# 0.5, 1.0 and 2.0, the recipe's 15 factors, and factors whose scaled size is one pixel either side of a
# 40-pixel crop of a 57-pixel side (40 / 57 = 0.7018), plus factors with no short period.
SCALES = sorted({0.5, 1.0, 2.0, 39.5 / 57, 40.4 / 57, 40.6 / 57, 1.37, 2.718281828, 0.9137, *RECIPE})


def _reference(image, f, interpolation):
    return cv2.resize(image, None, fx=f, fy=f, interpolation=interpolation)


def _structured(shape, seed):
    """Smooth content plus noise (so that neighbouring pixels differ by small and large steps alike)."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, shape, dtype=np.uint8)
    return cv2.addWeighted(cv2.GaussianBlur(noise, (0, 0), 3), 0.6, noise, 0.4, 0)


@pytest.mark.parametrize("shape", [(37, 53), (57, 96), (1, 7), (2, 2), (64, 3)])
def test_fixed_point_model_equals_cv2_resize(shape):
    """resize_exact with the whole image's tables is cv2.resize, for every scale (the model the fast path uses)."""
    image = _structured((*shape, 3), seed=sum(shape))
    for f in SCALES:
        if min(np.rint(np.array(shape) * f)) < 1 or f == 0.5:
            continue  # cv2.resize refuses an empty output; at 0.5 it averages 2x2 (scaled_crop resizes whole)
        ref = _reference(image, f, cv2.INTER_LINEAR)
        if ref.shape[:2] == image.shape[:2]:
            continue  # cv2.resize copies; scaled_crop does the same (tested below)
        rows = linear_tables(shape[0], ref.shape[0], f, False)
        cols = linear_tables(shape[1], ref.shape[1], f, True)
        assert np.array_equal(resize_exact(image, rows, cols), ref), f


def _positions(out_h, out_w, crop, rng):
    """Crop windows (top, left, rows, cols): the four corners, the whole image, random ones, thin strips."""
    ch, cw = min(crop, out_h), min(crop, out_w)
    yield from [(0, 0, ch, cw), (out_h - ch, out_w - cw, ch, cw), (0, out_w - cw, ch, cw), (out_h - ch, 0, ch, cw),
                (0, 0, out_h, out_w), (out_h - 1, out_w - 1, 1, 1), (0, out_w // 2, out_h, 1)]
    for _ in range(4):
        rows, cols = int(rng.integers(1, ch + 1)), int(rng.integers(1, cw + 1))
        yield int(rng.integers(0, out_h - rows + 1)), int(rng.integers(0, out_w - cols + 1)), rows, cols


@pytest.mark.parametrize("shape", [(57, 83), (96, 64), (12, 2048), (2048, 10)])
def test_scaled_crop_equals_whole_resize_then_crop(shape):
    """Every window of every scale, on small images and on long strips whose far coordinates round coarsely
    in float32 (where the region's tables differ from the whole image's and rows/columns are recomputed)."""
    rng = np.random.default_rng(shape[0])
    image = _structured((*shape, 3), seed=shape[1])
    label = rng.integers(0, 34, shape, dtype=np.uint8)
    for f in SCALES:
        ref = _reference(image, f, cv2.INTER_LINEAR)
        ref_label = _reference(label, f, cv2.INTER_NEAREST)
        for top, left, rows, cols in _positions(*ref.shape[:2], 40, rng):
            window = (slice(top, top + rows), slice(left, left + cols))
            assert np.array_equal(scaled_crop(image, f, top, left, rows, cols), ref[window]), (f, top, left)
            assert np.array_equal(scaled_label_crop(label, f, top, left, rows, cols), ref_label[window]), (f, top, left)


def test_long_strips_exercise_the_recomputed_columns():
    """The strip test above is not vacuous: at f = 1.4 the region's column tables differ from the whole
    image's for some columns near x = 2000 (float32 coordinates ~1400 round to 1/8192 there)."""
    f, width = 1.4, 2048
    out_w = int(np.rint(width * f))
    whole = linear_tables(width, out_w, f, True)
    start = 7 * 380  # an aligned region starting at output column 2660, source column 1900
    region = linear_tables(width - 1900, int(np.rint((width - 1900) * f)), f, True)
    n = len(region[0])
    differ = (np.stack([t[start:start + n] for t in whole]) - np.array([1900, 1900, 0, 0])[:, None]
              != np.stack(region)).any(0)
    assert differ.any()


@pytest.mark.parametrize("f", [0.7, 1.1, 1.4, 1.9])
def test_recomputed_lines_and_origin_spans_are_exact(f, monkeypatch):
    """Wide crops at the far right and bottom of a 1024x2048-sized frame (thin, to stay small): lines are
    recomputed (counted) or the region starts at the origin, and the crop equals the whole resize's."""
    import cwdseg.data.region_resize as rr

    calls = []
    original = rr.resize_exact
    monkeypatch.setattr(rr, "resize_exact", lambda *a: calls.append(len(a[1][0]) * len(a[2][0])) or original(*a))
    for shape in [(24, 2048), (1024, 24)]:
        image = _structured((*shape, 3), seed=int(f * 10))
        ref = _reference(image, f, cv2.INTER_LINEAR)
        rows, cols = min(512, ref.shape[0]), min(512, ref.shape[1])
        for top, left in [(ref.shape[0] - rows, ref.shape[1] - cols), (0, ref.shape[1] // 2 - cols // 2),
                          (ref.shape[0] // 2 - rows // 2, 0)]:
            got = rr.scaled_crop(image, f, top, left, rows, cols)
            assert np.array_equal(got, ref[top:top + rows, left:left + cols]), (shape, top, left)
    assert max(calls, default=0) < 512 * 512  # never the whole crop
    if f != 0.7:  # at 0.7 the span from the origin is the cheaper one for every window here
        assert calls  # some lines were recomputed


def test_the_model_holds_for_this_opencv_and_its_absence_is_said(monkeypatch):
    """The per-process self-check passes here; where it would not, preprocess warns and resizes whole images."""
    import cwdseg.data.transforms as transforms

    assert transforms.model_holds()
    monkeypatch.setattr(transforms, "model_holds", lambda: False)
    monkeypatch.setattr(transforms, "_WARNED", [])
    image, label = next(_raw_pairs(1, seed=2))
    with pytest.warns(UserWarning, match="resizes whole images"):
        fast = preprocess(image, label, np.random.default_rng(0), (32, 32), True, True)
    slow = preprocess(image, label, np.random.default_rng(0), (32, 32), True, True, region_resize=False)
    assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1])


def test_scaled_crop_refuses_a_window_outside_the_scaled_image():
    image = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="outside"):
        scaled_crop(image, 1.5, 10, 0, 6, 6)


def _raw_pairs(n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = [(57, 83), (40, 96), (30, 33), (96, 57)][i % 4]  # some smaller than the crop at some scales
        yield _structured((*shape, 3), seed + i), rng.integers(0, 34, shape, dtype=np.uint8)


@pytest.mark.parametrize("mirror", [False, True])
@pytest.mark.parametrize("crop", [(48, 48), (40, 64), (96, 120)])
def test_recipe_sample_is_bit_identical(crop, mirror):
    """preprocess with the region resize == with the whole-image resize: float32 and uint8 outputs, labels
    through a table, padding (crop (96, 120) pads at every scale, (48, 48) at some), both channel orders."""
    lut = np.random.default_rng(1).permutation(256).astype(np.uint8)
    for i, (image, label) in enumerate(_raw_pairs(8, seed=5)):
        for seed in range(12):
            for norm in (CAFFE_BGR, IMAGENET_RGB):
                args = (label, None, crop, True, mirror, lut, 255, norm.lut(), norm.rgb)
                fast = preprocess(image, args[0], np.random.default_rng(seed), *args[2:])
                slow = preprocess(image, args[0], np.random.default_rng(seed), *args[2:], region_resize=False)
                assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1]), (i, seed, norm.name)
                fast8 = preprocess(image, args[0], np.random.default_rng(seed), *args[2:], uint8_output=True)
                assert np.array_equal(fast8[1], slow[1])
                assert np.array_equal(fast8[0], preprocess(image, args[0], np.random.default_rng(seed), *args[2:],
                                                           region_resize=False, uint8_output=True)[0])


def _float64_normalised(batch_u8: np.ndarray, mean, std, rgb) -> np.ndarray:
    """The float batch computed in the test: (v - mean) / std in float64, cast to float32; padding 0."""
    picture = batch_u8[:, :3].astype(np.float64)
    out = (picture - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    out = out.astype(np.float32)
    out[np.broadcast_to(batch_u8[:, 3:] == 0, out.shape)] = 0.0
    return out


@pytest.mark.parametrize("norm", [CAFFE_BGR, IMAGENET_RGB], ids=lambda n: n.name)
def test_uint8_batch_normalised_on_the_device_equals_the_float_batch(norm):
    """Collated uint8 samples -> to_float_tensor == the collated float samples of today's path, bit for bit,
    and == a float64 computation written here (so neither side is trusted)."""
    samples_u8, samples_f = [], []
    for seed, (image, label) in enumerate(_raw_pairs(8, seed=9)):
        args = (label, None, (48, 48), True, True, None, 255, norm.lut(), norm.rgb)
        samples_u8.append(torch.from_numpy(preprocess(image, args[0], np.random.default_rng(seed), *args[2:],
                                                      uint8_output=True)[0]))
        samples_f.append(torch.from_numpy(preprocess(image, args[0], np.random.default_rng(seed), *args[2:])[0]))
    batch_u8, batch_f = torch.stack(samples_u8), torch.stack(samples_f)
    assert batch_u8.dtype == torch.uint8 and batch_u8.shape == (8, 4, 48, 48)
    assert (batch_u8[:, 3] == 0).any()  # some padding is in the batch
    out = norm.to_float_tensor(batch_u8)
    assert out.dtype == torch.float32 and out.shape == (8, 3, 48, 48)
    assert torch.equal(out, batch_f)
    assert np.array_equal(out.numpy(), _float64_normalised(batch_u8.numpy(), norm.mean, norm.std, norm.rgb))


def test_to_float_tensor_refuses_other_batches():
    with pytest.raises(ValueError, match="uint8 batch"):
        CAFFE_BGR.to_float_tensor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 batch"):
        CAFFE_BGR.to_float_tensor(torch.zeros(2, 4, 8, 8))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("fast") / "synthetic", n_train=4, n_val=0, n_test=0, size=(64, 128),
                    seed=11)


def test_dataset_uint8_images_collate_and_normalise_to_the_float_batch(root):
    """The dataset option end to end: every image of a generated set, the recipe (scale + mirror + crop)."""
    kw = dict(crop_size=(48, 48), random_scale=True, random_mirror=True, verbose=False)
    floats = CityscapesDataset(root, "train", **kw)
    uint8s = CityscapesDataset(root, "train", uint8_images=True, **kw)
    keys = [(i, seed) for i in range(len(floats)) for seed in range(6)]
    batch_f = default_collate([floats[k] for k in keys])
    batch_u = default_collate([uint8s[k] for k in keys])
    assert batch_u[0].dtype == torch.uint8 and batch_u[0].shape[1] == 4
    assert torch.equal(batch_u[1], batch_f[1]) and batch_u[2] == batch_f[2]
    assert torch.equal(floats.normalization.to_float_tensor(batch_u[0]), batch_f[0])
    # And the dataset's sample is the whole-image resize's, image by image.
    for index, seed in keys:
        image, label, lut = floats.load_raw(index)
        ref = preprocess(image, label, np.random.default_rng(seed), (48, 48), True, True, lut,
                         region_resize=False)
        sample = floats[(index, seed)]
        assert np.array_equal(sample[0].numpy(), ref[0]) and np.array_equal(sample[1].numpy(), ref[1])

"""Input normalisation as a property of the weights: BGR minus the Caffe mean, or ImageNet RGB mean/std."""
from __future__ import annotations

import numpy as np
import pytest

from cwdseg.data.transforms import CAFFE_BGR, IMAGENET_RGB, NORMALIZATIONS, preprocess


@pytest.fixture()
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def test_caffe_bgr_is_the_original_float64_subtraction(image):
    out, _ = preprocess(image, None, None, crop_size=None, mean_lut=CAFFE_BGR.lut(), rgb=CAFFE_BGR.rgb)
    # The original: float32 image minus a float64 BGR mean array, cast to float32, HWC -> CHW.
    mean = np.array([104.00698793, 116.66876762, 122.67891434])
    expected = np.asarray(np.asarray(image, np.float32) - mean, np.float32).transpose(2, 0, 1)
    assert np.array_equal(out, expected)


def test_imagenet_rgb_reorders_channels_and_divides_by_std(image):
    out, _ = preprocess(image, None, None, crop_size=None, mean_lut=IMAGENET_RGB.lut(), rgb=IMAGENET_RGB.rgb)
    rgb = image[..., ::-1].astype(np.float64) / 255.0
    expected = (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", sorted(NORMALIZATIONS))
def test_to_bgr_uint8_inverts_the_normalisation(image, name):
    norm = NORMALIZATIONS[name]
    out, _ = preprocess(image, None, None, crop_size=None, mean_lut=norm.lut(), rgb=norm.rgb)
    assert np.array_equal(norm.to_bgr_uint8(out), image)

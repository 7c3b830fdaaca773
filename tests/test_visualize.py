"""Prediction pictures: palette colours, the side-by-side panel, the image behind a network input."""
import numpy as np
import torch

from cwdseg.data.cityscapes import IMG_MEAN_BGR
from cwdseg.data.transforms import preprocess
from cwdseg.viz.segmaps import colorize, image_from_network_input, make_panel


def test_panel_marks_exactly_the_wrong_labelled_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    gt = rng.integers(0, 19, (6, 8)).astype(np.uint8)
    gt[0, :] = 255  # ignored row
    pred = gt.copy()
    pred[0, :] = 3  # "wrong" on ignored pixels: not an error
    pred[2, 3] = (gt[2, 3] + 1) % 19
    pred[5, 7] = (gt[5, 7] + 5) % 19
    panel = make_panel(image, gt, pred, scale=1.0)
    assert panel.shape == (6, 32, 3)
    assert np.array_equal(panel[:, :8], image)
    assert np.array_equal(panel[:, 8:16][..., ::-1], colorize(gt))  # BGR on disk, RGB palette
    assert np.array_equal(panel[:, 16:24][..., ::-1], colorize(pred))
    red = np.all(panel[:, 24:] == (0, 0, 255), axis=-1)
    assert sorted(zip(*np.nonzero(red))) == [(2, 3), (5, 7)]
    assert np.array_equal(panel[1, 24:][~red[1]], image[1][~red[1]] // 3)


def test_ignored_pixels_are_black_and_road_is_cityscapes_purple():
    rgb = colorize(np.array([[0, 255]], dtype=np.uint8))
    assert tuple(rgb[0, 0]) == (128, 64, 128) and tuple(rgb[0, 1]) == (0, 0, 0)


def test_network_input_back_to_the_picture():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    label = np.zeros((10, 12), dtype=np.uint8)
    net_input, _ = preprocess(image, label, rng, crop_size=None)
    assert np.array_equal(image_from_network_input(torch.from_numpy(net_input), IMG_MEAN_BGR), image)

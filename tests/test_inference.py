"""Whole / sliding / flip / multi-scale logits against independent re-computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cwdseg.evaluation.inference import parse_overlap, predict_logits, sliding_windows, tile_stride

C = 5


class TinySeg(nn.Module):
    """A stand-in segmentation net: stride-4 logits, returned as (logits, aux, feature) like PSPNet."""

    def __init__(self, symmetric: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, C, 3, stride=2, padding=1)
        if symmetric:  # kernels mirror-symmetric in x -> the network commutes with a horizontal flip
            with torch.no_grad():
                for conv in (self.conv1, self.conv2):
                    conv.weight.copy_(conv.weight + conv.weight.flip(-1))

    def forward(self, x):
        feat = torch.tanh(self.conv1(x))
        logits = self.conv2(feat)
        return logits, logits * 0.5, feat


def whole_reference(model, x):
    """Independent whole-image protocol: forward, bilinear align_corners=True to the input size."""
    with torch.no_grad():
        return F.interpolate(model(x)[0], size=x.shape[-2:], mode="bilinear", align_corners=True)


def sliding_reference(model, image, tile, overlap):
    """The original predict_sliding, transcribed loop by loop (one tile per forward)."""
    _, _, H, W = image.shape
    stride = math.ceil(tile[0] * (1 - overlap))
    rows = max(1, int(math.ceil((H - tile[0]) / stride) + 1))
    cols = max(1, int(math.ceil((W - tile[1]) / stride) + 1))
    probs = torch.zeros(1, C, H, W)
    count = torch.zeros(1, 1, H, W)
    for row in range(rows):
        for col in range(cols):
            x1, y1 = col * stride, row * stride
            x2, y2 = min(x1 + tile[1], W), min(y1 + tile[0], H)
            x1, y1 = max(x2 - tile[1], 0), max(y2 - tile[0], 0)
            img = image[:, :, y1:y2, x1:x2]
            padded = torch.zeros(1, 3, tile[0], tile[1])
            padded[:, :, : img.shape[2], : img.shape[3]] = img
            with torch.no_grad():
                out = F.interpolate(model(padded)[0], size=tile, mode="bilinear", align_corners=True)
            probs[:, :, y1:y2, x1:x2] += out[:, :, : img.shape[2], : img.shape[3]]
            count[:, :, y1:y2, x1:x2] += 1
    return probs / count


@pytest.fixture
def model():
    return TinySeg().eval()


def test_overlap_parsing_and_stride():
    assert parse_overlap("1/3") == pytest.approx(1 / 3)
    assert parse_overlap("0.25") == 0.25
    assert parse_overlap(0.5) == 0.5
    for bad in ("a/b", "1/0", "1", "-0.1"):
        with pytest.raises(ValueError):
            parse_overlap(bad)
    assert tile_stride((512, 512), 1 / 3) == (342, 342)


def test_grid_of_the_original_for_full_cityscapes_images():
    boxes = sliding_windows(1024, 2048, (512, 512), 1 / 3)
    assert len(boxes) == 3 * 6
    # by hand: row starts 0, 342, 684->clipped to 512; column starts 0,342,684,1026,1368,1710->1536
    assert sorted({b[0] for b in boxes}) == [0, 342, 512]
    assert sorted({b[2] for b in boxes}) == [0, 342, 684, 1026, 1368, 1536]
    assert all(b[1] - b[0] == 512 and b[3] - b[2] == 512 for b in boxes)


def test_single_tile_covering_the_image_equals_whole(model):
    x = torch.randn(2, 3, 48, 80)
    whole = predict_logits(model, x, mode="whole", num_classes=C)
    sliding = predict_logits(model, x, mode="sliding", tile=(48, 80), num_classes=C)
    assert len(sliding_windows(48, 80, (48, 80), 1 / 3)) == 1
    torch.testing.assert_close(sliding, whole, rtol=0, atol=0)
    torch.testing.assert_close(whole, whole_reference(model, x))


@pytest.mark.parametrize("size,tile,tile_batch", [((70, 100), (32, 32), 3), ((20, 100), (32, 32), 8),
                                                  ((64, 96), (32, 48), 1)])
def test_sliding_matches_the_original_loop(model, size, tile, tile_batch):
    x = torch.randn(1, 3, *size)
    got = predict_logits(model, x, mode="sliding", tile=tile, overlap=1 / 3, num_classes=C, tile_batch=tile_batch)
    if tile[0] == tile[1]:  # the original used tile[0] for both strides; identical for square tiles
        torch.testing.assert_close(got, sliding_reference(model, x, tile, 1 / 3), rtol=1e-5, atol=1e-5)
    else:
        stride_h, stride_w = math.ceil(tile[0] * 2 / 3), math.ceil(tile[1] * 2 / 3)
        assert len(sliding_windows(*size, tile, 1 / 3)) == (math.ceil((size[0] - tile[0]) / stride_h) + 1) * (
            math.ceil((size[1] - tile[1]) / stride_w) + 1)
    # batching tiles of several images does not change the result
    x2 = torch.cat([x, torch.randn(1, 3, *size)])
    both = predict_logits(model, x2, mode="sliding", tile=tile, num_classes=C, tile_batch=5)
    torch.testing.assert_close(both[:1], got, rtol=1e-5, atol=1e-5)


def test_flip_is_the_mean_of_both_passes(model):
    x = torch.randn(1, 3, 40, 56)
    got = predict_logits(model, x, flip=True, num_classes=C)
    expected = 0.5 * (whole_reference(model, x) + whole_reference(model, x.flip(-1)).flip(-1))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flip_changes_nothing_for_a_mirror_equivariant_model_and_symmetric_input():
    model = TinySeg(symmetric=True).eval()
    # Stride-2 convs (padding 1) commute with a mirror only when each sampling grid is symmetric:
    # width 4m+1 -> 2m+1 -> m+1 columns. 57 = 4*14+1.
    half, mid = torch.randn(1, 3, 41, 28), torch.randn(1, 3, 41, 1)
    x = torch.cat([half, mid, half.flip(-1)], dim=-1)
    assert torch.equal(x, x.flip(-1))
    plain = predict_logits(model, x, num_classes=C)
    flipped = predict_logits(model, x, flip=True, num_classes=C)
    torch.testing.assert_close(plain, plain.flip(-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(flipped, plain, rtol=1e-4, atol=1e-5)


def test_multi_scale_averages_rescaled_passes(model):
    x = torch.randn(1, 3, 40, 60)
    got = predict_logits(model, x, scales=(0.5, 1.25), flip=True, num_classes=C)
    parts = []
    for s in (0.5, 1.25):
        xs = F.interpolate(x, size=(round(40 * s), round(60 * s)), mode="bilinear", align_corners=True)
        for mirrored in (False, True):
            inp = xs.flip(-1) if mirrored else xs
            with torch.no_grad():
                out = F.interpolate(model(inp)[0], size=(40, 60), mode="bilinear", align_corners=True)
            parts.append(out.flip(-1) if mirrored else out)
    torch.testing.assert_close(got, sum(parts) / 4, rtol=1e-5, atol=1e-5)


def test_sliding_multi_scale_resizes_back(model):
    x = torch.randn(1, 3, 40, 60)
    got = predict_logits(model, x, mode="sliding", tile=(32, 32), scales=(1.5,), num_classes=C)
    xs = F.interpolate(x, size=(60, 90), mode="bilinear", align_corners=True)
    ref = F.interpolate(sliding_reference(model, xs, (32, 32), 1 / 3), size=(40, 60), mode="bilinear",
                        align_corners=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_is_close_to_fp32(model):
    x = torch.randn(1, 3, 32, 48)
    fp32 = predict_logits(model, x, num_classes=C)
    bf16 = predict_logits(model, x, num_classes=C, amp_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_bad_arguments(model):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, x, mode="tiles", num_classes=C)
    with pytest.raises(ValueError, match="classes"):
        predict_logits(model, x, num_classes=19)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        predict_logits(model, torch.randn(3, 16, 16), num_classes=C)

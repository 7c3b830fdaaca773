"""Confusion matrix, IoU and the official-evaluator wrapper against hand computations."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from cwdseg.evaluation.metrics import ConfusionMatrix, confusion_matrix, format_table, iou_from_confusion, official_miou


def test_confusion_matrix_of_a_known_prediction():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    # pairs (gt, pred), 255 dropped: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,0)
    expected = torch.tensor([[1, 1, 0],
                             [1, 2, 0],
                             [1, 0, 1]])
    conf = confusion_matrix(pred, target, num_classes=3)
    assert conf.dtype == torch.int64
    assert torch.equal(conf, expected)


def test_accumulates_over_batches():
    acc = ConfusionMatrix(num_classes=3)
    acc.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    acc.update(torch.tensor([[2, 2]]), torch.tensor([[2, 255]]))
    assert torch.equal(acc.value(), torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]]))


def test_rejects_label_ids_instead_of_train_ids():
    with pytest.raises(ValueError, match="trainIds"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 33]), num_classes=19)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), num_classes=19)


def test_iou_with_an_absent_class_counts_zero():
    # 4 classes: c is only ever predicted (once, on an "a" pixel); d occurs nowhere.
    conf = torch.tensor([[5, 1, 1, 0],
                         [2, 3, 0, 0],
                         [0, 0, 0, 0],
                         [0, 0, 0, 0]])
    out = iou_from_confusion(conf, ["a", "b", "c", "d"])
    iou_a = 5 / (7 + 7 - 5)          # row a = 5+1+1, col a = 5+2
    iou_b = 3 / (5 + 4 - 3)          # row b = 5, col b = 4
    iou_c = 0 / max(1, 0 + 1 - 0)    # only a false positive
    iou_d = 0.0                      # absent everywhere: 0, not NaN
    expected = [iou_a, iou_b, iou_c, iou_d]
    assert out["iou"] == pytest.approx(expected)
    assert out["miou"] == pytest.approx(sum(expected) / 4)
    assert out["pixel_accuracy"] == pytest.approx(8 / 12)
    assert out["mean_accuracy"] == pytest.approx((5 / 7 + 3 / 5 + 0 + 0) / 4)
    assert out["per_class_iou"]["b"] == pytest.approx(iou_b)
    assert out["present"] == [True, True, False, False]
    assert out["confusion_matrix"][0] == [5, 1, 1, 0]
    text = format_table(out)
    assert "mIoU" in text and "not in ground truth" in text


def _write(path, array):
    assert cv2.imwrite(str(path), np.asarray(array, dtype=np.uint8))
    return path


def test_official_miou_matches_hand_computation(tmp_path):
    # labelIds: 7 road, 8 sidewalk, 11 building, 0 unlabeled (ignored in eval), 4 static (ignored).
    gt = np.array([[7, 7, 7, 8], [8, 8, 0, 11], [11, 11, 4, 4]])
    pred = np.array([[7, 7, 8, 8], [8, 7, 7, 11], [11, 7, 7, 26]])
    g = _write(tmp_path / "a_gtFine_labelIds.png", gt)
    p = _write(tmp_path / "a_pred.png", pred)
    out = official_miou([p], [g])
    # pixels with an evaluated gt: road (3): pred 7,7,8; sidewalk (3): 8,8,7; building (3): 11,11,7.
    # road: tp 2, fn 1, fp (pred road on evaluated gt) 2 -> 2/5
    # sidewalk: tp 2, fn 1, fp 1 -> 2/4; building: tp 2, fn 1, fp 0 -> 2/3
    # car: predicted only on an ignored pixel -> fp 0, tp 0, fn 0 -> NaN
    assert out["per_class_iou"]["road"] == pytest.approx(2 / 5)
    assert out["per_class_iou"]["sidewalk"] == pytest.approx(2 / 4)
    assert out["per_class_iou"]["building"] == pytest.approx(2 / 3)
    assert math.isnan(out["per_class_iou"]["car"])
    assert len(out["per_class_iou"]) == 19
    assert out["miou"] == pytest.approx((2 / 5 + 2 / 4 + 2 / 3) / 3)
    with pytest.raises(FileNotFoundError):
        official_miou([tmp_path / "nope.png"], [g])

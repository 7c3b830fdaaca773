"""evaluate.py --save-dir writes the per-class IoU bar chart; --compare draws a second evaluation beside it."""
from __future__ import annotations

import json

import cv2
import pytest

from cwdseg.cli import evaluate
from cwdseg.data.synthetic import generate
from cwdseg.viz.bars import plot_class_iou_bars
from tests.factories import write_legacy_student


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bars")
    data = generate(root / "cityscapes", n_train=0, n_val=2, n_test=0, size=(64, 128), seed=1)
    write_legacy_student(root / "a.pth", seed=1)
    write_legacy_student(root / "b.pth", seed=2)
    return root, data


def _evaluate(root, data, name, *extra):
    return evaluate.main(["--data-dir", str(data), "--restore-from", str(root / f"{name}.pth"), "--save-dir",
                          str(root / name), "--num-workers", "0", "--no-progress", "--device", "cpu", *extra])


def test_save_dir_writes_the_bar_chart_and_compare_adds_the_second(setup):
    root, data = setup
    _evaluate(root, data, "b")
    chart = cv2.imread(str(root / "b" / "class_iou.png"))
    assert chart is not None and chart.shape[1] > chart.shape[0]
    _evaluate(root, data, "a", "--compare", str(root / "b" / "results.json"))
    both = cv2.imread(str(root / "a" / "class_iou.png"))
    assert both is not None and both.shape[1] > chart.shape[1]  # grouped bars take more room


def test_compare_must_be_a_val_results_json_with_the_same_classes(setup, tmp_path):
    root, data = setup
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"per_class_iou": {"road": 0.5}}))
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(root, data, "a", "--compare", str(bad))
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        evaluate.main(["--data-dir", str(data), "--restore-from", str(root / "a.pth"), "--compare", str(bad)])


def test_bar_chart_refuses_results_of_different_classes(tmp_path):
    with pytest.raises(ValueError, match="classes differ"):
        plot_class_iou_bars([("s", {"a": 0.1, "b": 0.2}, 0.15), ("t", {"a": 0.1}, 0.1)], tmp_path / "x.png")

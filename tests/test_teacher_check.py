"""The teacher check: a random-weights teacher file is stopped with one line, the override lets it through,
a teacher that predicts the labels passes; the images are the first N of the split, in order."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cwdseg.data.transforms import NORMALIZATIONS
from cwdseg.evaluation.loop import build_eval_dataset, load_model
from cwdseg.evaluation.teacher_check import (
    FLOOR,
    MARGIN,
    TeacherCheckError,
    check_teacher,
    default_threshold,
    run_threshold,
)
from cwdseg.models import NORMALIZATION
from tests.factories import write_legacy_teacher


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("tcheck")
    generate(root, n_train=0, n_val=3, n_test=0, size=(32, 64), seed=2)
    return build_eval_dataset(root, "val", normalization=NORMALIZATIONS[NORMALIZATION["pspnet_resnet101"]])


def test_thresholds():
    assert default_threshold("pspnet_resnet101", "cityscapes", 19)[0] == pytest.approx(78.56 - MARGIN)
    assert default_threshold("deeplabv3_resnet101", "cityscapes", 19)[0] == pytest.approx(78.07 - MARGIN)
    assert default_threshold("pspnet_resnet101", "ade20k", 150)[0] == FLOOR  # the figure is Cityscapes'
    assert default_threshold("pspnet_resnet18", "cityscapes", 19)[0] == FLOOR


def test_run_threshold(val_set, tmp_path):
    assert run_threshold("pspnet_resnet101", "cityscapes", 19, tmp_path)[0] == pytest.approx(78.56 - MARGIN)
    assert run_threshold("pspnet_resnet101", "cityscapes", 19, tmp_path, override=0.0) == (0.0, "--teacher-min-miou")
    (tmp_path / "synthetic.json").write_text("{}")  # a synthetic Cityscapes copy: no published figure applies
    assert run_threshold("pspnet_resnet101", "cityscapes", 19, tmp_path)[0] == FLOOR


def test_random_weights_teacher_file_is_stopped_and_the_override_passes(val_set, tmp_path):
    path = tmp_path / "teacher_city.pth"
    write_legacy_teacher(path, seed=3)  # a PSPNet-R101 file in the released layout, random weights
    model, arch = load_model(path)
    assert arch == "pspnet_resnet101"
    threshold, _ = default_threshold(arch, "cityscapes", 19)
    with pytest.raises(TeacherCheckError) as exc:
        check_teacher(model, val_set, num_images=1, num_classes=19, device="cpu", threshold_miou=threshold)
    message = str(exc.value)
    assert "\n" not in message and f"below the required {threshold:.2f}" in message
    assert "--teacher-min-miou 0" in message and "--teacher-check-images 0" in message
    measured = float(message.split("scores ")[1].split(" mIoU")[0])
    record = check_teacher(model, val_set, num_images=1, num_classes=19, device="cpu", threshold_miou=0.0)
    assert record["passed"] and record["num_images"] == 1 and record["miou"] == pytest.approx(measured, abs=0.005)
    assert record["miou"] < FLOOR


class LabelOracle(nn.Module):
    """A stub teacher whose logits are the one-hot labels of the images it is shown (in the split's order)."""

    def __init__(self, labels: list[torch.Tensor]) -> None:
        super().__init__()
        self.labels, self.calls = labels, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aux: bool = False) -> torch.Tensor:
        label = self.labels[self.calls].clone()
        self.calls += 1
        label[label == 255] = 0
        return 10.0 * nn.functional.one_hot(label.long(), 19).permute(2, 0, 1)[None].float()


def test_a_teacher_that_predicts_the_labels_passes_on_the_first_images_in_order(val_set):
    labels = [torch.as_tensor(val_set[i][1]) for i in range(2)]
    oracle = LabelOracle(labels)
    record = check_teacher(oracle, val_set, num_images=2, num_classes=19, device="cpu", threshold_miou=FLOOR)
    assert record["passed"] and record["miou"] == pytest.approx(100.0) and oracle.calls == 2
    assert record["images"] == [str(s) for s in val_set.samples[:2]]
    with pytest.raises(ValueError, match="at least 1"):
        check_teacher(oracle, val_set, num_images=0, num_classes=19, device="cpu", threshold_miou=FLOOR)

"""tools/reproduce_table.py on generated checkpoints under the released file names."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cwdseg.data import CityscapesDataset
from cwdseg.data.synthetic import generate
from cwdseg.models import build_model
from tests.factories import random_state_dict, write_legacy_student, write_legacy_teacher
from tools import reproduce_table
from tools.reproduce_table import RELEASED_CHECKPOINTS

TEACHER, STUDENT_A, STUDENT_B, CIRKD_TEACHER = (c.file for c in RELEASED_CHECKPOINTS)
MAX_IMAGES = 2


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "cityscapes", n_train=0, n_val=3, n_test=0,
                    size=(64, 128), seed=3)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    write_legacy_teacher(folder / TEACHER, seed=0)
    write_legacy_student(folder / STUDENT_A, seed=1)
    write_legacy_student(folder / STUDENT_B, seed=2)
    return folder


def reference_miou(arch: str, seed: int, root: Path, n: int, state_dict: dict | None = None) -> float:
    """Whole-image mIoU (percent) computed here from the generated weights, with NumPy bookkeeping."""
    model = build_model(arch)
    model.load_state_dict(random_state_dict(arch, seed) if state_dict is None else state_dict)
    model.eval()
    dataset = CityscapesDataset(root, "val", crop_size=None, verbose=False)
    conf = np.zeros((19, 19), dtype=np.int64)
    for i in range(n):
        image, label, _ = dataset[i]
        with torch.no_grad():
            logits = model(image[None])[0]
        pred = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=True).argmax(1)[0].numpy()
        gt = label.numpy().astype(np.int64)
        keep = gt != 255
        np.add.at(conf, (gt[keep], pred[keep]), 1)
    tp = np.diag(conf)
    return 100 * float(np.mean(tp / np.maximum(1, conf.sum(0) + conf.sum(1) - tp)))


def test_table_lists_the_released_files():
    # the fourth row (issue 12): CIRKD's DeepLabV3-R101 Cityscapes teacher, 78.07 val / 77.46 test
    assert [c.published_val for c in RELEASED_CHECKPOINTS] == [78.56, 75.02, 75.90, 78.07]
    assert [c.published_test for c in RELEASED_CHECKPOINTS] == [None, 73.86, 74.58, 77.46]
    assert [c.arch for c in RELEASED_CHECKPOINTS] == ["resnet101", "resnet18", "resnet18", "deeplabv3_resnet101"]
    assert all(c.protocol == {"mode": "whole", "scales": [1.0], "flip": False} for c in RELEASED_CHECKPOINTS)


def test_all_present_are_evaluated(synth, ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    rc = reproduce_table.main(["--ckpt-dir", str(ckpts), "--data-dir", str(synth), "--max-images", str(MAX_IMAGES),
                               "--device", "cpu", "--out-dir", str(out), "--num-workers", "0", "--no-progress"])
    assert rc == 0
    rows = json.loads((out / "reproduce_table.json").read_text())["rows"]
    assert [r["evaluated"] for r in rows] == [True, True, True, False]  # no CIRKD teacher in the fixture
    # only two images: never reported as reproducing (or missing) the published figure
    assert [r["status"] for r in rows] == [f"not comparable (first {MAX_IMAGES} images only)"] * 3 + ["missing"]
    for row, (arch, seed) in zip(rows, [("resnet101", 0), ("resnet18", 1), ("resnet18", 2)]):
        assert row["measured_miou_percent"] == pytest.approx(reference_miou(arch, seed, synth, MAX_IMAGES), abs=1e-6)
        assert row["delta_points"] == pytest.approx(row["measured_miou_percent"] - row["published_val_percent"])
        assert row["results"]["num_images"] == MAX_IMAGES
    table = (out / "reproduce_table.md").read_text()
    assert f"| `{STUDENT_A}` | resnet18 | whole, scales [1.0], no flip | 75.02 | {rows[1]['measured_miou_percent']:.2f} |" in table
    assert "not comparable" in table  # --max-images is flagged
    assert table in capsys.readouterr().out


def test_missing_and_wrong_files_are_reported(synth, ckpts, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    os.symlink(ckpts / STUDENT_A, partial / STUDENT_A)
    os.symlink(ckpts / STUDENT_B, partial / TEACHER)  # a student under the teacher's name
    out = tmp_path / "out"
    rc = reproduce_table.main(["--ckpt-dir", str(partial), "--data-dir", str(synth), "--max-images", "1",
                               "--device", "cpu", "--out-dir", str(out), "--num-workers", "0", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = {r["file"]: r for r in json.loads((out / "reproduce_table.json").read_text())["rows"]}
    assert rows[STUDENT_A]["evaluated"] and rows[STUDENT_A]["status"].startswith("not comparable")
    assert rows[STUDENT_B]["status"] == "missing" and rows[STUDENT_B]["measured_miou_percent"] is None
    assert f"missing: {partial / STUDENT_B} not found" in printed
    assert rows[TEACHER]["status"] == "error" and \
        "holds a pspnet_resnet18 network, not pspnet_resnet101" in rows[TEACHER]["message"]


def test_nothing_found_exits_1(synth, tmp_path, capsys):
    rc = reproduce_table.main(["--ckpt-dir", str(tmp_path / "none"), "--data-dir", str(synth),
                               "--out-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert rc == 1
    captured = capsys.readouterr()
    assert sum(line.startswith("missing: ") for line in captured.out.splitlines()) == 4
    assert "no checkpoint could be evaluated" in captured.err


@pytest.mark.parametrize("delta, expected", [
    (0.0, "within ±0.5 of published"),
    (-0.5, "within ±0.5 of published"),
    (0.31, "within ±0.5 of published"),
    (-78.2, "off by -78.20 (more than ±0.5)"),
    (0.51, "off by +0.51 (more than ±0.5)"),
])
def test_status_says_how_far_from_published(delta, expected):
    assert reproduce_table.verdict(delta, 0.5, "val", None, 500) == expected


def test_status_of_a_row_far_below_published_is_not_ok(synth, ckpts, tmp_path):
    # The whole val split of the generated data, so the row is comparable; random weights score ~0,
    # far below the published 75.02.
    rows = reproduce_table.reproduce(ckpts, synth, device="cpu", num_workers=0, progress=False,
                                     checkpoints=[RELEASED_CHECKPOINTS[1]])
    measured = rows[0]["measured_miou_percent"]
    assert measured < 20
    assert rows[0]["status"] == f"off by {measured - 75.02:+.2f} (more than ±0.5)"


def test_a_cirkd_row_is_evaluated_with_its_architecture(synth, tmp_path):
    # The CIRKD teacher row's machinery (DeepLabV3, CIRKD layout, its normalisation) on a small
    # DeepLabV3-R18 file in the same layout, under a row of its own.
    from tests.factories import write_cirkd_deeplabv3
    from tools.reproduce_table import ReleasedCheckpoint, reproduce

    sd = write_cirkd_deeplabv3(tmp_path / "kd.pth", "resnet18", seed=7)
    row = ReleasedCheckpoint("kd.pth", "DeepLabV3-R18", "deeplabv3_resnet18", 74.21, None, "here")
    (result,) = reproduce(tmp_path, synth, max_images=MAX_IMAGES, device="cpu", num_workers=0, progress=False,
                          checkpoints=(row,))
    assert result["evaluated"] and result["status"] == f"not comparable (first {MAX_IMAGES} images only)"
    assert result["measured_miou_percent"] == pytest.approx(reference_miou("deeplabv3_resnet18", 0, synth, MAX_IMAGES, sd), abs=1e-6)

"""tools/show_distillation.py: the picture is written and its KL values are CWD's per-channel terms."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from cwdseg.data.synthetic import generate
from cwdseg.distill.cwd import CriterionCWD
from cwdseg.models import build_model
from cwdseg.viz.channels import channel_distributions
from tests.factories import write_legacy_student, write_legacy_teacher
from tools import show_distillation


def kl_by_hand(student: np.ndarray, teacher: np.ndarray, tau: float) -> np.ndarray:
    """tau^2 * sum_i p_T,i (log p_T,i - log p_S,i) per channel, p = softmax over positions of z / tau,
    written with explicit loops in float64."""
    c_count = teacher.shape[0]
    out = np.zeros(c_count)
    for c in range(c_count):
        zt = teacher[c].ravel().astype(np.float64) / tau
        zs = student[c].ravel().astype(np.float64) / tau
        log_zt = zt.max() + math.log(sum(math.exp(v - zt.max()) for v in zt))
        log_zs = zs.max() + math.log(sum(math.exp(v - zs.max()) for v in zs))
        total = 0.0
        for a, b in zip(zt, zs):
            log_pt, log_ps = a - log_zt, b - log_zs
            total += math.exp(log_pt) * (log_pt - log_ps)
        out[c] = tau ** 2 * total
    return out


def test_per_channel_kl_equals_the_hand_formula_and_the_cwd_loss():
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(1, 5, 6, 7, generator=g)
    t = 3 * torch.randn(1, 5, 6, 7, generator=g)
    dist = channel_distributions(s, t, tau=4.0)
    want = kl_by_hand(s[0].numpy(), t[0].numpy(), 4.0)
    assert np.allclose(dist.kl, want, rtol=1e-5, atol=1e-7)
    assert np.allclose(dist.kl_map.sum(axis=(1, 2)), want, rtol=1e-4, atol=1e-7)
    assert np.allclose(dist.teacher.sum(axis=(1, 2)), 1.0, atol=1e-5)
    assert np.allclose(dist.student.sum(axis=(1, 2)), 1.0, atol=1e-5)
    # The loss is the mean of the per-channel terms (tau^2 / (N C) * sum, N = 1).
    loss = float(CriterionCWD("channel", "kl", temperature=4.0)(s, t))
    assert dist.loss == pytest.approx(loss, rel=1e-6)
    assert want.mean() == pytest.approx(loss, rel=1e-5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    write_legacy_teacher(folder / "teacher.pth", seed=5)
    write_legacy_student(folder / "student.pth", seed=6)
    return folder / "teacher.pth", folder / "student.pth"


def test_picture_is_written_with_cwd_terms_of_the_networks(pair, tmp_path):
    teacher_path, student_path = pair
    data = generate(tmp_path / "cityscapes", n_train=0, n_val=1, n_test=0, size=(64, 96), seed=2)
    out = tmp_path / "fig" / "channels.png"
    result = show_distillation.main(["--teacher", str(teacher_path), "--student", str(student_path), "--data-dir",
                                     str(data), "--index", "0", "--tau", "2", "--channels", "road", "car", "7",
                                     "--out", str(out)])
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape[0] > 200 and picture.shape[1] > 200
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))
    assert result["channels_drawn"] == ["road", "car", "traffic sign"]

    image = cv2.imread(str(sorted((data / "leftImg8bit" / "val").glob("*/*.png"))[0]), cv2.IMREAD_COLOR)
    x = torch.from_numpy((image.astype(np.float64) - [104.00698793, 116.66876762, 122.67891434])
                         .astype(np.float32).transpose(2, 0, 1).copy())[None]
    logits = {}
    for role, path, arch in (("t", teacher_path, "resnet101"), ("s", student_path, "resnet18")):
        net = build_model(arch).eval()
        net.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            logits[role] = net(x)[0][0].numpy()
    want = kl_by_hand(logits["s"], logits["t"], 2.0)
    got = np.array(list(result["per_channel_kl"].values()))
    assert np.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert result["cwd_loss"] == pytest.approx(want.mean(), rel=1e-4)
    assert result["map_size"] == list(logits["t"].shape[1:])


def test_errors_are_one_line(pair, tmp_path, capsys):
    teacher_path, student_path = pair
    assert show_distillation.cli(["--teacher", str(teacher_path), "--student", str(student_path)]) == 2
    assert "--image" in capsys.readouterr().err
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    assert show_distillation.cli(["--teacher", str(teacher_path), "--student", str(student_path), "--image",
                                  str(bad), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "\n" not in err

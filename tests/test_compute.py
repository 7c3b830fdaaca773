"""Per-step and per-run compute against the test's own count of the models' multiply-accumulates."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cwdseg.config import CONFIG_FORMAT, RunConfig, from_dict, to_dict
from cwdseg.engine.compute import logged_training, run_cost, run_cost_from_folder, step_cost, step_cost_of_config
from cwdseg.models import build_model
from cwdseg.models.connector import FeatureConnector
from cwdseg.models.summary import training_step_flops

CROP = (64, 96)


def hand_macs(model: nn.Module, size: tuple[int, int], skip: tuple[str, ...] = ()) -> int:
    """Conv + linear MACs of one real float64 forward of one image, by forward hooks on every layer."""
    total = [0]

    def hook(name):
        def count(module, inputs, output):
            if name.startswith(skip):
                return
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                total[0] += output.numel() * module.in_channels // module.groups * kh * kw
            else:
                total[0] += output.numel() * module.in_features
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval().double()
    with torch.no_grad():
        model(torch.randn(1, 3, *size, dtype=torch.float64))
    for h in handles:
        h.remove()
    return total[0]


@pytest.fixture(scope="module")
def macs():
    student = hand_macs(build_model("pspnet_resnet18"), CROP)
    teacher = hand_macs(build_model("pspnet_resnet18"), CROP, skip=("dsn.",))
    return student, teacher


def test_step_cost_is_the_models_macs_by_the_convention(macs):
    student, teacher = macs
    connectors = {"cwd_feat": FeatureConnector(128, 512), "fitnet": nn.Conv2d(128, 512, 1, bias=False)}
    cost = step_cost("pspnet_resnet18", "pspnet_resnet18", CROP, batch_size=2, connectors=connectors)
    fh, fw = -(-CROP[0] // 8) + 1, -(-CROP[1] // 8) + 1  # stride 8 with the original's ceil-mode pool: 64 -> 9
    conn = 2 * fh * fw * 128 * 512  # two 1x1 convs 128 -> 512 on the student's output map
    assert (cost.student_forward_macs, cost.teacher_forward_macs, cost.connector_forward_macs) == (student, teacher,
                                                                                                    conn)
    per_image = 2 * (3 * student + teacher + 3 * conn)
    assert cost.flops_per_image == per_image and cost.flops_per_step == 2 * per_image
    baseline = step_cost("pspnet_resnet18", None, CROP, batch_size=2)
    assert baseline.flops_per_step == 2 * 2 * 3 * student
    assert step_cost("pspnet_resnet18", "pspnet_resnet18", CROP, 2).flops_per_step == \
        training_step_flops("pspnet_resnet18", "pspnet_resnet18", CROP, 2)


def test_run_cost_is_the_step_cost_times_the_schedule(macs):
    student, teacher = macs
    cost = run_cost(step_cost("pspnet_resnet18", "pspnet_resnet18", CROP, batch_size=4), steps=7,
                    device_seconds=1.5, peak_memory_bytes=123)
    assert cost.images_seen == 28
    assert cost.student_flops == 28 * 2 * 3 * student and cost.teacher_flops == 28 * 2 * teacher
    assert cost.total_flops == 28 * 2 * (3 * student + teacher)
    out = cost.to_json()
    assert out["total_flops"] == cost.total_flops and out["step"]["flops_per_step"] == 4 * 2 * (3 * student + teacher)
    assert json.loads(json.dumps(out))["images_seen"] == 28


def test_run_cost_from_a_run_folder(macs, tmp_path):
    student, teacher = macs
    config = to_dict(RunConfig())
    config["models"].update(student_arch="pspnet_resnet18", teacher_arch="pspnet_resnet18")
    config["data"].update(crop_size=list(CROP), num_classes=19)
    config["optim"].update(batch_size=2, num_steps=5)
    config["distill"]["terms"] = {"cwd_feat": {"weight": 3.0, "on": "feature", "tau": 4.0, "norm": "channel",
                                               "div": "kl", "ignore_mask": False},
                                  "ifvd": {"weight": 200.0, "on": "logits"}}
    (tmp_path / "config.json").write_text(json.dumps({"format": CONFIG_FORMAT, "config": config,
                                                      "environment": {"world_size": 2}}))
    lines = [dict(step=0, iter_ms=900.0, images_per_s=1.0, peak_mem_mb=10.0),
             dict(step=4, iter_ms=100.0, images_per_s=20.0, peak_mem_mb=12.5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cost = run_cost_from_folder(tmp_path)
    fh, fw = -(-CROP[0] // 8) + 1, -(-CROP[1] // 8) + 1
    conn = fh * fw * 128 * 128  # cwd on the feature: the original's connector (R18 -> R18: 128 -> 128); ifvd: none
    assert cost.step.connector_forward_macs == conn
    assert cost.images_seen == 10 and cost.total_flops == 10 * 2 * (3 * student + teacher + 3 * conn)
    assert cost.device_seconds == pytest.approx(2 * (0.9 + 4 * 0.1))  # x 2 processes
    assert cost.peak_memory_bytes == int(12.5 * 2 ** 20)
    assert logged_training(tmp_path)["images_per_s"] == 20.0
    baseline = dict(config, distill={"preset": None, "terms": {}})
    assert step_cost_of_config(from_dict(baseline)).teacher_forward_macs == 0

"""Named taps: any layer of a registered model read by module path or alias with forward hooks, no
change to a model file; unknown names are one-line errors; inference-mode captures need a clone."""
from __future__ import annotations

import pytest
import torch

from cwdseg.distill.taps import TapError, TapRecorder, available_paths, resolve_tap
from cwdseg.models import ARCHS, arch_spec, build_model

SIZE = 64


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    student = build_model("pspnet_resnet18", 19).eval()
    teacher = build_model("deeplabv3_resnet18", 19).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    return student, teacher, x


def stem_then(model, x, last: int, prefix: str = ""):
    """The stage map computed by calling the layers one by one (independent of the hooks)."""
    body = model.get_submodule(prefix) if prefix else model
    x = body.relu1(body.bn1(body.conv1(x)))
    x = body.relu2(body.bn2(body.conv2(x)))
    x = body.relu3(body.bn3(body.conv3(x)))
    x = body.maxpool(x)
    for i in range(1, last + 1):
        x = getattr(body, f"layer{i}")(x)
    return x


def test_student_layer2_and_teacher_layer3_by_path_and_alias(pair):
    student, teacher, x = pair
    with TapRecorder(student, ["layer2", "stage2", "logits"], arch_spec("pspnet_resnet18").taps) as rec_s:
        with torch.no_grad():
            out_s = student(x)
    with TapRecorder(teacher, ["pretrained.layer3", "stage3", "feature"], arch_spec("deeplabv3_resnet18").taps) as rec_t:
        with torch.no_grad():
            out_t = teacher(x)
    with torch.no_grad():
        ref_s, ref_t = stem_then(student, x, 2), stem_then(teacher, x, 3, "pretrained")
    assert rec_s.taps["layer2"].shape == (2, 128, 9, 9) and torch.equal(rec_s.taps["layer2"], ref_s)
    assert torch.equal(rec_s.taps["stage2"], ref_s) and rec_s.taps["logits"] is out_s[0]
    assert rec_t.taps["pretrained.layer3"].shape == (2, 256, 8, 8) and torch.equal(rec_t.taps["stage3"], ref_t)
    assert rec_t.taps["feature"] is out_t[2]
    # the hooks are gone after the block: a later forward records nothing
    for model in (student, teacher):
        assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_alias_of_every_arch_resolves_and_head_is_the_feature(arch):
    with torch.device("meta"):                       # shapes and identities only: no weights to fill
        model = build_model(arch, 5).train()
        spec = arch_spec(arch)
        assert {"stage1", "stage2", "stage3", "stage4", "head"} <= set(spec.taps)
        with TapRecorder(model, [*spec.taps, "feature"], spec.taps) as rec:
            model(torch.zeros(2, 3, 48, 48))
    assert rec.taps["head"] is rec.taps["feature"]                     # the very tensor of output[2]
    assert rec.taps["head"].shape[1] == spec.feature_channels
    widths = [rec.taps[f"stage{i}"].shape[1] for i in range(1, 5)]
    strides = [-(-48 // rec.taps[f"stage{i}"].shape[-1]) for i in range(1, 5)]
    if spec.family == "segformer":  # MiT's four stages: the published widths, strides 4, 8, 16, 32
        assert widths == ([32, 64, 160, 256] if arch == "segformer_b0" else [64, 128, 320, 512]), widths
        assert strides == [4, 8, 16, 48 // 2], strides  # 48 px: 12, 6, 3, 2 (the last stage rounds up)
        return
    assert widths in ([64, 128, 256, 512], [256, 512, 1024, 2048], [24, 32, 96, 320]), widths
    assert strides[1:] == [strides[1]] * 3 and strides[0] < strides[1]


def test_unknown_tap_is_a_one_line_error_listing_the_available_names(pair):
    student, teacher, _ = pair
    with pytest.raises(TapError) as exc:
        TapRecorder(teacher, ["backbone.layer3"], arch_spec("deeplabv3_resnet18").taps)
    msg = str(exc.value)
    assert "\n" not in msg and "'backbone.layer3'" in msg
    for name in ("logits", "feature", "stage3", "head", "pretrained.layer3", "auxlayer"):
        assert name in msg
    assert "layer3.1" not in available_paths(student) and "layer3" in available_paths(student)
    with pytest.raises(TapError, match="alias of 'nope'"):
        resolve_tap(student, "stage9", {"stage9": "nope"})


def test_a_tap_that_is_not_a_tensor_or_missing_is_an_error(pair):
    _, teacher, x = pair
    with pytest.raises(TapError, match="returns tuple"):          # DeepLabHead returns (logits, feature)
        with TapRecorder(teacher, ["head"]):
            teacher(x)
    with pytest.raises(TapError, match="aux=False"):
        with TapRecorder(teacher, ["aux"]):
            teacher(x, aux=False)


def test_inference_mode_captures_must_be_cloned_outside_it(pair):
    student, teacher, x = pair
    spec_s, spec_t = arch_spec("pspnet_resnet18").taps, arch_spec("deeplabv3_resnet18").taps
    with TapRecorder(teacher, ["stage3"], spec_t) as rec_t:
        with torch.inference_mode():
            teacher(x)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="after leaving inference mode"):
            rec_t.cloned()
    student.train()
    with TapRecorder(student, ["stage3"], spec_s) as rec_s:
        student(x)
    s = rec_s.taps["stage3"][:, :, :8, :8]
    raw = rec_t.taps["stage3"]
    assert raw.is_inference()
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (s * raw).sum().backward()                     # a loss that saves the teacher map for backward
    student.zero_grad()
    t = rec_t.cloned()["stage3"]
    assert not t.is_inference() and torch.equal(t, raw)
    (s * t).sum().backward()
    assert student.layer3[0].conv1.weight.grad is not None
    student.eval()

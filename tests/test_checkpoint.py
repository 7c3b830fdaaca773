"""Loading and saving weight files (cwdseg/checkpoint.py) with files written in the layouts and the
serialization of the original releases by tests/factories.py."""
from __future__ import annotations

import zipfile
from collections import OrderedDict

import pytest
import torch
from torch import nn

from cwdseg import checkpoint as ckpt
from cwdseg.checkpoint import CheckpointError
from cwdseg.models import build_model
from tests.factories import (
    csail_resnet18_state_dict,
    pspnet_key_shapes,
    random_state_dict,
    write_csail_resnet18,
    write_legacy_student,
    write_legacy_teacher,
    write_torchvision_resnet18,
)

STUDENT_KEYS = [k for k, _ in pspnet_key_shapes("resnet18")]


def assert_model_holds(model: nn.Module, expected: dict) -> None:
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k


# ----------------------------------------------------------------------------------------------
# the four kinds of file


def test_released_student_legacy_file_loads_strictly(tmp_path):
    path = tmp_path / "CS_scenes_student.pth"
    written = write_legacy_student(path, seed=1)
    assert not zipfile.is_zipfile(path)  # really the pre-1.0 serialization
    raw = torch.load(path, weights_only=True)
    assert len(raw) == 150 and not any("num_batches_tracked" in k for k in raw)
    assert any((v < 0).any() for k, v in raw.items() if k.endswith("bn1.weight"))
    # plain strict load of a legacy file with no num_batches_tracked works ...
    build_model("resnet18").load_state_dict(raw, strict=True)
    # ... and through the toolkit, with the negative BN weights kept as they are (ABN applies |w|+eps)
    model = build_model("resnet18")
    ckpt.load_student(model, path)
    assert_model_holds(model, written)


def test_zip_serialization_also_loads(tmp_path):
    sd = random_state_dict("resnet18", seed=2)
    torch.save(sd, tmp_path / "s.pth")
    assert zipfile.is_zipfile(tmp_path / "s.pth")
    model = build_model("resnet18")
    ckpt.load_student(model, tmp_path / "s.pth")
    assert_model_holds(model, sd)


@pytest.fixture(scope="module")
def teacher_model():
    with torch.device("meta"):  # skip the random initialisation; load_state_dict(assign=True) gives real tensors
        model = build_model("resnet101")
    model.load_state_dict({k: torch.zeros(s) for k, s in pspnet_key_shapes("resnet101")}, assign=True)
    return model


def test_teacher_original_layout(tmp_path, teacher_model):
    path = tmp_path / "teacher_city.pth"
    written = write_legacy_teacher(path, layout="original", seed=4)
    assert len(written) == 565 and any(k.startswith("pspmodule.") for k in written)
    ckpt.load_teacher(teacher_model, path)
    assert_model_holds(teacher_model, written)


def test_teacher_toolbox_layout(tmp_path, teacher_model):
    path = tmp_path / "CS_scenes_teacher.pth"
    written = write_legacy_teacher(path, layout="toolbox", seed=5)
    assert "head.0.bottleneck.0.weight" in written and "head.1.weight" in written and "fc.weight" in written
    ckpt.load_teacher(teacher_model, path)
    expected = {}  # the renaming, written out by hand
    for k, v in written.items():
        if k.startswith("fc."):
            continue
        k = k.replace("head.0.", "pspmodule.", 1) if k.startswith("head.0.") else k.replace("head.1.", "head.", 1)
        expected[k] = v
    assert_model_holds(teacher_model, expected)


def test_teacher_toolbox_layout_wrong_shape_is_an_error(tmp_path, teacher_model):
    sd = write_legacy_teacher(tmp_path / "t.pth", layout="toolbox", seed=6)
    sd["head.1.weight"] = torch.zeros(21, 512, 1, 1)
    sd["head.1.bias"] = torch.zeros(21)
    torch.save(sd, tmp_path / "t21.pth", _use_new_zipfile_serialization=False)
    before = teacher_model.state_dict()["head.weight"].clone()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_teacher(teacher_model, tmp_path / "t21.pth")
    assert "head.weight: [21, 512, 1, 1] vs [19, 512, 1, 1]" in str(e.value) and "head.bias" in str(e.value)
    assert torch.equal(teacher_model.state_dict()["head.weight"], before)  # nothing half-loaded


def test_student_file_given_as_teacher_is_an_error(tmp_path, teacher_model):
    write_legacy_student(tmp_path / "s.pth")
    with pytest.raises(CheckpointError, match="resnet18 PSPNet"):
        ckpt.load_teacher(teacher_model, tmp_path / "s.pth")


def test_csail_imagenet_backbone(tmp_path, capsys):
    path = tmp_path / "resnet18-imagenet.pth"
    written = write_csail_resnet18(path, seed=7)
    model = build_model("resnet18")
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("pspmodule.", "head.", "dsn."))}
    report = ckpt.load_imagenet_backbone(model, path)
    backbone = [k for k in STUDENT_KEYS if not k.startswith(("pspmodule.", "head.", "dsn."))]
    assert len(backbone) == 115
    assert sorted(report["loaded"]) == sorted(backbone)
    assert sorted(report["skipped"]) == ["fc.bias", "fc.weight"]
    assert len(report["not_loaded"]) == 35
    sd = model.state_dict()
    for k in backbone:
        assert torch.equal(sd[k], written[k]), k
    for k, v in heads_before.items():
        assert torch.equal(sd[k], v), k
    out = capsys.readouterr().out
    assert "loaded 115" in out and "fc.weight" in out and str(path) in out


def test_imagenet_with_module_prefix_is_an_error(tmp_path):
    sd = OrderedDict(("module." + k, v) for k, v in csail_resnet18_state_dict().items())
    torch.save(sd, tmp_path / "prefixed.pth", _use_new_zipfile_serialization=False)
    model = build_model("resnet18")
    before = model.conv1.weight.detach().clone()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_imagenet_backbone(model, tmp_path / "prefixed.pth")
    msg = str(e.value)
    assert "prefixed.pth" in msg and "115 missing keys" in msg and "conv1.weight" in msg
    assert "prefixed 'module.'" in msg
    assert torch.equal(model.conv1.weight, before)


def test_torchvision_resnet_is_an_error(tmp_path):
    write_torchvision_resnet18(tmp_path / "resnet18-5c106cde.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_imagenet_backbone(build_model("resnet18"), tmp_path / "resnet18-5c106cde.pth")
    msg = str(e.value)
    assert "torchvision ResNet (7x7 conv1)" in msg and "resnet18-imagenet.pth" in msg
    assert "conv1.weight: [64, 3, 7, 7] vs [64, 3, 3, 3]" in msg
    assert "conv2.weight" in msg  # missing stem keys are listed


# ----------------------------------------------------------------------------------------------
# saving


def test_save_student_round_trip(tmp_path):
    model = build_model("resnet18")
    model.load_state_dict(random_state_dict("resnet18", seed=8))
    path = tmp_path / "out" / "city_39999_G.pth"
    ckpt.save_student(model, path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == STUDENT_KEYS  # exactly the released 150 keys, in the released order
    assert not zipfile.is_zipfile(path)  # legacy serialization, readable by the original tools
    fresh = build_model("resnet18")
    ckpt.load_student(fresh, path)
    assert_model_holds(fresh, model.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["city_39999_G.pth"]  # no temp file left


class FakeDDP(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # emitted by torch internals on importing torch.compile
def test_export_unwraps_ddp_and_compile(tmp_path):
    model = build_model("resnet18")
    for wrapped in (FakeDDP(model), torch.compile(model), FakeDDP(torch.compile(model))):
        assert any(k.startswith(("module.", "_orig_mod.")) for k in wrapped.state_dict())
        sd = ckpt.export_state_dict(wrapped)
        assert list(sd) == STUDENT_KEYS
        assert all(v.device.type == "cpu" and not v.requires_grad for v in sd.values())
    ckpt.save_student(FakeDDP(model), tmp_path / "s.pth")
    fresh = FakeDDP(build_model("resnet18"))
    ckpt.load_student(fresh, tmp_path / "s.pth")  # loading into a wrapped model unwraps too
    assert_model_holds(fresh.module, model.state_dict())


def test_student_prefixed_file_is_an_error_with_hint(tmp_path):
    model = build_model("resnet18")
    torch.save(FakeDDP(model).state_dict(), tmp_path / "ddp.pth")
    with pytest.raises(CheckpointError, match="prefixed 'module.'"):
        ckpt.load_student(build_model("resnet18"), tmp_path / "ddp.pth")


def test_training_checkpoint_dict(tmp_path):
    sd = random_state_dict("resnet18", seed=9)
    state = {"format": "cwd-seg/last/1", "step": 12, "student": sd, "optimizer_g": {"state": {}, "lr": 0.01},
             "recipe": {"input_size": [512, 512]}}
    ckpt.atomic_save(state, tmp_path / "last.pth")
    loaded = ckpt.load_checkpoint_dict(tmp_path / "last.pth")
    assert loaded["step"] == 12 and loaded["recipe"] == {"input_size": [512, 512]}
    model = build_model("resnet18")
    ckpt.load_student(model, tmp_path / "last.pth")  # the "student" entry is used
    assert_model_holds(model, sd)


def test_num_batches_tracked_in_a_file_is_ignored(tmp_path):
    sd = random_state_dict("resnet18", seed=10)
    with_counters = OrderedDict(sd)
    with_counters["bn1.num_batches_tracked"] = torch.tensor(7)
    torch.save(with_counters, tmp_path / "s.pth")
    model = build_model("resnet18")
    ckpt.load_student(model, tmp_path / "s.pth")
    assert_model_holds(model, sd)


def test_atomic_write_text(tmp_path):
    ckpt.atomic_write_text(tmp_path / "a" / "x.json", '{"ok": true}\n')
    assert (tmp_path / "a" / "x.json").read_text() == '{"ok": true}\n'
    assert len(list((tmp_path / "a").iterdir())) == 1


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "teacher_city.pth"
    with pytest.raises(CheckpointError, match="not found.*teacher_city.pth"):
        ckpt.load_student(build_model("resnet18"), path)
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_checkpoint_dict(path)
    with pytest.raises(CheckpointError, match="not a file"):
        ckpt.load_state_dict_file(tmp_path)


def test_wrong_shapes_lists_every_mismatch(tmp_path):
    sd = random_state_dict("resnet18", seed=11, num_classes=21)
    torch.save(sd, tmp_path / "voc.pth", _use_new_zipfile_serialization=False)
    model = build_model("resnet18")
    before = model.head.weight.detach().clone()
    with pytest.raises(CheckpointError) as e:
        ckpt.load_student(model, tmp_path / "voc.pth")
    msg = str(e.value)
    assert "voc.pth" in msg and "4 shape mismatches" in msg
    for line in ("head.weight: [21, 128, 1, 1] vs [19, 128, 1, 1]", "head.bias: [21] vs [19]",
                 "dsn.3.weight: [21, 128, 1, 1] vs [19, 128, 1, 1]", "dsn.3.bias: [21] vs [19]"):
        assert line in msg
    assert torch.equal(model.head.weight, before)


def test_missing_and_unexpected_keys(tmp_path):
    sd = random_state_dict("resnet18", seed=12)
    del sd["dsn.3.weight"], sd["dsn.3.bias"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_student(build_model("resnet18"), tmp_path / "odd.pth")
    msg = str(e.value)
    assert "2 missing keys: dsn.3.weight, dsn.3.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg


class Custom:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("obj,legacy", [(nn.Linear(2, 2), False), ({"w": Custom()}, True), ({"w": Custom()}, False)])
def test_pickle_with_code_is_refused(tmp_path, obj, legacy):
    torch.save(obj, tmp_path / "evil.pth", _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as e:
        ckpt.load_state_dict_file(tmp_path / "evil.pth")
    msg = str(e.value)
    assert "evil.pth" in msg and "weights_only" in msg and "untrusted" in msg
    with pytest.raises(CheckpointError, match="weights_only"):
        ckpt.load_checkpoint_dict(tmp_path / "evil.pth")


@pytest.mark.parametrize("obj,kind", [([torch.zeros(2)], "list"), (torch.zeros(2), "Tensor"), ({"a": 1, "b": "x"}, "not tensors")])
def test_non_state_dict_is_an_error(tmp_path, obj, kind):
    torch.save(obj, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=kind):
        ckpt.load_state_dict_file(tmp_path / "odd.pth")


def test_non_dict_training_checkpoint_and_garbage(tmp_path):
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="found a list"):
        ckpt.load_checkpoint_dict(tmp_path / "list.pth")
    (tmp_path / "page.pth").write_bytes(b"<html>Google Drive quota exceeded</html>")
    with pytest.raises(CheckpointError, match="cannot be read as a PyTorch file"):
        ckpt.load_state_dict_file(tmp_path / "page.pth")


def test_infer_arch():
    # registry names since issue 12 (before: the aliases "resnet18" / "resnet101")
    assert ckpt.infer_arch(random_state_dict("resnet18")) == "pspnet_resnet18"
    assert ckpt.infer_arch(csail_resnet18_state_dict()) == "pspnet_resnet18"
    assert ckpt.infer_arch({k: torch.empty(s, device="meta") for k, s in pspnet_key_shapes("resnet101")}) == "pspnet_resnet101"
    with pytest.raises(CheckpointError, match="torchvision"):
        from tests.factories import fill_state_dict, torchvision_resnet18_key_shapes
        ckpt.infer_arch(fill_state_dict(torchvision_resnet18_key_shapes()))


def test_imagenet_file_given_as_student_is_an_error_with_hint(tmp_path):
    write_csail_resnet18(tmp_path / "resnet18-imagenet.pth")
    with pytest.raises(CheckpointError) as e:
        ckpt.load_student(build_model("resnet18"), tmp_path / "resnet18-imagenet.pth")
    msg = str(e.value)
    assert "ImageNet initialisation" in msg and "35 missing keys" in msg and "2 unexpected keys: fc.weight, fc.bias" in msg

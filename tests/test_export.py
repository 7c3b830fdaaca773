"""tools/export.py and cwdseg.export: ONNX of every registered architecture, safetensors, metadata, model card."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cwdseg.export.metadata import BEST_VAL, FINAL
from cwdseg.export.normalization import ORIGINAL, apply, make, to_dict
from cwdseg.export.onnx import ExactAdaptiveAvgPool2d, export_onnx, read_onnx_metadata, static_dims
from cwdseg.export.weights import load_safetensors, load_safetensors_model, save_safetensors
from cwdseg.models import MODEL_BUILDERS, build_model
from tests.factories import write_legacy_student
from tools import export as export_tool

SIZES = ((64, 64), (96, 128))


def realistic_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights for any architecture with logits of a trained network's scale (|logit| ~ 5-10):
    convs N(0, 1/fan_in), BN |weight| in [0.5, 1] (a quarter negative), small biases and means."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
            continue
        leaf = key.rsplit(".", 1)[1]
        if value.ndim >= 2:
            t = torch.randn(value.shape, generator=g) * (1.0 / value[0].numel()) ** 0.5
        elif leaf == "weight":
            sign = torch.where(torch.rand(value.shape, generator=g) < 0.25, -1.0, 1.0)
            t = (0.5 + 0.5 * torch.rand(value.shape, generator=g)) * sign
        elif leaf == "running_var":
            t = 0.5 + torch.rand(value.shape, generator=g)
        else:
            t = 0.05 * torch.randn(value.shape, generator=g)
        state[key] = t
    model.load_state_dict(state)
    model.eval()
    # Such activations shrink layer by layer in deep BatchNorm networks (MobileNetV2) and grow in others:
    # scale the classifier convs (logits are linear in their weight and bias) so that |logit| peaks at ~8
    # on inputs like the tests' (pixel values minus a mean), whatever the architecture.
    classifiers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 19]
    with torch.no_grad():
        x = torch.randint(0, 256, (1, 3, 64, 64), generator=g).float() - 115.0
        out = model(x)
        factor = 8.0 / float((out[0] if isinstance(out, (tuple, list)) else out).abs().max())
        for conv in classifiers:
            conv.weight.mul_(factor)
            if conv.bias is not None:
                conv.bias.mul_(factor)
    return model


def adaptive_pool_by_loops(x: np.ndarray, bins: int) -> np.ndarray:
    """PyTorch's adaptive average pooling, written out: bin i spans [floor(i L / b), ceil((i + 1) L / b))."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, bins, bins), np.float64)
    for i in range(bins):
        y0, y1 = math.floor(i * h / bins), math.ceil((i + 1) * h / bins)
        for j in range(bins):
            x0, x1 = math.floor(j * w / bins), math.ceil((j + 1) * w / bins)
            out[:, :, i, j] = x[:, :, y0:y1, x0:x1].astype(np.float64).mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("bins", [1, 2, 3, 6])
@pytest.mark.parametrize("hw", [(9, 9), (13, 17), (8, 12), (7, 6), (4, 5)])
def test_exact_adaptive_pool_equals_the_bin_definition(bins, hw):
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(bins))
    got = ExactAdaptiveAvgPool2d(bins)(x).numpy()
    assert np.abs(got - adaptive_pool_by_loops(x.numpy(), bins)).max() < 1e-6


# Every family; of the SegFormers one size (B1..B5 are the same graph wider; tests/test_segformer.py has them).
@pytest.mark.parametrize("arch", [a for a in sorted(MODEL_BUILDERS) if not a.startswith("segformer_b") or a == "segformer_b0"])
def test_onnx_export_of_every_architecture_matches_pytorch_at_two_sizes(arch, tmp_path):
    import onnx
    import onnxruntime as ort

    model = realistic_weights(build_model(arch))
    path = export_onnx(model, tmp_path / f"{arch}.onnx", metadata={"arch": arch})
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3] and graph.input[0].type.tensor_type.shape.dim[1].dim_value == 3
    assert static_dims(path) == []
    assert read_onnx_metadata(path)["arch"] == arch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for h, w in SIZES:
        x = (rng.integers(0, 256, size=(2, 3, h, w)) - 115.0).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x))[0].numpy()
        got = session.run(["logits"], {"image": x})[0]
        assert got.shape == want.shape and got.shape[:2] == (2, 19)
        assert np.abs(want).max() > 1.0  # logits of a realistic scale, so that 1e-4 means something
        assert np.abs(got - want).max() < 1e-4, (arch, h, w, np.abs(got - want).max())


def test_safetensors_round_trip_is_bitwise_and_pickle_free(tmp_path):
    model = realistic_weights(build_model("resnet18"), seed=3)
    path = save_safetensors(model, tmp_path / "m.safetensors", {"arch": "resnet18", "num_classes": 19})
    state, meta = load_safetensors(path)
    want = model.state_dict()
    assert set(state) == set(want) and len(state) == 150
    for key, value in want.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    assert meta == {"arch": "resnet18", "num_classes": 19}
    # The file is an 8-byte header length, a JSON header and raw little-endian bytes: no pickle at all.
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    entry = header["head.bias"]
    start, end = entry["data_offsets"]
    by_hand = np.frombuffer(raw[8 + length + start:8 + length + end], dtype="<f4").reshape(entry["shape"])
    assert np.array_equal(by_hand, want["head.bias"].numpy())
    assert json.loads(header["__metadata__"]["cwdseg"]) == meta
    loaded, arch, _ = load_safetensors_model(path)
    assert arch == "resnet18"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A finished run as train.py leaves it: config.json, the final student, eval.json."""
    run = tmp_path_factory.mktemp("runs") / "cwd_run"
    write_legacy_student(run / "city_99_G.pth", seed=2)
    from cwdseg.config import CONFIG_FORMAT, RunConfig, to_dict

    config = to_dict(RunConfig())  # the recipe's defaults, as train.py records them, with an AT run's terms
    config["output"]["name"], config["optim"]["num_steps"], config["data"]["root"] = "cwd_run", 100, "/somewhere/cs"
    config["data"]["num_classes"] = 19
    config["distill"] = {"preset": "at_feat", "terms": {"at_feat": {"weight": 10000.0, "on": "feature", "p": 2.0}}}
    config["models"]["student_init"] = "random"
    inputs = {"teacher": {"path": "ckpt/teacher_city.pth", "sha256": "ab" * 32}, "student_init": None}
    (run / "config.json").write_text(json.dumps({"format": CONFIG_FORMAT, "config": config, "inputs": inputs}))
    names = ["road", "sidewalk", "building"] + [f"class{i}" for i in range(3, 19)]
    per_class = {n: round(0.013 * (i + 1), 6) for i, n in enumerate(names)}
    evaluation = {"miou": 0.4321, "pixel_accuracy": 0.8765, "per_class_iou": per_class, "split": "val",
                  "num_images": 4, "selection": FINAL, "step": 99, "checkpoint": str(run / "city_99_G.pth"),
                  "settings": {"mode": "whole", "scales": [1.0], "flip": False, "amp": "none"}}
    (run / "eval.json").write_text(json.dumps(evaluation))
    return run


@pytest.fixture(scope="module")
def exported(run_folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    meta = export_tool.main([str(run_folder), "--out-dir", str(out), "--fold-normalization", "--check-sizes", "64x64",
                             "72x96", "--gmacs-sizes", "64x128", "--tolerance", "1e-3"])
    return out, meta


def test_export_writes_every_file_with_the_run_metadata(exported, run_folder, capsys):
    out, meta = exported
    for name in ("cwd_run.onnx", "cwd_run.safetensors", "cwd_run.json", "MODEL_CARD.md"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.data"))  # one self-contained ONNX file
    written = json.loads((out / "cwd_run.json").read_text())
    assert written["arch"] == "pspnet_resnet18" and written["selection"] == FINAL  # the registry's name
    assert written["val"]["miou"] == 0.4321
    training = written["training"]  # from the run's configuration, not from the paper's defaults
    assert training["distillation"]["terms"] == {"at_feat": {"weight": 10000.0, "on": "feature", "p": 2.0}}
    assert training["teacher"] == {"arch": "pspnet_resnet101", "file": "ckpt/teacher_city.pth", "sha256": "ab" * 32}
    assert training["schedule"]["num_steps"] == 100 and training["data"]["dataset"] == "cityscapes"
    card = (out / "MODEL_CARD.md").read_text()
    assert "| distillation term `at_feat` | weight 10000; on feature, p 2.0 |" in card
    assert "sha256 `abababababababab`" in card and "100 steps" in card
    assert "The paper's recipe is for Cityscapes" not in card and "(PSPNet: 65x65" not in card  # nothing true
    assert "pspnet_resnet18: 65x65 for a 512x512 input" in card  # only of the paper's recipe; this network's size
    assert written["classes"][0] == {"id": 0, "name": "road", "color": [128, 64, 128]}
    assert written["normalization"] == to_dict(ORIGINAL) and written["normalization"]["channel_order"] == "BGR"
    assert max(written["onnx_check"]["max_abs_logit_diff"].values()) < 1e-3
    st_state, st_meta = load_safetensors(out / "cwd_run.safetensors")
    assert st_meta["val"]["miou"] == 0.4321
    released = torch.load(run_folder / "city_99_G.pth", weights_only=True)
    assert all(torch.equal(st_state[k], v) for k, v in released.items()) and set(st_state) == set(released)


def test_folded_onnx_takes_raw_pixels(exported, run_folder):
    import onnxruntime as ort

    out, _ = exported
    assert read_onnx_metadata(out / "cwd_run.onnx")["input"] == "raw"
    model = build_model("resnet18").eval()
    model.load_state_dict(torch.load(run_folder / "city_99_G.pth", weights_only=True))
    bgr = np.random.default_rng(0).integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    mean = np.array([104.00698793, 116.66876762, 122.67891434])  # the original's BGR mean, written out
    normalised = (bgr.astype(np.float64) - mean).astype(np.float32).transpose(2, 0, 1)[None]
    with torch.no_grad():
        want = model(torch.from_numpy(np.ascontiguousarray(normalised)))[0].numpy()
    raw = np.ascontiguousarray(bgr.transpose(2, 0, 1)[None].astype(np.float32))
    got = ort.InferenceSession(str(out / "cwd_run.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": raw})[0]
    assert np.abs(got - want).max() < 1e-3


def test_model_card_holds_the_eval_numbers_and_the_selection(exported):
    out, meta = exported
    card = (out / "MODEL_CARD.md").read_text()
    assert "| **mIoU** | **43.21** |" in card and "| pixel accuracy | 87.65 |" in card
    assert "| road | 1.30 |" in card and "| sidewalk | 2.60 |" in card and "| class18 | 24.70 |" in card
    assert "final iteration" in card and "13.07 M" in card
    assert "| distillation term `at_feat` | weight 10000; on feature, p 2.0 |" in card
    assert "| data | `cityscapes` at `/somewhere/cs`, 19 classes, ignore label 255 |" in card
    assert "load_file('cwd_run.safetensors')" in card and "build_model('pspnet_resnet18', num_classes=19)" in card
    # the five lines of plain PyTorch run as written
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) == 5
    import os

    cwd = os.getcwd()
    try:
        os.chdir(out)
        namespace: dict = {}
        exec(code, namespace)
    finally:
        os.chdir(cwd)
    assert isinstance(namespace["model"], torch.nn.Module)


def test_best_val_is_labelled_optimistic_and_unknown_files_unknown(run_folder, tmp_path):
    from cwdseg.export.metadata import resolve_source

    with pytest.raises(Exception, match="best_val_G.pth"):
        resolve_source(run_folder, "best-val")
    best = tmp_path / "run"
    best.mkdir()
    write_legacy_student(best / "best_val_G.pth", seed=4)
    (best / "best_val.json").write_text(json.dumps({"miou": 0.5, "per_class_iou": {}, "selection": BEST_VAL}))
    assert resolve_source(best, "best-val").selection == BEST_VAL
    assert resolve_source(best / "best_val_G.pth").selection == "unknown"


def test_export_errors_are_one_line(run_folder, exported, tmp_path, capsys):
    out, _ = exported
    assert export_tool.cli([str(run_folder), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("export.py: error: ") and "--overwrite" in err and "\n" not in err
    assert export_tool.cli([str(tmp_path / "nothing_here")]) == 2
    assert "no such run folder or file" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert export_tool.cli([str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    assert "<dataset>_<step>_G.pth" in capsys.readouterr().err


def test_normalization_luts_equal_the_training_pipeline():
    from cwdseg.data.transforms import preprocess

    bgr = np.random.default_rng(5).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    want, _ = preprocess(bgr, None, None, crop_size=None)
    assert np.array_equal(apply(ORIGINAL, bgr), want)
    rgb = make("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    by_hand = (bgr[..., ::-1].astype(np.float64) - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
    assert rgb.name == "imagenet_rgb"  # a known record is recognised
    assert np.abs(apply(rgb, bgr) - by_hand.transpose(2, 0, 1)).max() < 1e-5


def test_predict_runs_the_exports(exported, run_folder, tmp_path):
    """predict.py on the .onnx (ONNX Runtime, folded normalisation) and the .safetensors export."""
    import cv2

    from cwdseg.cli import predict

    out, _ = exported
    rng = np.random.default_rng(7)
    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        cv2.imwrite(str(images / f"im{k}.png"), rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8))
    common = ["--input", str(images), "--no-progress", "--device", "cpu", "--no-overlay"]
    predict.main(["--restore-from", str(run_folder / "city_99_G.pth"), "--output-dir", str(tmp_path / "pth"), *common])
    predict.main(["--restore-from", str(out / "cwd_run.safetensors"), "--output-dir", str(tmp_path / "st"), *common])
    predict.main(["--restore-from", str(out / "cwd_run.onnx"), "--output-dir", str(tmp_path / "onnx"), *common])
    for k in range(2):
        ref = cv2.imread(str(tmp_path / "pth" / "ids" / f"im{k}.png"), cv2.IMREAD_UNCHANGED)
        st = cv2.imread(str(tmp_path / "st" / "ids" / f"im{k}.png"), cv2.IMREAD_UNCHANGED)
        on = cv2.imread(str(tmp_path / "onnx" / "ids" / f"im{k}.png"), cv2.IMREAD_UNCHANGED)
        assert ref.shape == (48, 80) and np.array_equal(st, ref)
        assert (on == ref).mean() > 0.999  # fp32 logits within 1e-5: argmax differs at most at exact near-ties


def test_class_table_comes_from_the_dataset_registry():
    from cwdseg.data.registry import dataset_info
    from cwdseg.export.metadata import ExportSourceError

    info = dataset_info("pascal_voc")
    table = export_tool.read_classes(None, info.num_classes, "pascal_voc")
    assert [c["name"] for c in table] == list(info.class_names)
    assert [c["color"] for c in table] == info.colors.tolist()
    with pytest.raises(ExportSourceError, match="classes"):
        export_tool.read_classes(None, 19, "pascal_voc")
    assert export_tool.read_classes(None, 19)[13] == {"id": 13, "name": "car", "color": [0, 0, 142]}


def test_exporter_chatter_is_silenced_but_other_warnings_show(monkeypatch, tmp_path, caplog):
    import logging
    import warnings

    from cwdseg.export.onnx import ExportError

    def chatty_export(*args, **kwargs):
        logging.getLogger("torch.onnx._internal.exporter._registration").warning(
            "torchvision is not installed. Skipping torchvision::nms")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=2)
        warnings.warn("the user's own concern", UserWarning, stacklevel=2)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch.onnx, "export", chatty_export)
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        with pytest.raises(ExportError, match="stop here"):
            export_onnx(build_model("pspnet_resnet18", num_classes=19), tmp_path / "x.onnx")
    assert [str(w.message) for w in seen] == ["the user's own concern"]
    assert "torchvision" not in caplog.text

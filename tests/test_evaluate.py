"""evaluate.py end to end on the synthetic dataset, checked against cityscapesscripts and hand mappings."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import id2label, trainId2label
from torch import nn

from cwdseg.cli import evaluate
from cwdseg.data.synthetic import generate
from cwdseg.evaluation.metrics import official_miou
from cwdseg.viz.segmaps import save_color_png, save_label_id_png, save_train_id_png
from tests.factories import write_legacy_student

SIZE = (128, 256)
N_VAL, N_TEST = 4, 2


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "cityscapes", n_train=0, n_val=N_VAL, n_test=N_TEST,
                    size=SIZE, seed=0)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "student.pth"
    write_legacy_student(path, seed=1)
    return path


def label_id_to_train_id(label_ids: np.ndarray) -> np.ndarray:
    """Independent mapping from cityscapesscripts' own table."""
    lut = np.full(256, 255, dtype=np.uint8)
    for i, lab in id2label.items():
        if i >= 0 and 0 <= lab.trainId < 19:
            lut[i] = lab.trainId
    return lut[label_ids]


def gt_files(root: Path, split: str = "val") -> list[Path]:
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))


def test_prediction_pngs_round_trip_to_the_same_train_ids(tmp_path):
    rng = np.random.default_rng(0)
    train_ids = rng.integers(0, 19, size=(17, 23)).astype(np.uint8)
    train_ids[0, :5] = 255
    save_color_png(tmp_path / "c.png", train_ids)
    save_label_id_png(tmp_path / "l.png", train_ids)
    save_train_id_png(tmp_path / "t.png", train_ids)

    rgb = cv2.cvtColor(cv2.imread(str(tmp_path / "c.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    from_color = np.full(train_ids.shape, 255, dtype=np.uint8)
    for t in range(19):
        from_color[np.all(rgb == np.array(trainId2label[t].color), axis=-1)] = t
    assert np.array_equal(from_color[train_ids != 255], train_ids[train_ids != 255])
    assert np.all(rgb[train_ids == 255] == 0)

    label_ids = cv2.imread(str(tmp_path / "l.png"), cv2.IMREAD_UNCHANGED)
    assert label_ids.dtype == np.uint8 and label_ids.ndim == 2
    assert np.array_equal(label_id_to_train_id(label_ids), train_ids)  # 255 -> labelId 0 -> 255 again
    assert np.array_equal(cv2.imread(str(tmp_path / "t.png"), cv2.IMREAD_UNCHANGED), train_ids)


class ColourNet(nn.Module):
    """Nearest-class-mean-colour classifier at half resolution: informative but imperfect predictions."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.classify = nn.Conv2d(3, 19, 1)
        with torch.no_grad():  # argmax_c -|x - m_c|^2 = argmax_c 2 m_c.x - |m_c|^2
            self.classify.weight.copy_(2 * means[:, :, None, None])
            self.classify.bias.copy_(-(means ** 2).sum(1))
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        logits = self.classify(self.pool(x)) / 100.0
        return logits, logits, x


def class_mean_colours(root: Path) -> torch.Tensor:
    dataset = evaluate.build_eval_dataset(root, "val")
    sums, counts = torch.zeros(19, 3, dtype=torch.float64), torch.zeros(19, dtype=torch.float64)
    for i in range(len(dataset)):
        image, label, _ = dataset[i]
        for c in range(19):
            mask = label == c
            sums[c] += image[:, mask].sum(1).double()
            counts[c] += mask.sum()
    return (sums / counts.clamp(min=1)[:, None]).float()


@pytest.mark.parametrize("mode", ["whole", "sliding"])
def test_miou_agrees_with_cityscapesscripts(synth, tmp_path, mode):
    model = ColourNet(class_mean_colours(synth)).train()
    loader = evaluate.build_eval_loader(evaluate.build_eval_dataset(synth, "val"), batch_size=2, num_workers=0)
    results = evaluate.evaluate_model(model, loader, mode=mode, tile=(64, 64), save_dir=tmp_path, progress=False,
                                      tile_batch=7, amp="auto")
    assert model.training  # evaluate_model restores the caller's mode
    assert results["settings"]["amp"] == "none"  # auto on a CPU model: fp32
    conf = np.array(results["confusion_matrix"])
    assert all(results["present"])  # every class in the gt: both mean definitions coincide
    assert (conf.sum(0) > 0).sum() >= 15, "predictions should cover many classes for a meaningful comparison"
    assert 0.05 < results["miou"] < 0.999

    gts = gt_files(synth)
    preds = [tmp_path / "labelIds" / g.name.replace("_gtFine_labelIds.png", "_leftImg8bit.png") for g in gts]
    official = official_miou(preds, gts)
    assert official["miou"] == pytest.approx(results["miou"], abs=1e-4)
    for name, iou in results["per_class_iou"].items():
        assert official["per_class_iou"][name] == pytest.approx(iou, abs=1e-4)
    # the confusion matrix counts exactly the evaluated ground-truth pixels
    n_valid = sum(int((label_id_to_train_id(cv2.imread(str(g), cv2.IMREAD_UNCHANGED)) != 255).sum()) for g in gts)
    assert conf.sum() == n_valid


def test_cli_end_to_end_writes_results_json(synth, student, tmp_path, capsys):
    save = tmp_path / "out"
    evaluate.main(["--data-dir", str(synth), "--restore-from", str(student), "--save-dir", str(save),
                   "--official-check", "--num-workers", "1", "--no-progress"])
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "cityscapesscripts" in printed
    r = json.loads((save / "results.json").read_text())
    for key in ("miou", "pixel_accuracy", "per_class_iou", "confusion_matrix", "settings", "checkpoint",
                "images_per_s", "device", "torch_version", "split", "num_images", "official_check"):
        assert key in r, key
    assert r["split"] == "val" and r["num_images"] == N_VAL and r["device"] == "cpu"
    assert r["torch_version"] == torch.__version__ and r["images_per_s"] > 0
    assert r["settings"] == {"mode": "whole", "tile": [512, 512], "overlap": pytest.approx(1 / 3),
                             "stride": [342, 342], "tile_batch": 6, "scales": [1.0], "flip": False, "amp": "none",
                             "num_classes": 19, "batch_size": 1}
    assert r["checkpoint"]["arch"] == "pspnet_resnet18"  # registry name (issue 12; was the alias "resnet18")
    assert r["checkpoint"]["normalization"] == "caffe_bgr"
    assert r["checkpoint"]["sha256"] == hashlib.sha256(student.read_bytes()).hexdigest()
    assert list(r["per_class_iou"]) == [trainId2label[t].name for t in range(19)]
    assert np.array(r["confusion_matrix"]).shape == (19, 19)
    check = r["official_check"]
    assert check["max_class_diff"] < 1e-6
    assert check["official_miou"] == pytest.approx(check["ours_miou_scored_classes"], abs=1e-6)
    names = sorted(p.name.replace("_gtFine_labelIds.png", "") for p in gt_files(synth))
    assert sorted(p.name for p in (save / "labelIds").iterdir()) == [f"{n}_leftImg8bit.png" for n in names]
    assert sorted(p.name for p in (save / "color").iterdir()) == [f"{n}_color.png" for n in names]
    assert sorted(p.name for p in (save / "trainIds").iterdir()) == [f"{n}_trainIds.png" for n in names]
    assert sorted(p.name for p in (save / "panels").iterdir()) == [f"{n}.jpg" for n in names]
    # trainId and labelId PNGs hold the same prediction
    for n in names:
        t = cv2.imread(str(save / "trainIds" / f"{n}_trainIds.png"), cv2.IMREAD_UNCHANGED)
        lab = cv2.imread(str(save / "labelIds" / f"{n}_leftImg8bit.png"), cv2.IMREAD_UNCHANGED)
        assert t.shape == SIZE and np.array_equal(label_id_to_train_id(lab), t)


def test_cli_sliding_flip_without_save_dir_writes_nothing(synth, student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = evaluate.main(["--data-dir", str(synth), "--restore-from", str(student), "--mode", "sliding",
                       "--tile", "64", "64", "--overlap", "1/3", "--flip", "--max-images", "1",
                       "--tile-batch", "18", "--num-workers", "0", "--no-progress", "--num_classes", "19"])
    assert r["settings"]["stride"] == [43, 43] and r["settings"]["flip"] is True
    assert r["num_images"] == 1 and r["outputs"] is None
    assert list(tmp_path.iterdir()) == []


def test_test_split_writes_server_pngs_and_zip(synth, student, tmp_path):
    save = tmp_path / "test"
    r = evaluate.main(["--data-dir", str(synth), "--restore-from", str(student), "--split", "test",
                       "--save-dir", str(save), "--num-workers", "0", "--no-progress"])
    assert r["miou"] is None and r["num_images"] == N_TEST
    images = sorted((synth / "leftImg8bit" / "test").glob("*/*_leftImg8bit.png"))
    expected = sorted(p.name for p in images)
    assert sorted(p.name for p in (save / "labelIds").iterdir()) == expected
    with zipfile.ZipFile(save / "submission.zip") as zf:
        assert sorted(zf.namelist()) == expected
    valid = {lab.id for lab in id2label.values() if 0 <= lab.trainId < 19}
    for name in expected:
        assert set(np.unique(cv2.imread(str(save / "labelIds" / name), cv2.IMREAD_UNCHANGED))) <= valid
    assert not (save / "color").exists()


def test_clear_errors(synth, student, tmp_path, capsys):
    base = ["--data-dir", str(synth), "--num-workers", "0", "--no-progress"]
    assert evaluate.cli(base + ["--restore-from", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth: no such file" in capsys.readouterr().err

    assert evaluate.cli(base + ["--restore-from", str(student), "--arch", "resnet101"]) == 2
    assert "holds a pspnet_resnet18 network, not pspnet_resnet101" in capsys.readouterr().err

    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "val").mkdir(parents=True)
    (empty / "gtFine" / "val").mkdir(parents=True)
    assert evaluate.cli(["--data-dir", str(empty), "--restore-from", str(student)]) == 2
    assert "empty" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        evaluate.main(base + ["--restore-from", str(student), "--official-check"])  # needs --save-dir
    assert "--save-dir" in capsys.readouterr().err


def test_device_flags():
    from cwdseg.engine.distributed import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None, "None") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device(None, "0")
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="GPU index"):
        resolve_device(None, "x")
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("tpu7")


def test_amp_flags():
    from cwdseg.engine.precision import resolve_amp

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == "none"  # fp32 on a CPU, as the recipe's numbers were made
    assert [resolve_amp(a, cpu) for a in ("bf16", "fp16", "none")] == ["bf16", "fp16", "none"]
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("fp8", cpu)
    with pytest.raises(evaluate.EvaluationError, match="amp must be one of"):
        evaluate._as_amp_dtype("fp8", cpu)
    assert evaluate._as_amp_dtype("bf16", cpu) is torch.bfloat16 and evaluate._as_amp_dtype("auto", cpu) is None


def test_benchmark_runs_small():
    from benchmarks.bench_eval import run

    rows = run(size=(64, 128), tile=(32, 32), images=1, amps=("none",), warmup=False, device="cpu")
    assert [(r["mode"], r["tiles"]) for r in rows] == [("whole", 1), ("sliding", 3 * 6)]  # stride 22: 3 rows x 6 columns
    assert all(r["images_per_s"] > 0 and r["size"] == [64, 128] for r in rows)

"""evaluate.py's outputs on the other datasets' protocols (issue 26): panels at any --short-side, a failed
evaluation that leaves nothing behind, scored CamVid test, --compare legends, refused tiny scales."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cwdseg.data.synthetic_zoo import generate_dataset
from cwdseg.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--device", "cpu", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("zoo")
    return {"ade20k": generate_dataset("ade20k", base / "ade20k", 1, 1, 0, size=(48, 64), seed=0),
            "camvid": generate_dataset("camvid", base / "camvid", 1, 1, 2, size=(40, 56), seed=1)}


def student(path: Path, num_classes: int, seed: int) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_model("pspnet_resnet18", num_classes=num_classes).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {"ade20k": student(base / "ade_run" / "city_2_G.pth", 150, 0),
            "camvid_a": student(base / "cwd_run" / "city_2_G.pth", 11, 1),
            "camvid_b": student(base / "kd_run" / "city_2_G.pth", 11, 2)}


def evaluate(*argv: str):
    from cwdseg.cli import evaluate as ev

    return ev.main([*argv, *BASE])


def test_short_side_writes_full_size_panels(zoo, ckpts, tmp_path):
    out = tmp_path / "eval"
    results = evaluate("--dataset", "ade20k", "--data-dir", str(zoo["ade20k"]), "--restore-from",
                       str(ckpts["ade20k"]), "--short-side", "32", "--save-dir", str(out))
    assert results["settings"]["short_side"] == 32 and results["miou"] is not None
    panel = cv2.imread(str(next((out / "panels").glob("*.jpg"))))
    assert panel.shape[:2] == (24, 4 * 32)  # image | gt | pred | errors at the labels' 48x64, half size
    assert (out / "results.json").is_file() and (out / "class_iou.png").is_file()


def test_failed_evaluation_leaves_no_folder_that_blocks_the_next(zoo, ckpts, tmp_path, monkeypatch):
    from cwdseg.evaluation import writers

    out = tmp_path / "eval"
    real = writers.save_panel

    def broken(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk gone")

    monkeypatch.setattr(writers, "save_panel", broken)
    argv = ["--dataset", "ade20k", "--data-dir", str(zoo["ade20k"]), "--restore-from", str(ckpts["ade20k"]),
            "--save-dir", str(out)]
    with pytest.raises(OSError, match="disk gone"):
        evaluate(*argv)
    assert not out.exists()
    monkeypatch.setattr(writers, "save_panel", real)
    assert evaluate(*argv)["num_images"] == 1  # no --overwrite needed


def test_camvid_test_split_is_scored_against_its_labels(zoo, ckpts, tmp_path, capsys):
    results = evaluate("--dataset", "camvid", "--data-dir", str(zoo["camvid"]), "--restore-from",
                       str(ckpts["camvid_a"]), "--split", "test", "--save-dir", str(tmp_path / "t"))
    out = capsys.readouterr().out
    assert "no metrics" not in out and "mIoU" in out
    assert results["split"] == "test" and results["num_images"] == 2
    # independent confusion matrix from the label files (11 = void) and the written class-id PNGs
    conf = np.zeros((11, 11), np.int64)
    for label_file in sorted((zoo["camvid"] / "testannot").glob("*.png")):
        gt = np.array(Image.open(label_file)).astype(np.int64)
        pred = np.array(Image.open(tmp_path / "t" / "trainIds" / f"{label_file.stem}_trainIds.png")).astype(np.int64)
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g != 11:
                conf[g, p] += 1
    iou = [conf[c, c] / max(1, conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(11)]
    assert results["miou"] == pytest.approx(float(np.mean(iou)), abs=1e-12)
    assert results["miou_percent"] == pytest.approx(100 * float(np.mean(iou)), abs=1e-9)
    assert not (tmp_path / "t" / "submission.zip").exists()


def test_compare_legend_names_the_run_folders(zoo, ckpts, tmp_path, monkeypatch):
    from cwdseg.cli import evaluate as ev

    common = ["--dataset", "camvid", "--data-dir", str(zoo["camvid"])]
    evaluate(*common, "--restore-from", str(ckpts["camvid_b"]), "--save-dir", str(tmp_path / "kd"))
    drawn = {}
    monkeypatch.setattr(ev, "plot_class_iou_bars", lambda entries, out, title: drawn.setdefault("labels", [
        e[0] for e in entries]) and Path(out))
    evaluate(*common, "--restore-from", str(ckpts["camvid_a"]), "--save-dir", str(tmp_path / "cwd"),
             "--compare", str(tmp_path / "kd" / "results.json"))
    assert drawn["labels"] == ["cwd_run/city_2_G", "kd_run/city_2_G"]


def test_scales_under_the_output_stride_are_refused(zoo, ckpts, capsys):
    from cwdseg.cli import evaluate as ev

    code = ev.cli(["--dataset", "camvid", "--data-dir", str(zoo["camvid"]), "--restore-from",
                   str(ckpts["camvid_a"]), "--scales", "0.1", *BASE])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--scales 0.1 turns the 40x56 input into 4x6 px, under the network's output stride 8" in err[0]
    with pytest.raises(SystemExit):
        evaluate("--dataset", "camvid", "--data-dir", str(zoo["camvid"]), "--restore-from",
                 str(ckpts["camvid_a"]), "--mode", "sliding", "--tile", "4", "4")
    assert "--tile 4 4 is under the network's output stride 8" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["cwdseg.cli.evaluate", "cwdseg.cli.predict", "tools.export",
                                    "tools.show_distillation", "tools.reproduce_table"])
def test_argument_errors_print_the_short_usage_only(module, capsys):
    import importlib

    parser = importlib.import_module(module).get_args_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--no-such-flag"])  # a missing required flag or the unknown one: either way 2 lines
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 2, lines
    assert lines[0] == f"usage: {parser.prog} [-h] [options]" and lines[1].startswith(f"{parser.prog}: error: ")


def test_restore_from_a_folder_says_so(tmp_path, capsys, zoo):
    with pytest.raises(SystemExit):
        evaluate("--dataset", "camvid", "--data-dir", str(zoo["camvid"]), "--restore-from", str(tmp_path))
    assert f"--restore-from {tmp_path}: is a folder, not a checkpoint file" in capsys.readouterr().err

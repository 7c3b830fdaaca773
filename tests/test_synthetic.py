"""Synthetic Cityscapes generator: determinism, layout accepted by cityscapesscripts, class content."""
from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from cityscapesscripts.helpers.csHelpers import getCsFileInfo
from cityscapesscripts.helpers.labels import id2label
from cityscapesscripts.helpers.labels import labels as cs_labels

from cwdseg.data import CityscapesDataset, scan_split
from cwdseg.data.synthetic import MARKER_FILE, SPLIT_CITIES, generate, main

SIZE = (64, 128)
COUNTS = dict(n_train=4, n_val=3, n_test=2)
GT_TYPES = ("labelIds", "instanceIds", "color", "polygons")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "a", **COUNTS, size=SIZE, seed=0)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _train_ids(label_ids: np.ndarray) -> np.ndarray:
    """labelIds -> trainIds through cityscapesscripts' own table (255 for ignored ids)."""
    out = np.full_like(label_ids, 255)
    for lab in cs_labels:
        if lab.id >= 0 and 0 <= lab.trainId < 19:
            out[label_ids == lab.id] = lab.trainId
    return out


def test_same_seed_is_byte_identical_other_seed_differs(root, tmp_path):
    again = generate(tmp_path / "b", **COUNTS, size=SIZE, seed=0)
    other = generate(tmp_path / "c", **COUNTS, size=SIZE, seed=1)
    first = _hashes(root)
    assert len(first) == 1 + 5 * sum(COUNTS.values())  # marker + 5 files per image
    assert _hashes(again) == first
    other_hashes = _hashes(other)
    assert other_hashes.keys() == first.keys()
    images = [k for k in first if k.endswith("_leftImg8bit.png")]
    assert all(other_hashes[k] != first[k] for k in images)


def test_layout_and_file_names_parse_with_cityscapesscripts(root):
    for split, count in zip(("train", "val", "test"), COUNTS.values()):
        images = sorted((root / "leftImg8bit" / split).glob("*/*"))
        assert len(images) == count
        for image in images:
            info = getCsFileInfo(str(image))
            assert info.city == image.parent.name and info.city in SPLIT_CITIES[split]
            assert re.fullmatch(r"\d{6}", info.sequenceNb) and info.frameNb == "000019"
            assert (info.type, info.type2, info.ext) == ("leftImg8bit", "", "png")
            core = f"{info.city}_{info.sequenceNb}_{info.frameNb}"
            for gt_type in GT_TYPES:
                ext = "json" if gt_type == "polygons" else "png"
                gt = root / "gtFine" / split / info.city / f"{core}_gtFine_{gt_type}.{ext}"
                assert gt.is_file(), gt
                gt_info = getCsFileInfo(str(gt))
                assert (gt_info.city, gt_info.sequenceNb, gt_info.frameNb, gt_info.type, gt_info.type2, gt_info.ext) \
                    == (info.city, info.sequenceNb, info.frameNb, "gtFine", gt_type, ext)
            label = cv2.imread(str(root / "gtFine" / split / info.city / f"{core}_gtFine_labelIds.png"),
                               cv2.IMREAD_UNCHANGED)
            instance = cv2.imread(str(root / "gtFine" / split / info.city / f"{core}_gtFine_instanceIds.png"),
                                  cv2.IMREAD_UNCHANGED)
            color = cv2.imread(str(root / "gtFine" / split / info.city / f"{core}_gtFine_color.png"),
                               cv2.IMREAD_UNCHANGED)
            picture = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
            assert picture.shape == (*SIZE, 3) and picture.dtype == np.uint8
            assert label.shape == SIZE and label.dtype == np.uint8
            assert instance.dtype == np.uint16 and color.shape == (*SIZE, 4)
            # instanceIds: labelId*1000+k for instance classes, the labelId otherwise.
            np.testing.assert_array_equal(np.where(instance >= 1000, instance // 1000, instance), label)
            for lab_id in np.unique(label):
                rgb = id2label[int(lab_id)].color
                assert (color[label == lab_id][:, 2::-1] == rgb).all()
    assert (root / MARKER_FILE).is_file()


def test_json2labelimg_reproduces_labels(root, tmp_path):
    from cityscapesscripts.preparation.json2labelImg import json2labelImg
    from PIL import Image

    jsons = sorted(root.glob("gtFine/*/*/*_gtFine_polygons.json"))
    assert len(jsons) == sum(COUNTS.values())
    for js in jsons:
        out = tmp_path / "ids.png"
        json2labelImg(str(js), str(out), "ids")
        ours = cv2.imread(str(js).replace("_polygons.json", "_labelIds.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(np.asarray(Image.open(out)), ours)


def test_create_train_id_label_imgs_and_dataset_label_type(root, tmp_path, monkeypatch, capsys):
    from cityscapesscripts.preparation import createTrainIdLabelImgs

    copy_root = Path(shutil.copytree(root, tmp_path / "copy"))
    monkeypatch.setenv("CITYSCAPES_DATASET", str(copy_root))
    createTrainIdLabelImgs.main()
    capsys.readouterr()
    made = sorted(copy_root.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(made) == sum(COUNTS.values())
    for path in made:
        train_ids = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        label_ids = cv2.imread(str(path).replace("_labelTrainIds", "_labelIds"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(train_ids, _train_ids(label_ids))
    by_ids = CityscapesDataset(copy_root, "val", crop_size=(48, 96), random_mirror=True, verbose=False)
    by_train_ids = CityscapesDataset(copy_root, "val", crop_size=(48, 96), random_mirror=True,
                                     label_type="labelTrainIds", verbose=False)
    assert all(s.label.endswith("_gtFine_labelTrainIds.png") for s in by_train_ids.samples)
    assert "used directly" in by_train_ids.label_description()
    for key in [(0, 1), (1, 2), (2, 3)]:
        a, b = by_ids[key], by_train_ids[key]
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()


def test_official_evaluator_accepts_the_layout(root, tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    ground_truth = sorted(str(p) for p in root.glob("gtFine/val/*/*_gtFine_labelIds.png"))
    predictions = tmp_path / "pred"
    predictions.mkdir()
    for gt in ground_truth:
        info = getCsFileInfo(gt)
        shutil.copy(gt, predictions / f"{info.city}_{info.sequenceNb}_{info.frameNb}_pred.png")
    args = copy.copy(cs_eval.args)
    args.predictionPath, args.predictionWalk = str(predictions), None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    matched = [cs_eval.getPrediction(args, gt) for gt in ground_truth]
    assert [os.path.basename(p)[:-len("_pred.png")] for p in matched] == \
        [os.path.basename(g)[:-len("_gtFine_labelIds.png")] for g in ground_truth]
    results = cs_eval.evaluateImgLists(matched, ground_truth, args)
    assert results["averageScoreClasses"] == pytest.approx(1.0)  # all 19 classes present and matched


def test_class_content(root):
    for split in ("train", "val"):
        for sample in scan_split(root, split):
            label_ids = cv2.imread(sample.label, cv2.IMREAD_UNCHANGED)
            present = set(np.unique(label_ids).tolist())
            assert {0, 1, 4} <= present, sample.label  # unlabeled, ego vehicle, static
            if split == "val":
                assert set(np.unique(_train_ids(label_ids)).tolist()) == set(range(19)) | {255}
    for sample in scan_split(root, "test"):  # dummy labels: nothing but unlabeled and ego vehicle
        path = sample.image.replace("/leftImg8bit/", "/gtFine/", 1)[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png"
        assert set(np.unique(cv2.imread(path, cv2.IMREAD_UNCHANGED)).tolist()) == {0, 1}
    # The json keeps a license plate (labelId -1) that is never drawn, as in Cityscapes.
    js = next(root.glob("gtFine/val/*/*_polygons.json")).read_text()
    assert '"license plate"' in js


def test_pixels_are_learnable(tmp_path):
    """A nearest-class-mean colour classifier fitted on train must label most val pixels right."""
    root = generate(tmp_path / "learn", n_train=6, n_val=3, n_test=0, size=(96, 160), seed=4)

    def pixels(split):
        xs, ys = [], []
        for sample in scan_split(root, split):
            image = cv2.blur(cv2.imread(sample.image).astype(np.float32), (5, 5))
            xs.append(image.reshape(-1, 3))
            ys.append(_train_ids(cv2.imread(sample.label, cv2.IMREAD_UNCHANGED)).reshape(-1))
        return np.concatenate(xs), np.concatenate(ys)

    x, y = pixels("train")
    x_val, y_val = pixels("val")
    means = np.stack([x[y == c].mean(0) for c in range(19)])
    keep = y_val != 255
    distances = ((x_val[keep][:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == y_val[keep]).mean()
    assert accuracy > 0.6  # chance is about 0.05


def test_out_dir_rules(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate(foreign, 1, 1, 0, size=SIZE)
    assert (foreign / "keep.txt").read_text() == "x"
    ours = generate(tmp_path / "ours", 3, 1, 1, size=SIZE)
    generate(ours, 1, 1, 0, size=SIZE)  # a rerun replaces the previous synthetic dataset
    assert len(list(ours.glob("leftImg8bit/*/*/*.png"))) == 2
    assert not (ours / "leftImg8bit" / "test").exists()
    with pytest.raises(ValueError):
        generate(tmp_path / "tiny", 1, 0, 0, size=(16, 16))


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--train", "2", "--val", "1", "--test", "1", "--size", "64", "128",
                 "--seed", "5"]) == 0
    assert "wrote synthetic Cityscapes" in capsys.readouterr().out
    assert _hashes(tmp_path / "cli") == _hashes(generate(tmp_path / "fn", 2, 1, 1, size=(64, 128), seed=5))
    # The module entry point, as documented.
    out = subprocess.run([sys.executable, "-m", "cwdseg.data.synthetic", str(tmp_path / "m"), "--train", "1", "--val",
                          "1", "--test", "0", "--size", "64", "128"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr
    assert len(list((tmp_path / "m").glob("leftImg8bit/*/*/*.png"))) == 2

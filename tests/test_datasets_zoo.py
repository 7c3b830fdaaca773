"""The dataset registry on synthetic copies in the exact official layouts: pascal_voc, ade20k, camvid, folder.

Label decoding, mapping and metrics are checked against tables and loops written here (Pillow decodes
the label files; OpenCV would colour palette PNGs), never against the code under test.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cwdseg.data import DatasetError
from cwdseg.data.registry import build_dataset, dataset_info
from cwdseg.data.synthetic_zoo import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("pascal_voc", "ade20k", "camvid", "folder")
COUNTS = {"train": 4, "val": 2, "test": 2}

# Independent label tables: label-file value -> class index (255 = ignored); every other value is invalid.
VOC_TABLE = {**{v: v for v in range(21)}, 255: 255}
ADE_TABLE = {0: 255, **{v: v - 1 for v in range(1, 151)}}
CAMVID_TABLE = {**{v: v for v in range(11)}, 11: 255}
FOLDER_TABLE = {0: 0, 10: 1, 20: 2, 30: 3, 40: 4, 255: 255}
TABLES = {"pascal_voc": VOC_TABLE, "ade20k": ADE_TABLE, "camvid": CAMVID_TABLE, "folder": FOLDER_TABLE}
NUM_CLASSES = {"pascal_voc": 21, "ade20k": 150, "camvid": 11, "folder": 5}
# Official counts (CIRKD README "Support datasets"; ADE20K: the MIT Scene Parsing release).
OFFICIAL = {"pascal_voc": {"train": 10582, "val": 1449}, "ade20k": {"train": 20210, "val": 2000},
            "camvid": {"train": 367, "val": 101, "test": 233}}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("zoo")
    return {name: generate_dataset(name, base / name, COUNTS["train"], COUNTS["val"], COUNTS["test"], seed=0)
            for name in NAMES}


def label_files(root: Path, name: str, split: str) -> list[Path]:
    """The label files of a split, found from the official layout (not through the code under test)."""
    if name == "pascal_voc":
        list_name = {"train": "train_aug.txt", "val": "val.txt"}[split]
        ids = (root / "ImageSets/Segmentation" / list_name).read_text().split()
        return [root / "SegmentationClassAug" / f"{i}.png" for i in ids]
    if name == "ade20k":
        folder = {"train": "training", "val": "validation"}[split]
        return sorted((root / "ADEChallengeData2016/annotations" / folder).glob("*.png"))
    if name == "camvid":
        return sorted((root / f"{split}annot").glob("*.png"))
    stems = (root / "splits" / f"{split}.txt").read_text().split()
    return [root / "labels" / f"{s}.png" for s in stems]


def map_by_loop(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(raw.shape, 254, np.uint8)  # 254 marks "not in the table"
    for value, index in table.items():
        out[raw == value] = index
    assert (out != 254).all(), f"values outside the table: {sorted(set(np.unique(raw)) - set(table))}"
    return out


# ----------------------------------------------------------------------------------------------- layouts

def test_files_are_in_the_official_layouts(roots):
    voc = roots["pascal_voc"]
    assert (voc / "JPEGImages/2007_000000.jpg").is_file() and (voc / "JPEGImages/2008_000001.jpg").is_file()
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split() == [f"2007_{i:06d}" for i in range(4)]
    assert (voc / "ImageSets/Segmentation/val.txt").read_text().split() == ["2008_000000", "2008_000001"]
    with Image.open(voc / "SegmentationClassAug/2008_000000.png") as img:
        assert img.mode == "P"  # palette PNG, as VOC's label files
    ade = roots["ade20k"] / "ADEChallengeData2016"
    assert (ade / "images/training/ADE_train_00000001.jpg").is_file()
    assert (ade / "annotations/training/ADE_train_00000004.png").is_file()
    assert (ade / "images/validation/ADE_val_00000002.jpg").is_file()
    assert (ade / "annotations/validation/ADE_val_00000001.png").is_file()
    cam = roots["camvid"]
    for split in ("train", "val", "test"):
        images = sorted(p.name for p in (cam / split).glob("*.png"))
        assert images == sorted(p.name for p in (cam / f"{split}annot").glob("*.png")) and len(images) == COUNTS[split]
    folder = roots["folder"]
    spec = json.loads((folder / "classes.json").read_text())
    assert [c["value"] for c in spec["classes"]] == [0, 10, 20, 30, 40] and spec["ignore"] == [255]
    assert len(list((folder / "images").glob("*.jpg"))) == 6 and len(list((folder / "labels").glob("*.png"))) == 6


@pytest.mark.parametrize("name", NAMES)
def test_counts_and_class_counts(roots, name):
    splits = ("train", "val", "test") if name == "camvid" else ("train", "val")
    for split in splits:
        ds = build_dataset(name, roots[name], split, crop_size=None, verbose=False)
        assert len(ds) == COUNTS[split]
        assert [s.label for s in ds.samples] == [str(p) for p in label_files(roots[name], name, split)]
    info = dataset_info(name, roots[name])
    assert info.num_classes == NUM_CLASSES[name] == len(info.class_names) == len(info.colors)
    assert info.counts == OFFICIAL.get(name, {})


@pytest.mark.parametrize("name", NAMES)
def test_labels_map_as_the_independent_table(roots, name):
    ds = build_dataset(name, roots[name], "val", crop_size=None, verbose=False)
    seen = set()
    for index, path in enumerate(label_files(roots[name], name, "val")):
        raw = np.array(Image.open(path))
        expected = map_by_loop(raw, TABLES[name])
        _, label, sample_name = ds[index]
        assert sample_name == path.stem
        np.testing.assert_array_equal(label.numpy(), expected)
        seen |= set(np.unique(expected).tolist())
    # Every class, and the ignore value, occurs in val.
    assert seen == set(range(NUM_CLASSES[name])) | {255}


@pytest.mark.parametrize("name", NAMES)
def test_ignore_label_is_the_requested_value(roots, name):
    ds = build_dataset(name, roots[name], "val", crop_size=None, ignore_label=250, verbose=False)
    raw = np.array(Image.open(label_files(roots[name], name, "val")[0]))
    ignored = [v for v, k in TABLES[name].items() if k == 255]
    label = ds[0][1].numpy()
    assert (label[np.isin(raw, ignored)] == 250).all() and (label[~np.isin(raw, ignored)] < NUM_CLASSES[name]).all()


def test_voc_borders_are_255_around_objects(roots):
    raw = np.array(Image.open(label_files(roots["pascal_voc"], "pascal_voc", "val")[0]))
    border = raw == 255
    assert border.any()
    # A border pixel touches (4-neighbourhood) a pixel of another value or another border pixel.
    padded = np.pad(raw, 1, mode="edge")
    neighbours = np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    assert ((neighbours != 0) & border).any()


def reference_sample(image_path, label_path, table, crop, seed, scale, mirror):
    """The original (CIRKD / CWD) order on a raw label: map, scale, subtract the mean, pad, crop, mirror."""
    rng = np.random.default_rng(seed)
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    label = map_by_loop(np.array(Image.open(label_path)), table)
    if scale:
        f = 0.7 + int(rng.integers(0, 15)) / 10.0
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32) - np.array([104.00698793, 116.66876762, 122.67891434])
    crop_h, crop_w = crop
    pad_h, pad_w = max(crop_h - label.shape[0], 0), max(crop_w - label.shape[1], 0)
    image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
    label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(255,))
    h_off = int(rng.integers(0, label.shape[0] - crop_h + 1))
    w_off = int(rng.integers(0, label.shape[1] - crop_w + 1))
    image = np.asarray(image[h_off:h_off + crop_h, w_off:w_off + crop_w], np.float32).transpose(2, 0, 1)
    label = label[h_off:h_off + crop_h, w_off:w_off + crop_w]
    if mirror and int(rng.integers(0, 2)) == 0:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return image, label


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("crop,scale,mirror", [((64, 64), True, True), ((150, 40), False, True)])
def test_training_sample_equals_the_original_order(roots, name, crop, scale, mirror):
    ds = build_dataset(name, roots[name], "train", crop_size=crop, random_scale=scale, random_mirror=mirror,
                       verbose=False)
    for index, seed in ((0, 3), (1, 11)):
        sample = ds.samples[index]
        want_image, want_label = reference_sample(sample.image, sample.label, TABLES[name], crop, seed, scale, mirror)
        image, label, _ = ds[(index, seed)]
        np.testing.assert_array_equal(image.numpy(), want_image)
        np.testing.assert_array_equal(label.numpy(), want_label)


def test_palettes_and_class_names():
    from cwdseg.viz.segmaps import colorize

    voc, ade, cam = (dataset_info(n) for n in ("pascal_voc", "ade20k", "camvid"))
    # VOC colour map entries as published with the devkit (VOCcode/VOClabelcolormap).
    assert voc.class_names[15] == "person" and tuple(voc.colors[15]) == (192, 128, 128)
    assert tuple(voc.colors[1]) == (128, 0, 0) and tuple(voc.colors[20]) == (0, 64, 128)
    assert voc.class_names[0] == "background" and voc.class_names[-1] == "tvmonitor"
    assert ade.class_names[:3] == ("wall", "building", "sky") and ade.class_names[-1] == "flag"
    assert tuple(ade.colors[0]) == (120, 120, 120) and tuple(ade.colors[149]) == (92, 0, 255)
    assert len(set(ade.class_names)) == 150
    assert cam.class_names[0] == "sky" and cam.class_names[-1] == "bicyclist"
    assert tuple(cam.colors[3]) == (128, 64, 128) and tuple(cam.colors[10]) == (0, 128, 192)
    ids = np.array([[0, 15, 255]], np.uint8)
    np.testing.assert_array_equal(colorize(ids, voc.colors)[0], [(0, 0, 0), (192, 128, 128), (0, 0, 0)])
    # class -> label-file value, for prediction PNGs
    assert voc.class_to_file()[15] == 15 and ade.class_to_file()[0] == 1 and ade.class_to_file()[149] == 150


def test_voc_label_files_carry_the_voc_palette(roots):
    voc = dataset_info("pascal_voc")
    with Image.open(label_files(roots["pascal_voc"], "pascal_voc", "val")[0]) as img:
        palette = np.array(img.getpalette()[: 3 * 256], np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette[:21], voc.colors)
    assert tuple(palette[255]) == (224, 224, 192)  # the devkit's border colour


@pytest.mark.parametrize("name", NAMES)
def test_generator_is_deterministic_per_seed(roots, name, tmp_path):
    again = generate_dataset(name, tmp_path / "a", COUNTS["train"], COUNTS["val"], COUNTS["test"], seed=0)
    other = generate_dataset(name, tmp_path / "b", COUNTS["train"], COUNTS["val"], COUNTS["test"], seed=1)
    first = label_files(roots[name], name, "val")[0]
    rel = first.relative_to(roots[name])
    assert (again / rel).read_bytes() == first.read_bytes()
    assert (other / rel).read_bytes() != first.read_bytes()


# ------------------------------------------------------------------------------------------------ errors

@pytest.fixture()
def copy_of(roots, tmp_path):
    def make(name: str) -> Path:
        return Path(shutil.copytree(roots[name], tmp_path / name))
    return make


LAYOUT_BREAKS = {  # what to remove, and the path the error must name
    "pascal_voc": ("SegmentationClassAug", "SegmentationClassAug"),
    "ade20k": ("ADEChallengeData2016/annotations/training", "annotations/training"),
    "camvid": ("trainannot", "trainannot"),
    "folder": ("splits", "splits/train.txt"),
}


@pytest.mark.parametrize("name", NAMES)
def test_wrong_layout_names_what_was_expected_where(copy_of, name):
    root = copy_of(name)
    remove, named = LAYOUT_BREAKS[name]
    shutil.rmtree(root / remove)
    with pytest.raises(DatasetError) as exc:
        build_dataset(name, root, "train", verbose=False)
    message = str(exc.value)
    assert str(root) in message and named in message and "Expected layout" in message


def test_voc_parent_folder_is_pointed_at(copy_of, tmp_path):
    root = copy_of("pascal_voc")
    parent = tmp_path / "VOCdevkit_parent"
    (parent / "VOCdevkit").mkdir(parents=True)
    shutil.move(str(root), parent / "VOCdevkit" / "VOC2012")
    with pytest.raises(DatasetError, match="pass --data-dir .*VOCdevkit/VOC2012"):
        build_dataset("pascal_voc", parent, "train", verbose=False)


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_label_file_is_named(copy_of, name):
    root = copy_of(name)
    path = label_files(root, name, "val")[1]
    ds = build_dataset(name, root, "val", crop_size=None, verbose=False)
    path.write_bytes(path.read_bytes()[:60])  # truncated
    with pytest.raises(DatasetError, match=f"cannot decode label {path}"):
        ds[1]
    bad_value = {"pascal_voc": 100, "ade20k": 151, "camvid": 12, "folder": 7}[name]
    cv2.imwrite(str(path), np.full((40, 40), bad_value, np.uint8))
    image_path = ds.samples[1].image
    cv2.imwrite(str(image_path), np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DatasetError, match=rf"label {path} holds values \[{bad_value}\]"):
        ds[1]


def test_folder_classes_file_contradicting_the_labels(copy_of):
    root = copy_of("folder")
    spec = json.loads((root / "classes.json").read_text())
    spec["classes"] = spec["classes"][:4]  # forget "stone" (value 40), which the labels use
    (root / "classes.json").write_text(json.dumps(spec))
    ds = build_dataset("folder", root, "val", crop_size=None, verbose=False)
    assert dataset_info("folder", root).num_classes == 4
    with pytest.raises(DatasetError) as exc:
        for index in range(len(ds)):
            ds[index]
    assert "[40]" in str(exc.value) and str(root / "classes.json") in str(exc.value)


@pytest.mark.parametrize("spec, message", [
    ({"classes": []}, "non-empty"),
    ({"classes": [{"name": "a", "value": 0}, {"name": "b", "value": 0}]}, "duplicate class values"),
    ({"classes": [{"name": "a", "value": 0}], "ignore": [0]}, "both a class and ignored"),
    ({"classes": [{"name": "a", "value": 300}]}, "value must be an int in 0..255"),
    ({"classes": [{"name": "a", "value": 1, "color": [1, 2]}]}, "color must be"),
])
def test_folder_bad_classes_file(copy_of, spec, message):
    root = copy_of("folder")
    (root / "classes.json").write_text(json.dumps(spec))
    with pytest.raises(DatasetError, match=message):
        dataset_info("folder", root)


def test_check_command_compares_with_the_official_counts(copy_of, capsys):
    from cwdseg.data.__main__ import main

    root = copy_of("camvid")
    assert main(["--dataset", "camvid", "--data-dir", str(root), "--check", "1"]) == 0
    assert "train: 4 images (synthetic copy (official 367))" in capsys.readouterr().out
    (root / "synthetic.json").unlink()  # now it claims to be the real release
    assert main(["--dataset", "camvid", "--data-dir", str(root), "--check", "0"]) == 1
    captured = capsys.readouterr()
    assert "DIFFERS from the official 367" in captured.out and "train: 4 != 367" in captured.err


# ------------------------------------------------------------------------------------------- evaluation

class PatternModel(nn.Module):
    """Full-resolution logits whose argmax is a fixed function of the input (so the test can recompute it)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.anchor = nn.Parameter(torch.zeros(()))  # evaluate_model reads the device from a parameter

    @staticmethod
    def ids(image: torch.Tensor, num_classes: int) -> torch.Tensor:
        return (image[:, 0] * 0.37 + image[:, 2] * 0.11).floor().long().remainder(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.ids(x, self.num_classes), self.num_classes).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("name", NAMES)
def test_evaluator_miou_equals_an_independent_confusion_matrix(roots, name, tmp_path):
    from cwdseg.evaluation.loop import build_eval_dataset, build_eval_loader, evaluate_model

    n = NUM_CLASSES[name]
    dataset = build_eval_dataset(roots[name], "val", dataset=name)
    results = evaluate_model(PatternModel(n), build_eval_loader(dataset, 1, 0), num_classes=n, device="cpu",
                             progress=False, save_dir=tmp_path)
    conf = np.zeros((n, n), np.int64)
    for index, path in enumerate(label_files(roots[name], name, "val")):
        gt = map_by_loop(np.array(Image.open(path)), TABLES[name])
        pred = PatternModel.ids(dataset[index][0][None], n)[0].numpy()
        for g, p in zip(gt.ravel(), pred.ravel()):
            if g != 255:
                conf[g, p] += 1
    ious = [conf[c, c] / max(1, conf[c].sum() + conf[:, c].sum() - conf[c, c]) for c in range(n)]
    assert results["miou"] == pytest.approx(float(np.mean(ious)), abs=1e-12)
    assert list(results["per_class_iou"]) == list(dataset_info(name, roots[name]).class_names)
    assert results["dataset"] == name
    # prediction PNGs: dataset colours, and labelIds/ in the dataset's own file encoding
    first = label_files(roots[name], name, "val")[0].stem
    pred = PatternModel.ids(dataset[0][0][None], n)[0].numpy()
    encoded = np.array(Image.open(tmp_path / "labelIds" / f"{first}.png"))
    inverse = {k: v for v, k in TABLES[name].items() if k != 255}
    np.testing.assert_array_equal(encoded, np.vectorize(inverse.get)(pred))
    colours = cv2.cvtColor(cv2.imread(str(tmp_path / "color" / f"{first}_color.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(colours, dataset_info(name, roots[name]).colors[pred])


# ------------------------------------------------------------------------------------------ command lines

TINY = ["--input-size", "64,64", "--batch-size", "2", "--num-workers", "0", "--teacher-ckpt", "random",
        "--teacher-arch", "resnet18", "--student-init", "random", "--log-every", "1", "--device", "cpu",
        "--num-steps", "2", "--cwd", "True"]


def run(cmd: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2", **(env_extra or {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_and_evaluate_end_to_end(roots, name, tmp_path):
    proc = run([sys.executable, "train.py", "--data-dir", str(roots[name]), "--save-dir", str(tmp_path),
                "--save-name", "run", *TINY], env_extra={"DATASET": name})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "run"
    data = json.loads((run_dir / "config.json").read_text())["config"]["data"]
    assert data["dataset"] == name and data["num_classes"] == NUM_CLASSES[name]
    result = json.loads((run_dir / "eval.json").read_text())
    assert list(result["per_class_iou"]) == list(dataset_info(name, roots[name]).class_names)
    student_file = run_dir / f"{'city' if name == 'cityscapes' else name}_1_G.pth"  # the dataset names the file
    student = torch.load(student_file, map_location="cpu", weights_only=True)
    assert student["head.weight"].shape[0] == NUM_CLASSES[name]
    if name == "folder":  # the user's 5 classes, through evaluate.py as well
        from cwdseg.cli import evaluate

        out = evaluate.main(["--data-dir", str(roots[name]), "--restore-from",  # the file names its dataset
                             str(student_file), "--device", "cpu", "--num-workers", "0",
                             "--no-progress", "--save-dir", str(tmp_path / "eval")])
        assert out["settings"]["num_classes"] == 5 and list(out["per_class_iou"])[-1] == "stone"
        assert (tmp_path / "eval" / "results.json").is_file()


@pytest.mark.slow
def test_exp_cwd_reads_dataset_and_data_dir_from_the_environment(roots, tmp_path):
    proc = run(["bash", "exp_cwd.sh", "channel", "kl", "3", "4", "False", "False", "False", "v1",
                "--save-dir", str(tmp_path), *TINY[:-2]],
               env_extra={"DATASET": "camvid", "DATA_DIR": str(roots["camvid"]), "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "camvid train: 4 images" in proc.stdout
    # TINY's R18 teacher is not the paper's pair, so the run name carries both architectures
    run_dir = tmp_path / "False_False_False_channel_kl_3_4_v1_T-pspnet_resnet18_S-pspnet_resnet18"
    assert json.loads((run_dir / "config.json").read_text())["config"]["data"]["num_classes"] == 11


def test_num_classes_must_agree_with_the_dataset(roots, capsys):
    from cwdseg.cli import evaluate, train

    with pytest.raises(SystemExit) as exc:  # found while resolving the configuration: argparse's exit 2
        train.cli(["--dataset", "pascal_voc", "--data-dir", str(roots["pascal_voc"]), "--num-classes", "19",
                   "--device", "cpu"])
    assert exc.value.code == 2
    assert "--num-classes 19 contradicts --dataset pascal_voc, which has 21 classes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--dataset", "camvid", "--data-dir", str(roots["camvid"]), "--restore-from", "x.pth",
                       "--num-classes", "19"])
    assert exc.value.code == 2 and "contradicts --dataset camvid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--dataset", "camvid", "--data-dir", str(roots["camvid"]), "--restore-from", "x.pth",
                       "--official-check", "--save-dir", "o"])
    assert "scores Cityscapes only" in capsys.readouterr().err


def test_recipes_set_defaults_and_typed_flags_win(monkeypatch):
    from cwdseg.cli import train

    monkeypatch.delenv("DATA_DIR", raising=False)
    a = train.resolve_config(["--recipe", "camvid"])
    assert (a.data.dataset, a.data.crop_size, a.optim.batch_size, a.optim.num_steps, a.optim.lr,
            a.optim.weight_decay) == ("camvid", (360, 360), 16, 40000, 0.02, 1e-4)
    assert a.data.random_scale and a.data.random_mirror and a.data.root == "data/camvid"
    a = train.resolve_config(["--recipe", "ade20k", "--num-steps", "5", "--data-dir", "d"])
    assert (a.optim.num_steps, a.optim.batch_size, a.data.crop_size, a.data.root) == (5, 16, (512, 512), "d")
    a = train.resolve_config(["--recipe", "pascal_voc"])
    assert (a.optim.num_steps, a.optim.batch_size, a.optim.lr) == (40000, 16, 0.01)
    monkeypatch.setenv("DATA_DIR", "/x/voc")
    assert train.resolve_config(["--dataset", "pascal_voc"]).data.root == "/x/voc"
    # A fixed-class dataset's count is known at argument time; a folder dataset's comes from its
    # classes.json, read in main() (the data may not exist yet, e.g. before --demo generates it).
    assert train.resolve_config([]).data.num_classes == 19
    assert train.resolve_config(["--dataset", "pascal_voc"]).data.num_classes == 21
    assert train.resolve_config(["--dataset", "folder"]).data.num_classes is None


def test_short_side_evaluation_resizes_images_and_scores_full_size_labels(roots, tmp_path):
    from cwdseg.evaluation.loop import EvaluationError, build_eval_dataset, build_eval_loader, evaluate_model

    dataset = build_eval_dataset(roots["ade20k"], "val", dataset="ade20k", short_side=64)
    image, label, _ = dataset[0]
    path = label_files(roots["ade20k"], "ade20k", "val")[0]
    raw = np.array(Image.open(path))
    np.testing.assert_array_equal(label.numpy(), map_by_loop(raw, ADE_TABLE))  # full resolution
    h, w = raw.shape  # 128 x 176 -> short side 64: 64 x 88 (mmsegmentation's keep-ratio rule)
    assert tuple(image.shape) == (3, 64, round(w * 64 / h))
    bgr = cv2.resize(cv2.imread(str(dataset.samples[0].image)), (88, 64), interpolation=cv2.INTER_LINEAR)
    mean = np.array([104.00698793, 116.66876762, 122.67891434])
    np.testing.assert_array_equal(image.numpy(), (bgr.astype(np.float64) - mean).astype(np.float32).transpose(2, 0, 1))
    results = evaluate_model(PatternModel(150), build_eval_loader(dataset, 1, 0), num_classes=150, device="cpu",
                             progress=False)
    assert results["settings"]["short_side"] == 64 and results["num_images"] == 2
    with pytest.raises(EvaluationError, match="Cityscapes is evaluated at 1024x2048"):
        build_eval_dataset(roots["ade20k"], "val", dataset="cityscapes", short_side=512)


def test_voc_greyscale_labels_read_as_the_palette_ones(copy_of):
    root = copy_of("pascal_voc")
    path = label_files(root, "pascal_voc", "val")[0]
    values = np.array(Image.open(path))
    Image.fromarray(values).save(path)  # the greyscale SegmentationClassAug of most releases
    with Image.open(path) as img:
        assert img.mode == "L"
    label = build_dataset("pascal_voc", root, "val", crop_size=None, verbose=False)[0][1].numpy()
    np.testing.assert_array_equal(label, map_by_loop(values, VOC_TABLE))


def test_folder_splits_as_subfolders(copy_of):
    root = copy_of("folder")
    for split in ("train", "val"):
        for stem in (root / "splits" / f"{split}.txt").read_text().split():
            for kind, ext in (("images", ".jpg"), ("labels", ".png")):
                (root / kind / split).mkdir(exist_ok=True)
                shutil.move(str(root / kind / f"{stem}{ext}"), root / kind / split / f"{stem}{ext}")
    shutil.rmtree(root / "splits")
    ds = build_dataset("folder", root, "val", crop_size=None, verbose=False)
    assert [s.name for s in ds.samples] == ["val_0000", "val_0001"]
    assert set(np.unique(ds[0][1].numpy())) <= {0, 1, 2, 3, 4, 255}


@pytest.mark.parametrize("name", ["pascal_voc", "ade20k", "camvid", "folder"])
def test_ram_cache_is_refused_with_the_disk_cache_named(roots, name):
    from cwdseg.data.registry import build_dataset

    with pytest.raises(DatasetError, match=r"--cache-images .* only available for cityscapes.*--image-cache DIR"):
        build_dataset(name, roots[name], "train", cache_images=True, verbose=False)


def test_voc_in_cirkds_layout_reads_the_same_labels(copy_of, tmp_path):
    """CIRKD (dataset/voc.py): id lists outside the root, val labels from VOC's SegmentationClass/."""
    root = copy_of("pascal_voc")
    expected = [map_by_loop(np.array(Image.open(p)), VOC_TABLE) for p in label_files(root, "pascal_voc", "val")]
    lists = tmp_path / "dataset/list/voc"
    lists.mkdir(parents=True)
    for name in ("train_aug.txt", "val.txt"):
        shutil.move(str(root / "ImageSets/Segmentation" / name), lists / name)
    with pytest.raises(DatasetError, match="--data-list dataset/list/voc/val.txt"):
        build_dataset("pascal_voc", root, "val", verbose=False)
    val_ids = (lists / "val.txt").read_text().split()
    (root / "SegmentationClass").mkdir()
    for i in val_ids:  # VOC's own val labels; the augmented folder keeps only the train ids
        shutil.move(str(root / "SegmentationClassAug" / f"{i}.png"), root / "SegmentationClass" / f"{i}.png")
    ds = build_dataset("pascal_voc", root, "val", str(lists / "val.txt"), crop_size=None, verbose=False)
    assert [Path(s.label).parent.name for s in ds.samples] == ["SegmentationClass"] * len(val_ids)
    for index, labels in enumerate(expected):
        np.testing.assert_array_equal(ds[index][1].numpy(), labels)
    train = build_dataset("pascal_voc", root, "train", str(lists / "train_aug.txt"), crop_size=None, verbose=False)
    assert {Path(s.label).parent.name for s in train.samples} == {"SegmentationClassAug"}

"""cwdseg.load / Segmenter / cwdseg.evaluate: the class ids of evaluate.py's whole and sliding paths for a
toolkit student file (metadata, RGB network), a file in the original's layout and a CIRKD file, from
RGB arrays, paths and lists; probabilities, overlays, classes, errors."""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import cwdseg
from cwdseg.checkpoint import CheckpointError
from cwdseg.cli import evaluate as evaluate_cli
from cwdseg.cli import predict as predict_cli
from cwdseg.data.labels import CLASS_NAMES, TRAIN_ID_COLORS
from cwdseg.data.synthetic import generate
from cwdseg.evaluation.loop import EvaluationError
from tests.factories import random_state_dict, write_cirkd_deeplabv3, write_legacy_student

SIZE = (32, 64)  # small: a PSPNet-R18 forward at 32x64 takes ~0.2 s on a busy 2-core CPU
SLIDING = ["--mode", "sliding", "--tile", "16", "32", "--overlap", "1/3"]
TILE = (16, 32)
# The toolkit student's own classes: its metadata's colours, not the Cityscapes palette.
COLORS = [[(17 * i) % 256, (91 * i + 40) % 256, (53 * i + 7) % 256] for i in range(19)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "cityscapes", n_train=0, n_val=1, n_test=0, size=SIZE, seed=5)


def write_toolkit_student(path: Path) -> None:
    """A student file as the toolkit writes it: original key layout plus ``_metadata['cwdseg']``; this one
    says its network takes ImageNet-normalised RGB, so the RGB path is exercised end to end."""
    sd = random_state_dict("resnet18", seed=4)
    sd._metadata = OrderedDict(cwdseg={  # type: ignore[attr-defined]
        "format": "cwdseg/student/1", "arch": "pspnet_resnet18", "num_classes": 19,
        "class_names": [f"c{i}" for i in range(19)], "class_colors": COLORS, "normalization": "imagenet_rgb",
        "dataset": "cityscapes", "config": {"seed": 0}})
    torch.save(sd, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    write_toolkit_student(root / "toolkit.pth")
    write_legacy_student(root / "original.pth", seed=1)
    write_cirkd_deeplabv3(root / "cirkd.pth", "resnet18", seed=2)
    return {"toolkit": root / "toolkit.pth", "original": root / "original.pth", "cirkd": root / "cirkd.pth"}


def val_images(synth: Path) -> list[Path]:
    return sorted((synth / "leftImg8bit" / "val").glob("*/*.png"))


@pytest.fixture(scope="module")
def evaluated(synth, files, tmp_path_factory):
    """evaluate.py's results and trainId maps per (file kind, mode), each run once for the module."""
    cache: dict = {}

    def get(kind: str, mode: str) -> tuple[dict, dict[str, np.ndarray]]:
        if (kind, mode) not in cache:
            out = tmp_path_factory.mktemp(f"eval_{kind}_{mode}")
            cache[kind, mode] = evaluate_py_ids(synth, files[kind], out, SLIDING if mode == "sliding" else [])
        return cache[kind, mode]
    return get


def evaluate_py_ids(synth: Path, ckpt: Path, out: Path, extra: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    results = evaluate_cli.main(["--data-dir", str(synth), "--restore-from", str(ckpt), "--save-dir", str(out),
                                 "--num-workers", "0", "--no-progress", "--device", "cpu", *extra])
    ids = {p.name.removesuffix("_trainIds.png"): cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
           for p in sorted((out / "trainIds").rglob("*_trainIds.png"))}
    return results, ids


@pytest.mark.parametrize("kind", ["toolkit", "original", "cirkd"])
def test_predict_equals_evaluate_py_whole_and_sliding(kind, synth, files, evaluated):
    seg = cwdseg.load(files[kind], device="cpu")
    assert seg.arch == {"toolkit": "pspnet_resnet18", "original": "pspnet_resnet18", "cirkd": "deeplabv3_resnet18"}[kind]
    assert seg.normalization.name == ("imagenet_rgb" if kind == "toolkit" else "caffe_bgr")
    (path,) = val_images(synth)
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()  # RGB, as PIL/matplotlib load it
    for mode, inputs in (("whole", (rgb, [str(path)])), ("sliding", (path, [rgb]))):
        _, want = evaluated(kind, mode)
        expected = want[path.name.removesuffix("_leftImg8bit.png")]
        protocol = {} if mode == "whole" else {"mode": "sliding", "tile": TILE, "overlap": "1/3"}
        for given in inputs:  # an array, a path, a list of either
            got = seg.predict(given, **protocol)
            got = got[0] if isinstance(given, list) else got
            assert got.shape == SIZE and got.dtype == np.uint8
            assert np.array_equal(got, expected), (kind, mode, type(given).__name__)
        assert len(np.unique(expected)) > 1  # a map that could differ somewhere
        if kind == "toolkit" and mode == "whole":
            # BGR fed where RGB is expected changes the RGB network's prediction: the channel order is used
            assert not np.array_equal(seg.predict(rgb[..., ::-1].copy()), expected)


def test_predict_py_and_classes_follow_the_student_metadata(synth, files, tmp_path):
    seg = cwdseg.load(files["toolkit"], device="cpu")
    assert [c.name for c in seg.classes] == [f"c{i}" for i in range(19)]
    assert [list(c.color) for c in seg.classes] == COLORS and seg.classes[3].id == 3
    image = val_images(synth)[0]
    predict_cli.main(["--restore-from", str(files["toolkit"]), "--input", str(image), "--output-dir",
                      str(tmp_path), "--no-progress", "--device", "cpu"])
    ids = cv2.imread(str(tmp_path / "ids" / f"{image.stem}.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(ids, seg.predict(image))
    original = cwdseg.load(files["original"], device="cpu")
    assert [c.name for c in original.classes] == list(CLASS_NAMES)
    assert np.array_equal(np.array([c.color for c in original.classes]), TRAIN_ID_COLORS)


def test_probabilities_and_overlay(synth, files):
    seg = cwdseg.load(files["toolkit"], device="cpu")
    (path,) = val_images(synth)
    rgb = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()
    for protocol in ({}, {"flip": True}):
        probs = seg.probabilities(rgb, **protocol)
        assert probs.shape == (19, *SIZE) and probs.dtype == np.float32
        assert (probs >= 0).all()
        np.testing.assert_allclose(probs.astype(np.float64).sum(axis=0), 1.0, atol=1e-5)
        ids = probs.argmax(axis=0)
        if not protocol:
            assert np.array_equal(ids, seg.predict(rgb))
    ids = ids.astype(np.uint8)
    plain = seg.overlay(rgb, ids, legend=False)
    assert plain.shape == rgb.shape and plain.dtype == np.uint8
    # Each pixel is the half/half blend of the image and its class colour (RGB, from the file's metadata).
    blend = 0.5 * rgb.astype(np.float64) + 0.5 * np.asarray(COLORS, np.float64)[ids]
    assert np.abs(plain.astype(np.float64) - blend).max() <= 1.0
    with_legend = seg.overlay(path, ids)
    assert with_legend.shape == rgb.shape and not np.array_equal(with_legend, plain)


def test_evaluate_equals_evaluate_py(synth, files, evaluated):
    want, _ = evaluated("original", "whole")
    got = cwdseg.evaluate(files["original"], synth, device="cpu", num_workers=0)
    assert got["miou"] == want["miou"] and got["confusion_matrix"] == want["confusion_matrix"]
    assert got["checkpoint"] == want["checkpoint"] and got["settings"] == want["settings"]
    seg = cwdseg.load(files["cirkd"], device="cpu")
    sliding = cwdseg.evaluate(seg, synth, num_workers=0, mode="sliding", tile=TILE)
    cli, _ = evaluated("cirkd", "sliding")
    assert sliding["confusion_matrix"] == cli["confusion_matrix"]
    json.dumps(got)  # a plain results dict, as results.json


def test_bad_inputs_are_one_line_errors(files, tmp_path):
    seg = cwdseg.load(files["original"], device="cpu")
    with pytest.raises(ValueError, match=r"alpha channel"):
        seg.predict(np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"RGB uint8 \(H, W, 3\)"):
        seg.predict(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(CheckpointError, match="no such file"):
        cwdseg.load(tmp_path / "missing.pth")
    with pytest.raises(Exception, match="holds a deeplabv3_resnet18"):
        cwdseg.load(files["cirkd"], arch="pspnet_resnet18", device="cpu")
    with pytest.raises(EvaluationError, match=r"was trained with 19 classes \(cityscapes\), not 21"):
        cwdseg.load(files["toolkit"], num_classes=21, device="cpu")
    assert "pspnet_resnet18" in repr(seg) and seg.num_classes == 19


def test_class_overrides(files):
    seg = cwdseg.load(files["original"], device="cpu", classes=[f"k{i}" for i in range(18)] + [
        {"name": "last", "color": [1, 2, 3]}])
    assert seg.classes[18] == (18, "last", (1, 2, 3)) and seg.classes[0].color == (128, 128, 128)
    with pytest.raises(ValueError, match="3 classes given for a network of 19 outputs"):
        cwdseg.load(files["original"], device="cpu", classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"entry 1 is not a name"):
        cwdseg.load(files["original"], device="cpu", classes=["a", {"name": "b"}])

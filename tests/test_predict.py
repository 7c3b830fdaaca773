"""predict.py on a generated image folder and a generated video: sizes, and ids equal to evaluate.py's."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cwdseg.cli import evaluate, predict
from cwdseg.data.labels import TRAIN_ID_COLORS
from cwdseg.data.synthetic import generate
from cwdseg.data.transforms import preprocess
from cwdseg.evaluation.inference import predict_logits
from cwdseg.models import build_model
from cwdseg.viz.overlay import classes_present
from tests.factories import write_legacy_student

SIZE = (64, 128)
N_FRAMES = 5


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("data") / "cityscapes", n_train=0, n_val=3, n_test=0, size=SIZE, seed=3)


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "student.pth"
    write_legacy_student(path, seed=1)
    return path


@pytest.fixture(scope="module")
def net(student) -> torch.nn.Module:
    model = build_model("resnet18").eval()
    model.load_state_dict(torch.load(student, weights_only=True))
    return model


def val_images(synth: Path) -> list[Path]:
    return sorted((synth / "leftImg8bit" / "val").glob("*/*.png"))


@pytest.fixture(scope="module")
def evaluated(synth, student, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    evaluate.main(["--data-dir", str(synth), "--restore-from", str(student), "--save-dir", str(out),
                   "--num-workers", "0", "--no-progress", "--device", "cpu"])
    return out


def run_predict(*args: str) -> dict:
    return predict.main([*args, "--no-progress", "--device", "cpu"])


def test_image_folder_ids_equal_evaluate_and_overlays_have_the_image_size(synth, student, evaluated, tmp_path):
    folder = val_images(synth)[0].parent
    run_predict("--restore-from", str(student), "--input", str(folder), "--output-dir", str(tmp_path), "--batch-size", "2")
    for image_path in val_images(synth):
        stem = image_path.stem
        ids = cv2.imread(str(tmp_path / "ids" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        name = stem.removesuffix("_leftImg8bit")
        want = cv2.imread(str(evaluated / "trainIds" / f"{name}_trainIds.png"), cv2.IMREAD_UNCHANGED)
        assert ids.shape == want.shape == SIZE and ids.dtype == np.uint8
        assert np.array_equal(ids, want), stem
        overlay = cv2.imread(str(tmp_path / "overlay" / f"{stem}.png"), cv2.IMREAD_COLOR)
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        assert overlay.shape == image.shape
        # Away from the legend (top left), each pixel is the half/half blend of image and class colour.
        colour_bgr = TRAIN_ID_COLORS[ids][..., ::-1].astype(np.float64)
        blend = 0.5 * image.astype(np.float64) + 0.5 * colour_bgr
        region = (slice(SIZE[0] // 2, None), slice(SIZE[1] // 2, None))
        assert np.abs(overlay[region].astype(np.float64) - blend[region]).max() <= 1.0
        assert not np.array_equal(overlay[:8, :8], np.clip(np.rint(blend[:8, :8]), 0, 255).astype(np.uint8))  # legend


def test_glob_and_batch_size_give_the_same_ids(synth, student, tmp_path):
    pattern = str(val_images(synth)[0].parent / "*_leftImg8bit.png")
    run_predict("--restore-from", str(student), "--input", pattern, "--output-dir", str(tmp_path / "a"),
                "--batch-size", "3", "--no-overlay")
    run_predict("--restore-from", str(student), "--input", *map(str, val_images(synth)), "--output-dir",
                str(tmp_path / "b"), "--batch-size", "1", "--no-overlay")
    for image_path in val_images(synth):
        a = cv2.imread(str(tmp_path / "a" / "ids" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "b" / "ids" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b)
    assert not (tmp_path / "a" / "overlay").exists()


def _expected_ids(net: torch.nn.Module, frame_bgr: np.ndarray, **protocol) -> np.ndarray:
    """evaluate.py's pipeline for one frame: the dataset's preprocessing, predict_logits, argmax."""
    x, _ = preprocess(frame_bgr, None, None, crop_size=None)
    return predict_logits(net, torch.from_numpy(x)[None], **protocol).argmax(1)[0].numpy().astype(np.uint8)


def test_video_gives_an_annotated_video_and_per_frame_ids(synth, student, net, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (SIZE[1], SIZE[0]))
    source = cv2.imread(str(val_images(synth)[0]), cv2.IMREAD_COLOR)
    for k in range(N_FRAMES):
        writer.write(np.roll(source, 6 * k, axis=1))  # a camera panning right
    writer.release()
    out = tmp_path / "out"
    run_predict("--restore-from", str(student), "--input", str(video), "--output-dir", str(out), "--batch-size", "2")

    cap = cv2.VideoCapture(str(video))  # the frames as decoded, independently of predict.py
    decoded = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        decoded.append(frame)
    assert len(decoded) == N_FRAMES
    for k, frame in enumerate(decoded):
        ids = cv2.imread(str(out / "ids" / "clip" / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert ids.shape == SIZE
        assert np.array_equal(ids, _expected_ids(net, frame)), k
    # evaluate.py itself on the decoded first frame (put in place of a val image of a copy of the dataset).
    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    target = sorted((copy / "leftImg8bit" / "val").glob("*/*.png"))[0]
    cv2.imwrite(str(target), decoded[0])
    evaluate.main(["--data-dir", str(copy), "--restore-from", str(student), "--save-dir", str(tmp_path / "ev"),
                   "--max-images", "1", "--num-workers", "0", "--no-progress", "--device", "cpu"])
    by_evaluate = cv2.imread(str(next((tmp_path / "ev" / "trainIds").glob("*.png"))), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.imread(str(out / "ids" / "clip" / "000000.png"), cv2.IMREAD_UNCHANGED), by_evaluate)
    # PyAV decodes the MJPG frames to the same pixels as OpenCV here, so --decoder pyav gives the same ids.
    run_predict("--restore-from", str(student), "--input", str(video), "--output-dir", str(tmp_path / "av"),
                "--decoder", "pyav", "--max-frames", "2", "--video-ext", ".avi")
    assert sorted(p.name for p in (tmp_path / "av" / "ids" / "clip").iterdir()) == ["000000.png", "000001.png"]
    for k in range(2):
        by_av = cv2.imread(str(tmp_path / "av" / "ids" / "clip" / f"{k:06d}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(by_av, _expected_ids(net, decoded[k]))
    assert (tmp_path / "av" / "clip_overlay.avi").is_file()
    annotated = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_WIDTH)) == SIZE[1]
    assert int(annotated.get(cv2.CAP_PROP_FRAME_HEIGHT)) == SIZE[0]
    count = 0
    while annotated.read()[0]:
        count += 1
    assert count == N_FRAMES


def test_sliding_mode_is_evaluates_sliding_protocol(synth, student, net, tmp_path):
    image_path = val_images(synth)[1]
    run_predict("--restore-from", str(student), "--input", str(image_path), "--output-dir", str(tmp_path),
                "--mode", "sliding", "--tile", "48", "48", "--overlap", "1/3", "--no-overlay")
    ids = cv2.imread(str(tmp_path / "ids" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED)
    frame = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
    assert np.array_equal(ids, _expected_ids(net, frame, mode="sliding", tile=(48, 48), overlap=1 / 3))


def test_unreadable_input_and_existing_outputs_are_one_line_errors(synth, student, tmp_path, capsys):
    bad = tmp_path / "in" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png at all")
    assert predict.cli(["--restore-from", str(student), "--input", str(bad), "--output-dir", str(tmp_path / "o"),
                        "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("predict.py: error: ") and str(bad) in err and "\n" not in err

    image = str(val_images(synth)[0])
    args = ["--restore-from", str(student), "--input", image, "--output-dir", str(tmp_path / "o2"), "--no-progress",
            "--device", "cpu"]
    assert predict.cli(args) == 0
    first = (tmp_path / "o2" / "ids" / f"{Path(image).stem}.png").stat().st_mtime_ns
    capsys.readouterr()
    assert predict.cli(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o2" / "ids" / f"{Path(image).stem}.png").stat().st_mtime_ns == first
    assert predict.cli(args + ["--overwrite"]) == 0

    for missing in (str(tmp_path / "nope.png"), str(tmp_path / "*.jpg")):
        assert predict.cli(["--restore-from", str(student), "--input", missing, "--output-dir", str(tmp_path / "o3"),
                            "--device", "cpu"]) == 2
        assert missing in capsys.readouterr().err
    assert predict.cli(["--restore-from", str(tmp_path / "none.pth"), "--input", image, "--output-dir",
                        str(tmp_path / "o4"), "--device", "cpu"]) == 2
    assert "none.pth" in capsys.readouterr().err


def test_classes_present_is_ordered_by_area():
    ids = np.array([[3, 3, 3, 1], [1, 7, 255, 255]], np.uint8)
    assert classes_present(ids, 19) == [3, 1, 7]  # 255 (ignore) is no class


def test_class_names_and_colours_are_parameters(synth, student, tmp_path, capsys):
    table = tmp_path / "classes.json"
    table.write_text(__import__("json").dumps([{"name": f"thing{i}", "color": [255, 0, 10 * i]} for i in range(19)]))
    image_path = val_images(synth)[2]
    run_predict("--restore-from", str(student), "--input", str(image_path), "--output-dir", str(tmp_path / "o"),
                "--classes", str(table), "--alpha", "1.0")
    ids = cv2.imread(str(tmp_path / "o" / "ids" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "o" / "overlay" / f"{image_path.stem}.png"), cv2.IMREAD_COLOR)
    region = (slice(SIZE[0] // 2, None), slice(SIZE[1] // 2, None))
    want_bgr = np.stack([10 * ids, np.zeros_like(ids), np.full_like(ids, 255)], axis=-1)  # RGB (255, 0, 10 id)
    assert np.array_equal(overlay[region], want_bgr[region])
    assert predict.cli(["--restore-from", str(student), "--input", str(image_path), "--output-dir",
                        str(tmp_path / "o2"), "--channel-order", "RGB", "--device", "cpu"]) == 2
    assert "--mean" in capsys.readouterr().err


def test_dataset_option_takes_that_datasets_colours(synth, tmp_path):
    from cwdseg.data.registry import dataset_info

    info = dataset_info("pascal_voc")
    ckpt = tmp_path / "voc_student.pth"
    from tests.factories import random_state_dict

    torch.save(random_state_dict("resnet18", seed=3, num_classes=info.num_classes), ckpt)
    image_path = val_images(synth)[0]
    run_predict("--restore-from", str(ckpt), "--input", str(image_path), "--output-dir", str(tmp_path / "o"),
                "--dataset", "pascal_voc", "--num-classes", str(info.num_classes), "--alpha", "1.0")
    ids = cv2.imread(str(tmp_path / "o" / "ids" / f"{image_path.stem}.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "o" / "overlay" / f"{image_path.stem}.png"), cv2.IMREAD_COLOR)
    region = (slice(SIZE[0] // 2, None), slice(SIZE[1] // 2, None))
    assert ids.max() < info.num_classes
    assert np.array_equal(overlay[region], info.colors[ids][..., ::-1][region])

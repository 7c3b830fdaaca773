"""Cityscapes pipeline: label table, exact preprocessing, lists vs scanning, errors, seeded keys, cache.

The reference preprocessing below is the original CWD ``CSTrainValSet.__getitem__`` order of operations,
re-typed here from its description (decode -> dict loop labelId->trainId -> [uint8 resize] -> float32 ->
minus float64 mean -> pad -> crop -> CHW -> [mirror]); the label table comes from cityscapesscripts.
"""
from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels

import cwdseg.data.cityscapes as dataset_io
from cwdseg.data import (
    CLASS_NAMES,
    IGNORE_LABEL,
    IMG_MEAN_BGR,
    LABEL_ID_TO_TRAIN_ID,
    NUM_CLASSES,
    TRAIN_ID_COLORS,
    TRAIN_ID_TO_LABEL_ID,
    CityscapesDataset,
    DatasetError,
    build_loader,
    read_list_file,
    scan_split,
    worker_init_fn,
)
from cwdseg.data.labels import LABELS
from cwdseg.data.sampling import TrainSampleStream
from cwdseg.data.synthetic import generate
from cwdseg.data.transforms import preprocess

SIZE = (96, 160)  # (h, w) of the synthetic images: small, so the whole file stays fast


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("cs") / "synthetic", n_train=4, n_val=2, n_test=2, size=SIZE, seed=3)


@pytest.fixture()
def root_copy(root, tmp_path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(root, tmp_path / "copy"))


# ------------------------------------------------------------------------------------------- label table

def test_label_table_matches_cityscapesscripts():
    assert len(cs_labels) == len(LABELS)
    for ours, theirs in zip(LABELS, cs_labels):
        assert (ours.name, ours.id, ours.train_id, ours.has_instances, ours.color) == (
            theirs.name, theirs.id, theirs.trainId, theirs.hasInstances, theirs.color)
    for lab in cs_labels:
        if lab.id < 0:  # license plate: -1 read as uint8 is 255, which must stay ignored
            assert LABEL_ID_TO_TRAIN_ID[np.uint8(lab.id % 256)] == IGNORE_LABEL
            continue
        expected = lab.trainId if 0 <= lab.trainId < 19 else 255
        assert LABEL_ID_TO_TRAIN_ID[lab.id] == expected, lab.name
    known = {lab.id for lab in cs_labels if lab.id >= 0}
    for value in range(256):
        if value not in known:
            assert LABEL_ID_TO_TRAIN_ID[value] == 255
    assert LABEL_ID_TO_TRAIN_ID.dtype == np.uint8 and LABEL_ID_TO_TRAIN_ID.shape == (256,)


def test_inverse_table_names_and_colours():
    train_labels = {lab.trainId: lab for lab in cs_labels if 0 <= lab.trainId < 19}
    assert NUM_CLASSES == 19 and len(CLASS_NAMES) == 19
    for t in range(19):
        assert CLASS_NAMES[t] == train_labels[t].name
        assert TRAIN_ID_TO_LABEL_ID[t] == train_labels[t].id
        assert tuple(TRAIN_ID_COLORS[t]) == train_labels[t].color
    assert (TRAIN_ID_TO_LABEL_ID[19:] == 0).all()
    assert TRAIN_ID_TO_LABEL_ID.shape == (256,) and TRAIN_ID_COLORS.shape == (19, 3)


# ------------------------------------------------------------------------- reference (original) pipeline

ID_TO_TRAINID = {-1: 255}
ID_TO_TRAINID.update({lab.id: (lab.trainId if 0 <= lab.trainId < 19 else 255) for lab in cs_labels if lab.id >= 0})


def reference_sample(image_path, label_path, crop, seed, scale, mirror):
    """The original order of operations, with the random draws taken from default_rng(seed) in the
    documented order (scale step, row offset, column offset, mirror bit)."""
    rng = np.random.default_rng(seed)
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    label = cv2.imread(label_path, cv2.IMREAD_GRAYSCALE)
    mapped = label.copy()
    for k, v in ID_TO_TRAINID.items():
        mapped[label == k] = v
    label = mapped
    if scale:
        f = 0.7 + int(rng.integers(0, 15)) / 10.0
        image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32)
    image = image - np.array([104.00698793, 116.66876762, 122.67891434])
    if crop is None:
        crop = label.shape
    crop_h, crop_w = crop
    img_h, img_w = label.shape
    pad_h, pad_w = max(crop_h - img_h, 0), max(crop_w - img_w, 0)
    if pad_h > 0 or pad_w > 0:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
        label = cv2.copyMakeBorder(label, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=(255,))
    img_h, img_w = label.shape
    h_off = int(rng.integers(0, img_h - crop_h + 1))
    w_off = int(rng.integers(0, img_w - crop_w + 1))
    image = np.asarray(image[h_off:h_off + crop_h, w_off:w_off + crop_w], np.float32)
    label = np.asarray(label[h_off:h_off + crop_h, w_off:w_off + crop_w], np.float32)
    image = image.transpose((2, 0, 1))
    if mirror:
        flip = -1 if int(rng.integers(0, 2)) == 0 else 1
        image = image[:, :, ::flip]
        label = label[:, ::flip]
    return image.copy(), label.copy()


CROPS = [(64, 64), (80, 160), (128, 200), (64, 224), (150, 100), None]


@pytest.mark.parametrize("crop", CROPS)
@pytest.mark.parametrize("scale,mirror", [(False, False), (True, False), (False, True), (True, True)])
def test_fast_path_equals_original_order(root, crop, scale, mirror):
    ds = CityscapesDataset(root, "train", crop_size=crop, random_scale=scale, random_mirror=mirror, verbose=False)
    for index, seed in [(0, 0), (1, 11), (2, 222), (3, 3333), (0, 7)]:
        image, label, name = ds[(index, seed)]
        sample = ds.samples[index]
        ref_image, ref_label = reference_sample(sample.image, sample.label, crop, seed, scale, mirror)
        assert image.dtype == torch.float32 and label.dtype == torch.uint8
        assert image.shape == ref_image.shape and label.shape == ref_label.shape
        if crop is not None:
            assert tuple(image.shape) == (3, *crop) and tuple(label.shape) == crop
        np.testing.assert_array_equal(image.numpy(), ref_image)  # bit-identical, not just close
        np.testing.assert_array_equal(label.numpy(), ref_label.astype(np.uint8))
        assert set(np.unique(label.numpy())) <= set(range(19)) | {255}
        assert name == os.path.basename(sample.image)[: -len("_leftImg8bit.png")]


def test_mean_is_bgr_and_padding_is_zero(root):
    ds = CityscapesDataset(root, "val", crop_size=(SIZE[0] + 10, SIZE[1] + 20), verbose=False)
    image, label, _ = ds[(0, 1)]
    raw = cv2.imread(ds.samples[0].image, cv2.IMREAD_COLOR)
    h, w = SIZE
    for c in range(3):
        expected = (raw[:, :, c].astype(np.float64) - IMG_MEAN_BGR[c]).astype(np.float32)
        np.testing.assert_array_equal(image[c, :h, :w].numpy(), expected)
    assert (image[:, h:, :] == 0).all() and (image[:, :, w:] == 0).all()
    assert (label[h:, :] == 255).all() and (label[:, w:] == 255).all()


def test_preprocess_without_label_gives_ignore():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out, label = preprocess(image, None, np.random.default_rng(0), crop_size=(25, 25), random_mirror=True)
    assert out.shape == (3, 25, 25) and label.shape == (25, 25) and (label == 255).all()


# -------------------------------------------------------------------------------------- lists vs scanning

def _write_list(path: Path, root: Path, samples, with_labels=True):
    lines = []
    for s in samples:
        image = os.path.relpath(s.image, root)
        lines.append(f"{image}\t{os.path.relpath(s.label, root)}" if with_labels else image)
    path.write_text("\n".join(lines) + "\n")


def test_list_file_and_scan_agree(root, tmp_path):
    for split in ("train", "val"):
        # Build the list from the directory tree independently of scan_split.
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        lines = []
        for image in images:
            city = image.parent.name
            name = image.name[: -len("_leftImg8bit.png")]
            label = Path("gtFine") / split / city / f"{name}_gtFine_labelIds.png"
            lines.append(f"{image.relative_to(root)}\t{label}")
        list_path = tmp_path / f"{split}.lst"
        list_path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is allowed
        assert read_list_file(list_path, root) == scan_split(root, split)
        from_list = CityscapesDataset(root, split, list_path=list_path, verbose=False)
        scanned = CityscapesDataset(root, split, verbose=False)
        assert from_list.samples == scanned.samples
        assert torch.equal(from_list[(1, 5)][0], scanned[(1, 5)][0])


def test_test_split_has_no_labels(root, tmp_path):
    samples = scan_split(root, "test")
    assert len(samples) == 2 and all(s.label is None for s in samples)
    list_path = tmp_path / "test.lst"
    _write_list(list_path, root, samples, with_labels=False)
    assert read_list_file(list_path, root) == samples
    ds = CityscapesDataset(root, "test", list_path=list_path, crop_size=None, verbose=False)
    image, label, _ = ds[0]
    assert tuple(image.shape) == (3, *SIZE) and (label == 255).all()


def test_prints_one_line(root, capsys):
    CityscapesDataset(root, "val", crop_size=None)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("cityscapes val: 2 images (scanned ")
    CityscapesDataset(root, "val", crop_size=None, verbose=False)
    assert capsys.readouterr().out == ""


# -------------------------------------------------------------------------------------------- bad input

def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="dataset root not found"):
        CityscapesDataset(tmp_path / "nowhere", "train")


def test_missing_and_empty_split(tmp_path):
    (tmp_path / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(DatasetError, match="empty split"):
        scan_split(tmp_path, "train")
    with pytest.raises(DatasetError, match="split folder not found.*train"):
        scan_split(tmp_path, "val")


def test_image_without_label_when_scanning(root_copy):
    labels = sorted((root_copy / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))
    labels[1].unlink()
    labels[2].unlink()
    with pytest.raises(DatasetError, match="2 of 4 images") as info:
        CityscapesDataset(root_copy, "train", verbose=False)
    assert str(labels[1]) in str(info.value) and str(labels[2]) in str(info.value)


def test_missing_file_in_list(root, tmp_path):
    samples = scan_split(root, "val")
    list_path = tmp_path / "val.lst"
    _write_list(list_path, root, samples)
    text = list_path.read_text().replace("validton_000001_000019_gtFine", "validton_000099_000019_gtFine")
    list_path.write_text(text)
    with pytest.raises(DatasetError, match="line 2: .*validton_000099_000019_gtFine_labelIds.png"):
        read_list_file(list_path, root)
    with pytest.raises(DatasetError, match="list file not found"):
        read_list_file(tmp_path / "absent.lst", root)
    list_path.write_text("a b c\n")
    with pytest.raises(DatasetError, match="3 fields"):
        read_list_file(list_path, root)


DECODERS = ["opencv"] + (["pyspng"] if dataset_io.pyspng is not None else [])


@pytest.fixture(params=DECODERS)
def decoder(request, monkeypatch):
    """Run a test with each PNG decoder this machine has."""
    if request.param == "opencv":
        monkeypatch.setattr(dataset_io, "pyspng", None)
    return request.param


def test_decoders_give_opencv_imread_pixels(root, tmp_path, decoder):
    for sample in scan_split(root, "train"):
        assert np.array_equal(dataset_io.read_image(sample.image), cv2.imread(sample.image, cv2.IMREAD_COLOR))
    # not 8-bit RGB: grey, RGBA and 16-bit PNGs are converted as imread(IMREAD_COLOR) does
    rng = np.random.default_rng(0)
    for name, array in [("grey", rng.integers(0, 256, (9, 7), dtype=np.uint8)),
                        ("rgba", rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)),
                        ("deep", rng.integers(0, 65536, (9, 7, 3), dtype=np.uint16))]:
        path = str(tmp_path / f"{name}.png")
        cv2.imwrite(path, array)
        assert np.array_equal(dataset_io.read_image(path), cv2.imread(path, cv2.IMREAD_COLOR)), name


def test_truncated_image(root_copy, decoder):
    ds = CityscapesDataset(root_copy, "train", verbose=False)
    path = Path(ds.samples[2].image)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cannot decode image .*" + path.name):
        ds[(2, 0)]
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty image file"):
        ds[(2, 0)]
    with pytest.raises(DatasetError, match=path.name):  # the cache reads every file up front
        CityscapesDataset(root_copy, "train", cache_images=True, verbose=False)


def test_label_of_wrong_size(root_copy):
    ds = CityscapesDataset(root_copy, "train", verbose=False)
    path = ds.samples[1].label
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    cv2.imwrite(path, label[:-8])
    with pytest.raises(DatasetError, match="does not belong together") as info:
        ds[(1, 0)]
    assert os.path.basename(path) in str(info.value)


def test_bad_label_values_and_channels(root_copy):
    ds = CityscapesDataset(root_copy, "train", verbose=False)
    path = ds.samples[0].label
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    label[0, 0] = 200
    cv2.imwrite(path, label)
    with pytest.raises(DatasetError, match="value 200, not a Cityscapes labelId"):
        ds[(0, 0)]
    cv2.imwrite(path, np.dstack([label] * 3))
    with pytest.raises(DatasetError, match="single-channel"):
        ds[(0, 0)]


def test_bad_arguments(root):
    with pytest.raises(ValueError):
        CityscapesDataset(root, "train", crop_size=(0, 10), verbose=False)
    with pytest.raises(ValueError):
        CityscapesDataset(root, "train", label_type="colors", verbose=False)
    ds = CityscapesDataset(root, "train", verbose=False)
    with pytest.raises(IndexError):
        ds[4]
    assert ds[-1][2] == ds[3][2]


# ----------------------------------------------------------------------------- seeds, workers and cache

def test_seeded_key_is_reproducible_in_a_worker(root):
    ds = CityscapesDataset(root, "train", crop_size=(48, 64), random_scale=True, random_mirror=True, verbose=False)
    keys = [(i % 4, 1000 + i) for i in range(6)]
    direct = [ds[k] for k in keys]
    again = [ds[k] for k in keys]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=keys, num_workers=1,
                                         worker_init_fn=worker_init_fn)
    for (a_img, a_lab, a_name), (b_img, b_lab, _), (c_img, c_lab, c_name) in zip(direct, again, loader):
        assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
        assert torch.equal(a_img, c_img) and torch.equal(a_lab, c_lab) and a_name == c_name
    # Different seeds do change the sample (crop offset/scale/mirror).
    assert not torch.equal(ds[(0, 1)][0], ds[(0, 2)][0])


def test_seeded_sampler_and_cache_through_build_loader(root):
    plain = CityscapesDataset(root, "train", crop_size=(48, 64), random_mirror=True, verbose=False)
    cached = CityscapesDataset(root, "train", crop_size=(48, 64), random_mirror=True, cache_images=True,
                               verbose=False)
    assert cached.cached and not plain.cached
    sampler = TrainSampleStream(4, seed=5, start=8)  # the training stream, two epochs in
    loader = build_loader(cached, batch_size=2, sampler=sampler, num_workers=2)
    assert loader.persistent_workers and loader.worker_init_fn is worker_init_fn
    batches = list(itertools.islice(loader, 2))
    keys = list(itertools.islice(sampler, 4))
    assert len({seed for _, seed in keys}) == 4
    for b, (images, labels, names) in enumerate(batches):
        assert images.shape == (2, 3, 48, 64) and labels.shape == (2, 48, 64) and labels.dtype == torch.uint8
        for j in range(2):
            ref_image, ref_label, ref_name = plain[keys[2 * b + j]]
            assert torch.equal(images[j], ref_image) and torch.equal(labels[j], ref_label)
            assert names[j] == ref_name


def test_int_keys_follow_torch_seed(root):
    ds = CityscapesDataset(root, "train", crop_size=(32, 32), random_scale=True, verbose=False)
    torch.manual_seed(0)
    first = [ds[i][0] for i in range(4)]
    torch.manual_seed(0)
    second = [ds[i][0] for i in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_train_id_labels_from_a_list(root_copy, tmp_path):
    sample = scan_split(root_copy, "train")[0]
    train_ids_path = sample.label.replace("_labelIds.png", "_labelTrainIds.png")
    label_ids = cv2.imread(sample.label, cv2.IMREAD_UNCHANGED)
    expected = np.vectorize(lambda v: ID_TO_TRAINID[int(v)])(label_ids).astype(np.uint8)
    cv2.imwrite(train_ids_path, expected)
    list_path = tmp_path / "one.lst"
    list_path.write_text(f"{os.path.relpath(sample.image, root_copy)}\t{os.path.relpath(train_ids_path, root_copy)}\n")
    ds = CityscapesDataset(root_copy, "train", list_path=list_path, crop_size=None, verbose=False)
    assert "used directly" in ds.label_description()
    np.testing.assert_array_equal(ds[0][1].numpy(), expected)
    bad = expected.copy()
    bad[0, 0] = 40
    cv2.imwrite(train_ids_path, bad)
    with pytest.raises(DatasetError, match="not trainIds"):
        ds[0]


def test_check_command(root, tmp_path, capsys):
    from cwdseg.data.__main__ import main

    assert main(["--data-dir", str(root), "--check", "1"]) == 0
    assert "cityscapes test: 2 images" in capsys.readouterr().out
    assert main(["--data-dir", str(tmp_path / "nowhere")]) == 1

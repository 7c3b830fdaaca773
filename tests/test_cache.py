"""The decoded-image cache on disk: same samples as the PNG path, stale and damaged caches never read."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cwdseg.data.cache import ImageCacheError, open_image_cache
from cwdseg.data.cityscapes import CityscapesDataset, DatasetError, _load_pair
from cwdseg.data.synthetic import generate

SIZE = (72, 120)  # (h, w); crops of 64x112 with random scale 0.7..2.1 both pad and crop
CROP = (64, 112)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("cache") / "synthetic", n_train=3, n_val=1, n_test=1, size=SIZE, seed=5)


@pytest.fixture()
def root_copy(root, tmp_path) -> Path:
    """A private copy whose files a test may change."""
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _pairs(ds: CityscapesDataset) -> list[tuple[str, str | None]]:
    return [(s.image, s.label) for s in ds.samples]


def _cache_files(cache_dir: Path) -> tuple[Path, Path]:
    (data,) = cache_dir.glob("*.u8")
    return data, data.with_suffix(".json")


@pytest.mark.parametrize("split", ["train", "test"])
def test_cached_samples_are_bit_identical_to_the_png_path(root, tmp_path, split):
    kwargs = dict(crop_size=CROP, random_scale=True, random_mirror=True, verbose=False)
    png = CityscapesDataset(root, split, **kwargs)
    cached = CityscapesDataset(root, split, image_cache=tmp_path / "c", **kwargs)
    padded = total = 0
    for index in range(len(png)):
        for seed in range(16):
            image, label, name = png[(index, seed)]
            c_image, c_label, c_name = cached[(index, seed)]
            assert name == c_name
            assert c_image.dtype == image.dtype and np.array_equal(c_image.numpy(), image.numpy())
            assert np.array_equal(c_label.numpy(), label.numpy())
            rng = np.random.default_rng(seed)
            f = 0.7 + int(rng.integers(0, 15)) / 10.0
            padded += round(SIZE[0] * f) < CROP[0] or round(SIZE[1] * f) < CROP[1]
            total += 1
    assert 0 < padded < total  # the seeds give padded and unpadded crops


def test_cache_holds_the_decoded_files(root, tmp_path):
    ds = CityscapesDataset(root, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    for sample in ds.samples:
        image, label = ds.image_cache.read(sample.image, sample.label)
        assert np.array_equal(image, cv2.imread(sample.image, cv2.IMREAD_COLOR))
        assert np.array_equal(label, cv2.imread(sample.label, cv2.IMREAD_UNCHANGED))  # raw labelIds
        assert not image.flags.writeable
    data, index = _cache_files(tmp_path / "c")
    expected = sum(cv2.imread(s.image).size + cv2.imread(s.label, cv2.IMREAD_UNCHANGED).size for s in ds.samples)
    assert data.stat().st_size == expected
    assert len(json.loads(index.read_text())["entries"]) == len(ds)


def test_second_open_reuses_the_cache(root, tmp_path):
    ds = CityscapesDataset(root, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    data, _ = _cache_files(tmp_path / "c")
    before = data.stat().st_mtime_ns
    calls = []
    cache = open_image_cache(tmp_path / "c", _pairs(ds), lambda *p: calls.append(p), build=False)
    assert calls == [] and len(cache) == len(ds) and data.stat().st_mtime_ns == before


def test_stale_cache_is_refused_or_rebuilt(root_copy, tmp_path):
    ds = CityscapesDataset(root_copy, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    sample = ds.samples[1]
    new_image = cv2.imread(sample.image)[:, ::-1].copy()  # same size, other pixels
    cv2.imwrite(sample.image, new_image)
    with pytest.raises(ImageCacheError, match="stale"):
        open_image_cache(tmp_path / "c", _pairs(ds), _load_pair, build=False)
    messages = []
    cache = open_image_cache(tmp_path / "c", _pairs(ds), _load_pair, log=messages.append, progress=False)
    assert any("stale" in m for m in messages)
    assert np.array_equal(cache.read(sample.image, sample.label)[0], new_image)


def test_touched_source_makes_the_cache_stale(root_copy, tmp_path):
    ds = CityscapesDataset(root_copy, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    label = ds.samples[0].label
    st = os.stat(label)
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ImageCacheError, match="stale"):
        open_image_cache(tmp_path / "c", _pairs(ds), _load_pair, build=False)


@pytest.mark.parametrize("damage", ["truncate", "extend", "index_garbage", "index_offsets", "data_missing"])
def test_damaged_cache_is_refused_or_rebuilt(root, tmp_path, damage):
    ds = CityscapesDataset(root, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    data, index = _cache_files(tmp_path / "c")
    good = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(good[:-10])
    elif damage == "extend":
        data.write_bytes(good + b"\0")
    elif damage == "index_garbage":
        index.write_text(index.read_text()[:50])
    elif damage == "index_offsets":
        meta = json.loads(index.read_text())
        meta["entries"][1]["offset"] += 3
        index.write_text(json.dumps(meta))
    else:
        data.unlink()
    with pytest.raises(ImageCacheError, match="damaged|unreadable"):
        open_image_cache(tmp_path / "c", _pairs(ds), _load_pair, build=False)
    messages = []
    cache = open_image_cache(tmp_path / "c", _pairs(ds), _load_pair, log=messages.append, progress=False)
    assert messages and data.read_bytes() == good
    assert cache.verify(progress=False) == []


def test_flipped_byte_inside_the_data_is_found_by_verify(root, tmp_path):
    ds = CityscapesDataset(root, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    data, _ = _cache_files(tmp_path / "c")
    raw = bytearray(data.read_bytes())
    second_image_byte = SIZE[0] * SIZE[1] * 4 + 7  # entry 0 is image + label of SIZE
    raw[second_image_byte] ^= 0xFF
    data.write_bytes(bytes(raw))
    cache = open_image_cache(tmp_path / "c", _pairs(ds), _load_pair, build=False)  # same size: opens
    assert cache.verify(progress=False) == [ds.samples[1].image]


def test_half_written_build_is_not_read(root, tmp_path):
    """A build that died leaves a temporary file and no index: the next open builds from scratch."""
    ds = CityscapesDataset(root, "train", crop_size=None, verbose=False)
    folder = tmp_path / "c"
    folder.mkdir()
    cache = open_image_cache(folder, _pairs(ds), _load_pair, progress=False)
    data, index = _cache_files(folder)
    index.unlink()
    data.write_bytes(data.read_bytes()[:100])  # the data file of an interrupted build
    with pytest.raises(ImageCacheError, match="not built yet"):
        open_image_cache(folder, _pairs(ds), _load_pair, build=False)
    cache = open_image_cache(folder, _pairs(ds), _load_pair, progress=False)
    assert cache.verify(progress=False) == [] and not list(folder.glob("*.tmp-*"))


def test_failed_build_leaves_nothing_behind(root, tmp_path):
    ds = CityscapesDataset(root, "train", crop_size=None, verbose=False)

    def failing(image, label):
        if image == ds.samples[2].image:
            raise DatasetError(f"cannot decode {image}")
        return _load_pair(image, label)

    with pytest.raises(DatasetError, match="cannot decode"):
        open_image_cache(tmp_path / "c", _pairs(ds), failing, progress=False)
    assert sorted(p.suffix for p in (tmp_path / "c").iterdir()) == [".lock"]


def test_each_list_has_its_own_cache_in_one_folder(root, tmp_path):
    train = CityscapesDataset(root, "train", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    val = CityscapesDataset(root, "val", crop_size=None, image_cache=tmp_path / "c", verbose=False)
    assert len(list((tmp_path / "c").glob("*.u8"))) == 2
    with pytest.raises(ImageCacheError, match="not in the image cache"):
        train.image_cache.read(val.samples[0].image, val.samples[0].label)


def test_cache_pickles_without_its_pages(root, tmp_path):
    """Workers get the file's path, not a copy of the data (they share the page cache)."""
    ds = CityscapesDataset(root, "train", crop_size=CROP, image_cache=tmp_path / "c", verbose=False)
    ds[(0, 1)]  # maps the file in this process
    blob = pickle.dumps(ds.image_cache)
    assert len(blob) < ds.image_cache.nbytes / 4
    clone = pickle.loads(blob)
    for k in range(len(ds)):
        for a, b in zip(clone.entry(k), ds.image_cache.entry(k)):
            assert np.array_equal(a, b)


def test_ram_and_disk_cache_are_alternatives(root, tmp_path):
    with pytest.raises(DatasetError, match="alternatives"):
        CityscapesDataset(root, "train", cache_images=True, image_cache=tmp_path / "c", verbose=False)


def test_cache_command(root, tmp_path, capsys):
    from cwdseg.data.__main__ import main

    assert main(["cache", "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"), "--split", "train", "val",
                 "--verify"]) == 0
    assert len(list((tmp_path / "c").glob("*.json"))) == 2
    assert "verified 3 entries" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["cache", "--data-dir", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "c")])
    assert exc.value.code == 2 and "dataset root not found" in capsys.readouterr().err
    assert main(["--data-dir", str(root), "--split", "val"]) == 0  # the check command is unchanged


@pytest.mark.slow
def test_training_from_the_image_cache_gives_the_same_weights(root, tmp_path):
    """train.py --image-cache DIR: 3 steps with scale + mirror and 1 loader worker end bitwise equal to the
    PNG path (the cache is built on first use by the training process itself)."""
    import subprocess
    import sys

    import torch

    from cwdseg.checkpoint import state_dict_digest

    repo = Path(__file__).resolve().parents[1]
    common = ["--data-dir", str(root), "--save-dir", str(tmp_path), "--input-size", "64,64", "--batch-size", "2",
              "--num-workers", "1", "--teacher-ckpt", "random", "--teacher-arch", "resnet18", "--student-init",
              "random", "--device", "cpu", "--num-steps", "3", "--random-scale", "--random-mirror", "--eval", "False",
              "--cwd", "True"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    digests = {}
    for name, extra in (("png", []), ("cached", ["--image-cache", str(tmp_path / "cache")])):
        proc = subprocess.run([sys.executable, "train.py", *common, "--save-name", name, *extra], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        digests[name] = state_dict_digest(torch.load(tmp_path / name / "city_2_G.pth", map_location="cpu",
                                                     weights_only=True))
    assert "memory-mapped from" in proc.stdout
    assert digests["png"] == digests["cached"]
    proc = subprocess.run([sys.executable, "train.py", *common, "--save-name", "both", "--cache-images",
                           "--image-cache", str(tmp_path / "cache")], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "alternatives" in proc.stderr and "Traceback" not in proc.stderr


def _open_in_child(folder, pairs, queue):
    messages = []
    cache = open_image_cache(folder, pairs, _load_pair, log=messages.append, progress=False)
    queue.put((any("building" in m for m in messages), [cache.entry(k)[0].sum() for k in range(len(cache))]))


def test_processes_starting_together_build_once(root, tmp_path):
    """The ranks of one machine open the same cache at once: the lock lets one build, the others wait and read."""
    import multiprocessing

    ds = CityscapesDataset(root, "train", crop_size=None, verbose=False)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(tmp_path / "c", _pairs(ds), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for built, _ in results) == [False, False, True]
    expected = [cv2.imread(s.image).sum() for s in ds.samples]
    assert all(sums == expected for _, sums in results)


@pytest.mark.parametrize("name", ["pascal_voc", "ade20k", "camvid"])
def test_registry_datasets_read_the_same_samples_from_the_disk_cache(tmp_path, name):
    """The disk cache serves the other layouts too: the same crops (scale, mirror on) as their PNG/JPEG path."""
    from cwdseg.data.registry import build_dataset
    from cwdseg.data.synthetic_zoo import generate_dataset

    root = generate_dataset(name, tmp_path / name, 3, 1, 1, seed=0)
    kwargs = dict(crop_size=(48, 40), random_scale=True, random_mirror=True, verbose=False)
    plain = build_dataset(name, root, "train", **kwargs)
    cached = build_dataset(name, root, "train", image_cache=tmp_path / "cache", **kwargs)
    assert cached._image_cache is not None and len(cached) == len(plain)
    for index in range(len(plain)):
        for seed in (0, 7):
            a, b = plain[(index, seed)], cached[(index, seed)]
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]

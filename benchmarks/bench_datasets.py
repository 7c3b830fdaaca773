"""Per-dataset loading: our uint8-first path next to the CIRKD-style float pipeline, on the same keys.

``python benchmarks/bench_datasets.py [--samples 24]``

For pascal_voc, ade20k and camvid a synthetic copy at the datasets' typical image size is generated into
a temporary folder; each row times one training sample (random scale 0.7..2.1, crop, mirror) on one core,
the float pipeline (decode > map labels > scale > float mean > pad > crop > flip, as CIRKD's datasets)
and ours (``cwdseg.data.registry.build_dataset``) alternately, checks the outputs are identical, and
prints the medians and their ratio (ours / float; below 1 is faster).
"""
import argparse
import statistics
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from cwdseg.data.registry import build_dataset
from cwdseg.data.synthetic_zoo import generate_dataset

cv2.setNumThreads(1)
SIZES = {"pascal_voc": (375, 500), "ade20k": (512, 683), "camvid": (360, 480)}
CROPS = {"pascal_voc": (512, 512), "ade20k": (512, 512), "camvid": (360, 360)}
MEAN = np.array([104.00698793, 116.66876762, 122.67891434])


def cirkd(image_path, label_path, lut, crop, rng):
    image = cv2.imread(image_path, cv2.IMREAD_COLOR)
    label = np.array(Image.open(label_path))
    label = lut[label]
    f = 0.7 + int(rng.integers(0, 15)) / 10.0
    image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    image = np.asarray(image, np.float32) - MEAN
    ch, cw = crop
    ph, pw = max(ch - label.shape[0], 0), max(cw - label.shape[1], 0)
    image = cv2.copyMakeBorder(image, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
    label = cv2.copyMakeBorder(label, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(255,))
    h, w = int(rng.integers(0, label.shape[0] - ch + 1)), int(rng.integers(0, label.shape[1] - cw + 1))
    image = np.asarray(image[h:h + ch, w:w + cw], np.float32).transpose(2, 0, 1)
    label = label[h:h + ch, w:w + cw]
    if int(rng.integers(0, 2)) == 0:
        image, label = image[:, :, ::-1], label[:, ::-1]
    return image.copy(), label.copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24, help="samples per row (default: %(default)s)")
    samples = parser.parse_args().samples
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in SIZES.items():
            bench(name, size, generate_dataset(name, f"{tmp}/{name}", 8, 0, 0, size=size, seed=0), samples)


def bench(name, size, root, samples) -> None:
    ds = build_dataset(name, root, "train", crop_size=CROPS[name], random_scale=True, random_mirror=True, verbose=False)
    lut = ds.info.label_lut()
    ours, ref = [], []
    for i in range(samples):
        idx, seed = i % len(ds), 100 + i
        s = ds.samples[idx]
        t = time.perf_counter()
        a_img, a_lab = cirkd(s.image, s.label, lut, CROPS[name], np.random.default_rng(seed))
        ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        img, lab, _ = ds[(idx, seed)]
        ours.append(time.perf_counter() - t)
        assert np.array_equal(img.numpy(), a_img) and np.array_equal(lab.numpy(), a_lab)
    o, r = statistics.median(ours) * 1e3, statistics.median(ref) * 1e3
    print(f"{name:10s} {size[0]}x{size[1]} crop {CROPS[name]}: float pipeline {r:6.1f} ms, ours {o:6.1f} ms, "
          f"ratio {o / r:.2f}, outputs identical")


if __name__ == "__main__":
    main()

"""Data-loading benchmark: our pipeline next to the original order of operations, and loader throughput.

``python benchmarks/bench_loader.py [--data-root /data/cityscapes] [--samples 24] [--workers 2]``

Per-sample rows time one training sample (image + label, 512x512 crop) on one core (OpenCV threads off),
ours and the original re-implemented here, alternating on the same files so that both see the same disk
cache and machine load; the median over samples is reported, and every pair of outputs is checked to be
identical. Loader rows time ``build_loader`` batches of 8 with ``workers`` processes after the first batch.
Without ``--data-root`` a synthetic dataset of 1024x2048 images (the Cityscapes size) is generated into a
temporary folder.
"""
from __future__ import annotations

import argparse
import os
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch


from cwdseg.data.cityscapes import CityscapesDataset, build_loader
from cwdseg.data.sampling import TrainSampleStream
from cwdseg.data.original_order import original_sample
from cwdseg.data.synthetic import generate

CROP = (512, 512)
BATCH = 8
def _decoder() -> str:
    import cwdseg.data.cityscapes as io

    return "libspng (pyspng)" if io.pyspng is not None else "OpenCV"


def _paired_rows(ds: CityscapesDataset, samples: int, scale: bool, mirror: bool, tag: str) -> list[dict]:
    """Time ours and the original alternately on the same keys; check the outputs are identical."""
    ours_ms, original_ms = [], []
    for i in range(samples):
        index, seed = i % len(ds), 1000 + i
        sample = ds.samples[index]
        start = time.perf_counter()
        ref_image, ref_label = original_sample(sample.image, sample.label, CROP, scale, mirror,
                                               np.random.default_rng(seed))
        original_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        image, label, _ = ds[(index, seed)]
        ours_ms.append((time.perf_counter() - start) * 1e3)
        if not (np.array_equal(image.numpy(), ref_image) and np.array_equal(label.numpy(), ref_label)):
            raise AssertionError(f"outputs differ from the original for {sample.image} (seed {seed})")
    original = statistics.median(original_ms)
    ours = statistics.median(ours_ms)
    return [
        {"name": f"original{tag}: decode>[scale]>float>mean>crop", "ms_per_sample": original,
         "images_per_s": 1e3 / original, "ratio": 1.0, "note": "1 core"},
        {"name": f"ours{tag}: decode>[scale]>crop u8>LUT", "ms_per_sample": ours, "images_per_s": 1e3 / ours,
         "ratio": ours / original, "note": f"1 core, identical output ({samples} samples), PNG decoder: {_decoder()}"},
    ]


def _cached_row(ds: CityscapesDataset, samples: int, baseline_ms: float) -> dict:
    times = []
    for i in range(samples):
        start = time.perf_counter()
        ds[(i % len(ds), 1000 + i)]
        times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    return {"name": "ours, cache_images=True (decoded in RAM)", "ms_per_sample": ms, "images_per_s": 1e3 / ms,
            "ratio": ms / baseline_ms, "note": "1 core"}


def _loader_row(ds: CityscapesDataset, workers: int, batches: int, name: str) -> dict:
    # The training loop's own sample stream (endless, so take batches + 1 batches of it).
    loader = build_loader(ds, BATCH, sampler=TrainSampleStream(len(ds), seed=0), num_workers=workers, drop_last=True,
                          pin_memory=False)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not throughput
    start = time.perf_counter()
    count = sum(images.shape[0] for images, _, _ in itertools.islice(iterator, batches))
    seconds = time.perf_counter() - start
    del iterator, loader
    return {"name": name, "ms_per_sample": seconds * 1e3 / count, "images_per_s": count / seconds, "ratio": None,
            "note": f"{workers} workers, batch {BATCH}, {count} images, {CROP[0]}x{CROP[1]} crops"}


def run(data_root: str | None = None, samples: int = 24, workers: int = 2) -> list[dict]:
    """Benchmark rows (dicts with name, ms_per_sample, images_per_s, ratio vs the original, note)."""
    threads = (cv2.getNumThreads(), torch.get_num_threads())
    cv2.setNumThreads(0)  # per-sample rows measure one core, as a loader worker runs
    torch.set_num_threads(1)
    try:
        return _run(data_root, samples, workers)
    finally:  # benchmarks that follow in the same process get the machine back
        cv2.setNumThreads(threads[0])
        torch.set_num_threads(threads[1])


def _run(data_root: str | None, samples: int, workers: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if data_root is None:
            data_root = str(generate(Path(tmp) / "synthetic", n_train=8, n_val=0, n_test=0, size=(1024, 2048)))
        plain = CityscapesDataset(data_root, "train", crop_size=CROP, verbose=False)
        augmented = CityscapesDataset(data_root, "train", crop_size=CROP, random_scale=True, random_mirror=True,
                                      verbose=False)
        rows = _paired_rows(plain, samples, scale=False, mirror=False, tag="")
        rows += _paired_rows(augmented, samples, scale=True, mirror=True, tag=" +scale+mirror")
        cached = CityscapesDataset(data_root, "train", crop_size=CROP, cache_images=True, verbose=False,
                                   cache_threads=1) if len(plain) <= 64 else None
        if cached is not None:
            rows.append(_cached_row(cached, samples, rows[0]["ms_per_sample"]))
        batches = max(4, samples // BATCH)
        rows.append(_loader_row(plain, workers, batches, "loader: ours, from PNG"))
        if cached is not None:
            rows.append(_loader_row(cached, workers, batches, "loader: ours, cache_images=True"))
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of ``run`` as a text table (ratio: ours / the original order of operations)."""
    lines = [f"loader, {CROP[0]}x{CROP[1]} crops",
             f"{'':52s} {'ms/sample':>10s} {'images/s':>9s} {'ratio':>6s}  note"]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"{row['name']:52s} {row['ms_per_sample']:10.1f} {row['images_per_s']:9.1f} {ratio:>6s}  "
                     f"{row['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="Cityscapes root (default: synthetic 1024x2048 data)")
    parser.add_argument("--samples", type=int, default=24, help="samples per per-sample row (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (default: %(default)s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.data_root, args.samples, args.workers)
    source = args.data_root or "synthetic 1024x2048 (8 images)"
    print(f"data: {source}; {os.cpu_count()} CPUs; per-sample rows: median of {args.samples} samples")
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

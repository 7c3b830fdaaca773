"""Data-loading benchmark: the original order of operations, our PNG path and the image caches, side by side.

``python benchmarks/bench_loader.py [--data-root /data/cityscapes] [--samples 24] [--workers 2] [--quick]``

Per-sample rows time one training sample (image + label, 512x512 crop) on one core (OpenCV and torch
single-threaded, as in a loader worker). All pipelines of a group process the *same* key (image, seed) in
each round, interleaved (A B C D, then D C B A, ...) so that the disk cache and the load of other processes
fall on all of them alike; one untimed warm-up round comes first. Every round checks that all pipelines give
identical outputs. Pipelines:

- ``original``: the original code's order (decode -> float -> mean -> crop), :mod:`cwdseg.data.original_order`;
- ``PNG``: ours, decoding the PNGs (libspng when installed);
- ``disk cache``: ours reading the memory-mapped image cache (``--image-cache DIR``, :mod:`cwdseg.data.cache`),
  built before timing; its pages are in the page cache (the steady state of a machine whose RAM holds it);
- ``RAM cache``: ours with ``cache_images=True``;
- with random scale + mirror (the training recipe, the headline): ``disk cache, whole-image resize`` is the
  previous path (resize the whole image, then crop), ``disk cache`` resizes only the region the crop reads
  (:mod:`cwdseg.data.region_resize`), ``disk cache, uint8`` also leaves the normalisation to the device
  (``uint8_images=True``; its check normalises with ``Normalization.to_float_tensor``, untimed).

Each row gives the median over samples with its spread (IQR and min-max), the median CPU time of the
calling thread (``CPU ms``: what the sample costs its core, less sensitive to other processes' load than the
wall time) and its ratio to the PNG path (and to the original), with a warning where the spread is larger than
the difference. Loader rows time
``build_loader`` batches of 8 with ``--workers`` processes in windows of batches after the start-up batches
(spread over windows); they run one after the other (loaders with their own prefetching workers cannot be
interleaved meaningfully).
Without ``--data-root`` a synthetic dataset of 1024x2048 images (the Cityscapes size) is generated into a
temporary folder.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import stats
import torch
from original_order import original_sample

from cwdseg.data.cityscapes import CityscapesDataset, build_loader
from cwdseg.data.sampling import TrainSampleStream
from cwdseg.data.synthetic import generate

CROP = (512, 512)
BATCH = 8
GOAL_CACHE_MS = 3.0  # issues 18 and 25: one loader core per GPU at 40 ms per step of 8 images, recipe sample


def _decoder() -> str:
    import cwdseg.data.cityscapes as io

    return "libspng (pyspng)" if io.pyspng is not None else "OpenCV"


def _per_sample_group(datasets: dict[str, CityscapesDataset], samples: int, scale: bool, mirror: bool,
                      tag: str) -> list[dict]:
    """Interleaved per-sample times of the original and of each dataset on the same keys; outputs compared."""
    first = next(iter(datasets.values()))
    outputs: dict[str, tuple] = {}

    def key(r: int) -> tuple[int, int]:  # round r's (index, seed); warm-up rounds are negative
        return (r % len(first), 1000 + r) if r >= 0 else (0, 999)

    def original(r: int) -> None:
        index, seed = key(r)
        s = first.samples[index]
        outputs["original"] = original_sample(s.image, s.label, CROP, scale, mirror, np.random.default_rng(seed))

    cpu: dict[str, list[float]] = {name: [] for name in ["original", *datasets]}

    def original_timed(r: int) -> None:
        start = time.thread_time()
        original(r)
        if r >= 0:
            cpu["original"].append(time.thread_time() - start)

    def ours(name: str):
        def fn(r: int) -> None:
            start = time.thread_time()
            image, label, _ = datasets[name][key(r)]
            if r >= 0:  # not the warm-up round
                cpu[name].append(time.thread_time() - start)
            outputs[name] = (image.numpy(), label.numpy())
        return fn

    fns = {"original": original_timed, **{name: ours(name) for name in datasets}}
    checked = {"count": 0}

    def check_round(r: int) -> None:  # after each timed round, untimed
        ref_image, ref_label = outputs["original"]
        for name in datasets:
            image, label = outputs[name]
            if datasets[name].uint8_images:
                image = datasets[name].normalization.to_float_tensor(torch.from_numpy(image)[None])[0].numpy()
            if not (np.array_equal(image, ref_image) and np.array_equal(label, ref_label)):
                index, seed = key(r)
                raise AssertionError(f"{name} differs from the original for {first.samples[index].image} (seed {seed})")
        checked["count"] += 1

    times = stats.interleaved(fns, samples, warmup=1, with_round=True, after_round=check_round)

    summaries = {name: stats.summarize(t).scaled(1e3) for name, t in times.items()}
    png = summaries.get("PNG")
    rows = []
    for name, s in summaries.items():
        warning = None
        if png is not None and name != "PNG":
            warning = stats.ratio_warning(s, png, f"{name}{tag} vs PNG")
        rows.append({
            "name": f"{name}{tag}", "ms_per_sample": s.as_dict(), "images_per_s": 1e3 / s.median,
            "ratio_to_original": s.median / summaries["original"].median,
            "ratio_to_png": None if png is None else s.median / png.median,
            "cpu_ms": stats.summarize(cpu[name]).scaled(1e3).median,
            "note": f"1 core, {samples} samples, identical output in all {checked['count']} rounds",
            "warning": warning,
        })
    return rows


def _loader_row(ds: CityscapesDataset, workers: int, windows: int, window: int, name: str) -> dict:
    """Throughput of ``build_loader`` in ``windows`` windows of ``window`` batches, after the start-up batches."""
    prefetch = 4
    # The training loop's own sample stream (endless).
    loader = build_loader(ds, BATCH, sampler=TrainSampleStream(len(ds), seed=0), num_workers=workers, drop_last=True,
                          pin_memory=False, prefetch_factor=prefetch)
    iterator = iter(loader)
    # Worker start-up, and the batches that were prefetched meanwhile, are not throughput.
    for _ in range(max(1, workers * prefetch)):
        next(iterator)
    per_sample = []
    for _ in range(windows):
        start = time.perf_counter()
        count = sum(next(iterator)[0].shape[0] for _ in range(window))
        per_sample.append((time.perf_counter() - start) / count)
    del iterator, loader
    s = stats.summarize(per_sample).scaled(1e3)
    return {"name": name, "ms_per_sample": s.as_dict(), "images_per_s": 1e3 / s.median, "ratio_to_original": None,
            "cpu_ms": None,
            "ratio_to_png": None, "warning": None,
            "note": f"{workers} workers, batch {BATCH}, {windows} windows of {window} batches after "
                    f"{max(1, workers * prefetch)} start-up batches"}


def run(data_root: str | None = None, samples: int = 24, workers: int = 2, quick: bool = False) -> list[dict]:
    """Benchmark rows: name, ms_per_sample (median, q1, q3, min, max, n, iqr), images_per_s, ratios, note."""
    threads = (cv2.getNumThreads(), torch.get_num_threads())
    cv2.setNumThreads(0)  # per-sample rows measure one core, as a loader worker runs
    torch.set_num_threads(1)
    try:
        return _run(data_root, samples, workers, quick)
    finally:  # benchmarks that follow in the same process get the machine back
        cv2.setNumThreads(threads[0])
        torch.set_num_threads(threads[1])


def _run(data_root: str | None, samples: int, workers: int, quick: bool) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        if data_root is None:
            size = (512, 1024) if quick else (1024, 2048)
            data_root = str(generate(Path(tmp) / "synthetic", n_train=4 if quick else 8, n_val=0, n_test=0, size=size))
        cache_dir = Path(tmp) / "image_cache"
        rows = []
        for scale_mirror, tag in ((True, " +scale+mirror"), (False, "")):
            kw = dict(crop_size=CROP, random_scale=scale_mirror, random_mirror=scale_mirror, verbose=False)
            datasets = {"PNG": CityscapesDataset(data_root, "train", **kw)}
            cached = dict(image_cache=cache_dir, cache_threads=1, **kw)
            if scale_mirror:
                datasets["disk cache, whole-image resize"] = CityscapesDataset(data_root, "train", **cached)
                datasets["disk cache, whole-image resize"].region_resize = False
            datasets["disk cache"] = CityscapesDataset(data_root, "train", **cached)
            datasets["disk cache, uint8"] = CityscapesDataset(data_root, "train", uint8_images=True, **cached)
            if len(datasets["PNG"]) <= 64:
                datasets["RAM cache"] = CityscapesDataset(data_root, "train", cache_images=True, cache_threads=1, **kw)
            rows += _per_sample_group(datasets, samples, scale_mirror, scale_mirror, tag)
        # A window is a multiple of `workers` batches: the workers finish their batches about together, so
        # one batch waits for a whole batch time and the next is already there.
        windows, window = (3, workers) if quick else (5, 2 * workers)
        recipe = dict(crop_size=CROP, random_scale=True, random_mirror=True, verbose=False)
        loaders = {"loader +scale+mirror: PNG": {},
                   "loader +scale+mirror: disk cache": dict(image_cache=cache_dir),
                   "loader +scale+mirror: disk cache, uint8": dict(image_cache=cache_dir, uint8_images=True)}
        first = len(rows)
        for name, extra in loaders.items():
            rows.append(_loader_row(CityscapesDataset(data_root, "train", **recipe, **extra), workers, windows,
                                    window, name))
        png = rows[first]["ms_per_sample"]
        for row in rows[first + 1:]:
            row["ratio_to_png"] = row["ms_per_sample"]["median"] / png["median"]
            row["warning"] = stats.ratio_warning(stats.Summary.from_dict(row["ms_per_sample"]),
                                                 stats.Summary.from_dict(png), f"{row['name']} vs PNG")
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of ``run`` as a text table: median ms/sample with IQR and min-max, ratios, warnings."""
    lines = [f"loader, {CROP[0]}x{CROP[1]} crops, PNG decoder: {_decoder()}",
             f"{'':46s} {'ms/sample':>9s} {'IQR':>13s} {'min-max':>13s} {'CPU ms':>6s} {'img/s':>7s} "
             f"{'/PNG':>5s} {'/orig':>5s}  "
             "note"]
    warnings = []
    for row in rows:
        s = row["ms_per_sample"]
        png = "" if row["ratio_to_png"] is None else f"{row['ratio_to_png']:.3f}"
        orig = "" if row["ratio_to_original"] is None else f"{row['ratio_to_original']:.2f}"
        cpu = "" if row.get("cpu_ms") is None else f"{row['cpu_ms']:.2f}"
        lines.append(f"{row['name']:46s} {s['median']:9.2f} {s['q1']:6.2f}-{s['q3']:<6.2f} "
                     f"{s['min']:6.2f}-{s['max']:<6.2f} "
                     f"{cpu:>6s} {row['images_per_s']:7.1f} {png:>5s} {orig:>5s}  {row['note']}")
        if row.get("warning"):
            warnings.append(row["warning"])
    for name in ("disk cache +scale+mirror", "disk cache, uint8 +scale+mirror"):
        for row in (r for r in rows if r["name"] == name):
            ms = row["ms_per_sample"]["median"]
            verdict = "met" if ms <= GOAL_CACHE_MS else "NOT met"
            lines.append(f"goal <= {GOAL_CACHE_MS:.0f} ms per recipe sample ({name}) on one core: {verdict} "
                         f"({ms:.2f} ms)")
    return "\n".join(lines + warnings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="Cityscapes root (default: synthetic 1024x2048 data)")
    parser.add_argument("--samples", type=int, default=24, help="samples (rounds) per group (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 512x1024 images, 4 samples")
    args = parser.parse_args(argv)
    if args.quick:
        print(stats.QUICK_BANNER)
    samples = 4 if args.quick else args.samples
    start = time.perf_counter()
    rows = run(args.data_root, samples, args.workers, quick=args.quick)
    source = args.data_root or ("synthetic 512x1024 (4 images)" if args.quick else "synthetic 1024x2048 (8 images)")
    print(f"data: {source}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"per-sample rows: median of {samples} interleaved samples")
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

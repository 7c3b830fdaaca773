"""Check a dataset root: ``python -m cwdseg.data [--dataset NAME] --data-dir ROOT [--split ...] [--check N]``.

Prints the image count of each split (Cityscapes 2975 / 500 / 1525, pascal_voc 10582 / 1449, ade20k
20210 / 2000, camvid 367 / 101 / 233) and decodes the first N samples of each (all with ``--check -1``),
so that a broken download fails here with the file named instead of hours into training. For the
datasets other than Cityscapes a count that differs from the official one is an error (exit status 1),
except in a synthetic copy (``synthetic.json``).

Build the decoded-image cache of splits (``cwdseg.data.cache``; what ``train.py --image-cache DIR`` reads):
``python -m cwdseg.data cache --data-dir ROOT --cache-dir DIR [--split train] [--verify]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cwdseg.data.cityscapes import CityscapesDataset, DatasetError
from cwdseg.data.registry import DATASETS, build_dataset, dataset_info


def cache_main(argv: list[str]) -> int:
    """``cache`` sub-command: build (or find up to date) the image cache of each split, optionally verify it."""
    parser = argparse.ArgumentParser(prog="python -m cwdseg.data cache",
                                     description="Decode splits once into a memory-mapped image cache.")
    parser.add_argument("--data-dir", required=True, help="folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--cache-dir", required=True, help="folder of the cache files (train.py --image-cache)")
    parser.add_argument("--split", nargs="+", default=["train"], help="splits (default: %(default)s)")
    parser.add_argument("--data-list", default=None, help="list file instead of scanning (one split only)")
    parser.add_argument("--label-type", default="labelIds", choices=["labelIds", "labelTrainIds"],
                        help="label files to read (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="decoding threads (default: up to 8 cores)")
    parser.add_argument("--verify", action="store_true", help="re-read every cached entry against its crc32")
    args = parser.parse_args(argv)
    if args.data_list and len(args.split) != 1:
        parser.error("--data-list goes with exactly one --split")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        for split in args.split:
            ds = CityscapesDataset(args.data_dir, split, list_path=args.data_list, crop_size=None,
                                   label_type=args.label_type, image_cache=args.cache_dir,
                                   cache_threads=args.threads)
            if args.verify:
                bad = ds.image_cache.verify()
                if bad:
                    parser.error(f"{len(bad)} damaged entries in the image cache of '{split}' (first: {bad[0]}); "
                                 f"delete {ds.image_cache.data_path} and run this command again.")
                print(f"  verified {len(ds)} entries")
    except DatasetError as exc:
        parser.error(str(exc))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["cache"]:
        return cache_main(argv[1:])
    parser = argparse.ArgumentParser(description="Count and check the splits of a dataset root.")
    parser.add_argument("--dataset", default="cityscapes", choices=sorted(DATASETS),
                        help="layout of the root (default: %(default)s)")
    parser.add_argument("--data-dir", required=True, help="dataset root (cityscapes: holds leftImg8bit/ and gtFine/)")
    parser.add_argument("--split", nargs="+", default=None,
                        help="splits (default: cityscapes train val test; else the dataset's official splits)")
    parser.add_argument("--data-list", default=None, help="list file instead of scanning (one split only)")
    parser.add_argument("--label-type", default="labelIds", choices=["labelIds", "labelTrainIds"],
                        help="label files to read (default: %(default)s)")
    parser.add_argument("--check", type=int, default=8,
                        help="samples to decode per split, -1 = all (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.data_list and (args.split is None or len(args.split) != 1):
        parser.error("--data-list goes with exactly one --split")
    if args.dataset != "cityscapes":
        return _check_other(args)
    splits = args.split or ["train", "val", "test"]
    try:
        for split in splits:
            ds = CityscapesDataset(args.data_dir, split, list_path=args.data_list, crop_size=None,
                                   label_type=args.label_type)
            _decode_first(ds, args.check)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _decode_first(ds, check: int) -> None:
    """Decode the first ``check`` samples of ``ds`` (all with -1): a broken file fails here, named."""
    count = len(ds) if check < 0 else min(check, len(ds))
    start = time.perf_counter()
    for index in range(count):
        ds[index]
    print(f"  decoded {count} samples without error ({time.perf_counter() - start:.1f} s)")


def _check_other(args: argparse.Namespace) -> int:
    """Counts against the official numbers and decoding, for the registry's non-Cityscapes datasets."""
    differs = []
    try:
        info = dataset_info(args.dataset, args.data_dir)
        splits = args.split or list(info.counts) or ["train", "val"]
        synthetic = any((p / "synthetic.json").is_file() for p in (Path(args.data_dir), Path(args.data_dir).parent))
        for split in splits:
            ds = build_dataset(args.dataset, args.data_dir, split, args.data_list, crop_size=None)
            expected = info.counts.get(split)
            if expected is None or args.data_list:
                verdict = "no official count" if expected is None else f"list file; the official split has {expected}"
            elif len(ds) == expected:
                verdict = f"= official {expected}"
            elif synthetic:
                verdict = f"synthetic copy (official {expected})"
            else:
                verdict = f"DIFFERS from the official {expected}"
                differs.append(f"{split}: {len(ds)} != {expected}")
            print(f"  {split}: {len(ds)} images ({verdict})")
            _decode_first(ds, args.check)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if differs:
        print(f"error: {args.dataset} split counts differ from the official release ({'; '.join(differs)}): "
              "a partial download or unpack?", file=sys.stderr)
        return 1
    print(f"{args.dataset}: {info.num_classes} classes ({info.label_description})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Check a Cityscapes root: ``python -m cwdseg.data --data-dir ROOT [--split train val test] [--check N]``.

Prints the image count of each split (2975 / 500 / 1525 for the full dataset) and decodes the first N
samples of each (all with ``--check -1``), so that a broken download fails here with the file named
instead of hours into training.

Build the decoded-image cache of splits (``cwdseg.data.cache``; what ``train.py --image-cache DIR`` reads):
``python -m cwdseg.data cache --data-dir ROOT --cache-dir DIR [--split train] [--verify]``.
"""
from __future__ import annotations

import argparse
import sys
import time

from cwdseg.data.cityscapes import CityscapesDataset, DatasetError


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
    parser = argparse.ArgumentParser(description="Count and check the splits of a Cityscapes root.")
    parser.add_argument("--data-dir", required=True, help="folder holding leftImg8bit/ and gtFine/")
    parser.add_argument("--split", nargs="+", default=["train", "val", "test"], help="splits (default: %(default)s)")
    parser.add_argument("--data-list", default=None, help="list file instead of scanning (one split only)")
    parser.add_argument("--label-type", default="labelIds", choices=["labelIds", "labelTrainIds"],
                        help="label files to read (default: %(default)s)")
    parser.add_argument("--check", type=int, default=8,
                        help="samples to decode per split, -1 = all (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.data_list and len(args.split) != 1:
        parser.error("--data-list goes with exactly one --split")
    try:
        for split in args.split:
            ds = CityscapesDataset(args.data_dir, split, list_path=args.data_list, crop_size=None,
                                   label_type=args.label_type)
            count = len(ds) if args.check < 0 else min(args.check, len(ds))
            start = time.perf_counter()
            for index in range(count):
                ds[index]
            print(f"  decoded {count} samples without error ({time.perf_counter() - start:.1f} s)")
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

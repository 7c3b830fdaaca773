"""Check a Cityscapes root: ``python -m cwdseg.data --data-dir ROOT [--split train val test] [--check N]``.

Prints the image count of each split (2975 / 500 / 1525 for the full dataset) and decodes the first N
samples of each (all with ``--check -1``), so that a broken download fails here with the file named
instead of hours into training.
"""
from __future__ import annotations

import argparse
import sys
import time

from cwdseg.data.cityscapes import CityscapesDataset, DatasetError


def main(argv: list[str] | None = None) -> int:
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

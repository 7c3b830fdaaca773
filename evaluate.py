"""Evaluate a checkpoint on Cityscapes val (mIoU) or predict the test split: the original's ``val.py``.

    python evaluate.py --data-dir data/cityscapes --restore-from ckpt/<student>.pth

The implementation is :mod:`cwdseg.cli.evaluate` (also installed as ``cwd-eval``).
"""
import sys

from cwdseg.cli.evaluate import cli

if __name__ == "__main__":
    sys.exit(cli())

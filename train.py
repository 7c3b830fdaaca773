"""Train a student with channel-wise distillation: the original's ``train.py`` command line.

    python train.py --demo
    bash exp_cwd.sh channel kl 3 4 False False False v1

The implementation is :mod:`cwdseg.cli.train` (also installed as ``cwd-train``).
"""
import sys

from cwdseg.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())

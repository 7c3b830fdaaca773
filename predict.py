"""Segment your own images, folders, globs and videos with a trained network (or an ONNX export).

    python predict.py --restore-from ckpt/<student>.pth --input photos/ dashcam.mp4 --output-dir outputs/mine

The implementation is :mod:`cwdseg.cli.predict`.
"""
import sys

from cwdseg.cli.predict import cli

if __name__ == "__main__":
    sys.exit(cli())

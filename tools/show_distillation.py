"""Draw what channel-wise distillation compares, for one image and a teacher/student pair.

    python tools/show_distillation.py --teacher ckpt/teacher_city.pth --student ckpt/<student>.pth --image street.png
    python tools/show_distillation.py --teacher T.pth --student S.pth --data-dir data/cityscapes --index 0 \\
        --channels car person road

For each class channel of the logits: the teacher's and the student's distribution over the image
positions at temperature τ (softmax over H·W of logits/τ), and the pointwise KL terms; on top, the
per-channel KL of all channels, whose mean is the CWD loss of this image (the values are
``CriterionCWD``'s own per-channel terms). Writes ``--out`` (PNG) and a JSON beside it with the per-channel
KL. The image comes from ``--image`` or the ``--index``-th val image of ``--data-dir``; ``--resize``
shrinks it first (the R101 teacher on a 1024x2048 image takes a while on a CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cwdseg.checkpoint import CheckpointError, atomic_write_text
from cwdseg.cli.parser import ArgumentParser
from cwdseg.data import DatasetError
from cwdseg.data.labels import CLASS_NAMES, NUM_CLASSES
from cwdseg.evaluation.loop import EvaluationError, build_eval_dataset, load_model
from cwdseg.evaluation.media import MediaError, read_image
from cwdseg.export.normalization import ORIGINAL, apply
from cwdseg.export.onnx import LogitsOnly
from cwdseg.viz.channels import channel_distributions, plot_channel_grid, top_channels


class ShowError(RuntimeError):
    """A bad argument of show_distillation.py."""


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Per-class channel distributions of teacher and student (CWD)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pth)")
    p.add_argument("--student", required=True, help="student checkpoint (.pth, or a run's last.pth)")
    p.add_argument("--image", default=None, help="an image file; or use --data-dir and --index")
    p.add_argument("--data-dir", default=None, help="Cityscapes root: take a val image from it")
    p.add_argument("--index", type=int, default=0, help="which val image of --data-dir")
    p.add_argument("--resize", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize the image first")
    p.add_argument("--tau", type=float, default=4.0, help="temperature τ (the paper's recipe: 4)")
    p.add_argument("--channels", nargs="+", default=None, help="class names or ids to draw; default: --top-k")
    p.add_argument("--top-k", type=int, default=6, help="draw the k channels with the largest KL")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES, help="classes of both networks")
    p.add_argument("--out", default="outputs/show_distillation/channels.png", help="the PNG to write (+ .json)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _pick_image(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    if (args.image is None) == (args.data_dir is None):
        raise ShowError("give either --image FILE or --data-dir ROOT (with --index N)")
    if args.image is not None:
        return read_image(Path(args.image)), str(args.image)
    dataset = build_eval_dataset(args.data_dir, "val")
    if not 0 <= args.index < len(dataset):
        raise ShowError(f"--index {args.index}: the val split of {args.data_dir} has {len(dataset)} images")
    path = dataset.samples[args.index].image
    return read_image(Path(path)), str(path)


def _channels(args: argparse.Namespace, names: list[str], dist) -> list[int]:
    if not args.channels:
        return top_channels(dist, min(args.top_k, len(names)))
    picked = []
    for token in args.channels:
        if token.isdigit() and int(token) < len(names):
            picked.append(int(token))
        elif token in names:
            picked.append(names.index(token))
        else:
            raise ShowError(f"--channels {token!r}: not a class id or name (names: {', '.join(names)})")
    return picked


def _load(path: str, flag: str, num_classes: int) -> tuple[torch.nn.Module, str]:
    """``load_model`` with every error naming the flag whose file it is (not evaluate.py's --restore-from)."""
    if Path(path).is_dir():
        raise ShowError(f"{flag} {path}: is a folder, not a checkpoint file; pass a .pth file in it")
    if not Path(path).is_file():
        raise ShowError(f"{flag} {path}: no such file")
    try:
        return load_model(path, None, num_classes)
    except (CheckpointError, EvaluationError) as exc:
        raise ShowError(f"{flag}: {exc}") from None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Returns the JSON written beside the PNG (per-channel KL, loss, channels drawn)."""
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ShowError(f"--out {out}: must end in .png")
    if out.exists() and not args.overwrite:
        raise ShowError(f"{out} exists; pass --overwrite or choose another --out")
    if args.tau <= 0 or args.top_k < 1:
        raise ShowError("--tau must be > 0 and --top-k >= 1")
    image_bgr, source = _pick_image(args)
    if args.resize:
        image_bgr = cv2.resize(image_bgr, (args.resize[1], args.resize[0]), interpolation=cv2.INTER_LINEAR)
    teacher, teacher_arch = _load(args.teacher, "--teacher", args.num_classes)
    student, student_arch = _load(args.student, "--student", args.num_classes)
    x = torch.from_numpy(apply(ORIGINAL, image_bgr))[None]
    with torch.no_grad():
        t_logits = LogitsOnly(teacher.eval())(x)
        s_logits = LogitsOnly(student.eval())(x)
    dist = channel_distributions(s_logits, t_logits, args.tau, resize=s_logits.shape[2:] != t_logits.shape[2:])
    names = list(CLASS_NAMES) if args.num_classes == NUM_CLASSES else [str(c) for c in range(args.num_classes)]
    channels = _channels(args, names, dist)
    plot_channel_grid(dist, out, channels, names, cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB),
                      title=f"CWD on the logits: teacher {teacher_arch} vs student {student_arch}, τ = {args.tau:g}, "
                            f"{dist.teacher.shape[1]}x{dist.teacher.shape[2]} positions")
    result = {"image": source, "teacher": str(args.teacher), "student": str(args.student), "tau": args.tau,
              "map_size": list(dist.teacher.shape[1:]), "cwd_loss": dist.loss,
              "per_channel_kl": {names[c]: float(v) for c, v in enumerate(dist.kl)},
              "channels_drawn": [names[c] for c in channels]}
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    print(f"CWD loss of this image {dist.loss:.4f} (τ = {args.tau:g}); largest per-channel KL: "
          + ", ".join(f"{names[c]} {dist.kl[c]:.4f}" for c in top_channels(dist, 3)))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return result


def cli(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except (ShowError, MediaError, CheckpointError, EvaluationError, DatasetError, ValueError) as exc:
        print(f"show_distillation.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

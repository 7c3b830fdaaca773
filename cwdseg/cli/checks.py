"""Value checks of the command lines: each bad value is one line naming the flag, the value and the
valid range, reported before any work starts (``resolve_args`` / ``evaluate.main`` call these).

The domain checks that need a file (a list line without its label, a checkpoint of another class
count, a resume from other files) live where the file is read; these are the ones a value alone decides.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from cwdseg.data.labels import NUM_CLASSES
from cwdseg.evaluation.inference import OUTPUT_STRIDE, input_size_error, parse_overlap


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number_errors(args: argparse.Namespace, rules: dict[str, tuple[str, float]]) -> list[str]:
    """``rules``: attribute -> (">" or ">=", bound). Missing attributes are skipped (other commands)."""
    errors = []
    for name, (op, bound) in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (value > bound if op == ">" else value >= bound)
        if not ok:
            errors.append(f"{_flag(name)} must be {op} {bound:g}, got {value:g}")
    return errors


def writable_folder_error(flag: str, folder: str | os.PathLike) -> str | None:
    """Whether outputs can be written under ``folder`` (created if needed): its nearest existing
    ancestor must be a writable directory. None when fine, else the one-line error."""
    path = Path(folder).expanduser().absolute()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{flag} {folder}: {probe} is not a folder; choose another {flag}"
    if not os.access(probe, os.W_OK | os.X_OK):
        why = "read-only filesystem" if _read_only_fs(probe) else "no write permission"
        return f"{flag} {folder}: cannot write into {probe} ({why}); choose a writable {flag}"
    return None


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def class_count_error(flag: str, num_classes: int, dataset: str = "cityscapes") -> str | None:
    """The network's class count must match the labels: Cityscapes labels are trainIds 0..18. (None: not
    given, the dataset's count is used; the registry datasets are checked against their own count where
    the dataset is resolved.)"""
    if num_classes is not None and dataset == "cityscapes" and num_classes != NUM_CLASSES:
        return (f"{flag} {num_classes}: the Cityscapes labels hold {NUM_CLASSES} classes (trainIds 0..18); "
                f"use {flag} {NUM_CLASSES}")
    return None


TRAIN_RULES: dict[str, tuple[str, float]] = {
    "temperature": (">", 0), "lambda_cwd": (">=", 0), "lambda_kd": (">=", 0), "lambda_adv": (">=", 0),
    "lambda_d": (">=", 0), "lambda_gp": (">=", 0), "lr_g": (">", 0), "lr_d": (">", 0), "momentum": (">=", 0),
    "weight_decay": (">=", 0), "power": (">=", 0),
}


def train_value_errors(args: argparse.Namespace) -> list[str]:
    """Every bad value of train.py's arguments, one line each."""
    errors = _number_errors(args, TRAIN_RULES)
    if getattr(args, "momentum", 0) >= 1:
        errors.append(f"--momentum must be < 1, got {args.momentum:g}")
    if not 0 <= args.ignore_label <= 255:
        errors.append(f"--ignore-label must be in 0..255 (labels are 8-bit), got {args.ignore_label}")
    elif args.num_classes is not None and args.ignore_label < args.num_classes:
        errors.append(f"--ignore-label {args.ignore_label} is one of the {args.num_classes} classes; "
                      "it must be >= --num_classes (the recipe: 255)")
    for error in (class_count_error("--num_classes", args.num_classes, getattr(args, "dataset", "cityscapes")),
                  writable_folder_error("--save-dir", args.save_dir)):
        if error:
            errors.append(error)
    if args.resume and not Path(args.resume).is_file():
        errors.append(f"--resume {args.resume}: is a folder; pass its last.pth" if Path(args.resume).is_dir()
                      else f"--resume {args.resume}: no such file")
    return errors


def eval_value_errors(args: argparse.Namespace) -> list[str]:
    """Every bad value of evaluate.py's arguments, one line each."""
    errors = []
    bad_scales = [s for s in args.scales if not (math.isfinite(s) and s > 0)]
    if bad_scales:
        errors.append(f"--scales must all be > 0, got {' '.join(f'{s:g}' for s in bad_scales)}")
    if any(t < 1 for t in args.tile):
        errors.append(f"--tile must be two positive sizes, got {args.tile[0]} {args.tile[1]}")
    elif args.mode == "sliding" and min(args.tile) < OUTPUT_STRIDE:
        errors.append(input_size_error(0, 0, args.scales, "sliding", args.tile))
    if args.batch_size < 1 or args.tile_batch < 1 or args.num_workers < 0:
        errors.append("--batch-size and --tile-batch must be >= 1, --num-workers >= 0")
    error = class_count_error("--num-classes", args.num_classes, getattr(args, "dataset", "cityscapes"))
    if error:
        errors.append(error)
    if args.save_dir is not None:
        error = writable_folder_error("--save-dir", args.save_dir)
        if error:
            errors.append(error)
    return errors


def overlap_arg(value: str) -> float:
    """argparse type of ``--overlap`` (a fraction like ``1/3`` or a float), shared by evaluate.py and predict.py."""
    try:
        return parse_overlap(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class OutputNameError(ValueError):
    """An output name that would leave its folder (``..``, a separator, an absolute path)."""


def safe_child(save_dir: str | os.PathLike, name: str, flag: str = "--save-name") -> Path:
    """``save_dir / name`` for a ``name`` that stays one level inside ``save_dir``; else an
    :class:`OutputNameError` with the one-line reason (``--save-name ../../x`` must not write elsewhere)."""
    parent = Path(save_dir).expanduser().absolute()
    child = (parent / name).resolve()
    if not name or name in (".", "..") or Path(name).is_absolute() or "/" in name or "\\" in name \
            or child.parent != parent.resolve():
        raise OutputNameError(f"{flag} {name!r}: must be a plain folder name inside {save_dir} (no '/', '..' or "
                              f"absolute path); put the path into --save-dir instead")
    return parent / name


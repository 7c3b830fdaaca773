"""Value checks of the command lines: each bad value is one line naming the flag, the value and the
valid range, reported before any work starts (``train.resolve_config`` / ``evaluate.main`` call these).

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


# The original's distillation flags (their values become term options, checked here as typed).
LEGACY_RULES: dict[str, tuple[str, float]] = {
    "temperature": (">", 0), "lambda_cwd": (">=", 0), "lambda_kd": (">=", 0), "lambda_adv": (">=", 0),
    "lambda_d": (">=", 0), "lambda_gp": (">=", 0),
}
# Configuration fields -> (flag that names them in messages, rule).
CONFIG_RULES: dict[str, tuple[str, str, float]] = {
    "optim.lr": ("--lr-g", ">", 0), "optim.lr_d": ("--lr-d", ">", 0), "optim.momentum": ("--momentum", ">=", 0),
    "optim.weight_decay": ("--weight-decay", ">=", 0), "optim.power": ("--power", ">=", 0),
    "optim.head_lr_mult": ("optim.head_lr_mult", ">", 0), "optim.warmup_ratio": ("optim.warmup_ratio", ">", 0),
    "optim.batch_size": ("--batch-size", ">", 0), "optim.num_steps": ("--num-steps", ">", 0),
    "optim.grad_accum": ("--grad-accum", ">", 0), "output.save_last_every": ("--save-last-every", ">", 0),
    "output.log_every": ("--log-every", ">", 0), "output.save_every": ("--save-every", ">=", 0),
    "eval.every": ("--eval-every", ">=", 0), "data.num_workers": ("--num-workers", ">=", 0),
    "optim.warmup_steps": ("optim.warmup_steps", ">=", 0),
    "eval.teacher_check_images": ("--teacher-check-images", ">=", 0),
}
CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "optim.optimizer": ("--optimizer", ("sgd", "adamw")),
}


def _check(flag: str, value: float, op: str, bound: float) -> str | None:
    ok = math.isfinite(value) and (value > bound if op == ">" else value >= bound)
    if ok:
        return None
    if isinstance(value, int) and op == ">" and bound == 0:
        return f"{flag} must be positive, got {value}"
    return f"{flag} must be {op} {bound:g}, got {value:g}"


def train_value_errors(cfg, typed: dict) -> list[str]:
    """Every bad value of a resolved run configuration (``cfg``, a :class:`cwdseg.config.RunConfig`) and of
    the original's distillation flags as typed (``typed``), one line each, named by flag where one exists."""
    errors = [e for name, (op, bound) in LEGACY_RULES.items() if name in typed
              for e in [_check(_flag(name), float(typed[name]), op, bound)] if e]
    for key, (flag, op, bound) in CONFIG_RULES.items():
        section, name = key.split(".")
        error = _check(flag, getattr(getattr(cfg, section), name), op, bound)
        if error:
            errors.append(error)
    for key, (flag, allowed) in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            errors.append(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    if cfg.optim.momentum >= 1:
        errors.append(f"--momentum must be < 1, got {cfg.optim.momentum:g}")
    d = cfg.data
    if not 0 <= d.ignore_label <= 255:
        errors.append(f"--ignore-label must be in 0..255 (labels are 8-bit), got {d.ignore_label}")
    elif d.num_classes is not None and d.ignore_label < d.num_classes:
        errors.append(f"--ignore-label {d.ignore_label} is one of the {d.num_classes} classes; "
                      "it must be >= --num_classes (the recipe: 255)")
    if len(d.crop_size) != 2 or min(d.crop_size) <= 0:
        errors.append(f"--input-size must be two positive sizes H,W, got {d.crop_size}")
    elif min(d.crop_size) < 4 * OUTPUT_STRIDE:
        errors.append(f"--input-size {d.crop_size[0]},{d.crop_size[1]} gives maps of under 4x4 at the networks' "
                      f"output stride {OUTPUT_STRIDE}; use crops of at least {4 * OUTPUT_STRIDE} px "
                      "(the recipe: 512,512)")
    for error in (class_count_error("--num_classes", d.num_classes, d.dataset),
                  writable_folder_error("--save-dir", cfg.output.save_dir)):
        if error:
            errors.append(error)
    name = cfg.output.name
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or "/" in name:
        errors.append(f"--save-name {name!r}: a run name is one folder name inside --save-dir (no '/', no '..')")
    if typed.get("resume") and not Path(typed["resume"]).is_file():
        errors.append(f"--resume {typed['resume']}: is a folder; pass its last.pth" if Path(typed["resume"]).is_dir()
                      else f"--resume {typed['resume']}: no such file")
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
    error = class_count_error("--num-classes", args.num_classes, args.dataset or "cityscapes")
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


"""A teacher check before distilling: score the teacher on a fixed handful of val images and stop a run
whose teacher is clearly not the one it should be (random weights, a wrong file, a wrong normalisation).

A distillation run with a broken teacher trains for hours and reports a student worse than the
baseline, with nothing in the logs saying why. The check evaluates the teacher on the *first*
``num_images`` images of the val split (in the split's order: fixed and deterministic), with the
final evaluation's protocol (whole image, single scale), and compares that mIoU to a threshold:

- a known teacher file on its own dataset (``KNOWN_TEACHERS``: the architecture, Cityscapes, 19
  classes): its published val mIoU minus ``MARGIN`` (5) points. A few images give a noisy mIoU (some
  classes are absent, and absent classes are left out of the mean), so the margin is wide; a random
  or mismatched network scores a few percent and is far below it;
- any other teacher: ``FLOOR`` (10) mIoU points, far above what random weights score (a random
  network predicts one or two classes everywhere: a few points) and far below any trained network.

``--teacher-min-miou X`` replaces the threshold, ``--teacher-min-miou 0`` accepts any teacher (the
check is still logged), ``--teacher-check-images 0`` skips it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cwdseg.data.synthetic import MARKER_FILE as SYNTHETIC_MARKER

MARGIN = 5.0      # points under the published figure that still pass
FLOOR = 10.0      # the threshold of a teacher with no published figure
DEFAULT_IMAGES = 8
OVERRIDE_HINT = "--teacher-min-miou 0 to distil from it anyway, or --teacher-check-images 0 to skip the check"


class TeacherCheckError(RuntimeError):
    """The teacher scored below the threshold; one line with the measured and required mIoU and the override."""


@dataclass(frozen=True)
class KnownTeacher:
    arch: str            # cwdseg.models registry name
    dataset: str
    num_classes: int
    published: float     # val mIoU (%)
    source: str


KNOWN_TEACHERS = (
    KnownTeacher("pspnet_resnet101", "cityscapes", 19, 78.56,
                 "CWD paper / TorchDistiller teacher_city.pth (the released file measures 78.32, IFVD issue #6)"),
    KnownTeacher("deeplabv3_resnet101", "cityscapes", 19, 78.07, "CIRKD released DeepLabV3-ResNet101 (val)"),
)


def published_miou(arch: str, dataset: str, num_classes: int) -> KnownTeacher | None:
    """The published figure of a teacher of ``arch`` on ``dataset`` with ``num_classes`` classes, if known."""
    return next((k for k in KNOWN_TEACHERS if (k.arch, k.dataset, k.num_classes) == (arch, dataset, num_classes)),
                None)


def default_threshold(arch: str, dataset: str, num_classes: int) -> tuple[float, str]:
    """``(threshold in mIoU points, why)``: published - MARGIN for a known teacher, else FLOOR."""
    known = published_miou(arch, dataset, num_classes)
    if known is not None:
        return known.published - MARGIN, f"published {known.published:.2f} - {MARGIN:g} ({known.source})"
    return FLOOR, f"no published figure for {arch} on {dataset}: the floor for a trained network"


def run_threshold(arch: str, dataset: str, num_classes: int, data_dir: str | Path,
                  override: float | None = None) -> tuple[float, str]:
    """The threshold of a training run: ``override`` (``--teacher-min-miou``) when given, else
    :func:`default_threshold`, where a synthetic copy of a layout (``cwdseg.data.synthetic``'s marker file in
    ``data_dir``) has no published figure."""
    if override is not None:
        return float(override), "--teacher-min-miou"
    if (Path(data_dir) / SYNTHETIC_MARKER).is_file():
        dataset = "synthetic"
    return default_threshold(arch, dataset, num_classes)


def _first_images(data: Dataset | DataLoader, num_images: int) -> DataLoader:
    """An in-order loader over the first ``num_images`` images (batch 1, no workers: a handful of images)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    n = min(num_images, len(dataset))
    if n == 0:
        raise ValueError("the teacher check needs a non-empty val split")
    subset = Subset(dataset, range(n))
    if hasattr(dataset, "info"):
        subset.info = dataset.info  # type: ignore[attr-defined]
    if hasattr(dataset, "eval_short_side"):
        subset.eval_short_side = dataset.eval_short_side  # type: ignore[attr-defined]
    return DataLoader(subset, batch_size=1, shuffle=False, num_workers=0)


def check_teacher(model: nn.Module, data: Dataset | DataLoader, *, num_images: int, num_classes: int,
                  device: str | torch.device, threshold_miou: float, amp: str = "none",
                  label: str = "teacher") -> dict[str, Any]:
    """Evaluate ``model`` on the first ``num_images`` images of ``data`` (a val dataset giving
    ``(image, label, name)`` at full resolution, normalised as the teacher expects, or a loader over one)
    and compare the mIoU (percent) to ``threshold_miou``.

    Returns the record to store in the run (``{"miou", "threshold", "passed", "num_images", "images",
    "per_class_iou"}``); raises :class:`TeacherCheckError` (one line) when the mIoU is below the threshold.
    The model's train/eval mode is restored.
    """
    from cwdseg.evaluation.loop import evaluate_model

    if num_images < 1:
        raise ValueError(f"num_images must be at least 1 (0 means: do not call the check), got {num_images}")
    loader = _first_images(data, num_images)
    metrics = evaluate_model(model, loader, num_classes=num_classes, device=device, amp=amp, progress=False)
    miou = 100.0 * float(metrics["miou"])
    record = {"miou": miou, "threshold": float(threshold_miou), "passed": miou >= threshold_miou,
              "num_images": metrics["num_images"],
              "images": [str(s) for s in getattr(loader.dataset.dataset, "samples", [])[:metrics["num_images"]]],
              "per_class_iou": metrics["per_class_iou"]}
    if not record["passed"]:
        raise TeacherCheckError(f"the {label} scores {miou:.2f} mIoU on the first {metrics['num_images']} val images, "
                                f"below the required {threshold_miou:.2f}: check --teacher-ckpt, --teacher-arch and "
                                f"the normalisation; {OVERRIDE_HINT}")
    return record

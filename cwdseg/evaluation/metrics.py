"""Segmentation metrics: a confusion matrix accumulated on the device, and IoU from it.

Conventions (those of the original ``utils/evaluate.py``):

- rows are the ground-truth class, columns the predicted class: ``conf[gt, pred]``;
- pixels whose ground truth is the ignore label (255) are left out;
- ``IoU_c = tp / max(1, row_c + col_c - tp)``, so a class absent from both the ground truth and the
  prediction scores 0, and mIoU is the plain mean over all classes. The official Cityscapes tool
  instead skips such classes (NaN) in its mean; the two agree whenever every class occurs in the
  ground truth, as in the full val split. :func:`official_miou` runs the official tool for comparison.

Scores are fractions in [0, 1]; tables print them in percent.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 19,
                     ignore: int = 255) -> torch.Tensor:
    """The ``[num_classes, num_classes]`` int64 confusion matrix (``conf[gt, pred]``) of one batch.

    ``pred`` and ``target`` hold class ids of the same shape (any integer dtype). Pixels with
    ``target == ignore`` are skipped. Any other id outside ``[0, num_classes)`` is an error rather than
    being dropped, because it means the labels were not mapped to trainIds. Runs on the tensors' device
    with one ``bincount``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    target = target.to(device=pred.device, dtype=torch.int64)
    pred = pred.to(torch.int64)
    keep = target != ignore
    t = target[keep]
    p = pred[keep]
    # One combined check keeps it to a single device->host sync per batch.
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bool(bad.any()):
        raise ValueError(
            f"class ids outside [0, {num_classes}) other than ignore={ignore}: labels "
            f"{torch.unique(t[(t < 0) | (t >= num_classes)]).tolist()[:10]}, predictions "
            f"{torch.unique(p[(p < 0) | (p >= num_classes)]).tolist()[:10]}; labels must be trainIds"
        )
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates :func:`confusion_matrix` over a split, on the device of the first update."""

    def __init__(self, num_classes: int = 19, ignore: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore = ignore
        self.mat: torch.Tensor | None = None

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions and labels (same shape, class ids)."""
        batch = confusion_matrix(pred, target, self.num_classes, self.ignore)
        self.mat = batch if self.mat is None else self.mat + batch

    def value(self) -> torch.Tensor:
        """The accumulated matrix on the CPU (zeros before any update)."""
        if self.mat is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self.mat.cpu()


def iou_from_confusion(conf: torch.Tensor, class_names: Sequence[str] | None = None) -> dict:
    """Per-class IoU, mIoU and accuracies from a ``conf[gt, pred]`` matrix.

    Returns ``{"miou", "pixel_accuracy", "mean_accuracy", "iou": [per class], "per_class_iou": {name: iou},
    "present": [class occurs in the ground truth], "confusion_matrix": [[int]]}``. ``miou`` averages all
    classes with ``tp / max(1, row + col - tp)`` (absent classes count 0, as the original);
    ``mean_accuracy`` averages ``tp / max(1, row)`` the same way; ``pixel_accuracy`` is
    ``trace / max(1, total)``.
    """
    conf = torch.as_tensor(conf).to(torch.float64).cpu()
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {tuple(conf.shape)}")
    n = conf.shape[0]
    if class_names is None:
        class_names = [str(i) for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}-class confusion matrix")
    tp = conf.diagonal()
    gt_count = conf.sum(dim=1)
    pred_count = conf.sum(dim=0)
    iou = tp / (gt_count + pred_count - tp).clamp(min=1)
    class_acc = tp / gt_count.clamp(min=1)
    return {
        "miou": float(iou.mean()),
        "pixel_accuracy": float(tp.sum() / conf.sum().clamp(min=1)),
        "mean_accuracy": float(class_acc.mean()),
        "iou": [float(v) for v in iou],
        "per_class_iou": {name: float(v) for name, v in zip(class_names, iou)},
        "present": [bool(v > 0) for v in gt_count],
        "confusion_matrix": conf.to(torch.int64).tolist(),
    }


def format_table(metrics: dict) -> str:
    """A plain-text table of the per-class IoU (percent), then mIoU and pixel accuracy."""
    names = list(metrics["per_class_iou"])
    width = max(len("mIoU"), *(len(n) for n in names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, iou, present in zip(names, metrics["iou"], metrics["present"]):
        mark = "" if present else "  (not in ground truth)"
        lines.append(f"{name:<{width}}  {100 * iou:7.2f}{mark}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * metrics['miou']:7.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * metrics['pixel_accuracy']:7.2f}")
    lines.append(f"{'mean acc':<{width}}  {100 * metrics['mean_accuracy']:7.2f}")
    return "\n".join(lines)


def official_miou(pred_label_id_pngs: Sequence[str | Path], gt_label_id_pngs: Sequence[str | Path]) -> dict:
    """Score labelId PNGs with the official ``cityscapesscripts`` pixel-level evaluator.

    ``pred_label_id_pngs[i]`` is compared with ``gt_label_id_pngs[i]`` (``*_gtFine_labelIds.png``).
    Returns ``{"miou": averageScoreClasses, "per_class_iou": {name: IoU or NaN}, "num_images"}`` for the
    19 evaluated classes; the official tool gives NaN to a class absent from both ground truth and
    prediction and leaves it out of its mean. Instance scores and pixel accuracy are switched off: both
    call ``np.in1d``, which NumPy 2.4 removed. Raises RuntimeError if the tool rejects the files (it
    reports by exiting, which is turned into an exception here).
    """
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
        from cityscapesscripts.helpers.labels import labels as cs_labels
    except ImportError as exc:  # pragma: no cover - installed in this project's environment
        raise RuntimeError("the official check needs cityscapesscripts: pip install cityscapesscripts") from exc
    preds = [str(p) for p in pred_label_id_pngs]
    gts = [str(g) for g in gt_label_id_pngs]
    if len(preds) != len(gts) or not preds:
        raise ValueError(f"need equally many predictions and ground truths, got {len(preds)} and {len(gts)}")
    for path in preds + gts:
        if not Path(path).is_file():
            raise FileNotFoundError(f"official check: {path} does not exist")
    # A copy, so the module-level defaults other code may rely on stay untouched.
    args = copy.copy(official.args)
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False  # otherwise it writes a JSON into site-packages
    args.quiet = True
    args.colorized = False
    args.bold = args.nocol = ""
    try:
        result = official.evaluateImgLists(preds, gts, args)
    except SystemExit as exc:  # printError() exits the interpreter
        raise RuntimeError(f"cityscapesscripts rejected the files (exit {exc.code}); see the message above") from exc
    evaluated = [lab.name for lab in cs_labels if lab.id >= 0 and not lab.ignoreInEval]
    per_class = {name: float(result["classScores"][name]) for name in evaluated}
    miou = float(result["averageScoreClasses"])
    return {"miou": miou, "per_class_iou": per_class, "num_images": len(preds),
            "nan_classes": [n for n, v in per_class.items() if math.isnan(v)]}

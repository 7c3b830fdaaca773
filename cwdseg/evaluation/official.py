"""Cross-check of our scores with the official cityscapesscripts evaluator on the written labelId PNGs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from cwdseg.evaluation.loop import EvaluationError
from cwdseg.evaluation.metrics import official_miou


def run_official_check(results: dict, samples: Sequence[Any]) -> dict:
    """Score the written labelId PNGs with cityscapesscripts and compare with ``results`` (val only).

    Returns ``{"official_miou", "ours_miou", "ours_miou_scored_classes", "max_class_diff",
    "per_class_iou": {name: official or None}}``. The official tool leaves out (NaN) classes absent from
    ground truth and prediction; ``ours_miou_scored_classes`` averages ours over the classes it scores.
    """
    if results["outputs"] is None:
        raise EvaluationError("--official-check needs the labelId PNGs: pass --save-dir")
    label_dir = Path(results["outputs"]["label_ids"])
    preds, gts = [], []
    for sample in samples:
        if sample.label is None:
            raise EvaluationError(f"{sample.name} has no ground-truth file; the official check needs the val labels")
        preds.append(label_dir / f"{sample.name}_leftImg8bit.png")
        gts.append(sample.label)
    official = official_miou(preds, gts)
    scored = [name for name, v in official["per_class_iou"].items() if not math.isnan(v)]
    ours = results["per_class_iou"]
    diffs = [abs(ours[name] - official["per_class_iou"][name]) for name in scored]
    return {
        "official_miou": official["miou"],
        "ours_miou": results["miou"],
        "ours_miou_scored_classes": sum(ours[n] for n in scored) / len(scored) if scored else None,
        "max_class_diff": max(diffs) if diffs else 0.0,
        "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in official["per_class_iou"].items()},
        "unscored_classes": official["nan_classes"],
    }

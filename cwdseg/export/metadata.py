"""What an export records, and where it comes from: a training run folder or a released weight file.

A **run folder** (``ckpt/<NAME>/`` of ``train.py``) gives ``config.json`` (the recipe), ``eval.json``
(the final-iteration val evaluation, with the path of the student it scored) and, with
``--save-best True``, ``best_val_G.pth`` + ``best_val.json``. A **file** (a released checkpoint or any
student ``.pth``) may come with an ``evaluate.py`` ``results.json`` or an ``eval.json`` (``--eval-json``).

The selection label is never guessed upward: final-iteration weights are labelled ``final-iteration``;
best-on-val weights ``best-val (chosen on the val set: optimistic)``; a file with no evaluation record of
how it was chosen is ``unknown``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cwdseg.data.labels import CLASS_NAMES, TRAIN_ID_COLORS
from cwdseg.data.transforms import Normalization
from cwdseg.export.normalization import to_dict

FINAL, BEST_VAL = "final-iteration", "best-val (chosen on the val set: optimistic)"
SELECTIONS = ("final", "best-val")
# config.json keys that make up the training recipe (the rest are paths, runtime and logging settings).
RECIPE_KEYS = ("input_size", "batch_size", "grad_accum", "num_steps", "lr_g", "lr_d", "momentum", "weight_decay",
               "power", "seed", "random_mirror", "random_scale", "cwd", "cwd_feat", "norm_type", "divergence",
               "temperature", "lambda_cwd", "cwd_ignore_mask", "kd", "lambda_kd", "adv", "lambda_adv", "lambda_d",
               "lambda_gp", "teacher_arch", "T_ckpt_path", "is_student_load_imgnet", "student_pretrain_model_imgnet",
               "amp", "world_size", "code_version", "torch_version", "save_name")


class ExportSourceError(RuntimeError):
    """The run folder or file to export is missing something, said with what to do."""


@dataclass
class ExportSource:
    """The weights to export and what is known about them."""

    weights: Path
    name: str
    selection: str
    config: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportSourceError(f"{path}: cannot read the {what} ({exc})") from None
    if not isinstance(data, dict):
        raise ExportSourceError(f"{path}: the {what} is not a JSON object")
    return data


def _final_student(run_dir: Path) -> Path:
    found = []
    for p in run_dir.glob("city_*_G.pth"):
        m = re.fullmatch(r"city_(\d+)_G\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise ExportSourceError(f"{run_dir}: no final student city_<step>_G.pth in the run folder (has training "
                                f"finished?); pass the .pth file itself to export another file")
    return max(found)[1]


def resolve_source(source: str | Path, select: str = "final", eval_json: str | Path | None = None,
                   config_json: str | Path | None = None) -> ExportSource:
    """The weights, recipe, evaluation and honest selection label of a run folder or a weight file."""
    if select not in SELECTIONS:
        raise ExportSourceError(f"select must be one of {SELECTIONS}, got {select!r}")
    source = Path(source)
    if not source.exists():
        raise ExportSourceError(f"{source}: no such run folder or file")
    config = _read_json(Path(config_json), "config") if config_json else None
    evaluation = _read_json(Path(eval_json), "evaluation") if eval_json else None
    if source.is_dir():
        if config is None and (source / "config.json").is_file():
            config = _read_json(source / "config.json", "run config")
        if select == "best-val":
            weights = source / "best_val_G.pth"
            if not weights.is_file():
                raise ExportSourceError(f"{source}: no best_val_G.pth (the run was trained without --save-best "
                                        f"True); export the final student instead (--select final)")
            if evaluation is None and (source / "best_val.json").is_file():
                evaluation = _read_json(source / "best_val.json", "best-val evaluation")
            selection = BEST_VAL
        else:
            if evaluation is None and (source / "eval.json").is_file():
                evaluation = _read_json(source / "eval.json", "final evaluation")
            scored = Path(evaluation["checkpoint"]) if evaluation and evaluation.get("checkpoint") else None
            weights = scored if scored is not None and scored.is_file() else _final_student(source)
            if scored is not None and scored.name != weights.name:
                raise ExportSourceError(f"{source}/eval.json scored {scored}, which is not in the folder")
            selection = FINAL
        name = (config or {}).get("save_name") or source.name
        src = ExportSource(weights, str(name), selection, config, evaluation)
        if evaluation is None:
            src.notes.append("no eval.json in the run folder: the model card has no val numbers")
        return src
    label = (evaluation or {}).get("selection")
    selection = BEST_VAL if label and str(label).startswith("best-val") else FINAL if label == FINAL else "unknown"
    src = ExportSource(source, source.stem, selection, config, evaluation)
    if selection == "unknown":
        src.notes.append("how these weights were chosen is not recorded (released file?): selection 'unknown'")
    return src


def class_table(class_names: Sequence[str] = CLASS_NAMES, colors: np.ndarray | Sequence = TRAIN_ID_COLORS) -> list[dict]:
    """``[{"id", "name", "color": [r, g, b]}]``, the classes and their RGB colours in train-id order."""
    colors = np.asarray(colors)
    if len(class_names) != len(colors):
        raise ValueError(f"{len(class_names)} class names but {len(colors)} colours")
    return [{"id": i, "name": str(n), "color": [int(c) for c in colors[i]]} for i, n in enumerate(class_names)]


def evaluation_summary(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The numbers an export carries from an ``eval.json`` / ``results.json``: mIoU, per-class IoU, protocol."""
    if not evaluation or evaluation.get("miou") is None:
        return None
    keep = ("miou", "pixel_accuracy", "mean_accuracy", "per_class_iou", "num_images", "split", "settings", "step",
            "selection")
    return {k: evaluation[k] for k in keep if k in evaluation}


def build_metadata(arch: str, num_classes: int, source: ExportSource, normalization: Normalization,
                   classes: list[dict], params: int, gmacs: dict[str, float]) -> dict[str, Any]:
    """The metadata JSON of an export (also stored inside the ONNX and safetensors files)."""
    recipe = {k: source.config[k] for k in RECIPE_KEYS if source.config and k in source.config} or None
    return {
        "format_version": 1,
        "name": source.name,
        "arch": arch,
        "num_classes": num_classes,
        "classes": classes,
        "normalization": to_dict(normalization),
        "output": "logits [N, num_classes, h, w] at the network's output stride (PSPNet: 65x65 for 512x512); upsample "
                  "bilinearly (align_corners=True) to the image size and take the argmax over classes",
        "selection": source.selection,
        "source_weights": str(source.weights),
        "recipe": recipe,
        "data": {k: source.config.get(k) for k in ("data_dir", "data_list", "num_classes", "ignore_label")}
        if source.config else None,
        "val": evaluation_summary(source.evaluation),
        "parameters": params,
        "gmacs": gmacs,
        "notes": source.notes,
    }

"""What an export records, and where it comes from: a training run folder or a released weight file.

A **run folder** (``ckpt/<NAME>/`` of ``train.py``) gives ``config.json`` (the run configuration), ``eval.json``
(the final-iteration val evaluation, with the path of the student it scored) and, with
``--save-best True``, ``best_val_G.pth`` + ``best_val.json``. A **file** (a released checkpoint or any
student ``.pth``) may come with an ``evaluate.py`` ``results.json`` or an ``eval.json`` (``--eval-json``);
a student file written by the toolkit carries its run configuration itself. Everything the export and
its model card say about training comes from that one configuration (``cwdseg.config``).

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

from cwdseg.checkpoint import CheckpointError, load_state_dict_file, student_metadata
from cwdseg.config import CONFIG_FORMAT
from cwdseg.data.labels import CLASS_NAMES, TRAIN_ID_COLORS
from cwdseg.data.transforms import Normalization
from cwdseg.export.normalization import to_dict
from cwdseg.models import output_size

FINAL, BEST_VAL = "final-iteration", "best-val (chosen on the val set: optimistic)"
SELECTIONS = ("final", "best-val")

class ExportSourceError(RuntimeError):
    """The run folder or file to export is missing something, said with what to do."""


@dataclass
class ExportSource:
    """The weights to export and what is known about them."""

    weights: Path
    name: str
    selection: str
    config: dict[str, Any] | None = None       # the run configuration (cwdseg.config.to_dict)
    evaluation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Any] | None = None       # the run's weight files by digest (config.json)
    student: dict[str, Any] | None = None      # the toolkit metadata of the weight file, when it has it


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
    for p in run_dir.glob("*_G.pth"):
        m = re.fullmatch(r"[a-z0-9_]+?_(\d+)_G\.pth", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise ExportSourceError(f"{run_dir}: no final student <dataset>_<step>_G.pth in the run folder (has "
                                f"training finished?); pass the .pth file itself to export another file")
    return max(found)[1]


def _run_record(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(config, inputs)`` of a run's config.json."""
    record = _read_json(path, "run config")
    if record.get("format") != CONFIG_FORMAT:
        raise ExportSourceError(f"{path}: not a config.json of this toolkit's runs (no format {CONFIG_FORMAT!r}); "
                                "export the weight file alone")
    return record.get("config"), record.get("inputs")


def _student_meta(weights: Path) -> dict[str, Any] | None:
    try:
        return student_metadata(load_state_dict_file(weights))
    except CheckpointError:
        return None  # the loader reports an unreadable file with its own message


def resolve_source(source: str | Path, select: str = "final", eval_json: str | Path | None = None,
                   config_json: str | Path | None = None) -> ExportSource:
    """The weights, recipe, evaluation and honest selection label of a run folder or a weight file."""
    if select not in SELECTIONS:
        raise ExportSourceError(f"select must be one of {SELECTIONS}, got {select!r}")
    source = Path(source)
    if not source.exists():
        raise ExportSourceError(f"{source}: no such run folder or file")
    config, inputs = _run_record(Path(config_json)) if config_json else (None, None)
    evaluation = _read_json(Path(eval_json), "evaluation") if eval_json else None
    if source.is_dir():
        if config is None and (source / "config.json").is_file():
            config, inputs = _run_record(source / "config.json")
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
        name = (config or {}).get("output", {}).get("name") or source.name
        src = ExportSource(weights, str(name), selection, config, evaluation, inputs=inputs,
                           student=_student_meta(weights))
        if evaluation is None:
            src.notes.append("no eval.json in the run folder: the model card has no val numbers")
        return src
    label = (evaluation or {}).get("selection")
    selection = BEST_VAL if label and str(label).startswith("best-val") else FINAL if label == FINAL else "unknown"
    student = _student_meta(source)
    if config is None and student is not None:
        config = student.get("config")
    src = ExportSource(source, source.stem, selection, config, evaluation, student=student)
    if selection == "unknown":
        src.notes.append("how these weights were chosen is not recorded (released file?): selection 'unknown'")
    return src


def class_table(class_names: Sequence[str] = CLASS_NAMES,
                colors: np.ndarray | Sequence = TRAIN_ID_COLORS) -> list[dict]:
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


def training_record(source: ExportSource) -> dict[str, Any] | None:
    """What the export says about how the weights were trained, all from the run configuration:
    the distillation terms with their weights and options, the pair and its files (by digest), the data
    and its classes, the crop and schedule, and the evaluation protocol."""
    cfg = source.config
    if not cfg:
        return None
    data, models, optim, distill = cfg["data"], cfg["models"], cfg["optim"], cfg["distill"]
    inputs = source.inputs or {}
    return {
        "distillation": {"preset": distill.get("preset"), "terms": distill.get("terms", {})},
        "teacher": {"arch": models["teacher_arch"], "file": (inputs.get("teacher") or {}).get("path"),
                    "sha256": (inputs.get("teacher") or {}).get("sha256")} if distill.get("terms") else None,
        "student": {"arch": models["student_arch"], "init": models["student_init"],
                    "init_sha256": (inputs.get("student_init") or {}).get("sha256"),
                    "normalization": models["student_normalization"]},
        "data": {"dataset": data["dataset"], "root": data["root"], "train_list": data["train_list"],
                 "num_classes": data["num_classes"], "ignore_label": data["ignore_label"],
                 "crop_size": data["crop_size"], "random_scale": data["random_scale"],
                 "random_mirror": data["random_mirror"]},
        "schedule": {k: optim[k] for k in ("optimizer", "lr", "momentum", "weight_decay", "power", "head_lr_mult",
                                           "warmup_steps", "batch_size", "grad_accum", "num_steps", "seed")},
        "evaluation": "the run's own val evaluation: whole image at native size, batch 1, no flip, one scale",
        "run": cfg["output"]["name"],
    }


def build_metadata(arch: str, num_classes: int, source: ExportSource, normalization: Normalization,
                   classes: list[dict], params: int, gmacs: dict[str, float]) -> dict[str, Any]:
    """The metadata JSON of an export (also stored inside the ONNX and safetensors files)."""
    out_h, out_w = output_size(arch, (512, 512))
    return {
        "format_version": 2,
        "name": source.name,
        "arch": arch,
        "num_classes": num_classes,
        "classes": classes,
        "normalization": to_dict(normalization),
        "output": f"logits [N, num_classes, h, w] at the network's output stride ({arch}: {out_h}x{out_w} for a "
                  "512x512 input); upsample bilinearly (align_corners=True) to the image size and take the argmax "
                  "over classes",
        "selection": source.selection,
        "source_weights": str(source.weights),
        "training": training_record(source),
        "config": source.config,
        "val": evaluation_summary(source.evaluation),
        "parameters": params,
        "gmacs": gmacs,
        "notes": source.notes,
    }

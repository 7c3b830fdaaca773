"""The evaluation loop: load a checkpoint's network, build the full-resolution split, predict and score.

``evaluate_model`` is the same loop for an already-built model (the training run's final evaluation).
"""
from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cwdseg.checkpoint import infer_arch, load_network, load_state_dict_file, student_metadata
from cwdseg.data import build_loader
from cwdseg.data.labels import CLASS_NAMES, NUM_CLASSES
from cwdseg.data.registry import build_dataset, dataset_info
from cwdseg.data.transforms import NORMALIZATIONS, Normalization
from cwdseg.engine.precision import amp_dtype
from cwdseg.evaluation.inference import input_size_error, parse_overlap, predict_logits, tile_stride
from cwdseg.evaluation.metrics import ConfusionMatrix, iou_from_confusion
from cwdseg.evaluation.writers import (
    COLOR_DIR,
    LABEL_ID_DIR,
    SUBMISSION_ZIP,
    TRAIN_ID_DIR,
    write_predictions,
    write_submission_zip,
)
from cwdseg.models import NORMALIZATION, arch_spec, build_model, canonical_arch

SPLITS = ("val", "test")


class EvaluationError(RuntimeError):
    """A problem with the evaluation inputs (arguments, files, split), with what to do about it."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A network read from a file, with what is known about it: from the toolkit's own metadata
    (``meta`` not None), else from the file's keys and the caller's flags."""

    model: nn.Module
    arch: str
    num_classes: int
    normalization: str               # a name of cwdseg.data.transforms.NORMALIZATIONS
    dataset: str | None              # the dataset it was trained on, when the file says
    class_names: tuple[str, ...] | None
    class_colors: tuple[tuple[int, int, int], ...] | None
    meta: dict | None                # the toolkit's student metadata (None: a foreign file)


def load_model_file(path: str | Path, arch: str | None = None, num_classes: int | None = None,
                    dataset: str | None = None) -> LoadedModel:
    """Build the network a checkpoint file holds and load it (strict).

    A student file written by the toolkit names its architecture, classes and input normalisation
    (``cwdseg.checkpoint.student_metadata``); a given ``arch``/``num_classes`` that contradicts it is an
    error. Foreign files (the original's, CIRKD's) are recognised by their keys
    (``cwdseg.checkpoint.infer_arch``), with ``num_classes`` from the caller (else ``dataset``'s count,
    else 19) and the architecture's normalisation. Every architecture loads through one strict loader
    (``cwdseg.checkpoint.load_network``), which knows each registered layout.
    """
    path = Path(path)
    if not path.is_file() and not (path.is_dir() and (path / "config.json").is_file()):  # or a Hugging Face folder
        what = "is a folder, not a weight file" if path.is_dir() else "no such file"
        raise EvaluationError(f"--restore-from {path}: {what}; download the released checkpoints listed "
                              f"in README.md into ckpt/ or point the flag at your own file")
    state = load_state_dict_file(path)
    meta = student_metadata(state)
    found = meta["arch"] if meta else infer_arch(state)
    if arch is not None:
        try:
            wanted = canonical_arch(arch)
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
        if wanted != found:
            raise EvaluationError(f"{path} holds a {found} network, not {wanted}; drop --arch (it is "
                                  f"{'recorded in' if meta else 'inferred from'} the file) or pass --arch {found}")
    if meta and num_classes is not None and num_classes != meta["num_classes"]:
        raise EvaluationError(f"{path} was trained with {meta['num_classes']} classes ({meta['dataset']}), not "
                              f"{num_classes}; drop --num-classes (the file records it)")
    if meta:
        classes = meta["num_classes"]
    else:
        classes = num_classes or (dataset_info(dataset).num_classes if dataset and dataset != "folder" else NUM_CLASSES)
    model = build_model(found, num_classes=classes)
    load_network(model, path)
    return LoadedModel(
        model, found, classes, meta["normalization"] if meta else NORMALIZATION[found],
        meta.get("dataset") if meta else None,
        tuple(meta["class_names"]) if meta else None,
        tuple(tuple(c) for c in meta["class_colors"]) if meta else None, meta)


def load_model(path: str | Path, arch: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, str]:
    """``(model, arch)`` of :func:`load_model_file`."""
    loaded = load_model_file(path, arch, num_classes)
    return loaded.model, loaded.arch


def checkpoint_normalization(arch: str, override: str | None = None) -> Normalization:
    """The input normalisation for a network of ``arch``: ``override`` (a name of
    ``cwdseg.data.transforms.NORMALIZATIONS``) when given, else the one its weights were trained with
    (``cwdseg.models.NORMALIZATION``)."""
    name = override if override is not None else NORMALIZATION[arch]
    if name not in NORMALIZATIONS:
        raise EvaluationError(f"unknown normalisation {name!r} for {arch_spec(arch).label}; "
                              f"valid: {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


def build_eval_dataset(data_dir: str | Path, split: str = "val", data_list: str | None = None,
                       max_images: int | None = None, ignore_label: int = 255, dataset: str = "cityscapes",
                       short_side: int | None = None, normalization: Normalization | None = None) -> Dataset:
    """The full-resolution (no crop) split of ``dataset`` (a ``cwdseg.data.registry`` name), optionally
    only its first ``max_images`` images, normalised as ``normalization`` says (default: the dataset's,
    the original's Caffe BGR).

    Returns the dataset (``CityscapesDataset`` for cityscapes) or a ``Subset`` of it, with a ``samples``
    attribute listing the images it yields, in order. ``short_side``: resize each image so that its short
    side is ``short_side`` (mmsegmentation's ADE20K/VOC test resize; not for cityscapes); labels stay at
    full resolution and the loop resizes the logits back to them.
    """
    if split not in SPLITS:
        raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    name = dataset
    extra = {}
    if short_side is not None:
        if name == "cityscapes":
            raise EvaluationError("--short-side is for the other datasets; Cityscapes is evaluated at 1024x2048")
        extra["eval_short_side"] = short_side
    if normalization is not None:
        extra["normalization"] = normalization
    dataset = build_dataset(name, str(data_dir), split, data_list, crop_size=None, ignore_label=ignore_label, **extra)
    if len(dataset) == 0:
        raise EvaluationError(f"the {split} split of {data_dir} has no images"
                              + (f" (list {data_list})" if data_list else "") + "; check --data-dir / --data-list")
    if max_images is not None:
        if max_images < 1:
            raise EvaluationError(f"--max-images must be at least 1, got {max_images}")
        if max_images < len(dataset):
            subset = torch.utils.data.Subset(dataset, range(max_images))
            subset.samples = dataset.samples[:max_images]  # type: ignore[attr-defined]
            if hasattr(dataset, "info"):
                subset.info = dataset.info  # type: ignore[attr-defined]
                subset.eval_short_side = dataset.eval_short_side  # type: ignore[attr-defined]
            return subset
    return dataset


def build_eval_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 2) -> DataLoader:
    """An in-order loader over ``dataset`` with worker processes (``cwdseg.data.cityscapes.build_loader``)."""
    return build_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)


def _as_amp_dtype(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    try:
        return amp_dtype(amp, device)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None

def evaluate_model(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int = NUM_CLASSES,
    mode: str = "whole",
    tile: Sequence[int] = (512, 512),
    overlap: float | str = 1 / 3,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    device: str | torch.device | None = None,
    amp: str | torch.dtype | None = "none",
    save_dir: str | Path | None = None,
    split: str = "val",
    progress: bool = True,
    tile_batch: int = 6,
    info=None,
) -> dict[str, Any]:
    """Predict every batch ``(image, label, name)`` of ``loader`` and score it; returns the results dict.

    The model is put in eval mode for the loop (its previous mode is restored). Predictions are the
    argmax of :func:`cwdseg.evaluation.inference.predict_logits`, computed on ``device`` (default: the
    model's); the confusion matrix accumulates there too. On Cityscapes' ``split="test"`` the labels are
    dummies, so no metrics are computed (``miou`` etc. are None); other datasets' test labels are scored.
    With ``save_dir`` the prediction PNGs
    are written (see :func:`cwdseg.evaluation.writers.write_predictions`) and, for test,
    ``submission.zip``; ``results.json`` is left to the caller. Scores are fractions in [0, 1].
    ``info`` (a :class:`cwdseg.data.info.DatasetInfo`; default: the loader's dataset's, else Cityscapes)
    gives the class names of the results and the colours of the pictures.
    """
    if info is None:
        info = getattr(getattr(loader, "dataset", None), "info", None)
    if info is not None and info.num_classes != num_classes:
        raise EvaluationError(f"{info.name} has {info.num_classes} classes but num_classes={num_classes}; "
                              f"pass --num-classes {info.num_classes} (or leave it out)")
    if split not in SPLITS:
        raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    if mode not in ("whole", "sliding"):
        raise EvaluationError(f"mode must be 'whole' or 'sliding', got {mode!r}")
    device = torch.device(device if device is not None else next(model.parameters()).device)
    protocol = dict(mode=mode, tile=tuple(tile), overlap=parse_overlap(overlap), scales=tuple(scales), flip=flip,
                    num_classes=num_classes, tile_batch=tile_batch, amp_dtype=_as_amp_dtype(amp, device))
    save_path = Path(save_dir).resolve() if save_dir is not None else None
    short_side = getattr(loader.dataset, "eval_short_side", None)
    # Only Cityscapes' test labels are dummies (predictions go to its server); CamVid's test split, which
    # CIRKD's eval.py scores, has real labels and is scored like val.
    role = "test" if split == "test" and not has_test_labels(info) else "val"
    conf, label_pngs, num_images, seconds = _predict_split(model.to(device), loader, protocol, device, save_path,
                                                           role, progress, info, short_side is not None)
    results = _report(conf, label_pngs, num_images, seconds, protocol, save_path, role, device, loader.batch_size,
                      None if info is None else list(info.class_names))
    results["split"] = split
    if info is not None:
        results["dataset"] = info.name
    if short_side is not None:
        results["settings"]["short_side"] = short_side
    return results


def has_test_labels(info) -> bool:
    """Whether the test split of the dataset ``info`` describes (None: Cityscapes) has real labels."""
    return info is not None and info.name != "cityscapes"


def _predict_split(model: nn.Module, loader: DataLoader, protocol: dict, device: torch.device,
                   save_path: Path | None, split: str, progress: bool, info=None, to_label_size: bool = False):
    """The loop: predict, accumulate the confusion matrix, write PNGs. Returns what the report needs."""
    conf = ConfusionMatrix(protocol["num_classes"])
    dataset = loader.dataset
    normalization = getattr(dataset, "normalization", getattr(getattr(dataset, "dataset", None), "normalization", None))
    label_pngs: list[Path] = []
    num_images = 0
    was_training = model.training
    model.eval()
    bar = progress_bar(len(loader.dataset), f"eval {split}", progress)
    start = time.perf_counter()
    try:
        for batch in loader:
            image, label, names = batch[0], batch[1], batch[2]
            error = input_size_error(image.shape[-2], image.shape[-1], protocol["scales"], protocol["mode"],
                                     protocol["tile"])
            if error:
                raise EvaluationError(f"{names[0]}: {error}")
            image = image.to(device, non_blocking=True)
            logits = predict_logits(model, image, **protocol)
            if to_label_size:  # resized inputs: scored at the labels' full resolution (mmsegmentation's order)
                logits = torch.nn.functional.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear",
                                                         align_corners=False)
            pred = logits.argmax(dim=1)  # only the [N,H,W] ids leave the device
            if split != "test":
                if tuple(label.shape) != tuple(pred.shape):
                    raise EvaluationError(f"label of {names[0]} is {tuple(label.shape)[1:]} but the image gives "
                                          f"{tuple(pred.shape)[1:]}; labels must be at full image resolution")
                conf.update(pred, label.to(device, non_blocking=True))
            if save_path is not None:
                label_pngs += write_predictions(pred, names, save_path, split, images=batch[0], labels=label,
                                                info=info, normalization=normalization)
            num_images += image.shape[0]
            bar.update(image.shape[0])
            bar.set_postfix(img_per_s=f"{num_images / (time.perf_counter() - start):.2f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        bar.close()
        model.train(was_training)
    if num_images == 0:
        raise EvaluationError("the loader yielded no images; the split is empty")
    return conf, label_pngs, num_images, time.perf_counter() - start


class _PlainProgress:
    """Progress as whole lines (about every tenth of the total) for logs, where a bar's carriage
    returns pile up; the same update/set_postfix/close calls as tqdm."""

    def __init__(self, total: int, desc: str, unit: str = "images") -> None:
        self.step = max(1, total // 10) if total else 100  # an unknown total (some videos): every 100
        self.total, self.desc, self.n, self.postfix, self.next_at, self.unit = total, desc, 0, "", self.step, unit

    def update(self, n: int) -> None:
        self.n += n
        if self.n >= self.next_at and (not self.total or self.n < self.total):
            self._print()
            self.next_at = self.n + self.step

    def set_postfix(self, **values: str) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _print(self) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        print(f"{self.desc}: {done} {self.unit}" + (f" ({self.postfix})" if self.postfix else ""),
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.n:
            self._print()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "images"):
    """A tqdm bar on a terminal, plain lines otherwise (a log file), nothing when disabled."""
    if enabled and not sys.stderr.isatty():
        return _PlainProgress(total, desc, unit)
    return tqdm(total=total or None, unit=unit, disable=not enabled, desc=desc, dynamic_ncols=True)


def _report(conf: ConfusionMatrix, label_pngs: list[Path], num_images: int, seconds: float, protocol: dict,
            save_path: Path | None, split: str, device: torch.device, batch_size: int | None,
            class_names: list[str] | None = None) -> dict[str, Any]:
    """The results dict: metrics (none on test), the protocol's settings, timing, and where outputs went."""
    num_classes = protocol["num_classes"]
    if split == "test":
        metrics: dict[str, Any] = {k: None for k in ("miou", "pixel_accuracy", "mean_accuracy", "iou",
                                                      "per_class_iou", "present", "confusion_matrix")}
    else:
        if class_names is None:
            class_names = list(CLASS_NAMES) if num_classes == NUM_CLASSES else [str(i) for i in range(num_classes)]
        metrics = iou_from_confusion(conf.value(), class_names)
    # Fractions stay under their historical keys (every reader knows them); the same scores in percent,
    # the unit every printed number uses, sit beside them under keys that name it.
    metrics.update({f"{key}_percent": None if metrics[key] is None else 100 * metrics[key]
                    for key in ("miou", "pixel_accuracy", "mean_accuracy")})
    outputs = None
    if save_path is not None:
        outputs = {"dir": str(save_path), "label_ids": str(save_path / LABEL_ID_DIR)}
        if split == "test":
            outputs["zip"] = str(write_submission_zip(label_pngs, save_path / SUBMISSION_ZIP))
        else:
            outputs.update(color=str(save_path / COLOR_DIR), train_ids=str(save_path / TRAIN_ID_DIR))
    dtype = protocol["amp_dtype"]
    tile, overlap = protocol["tile"], protocol["overlap"]
    return {
        "split": split,
        "num_images": num_images,
        **metrics,
        "settings": {
            "mode": protocol["mode"], "tile": list(tile), "overlap": overlap,
            "stride": list(tile_stride(tile, overlap)), "tile_batch": protocol["tile_batch"],
            "scales": list(protocol["scales"]), "flip": protocol["flip"],
            "amp": "none" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
            "num_classes": num_classes, "batch_size": batch_size,
        },
        "seconds": seconds,
        "images_per_s": num_images / seconds,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_version": torch.__version__,
        "outputs": outputs,
    }

"""Evaluate a PSPNet checkpoint on Cityscapes val (mIoU) or predict the test split for the server.

The defaults are the protocol of every published number of the original code ("singleAndWhole"):
the whole 1024x2048 image in one forward, one scale, no flip, fp32.

    python evaluate.py --data-dir data/cityscapes --restore-from ckpt/new_rn18-cityscape_singleAndWhole_val-75.02_test-73.86.pth
    python evaluate.py --data-dir D --restore-from ckpt/teacher_city.pth --save-dir outputs/teacher --official-check
    python evaluate.py --data-dir D --restore-from CKPT --split test --save-dir outputs/test   # -> submission zip
    python evaluate.py ... --mode sliding --tile 512 512 --overlap 1/3 --scales 0.75 1.0 1.25 --flip

The architecture is read from the checkpoint's keys (``--arch`` only double-checks it). With
``--save-dir`` it writes ``results.json`` and the predictions: for val colour PNGs (official Cityscapes
palette), trainId PNGs and labelId PNGs; for test labelId PNGs named ``<city>_<seq>_<frame>_leftImg8bit.png``
and ``submission.zip`` of them. ``evaluate_model`` is the same loop for an already-built model (train.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import IMG_MEAN_BGR, CityscapesDataset, DatasetError, build_loader
from dataset.labels import CLASS_NAMES, NUM_CLASSES
from networks import build_model
from utils.checkpoint import CheckpointError, infer_arch, load_state_dict_file, load_student, load_teacher
from utils.distributed import AMP_CHOICES, AMP_DTYPES, DeviceError, resolve_amp, resolve_device
from utils.inference import parse_overlap, predict_logits, tile_stride
from utils.metrics import ConfusionMatrix, format_table, iou_from_confusion, official_miou
from utils.visualize import image_from_network_input, save_color_png, save_label_id_png, save_panel, save_train_id_png

SPLITS = ("val", "test")
# Sub-folders of --save-dir; labelIds/ alone is what the official evaluator or the server should read.
COLOR_DIR, TRAIN_ID_DIR, LABEL_ID_DIR, PANEL_DIR = "color", "trainIds", "labelIds", "panels"
SUBMISSION_ZIP = "submission.zip"


class EvaluationError(RuntimeError):
    """A problem with the evaluation inputs (arguments, files, split), with what to do about it."""


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------
def _overlap_arg(value: str) -> float:
    try:
        return parse_overlap(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of evaluate.py (reusable by other scripts through ``parents=``)."""
    p = argparse.ArgumentParser(description="Evaluate a PSPNet checkpoint on Cityscapes", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True, help="Cityscapes root (holds leftImg8bit/ and gtFine/)")
    g.add_argument("--split", choices=SPLITS, default="val", help="val: mIoU; test: labelId PNGs for the server")
    g.add_argument("--data-list", default=None,
                   help="list file of the split (image<TAB>label per line); default: scan the split folder")
    g.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images (quick checks)")
    g.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=NUM_CLASSES,
                   help="number of classes of the network")
    g = p.add_argument_group("model")
    g.add_argument("--restore-from", required=True, help="checkpoint file (released student/teacher or ours)")
    g.add_argument("--arch", choices=("resnet18", "resnet101"), default=None,
                   help="network; default: inferred from the checkpoint's keys (given: must match the file)")
    g = p.add_argument_group("protocol")
    g.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                   help="whole image in one forward, or overlapping tiles")
    g.add_argument("--tile", type=int, nargs=2, default=(512, 512), metavar=("H", "W"), help="sliding tile size")
    g.add_argument("--overlap", type=_overlap_arg, default=1 / 3,
                   help="sliding tile overlap, a fraction like 1/3 or a float; stride = ceil(tile*(1-overlap))")
    g.add_argument("--tile-batch", type=int, default=6, help="tiles per forward in sliding mode")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], help="image scales whose logits are averaged")
    g.add_argument("--flip", action="store_true", help="also average the logits of the mirrored image")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N; default: cuda if available else cpu")
    g.add_argument("--gpu", default=None,
                   help="the original's GPU index; --gpu N means --device cuda:N (the string None is ignored)")
    g.add_argument("--amp", choices=AMP_CHOICES, default="none",
                   help="autocast dtype of the network forward (auto: bf16 on a GPU that has it, else none); "
                        "none (fp32) reproduces the published numbers")
    g.add_argument("--batch-size", type=int, default=1, help="images per forward (1 keeps 1024x2048 memory sane)")
    g.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading processes")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", default=None,
                   help="write results.json and prediction PNGs here; without it only the metrics are printed")
    g.add_argument("--official-check", action="store_true",
                   help="after writing the labelId PNGs (val, needs --save-dir), score them with cityscapesscripts")
    return p


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: str | Path, arch: str | None = None, num_classes: int = NUM_CLASSES) -> tuple[nn.Module, str]:
    """Build the PSPNet a checkpoint file holds and load it (strict); returns ``(model, arch)``.

    The architecture comes from the file's keys (``utils.checkpoint.infer_arch``); a given ``arch``
    that disagrees is an error naming both. Students (resnet18) load with ``load_student``, teachers
    (resnet101) with ``load_teacher``, so every layout those accept works here.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"--restore-from {path}: no such file; download the released checkpoints listed "
                              f"in README.md into ckpt/ or point the flag at your own file")
    found = infer_arch(load_state_dict_file(path))
    if arch is not None and arch != found:
        raise EvaluationError(f"{path} holds a {found} network, not {arch}; drop --arch (it is inferred from "
                              f"the file) or pass --arch {found}")
    model = build_model(found, num_classes=num_classes)
    (load_student if found == "resnet18" else load_teacher)(model, path)
    return model, found


def build_eval_dataset(data_dir: str | Path, split: str = "val", data_list: str | None = None,
                       max_images: int | None = None, ignore_label: int = 255) -> Dataset:
    """The full-resolution (no crop) Cityscapes split, optionally only its first ``max_images`` images.

    Returns a ``CityscapesDataset`` (or a ``Subset`` of one) with a ``samples`` attribute listing the
    images it yields, in order.
    """
    if split not in SPLITS:
        raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = CityscapesDataset(str(data_dir), split=split, list_path=data_list, crop_size=None,
                                ignore_label=ignore_label)
    if len(dataset) == 0:
        raise EvaluationError(f"the {split} split of {data_dir} has no images"
                              + (f" (list {data_list})" if data_list else "") + "; check --data-dir / --data-list")
    if max_images is not None:
        if max_images < 1:
            raise EvaluationError(f"--max-images must be at least 1, got {max_images}")
        if max_images < len(dataset):
            subset = torch.utils.data.Subset(dataset, range(max_images))
            subset.samples = dataset.samples[:max_images]  # type: ignore[attr-defined]
            return subset
    return dataset


def build_eval_loader(dataset: Dataset, batch_size: int = 1, num_workers: int = 2) -> DataLoader:
    """An in-order loader over ``dataset`` with worker processes (``dataset.cityscapes.build_loader``)."""
    return build_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)


# --------------------------------------------------------------------------------------------------
# Evaluation loop
# --------------------------------------------------------------------------------------------------
def write_predictions(pred: torch.Tensor, names: Sequence[str], save_dir: Path, split: str,
                      images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> list[Path]:
    """Write one batch of trainId maps ``[N, H, W]``; returns the labelId PNG paths.

    val: ``color/<name>_color.png``, ``trainIds/<name>_trainIds.png``, ``labelIds/<name>_leftImg8bit.png``
    and, given the network inputs and labels, ``panels/<name>.jpg`` (image | ground truth | prediction |
    errors, half size); test: ``labelIds/<name>_leftImg8bit.png`` only (the server's naming).
    """
    maps = pred.to(torch.uint8).cpu().numpy()
    written = []
    for i, (train_ids, name) in enumerate(zip(maps, names)):
        if split != "test":
            save_color_png(save_dir / COLOR_DIR / f"{name}_color.png", train_ids)
            save_train_id_png(save_dir / TRAIN_ID_DIR / f"{name}_trainIds.png", train_ids)
            if images is not None and labels is not None:
                save_panel(save_dir / PANEL_DIR / f"{name}.jpg", image_from_network_input(images[i], IMG_MEAN_BGR),
                           labels[i], train_ids)
        written.append(save_label_id_png(save_dir / LABEL_ID_DIR / f"{name}_leftImg8bit.png", train_ids))
    return written


def write_submission_zip(label_id_pngs: Sequence[Path], zip_path: Path) -> Path:
    """Zip the test labelId PNGs flat (file names only), ready for the Cityscapes benchmark server."""
    tmp = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are already compressed
        for png in label_id_pngs:
            zf.write(png, arcname=png.name)
    os.replace(tmp, zip_path)
    return zip_path


def _as_amp_dtype(amp: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    if amp is None or isinstance(amp, torch.dtype):
        return amp
    try:
        return AMP_DTYPES[resolve_amp(amp, device)]
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
) -> dict[str, Any]:
    """Predict every batch ``(image, label, name)`` of ``loader`` and score it; returns the results dict.

    The model is put in eval mode for the loop (its previous mode is restored). Predictions are the
    argmax of :func:`utils.inference.predict_logits`, computed on ``device`` (default: the model's);
    the confusion matrix accumulates there too. On ``split="test"`` the labels are Cityscapes' dummies,
    so no metrics are computed (``miou`` etc. are None). With ``save_dir`` the prediction PNGs are
    written (see :func:`write_predictions`) and, for test, ``submission.zip``; ``results.json`` is left
    to the caller. Scores are fractions in [0, 1].
    """
    if split not in SPLITS:
        raise EvaluationError(f"split must be one of {SPLITS}, got {split!r}")
    if mode not in ("whole", "sliding"):
        raise EvaluationError(f"mode must be 'whole' or 'sliding', got {mode!r}")
    overlap = parse_overlap(overlap)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    amp_dtype = _as_amp_dtype(amp, device)
    model = model.to(device)
    save_path = Path(save_dir).resolve() if save_dir is not None else None
    class_names = list(CLASS_NAMES) if num_classes == NUM_CLASSES else [str(i) for i in range(num_classes)]

    conf = ConfusionMatrix(num_classes)
    label_pngs: list[Path] = []
    num_images = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(loader.dataset), unit="img", disable=not progress, desc=f"eval {split}",
               dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in loader:
            image, label, names = batch[0], batch[1], batch[2]
            image = image.to(device, non_blocking=True)
            logits = predict_logits(model, image, mode=mode, tile=tile, overlap=overlap, scales=scales, flip=flip,
                                    num_classes=num_classes, tile_batch=tile_batch, amp_dtype=amp_dtype)
            pred = logits.argmax(dim=1)  # on the device: only the [N,H,W] ids ever leave it
            del logits
            if split != "test":
                if tuple(label.shape) != tuple(pred.shape):
                    raise EvaluationError(f"label of {names[0]} is {tuple(label.shape)[1:]} but the image gives "
                                          f"{tuple(pred.shape)[1:]}; labels must be at full image resolution")
                conf.update(pred, label.to(device, non_blocking=True))
            if save_path is not None:
                label_pngs += write_predictions(pred, names, save_path, split, images=batch[0], labels=label)
            num_images += image.shape[0]
            bar.update(image.shape[0])
            bar.set_postfix(img_per_s=f"{num_images / (time.perf_counter() - start):.2f}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    if num_images == 0:
        raise EvaluationError("the loader yielded no images; the split is empty")

    metrics: dict[str, Any]
    if split == "test":
        metrics = {k: None for k in ("miou", "pixel_accuracy", "mean_accuracy", "iou", "per_class_iou", "present",
                                     "confusion_matrix")}
    else:
        metrics = iou_from_confusion(conf.value(), class_names)
    outputs = None
    if save_path is not None:
        outputs = {"dir": str(save_path), "label_ids": str(save_path / LABEL_ID_DIR)}
        if split == "test":
            outputs["zip"] = str(write_submission_zip(label_pngs, save_path / SUBMISSION_ZIP))
        else:
            outputs.update(color=str(save_path / COLOR_DIR), train_ids=str(save_path / TRAIN_ID_DIR))
    return {
        "split": split,
        "num_images": num_images,
        **metrics,
        "settings": {
            "mode": mode, "tile": list(tile), "overlap": overlap, "stride": list(tile_stride(tile, overlap)),
            "tile_batch": tile_batch, "scales": list(scales), "flip": flip,
            "amp": "none" if amp_dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype],
            "num_classes": num_classes, "batch_size": loader.batch_size,
        },
        "seconds": seconds,
        "images_per_s": num_images / seconds,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch_version": torch.__version__,
        "outputs": outputs,
    }


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


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, evaluate, print the table, write ``results.json`` with --save-dir; returns the results."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.official_check and (args.save_dir is None or args.split != "val"):
        parser.error("--official-check scores the labelId PNGs of the val split: pass --split val and --save-dir")
    if args.batch_size < 1 or args.tile_batch < 1 or args.num_workers < 0:
        parser.error("--batch-size and --tile-batch must be >= 1, --num-workers >= 0")
    device = resolve_device(args.device, args.gpu)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every image has the same size

    model, arch = load_model(args.restore_from, args.arch, args.num_classes)
    dataset = build_eval_dataset(args.data_dir, args.split, args.data_list, args.max_images)
    loader = build_eval_loader(dataset, args.batch_size, args.num_workers)
    print(f"evaluating {args.restore_from} ({arch}) on {len(dataset)} {args.split} images, {args.mode} mode, "
          f"scales {args.scales}, flip {args.flip}, amp {args.amp}, device {device}", flush=True)

    results = evaluate_model(
        model, loader, num_classes=args.num_classes, mode=args.mode, tile=tuple(args.tile), overlap=args.overlap,
        scales=tuple(args.scales), flip=args.flip, device=device, amp=args.amp, save_dir=args.save_dir,
        split=args.split, progress=args.progress, tile_batch=args.tile_batch,
    )
    results["checkpoint"] = {"path": str(Path(args.restore_from).resolve()), "sha256": sha256_file(args.restore_from),
                             "arch": arch}
    results["data"] = {"data_dir": str(Path(args.data_dir).resolve()), "data_list": args.data_list,
                       "max_images": args.max_images}

    if args.split == "val":
        print(format_table(results))
    else:
        print(f"test split: no metrics (Cityscapes test labels are dummies); submit {results['outputs']['zip']}"
              if results["outputs"] else "test split: no metrics (labels are dummies); pass --save-dir for the PNGs")
    print(f"{results['num_images']} images in {results['seconds']:.1f} s ({results['images_per_s']:.2f} img/s)")

    if args.official_check:
        check = run_official_check(results, dataset.samples)
        results["official_check"] = check
        print(f"mIoU evaluate.py: {100 * check['ours_miou']:.4f} (absent classes count 0) | over the classes the "
              f"official tool scores: {100 * (check['ours_miou_scored_classes'] or 0):.4f} | cityscapesscripts: "
              f"{100 * check['official_miou']:.4f} | largest per-class difference {100 * check['max_class_diff']:.2e}")
        if check["unscored_classes"]:
            print(f"  classes absent from ground truth and prediction (NaN for the official tool, 0 here): "
                  f"{', '.join(check['unscored_classes'])}")

    if args.save_dir is not None:
        out = Path(args.save_dir) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return results


def cli(argv: list[str] | None = None) -> int:
    """Console entry: :func:`main`, with clear one-line errors (exit status 2) instead of tracebacks."""
    try:
        main(argv)
    except (EvaluationError, CheckpointError, DatasetError, DeviceError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""Evaluate a segmentation checkpoint (PSPNet, CIRKD's DeepLabV3) on a labelled split (mIoU), or predict
Cityscapes' test split for the server.

The defaults are the protocol of every published number of the original code ("singleAndWhole"):
the whole 1024x2048 image in one forward, one scale, no flip, fp32.

    python evaluate.py --data-dir data/cityscapes \\
        --restore-from ckpt/new_rn18-cityscape_singleAndWhole_val-75.02_test-73.86.pth
    python evaluate.py --data-dir D --restore-from ckpt/teacher_city.pth --save-dir outputs/teacher --official-check
    python evaluate.py --data-dir D --restore-from CKPT --split test --save-dir outputs/test   # -> submission zip
    python evaluate.py ... --mode sliding --tile 512 512 --overlap 1/3 --scales 0.75 1.0 1.25 --flip

The architecture is read from the checkpoint's keys (``--arch`` only double-checks it), and the
input normalisation follows it (the one its weights were trained with; ``--normalization`` overrides). With
``--save-dir`` it writes ``results.json`` and the predictions: for val colour PNGs (official Cityscapes
palette), trainId PNGs, labelId PNGs and ``class_iou.png`` (per-class IoU bars; ``--compare`` another
results.json, e.g. the teacher's, to draw both); for test labelId PNGs named ``<city>_<seq>_<frame>_leftImg8bit.png``
and ``submission.zip`` of them. The library behind it is :mod:`cwdseg.evaluation`; ``evaluate.py`` and
``cwd-eval`` call :func:`cli`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from cwdseg.api import evaluate_split, load
from cwdseg.checkpoint import CheckpointError, atomic_write_text
from cwdseg.cli.checks import eval_value_errors, overlap_arg
from cwdseg.cli.parser import ArgumentParser
from cwdseg.data import DatasetError
from cwdseg.data.cityscapes import default_num_workers
from cwdseg.data.registry import DATASETS, dataset_info
from cwdseg.data.transforms import NORMALIZATIONS
from cwdseg.engine.distributed import DeviceError, resolve_device
from cwdseg.engine.precision import AMP_CHOICES
from cwdseg.evaluation.loop import (
    SPLITS,
    EvaluationError,
    _as_amp_dtype,
    build_eval_dataset,
    build_eval_loader,
    evaluate_model,
    load_model,
)
from cwdseg.evaluation.metrics import format_table
from cwdseg.evaluation.official import run_official_check
from cwdseg.evaluation.outputs import prepare_save_dir, remove_outputs
from cwdseg.export.onnx import ExportError
from cwdseg.models import ARCH_NAMES
from cwdseg.viz.bars import plot_class_iou_bars

__all__ = ["EvaluationError", "_as_amp_dtype", "build_eval_dataset", "build_eval_loader", "evaluate_model",
           "get_args_parser", "load_model", "main", "cli"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of evaluate.py (reusable by other scripts through ``parents=``)."""
    p = ArgumentParser(description="Evaluate a segmentation checkpoint on a dataset (Cityscapes by default)",
                       add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=os.environ.get("DATASET"), choices=sorted(DATASETS),
                   help="dataset layout and label convention of --data-dir; default: $DATASET, else the one a "
                        "toolkit student file records, else cityscapes")
    g.add_argument("--data-dir", required=True, help="dataset root (Cityscapes: holds leftImg8bit/ and gtFine/)")
    g.add_argument("--split", choices=SPLITS, default="val", help="val: mIoU; test: labelId PNGs for the server")
    g.add_argument("--data-list", default=None,
                   help="list file of the split (image<TAB>label per line); default: scan the split folder")
    g.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images (quick checks)")
    g.add_argument("--num-classes", "--num_classes", dest="num_classes", type=int, default=None,
                   help="number of classes of the network; default: the dataset's (must agree when given)")
    g = p.add_argument_group("model")
    g.add_argument("--restore-from", required=True, help="checkpoint file (released student/teacher or ours)")
    g.add_argument("--arch", choices=ARCH_NAMES, default=None,
                   help="network; default: inferred from the checkpoint's keys (given: must match the file)")
    g.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default=None,
                   help="input normalisation; default: the one the checkpoint's architecture was trained with")
    g = p.add_argument_group("protocol")
    g.add_argument("--mode", choices=("whole", "sliding"), default="whole",
                   help="whole image in one forward, or overlapping tiles")
    g.add_argument("--tile", type=int, nargs=2, default=(512, 512), metavar=("H", "W"), help="sliding tile size")
    g.add_argument("--overlap", type=overlap_arg, default=1 / 3,
                   help="sliding tile overlap, a fraction like 1/3 or a float; stride = ceil(tile*(1-overlap))")
    g.add_argument("--tile-batch", type=int, default=6, help="tiles per forward in sliding mode")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], help="image scales whose logits are averaged")
    g.add_argument("--short-side", type=int, default=None,
                   help="resize images to this short side first, labels kept at full size (mmsegmentation's "
                        "ADE20K/VOC test protocol: 512); default: native size")
    g.add_argument("--flip", action="store_true", help="also average the logits of the mirrored image")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N; default: cuda if available else cpu")
    g.add_argument("--gpu", default=None,
                   help="the original's GPU index; --gpu N means --device cuda:N (the string None is ignored)")
    g.add_argument("--amp", choices=AMP_CHOICES, default="none",
                   help="autocast dtype of the network forward (auto: bf16 on a GPU that has it, else none); "
                        "none (fp32) reproduces the published numbers")
    g.add_argument("--batch-size", type=int, default=1, help="images per forward (1 keeps 1024x2048 memory sane)")
    g.add_argument("--num-workers", type=int, default=default_num_workers(),
                   help="data-loading processes; the default fits this machine's cores")
    # "%(default).0s" prints nothing: it keeps the formatter from adding "(default: True)" to a flag that turns it off.
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress output (default: a bar on a terminal, plain lines in a log)%(default).0s")
    g = p.add_argument_group("output")
    g.add_argument("--save-dir", default=None,
                   help="write results.json and prediction PNGs here; without it only the metrics are printed")
    g.add_argument("--overwrite", action="store_true",
                   help="clear a --save-dir that holds another checkpoint's outputs first (without it: refused)")
    g.add_argument("--official-check", action="store_true",
                   help="after writing the labelId PNGs (val, needs --save-dir), score them with cityscapesscripts")
    g.add_argument("--compare", default=None, metavar="RESULTS_JSON",
                   help="another evaluation's results.json (e.g. the teacher's): its IoU bars go beside these "
                        "in class_iou.png (val, with --save-dir)")
    return p


def _read_compare(parser: argparse.ArgumentParser, args: argparse.Namespace, names: list[str]) -> dict[str, Any] | None:
    """The --compare results.json (checked: a val evaluation with per-class IoU), or None."""
    if args.compare is None:
        return None
    if args.save_dir is None or (args.split == "test" and args.dataset == "cityscapes"):
        parser.error("--compare draws class_iou.png beside a scored evaluation: pass --save-dir (and a split "
                     "with labels, e.g. --split val)")
    try:
        other = json.loads(Path(args.compare).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        parser.error(f"--compare {args.compare}: cannot read it as JSON ({exc})")
    if not isinstance(other, dict) or not isinstance(other.get("per_class_iou"), dict):
        parser.error(f"--compare {args.compare}: not an evaluate.py results.json of the val split (no per_class_iou)")
    if list(other["per_class_iou"]) != names:
        parser.error(f"--compare {args.compare}: it scores other classes than this evaluation ({len(names)} classes)")
    return other


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, evaluate, print the table, write ``results.json`` with --save-dir; returns the results."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.official_check and (args.save_dir is None or args.split != "val"):
        parser.error("--official-check scores the labelId PNGs of the val split: pass --split val and --save-dir")
    errors = eval_value_errors(args)
    if errors:
        parser.error("; ".join(errors))
    if args.dataset is not None:  # what the flags alone decide, before any file is read
        if args.official_check and args.dataset != "cityscapes":
            parser.error("--official-check runs cityscapesscripts, which scores Cityscapes only; drop it for "
                         f"--dataset {args.dataset}")
        known = dataset_info(args.dataset, args.data_dir)
        if args.num_classes is not None and args.num_classes != known.num_classes:
            parser.error(f"--num-classes {args.num_classes} contradicts --dataset {args.dataset}, which has "
                         f"{known.num_classes} classes; drop --num-classes")
    device = resolve_device(args.device, args.gpu)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every image has the same size
    # A toolkit student file says what it is (architecture, classes, input, dataset); foreign files are
    # recognised by their keys, with --dataset / --num-classes from the command line.
    restore = Path(args.restore_from)
    if restore.is_dir() and not (restore / "config.json").is_file():  # a Hugging Face folder is a network
        parser.error(f"--restore-from {restore}: is a folder, not a checkpoint file; pass one of its files "
                     f"(e.g. {next(iter(sorted(restore.glob('*.pth'))), restore / 'city_<step>_G.pth')})")
    segmenter = load(args.restore_from, device=device, num_classes=args.num_classes, arch=args.arch,
                     normalization=args.normalization, amp=args.amp, dataset=args.dataset)  # cwdseg.load
    dataset = args.dataset or segmenter.dataset or "cityscapes"
    if args.official_check and dataset != "cityscapes":
        parser.error("--official-check runs cityscapesscripts, which scores Cityscapes only; drop it for "
                     f"--dataset {dataset}")
    info = dataset_info(dataset, args.data_dir)
    if segmenter.num_classes != info.num_classes:
        given = (f"--num-classes {args.num_classes}" if args.num_classes
                 else f"{args.restore_from} ({segmenter.num_classes} classes)")
        parser.error(f"{given} contradicts --dataset {dataset}, which has {info.num_classes} classes; "
                     + ("drop --num-classes" if args.num_classes else "pass the dataset the network was trained on"))
    compare = _read_compare(parser, args, list(info.class_names))

    save_dir = None if args.save_dir is None else Path(args.save_dir)
    fresh = save_dir is not None and (not save_dir.exists() or (save_dir.is_dir() and not any(save_dir.iterdir())))
    if save_dir is not None:
        prepare_save_dir(save_dir, args.restore_from, args.overwrite)
    try:
        return _evaluate(args, segmenter, dataset, compare)
    except BaseException:
        if fresh:  # a failed evaluation leaves nothing that would refuse the next one
            remove_outputs(save_dir, created=True)
        raise


def _evaluate(args: argparse.Namespace, segmenter: Any, dataset: str, compare: dict[str, Any] | None) -> dict[str, Any]:
    """Evaluate, print, and write results.json and class_iou.png into --save-dir (when given)."""
    results, dataset = evaluate_split(
        segmenter, args.data_dir, dataset=dataset, split=args.split, data_list=args.data_list,
        max_images=args.max_images, mode=args.mode, tile=tuple(args.tile), overlap=args.overlap,
        tile_batch=args.tile_batch, scales=tuple(args.scales), flip=args.flip, short_side=args.short_side,
        batch_size=args.batch_size, num_workers=args.num_workers, save_dir=args.save_dir, progress=args.progress,
        log=lambda line: print(line, flush=True))

    if results["miou"] is not None:
        print(format_table(results))
    else:
        print(f"test split: no metrics (Cityscapes test labels are dummies); submit {results['outputs']['zip']}"
              if results["outputs"] else "test split: no metrics (Cityscapes test labels are dummies); pass "
                                         "--save-dir for the server PNGs")
    print(f"{results['num_images']} images in {results['seconds']:.1f} s ({results['images_per_s']:.2f} img/s)")

    if args.official_check:
        check = run_official_check(results, dataset.samples)
        results["official_check"] = check
        print(f"mIoU (%) evaluate.py: {100 * check['ours_miou']:.2f} (absent classes count 0) | over the classes "
              f"the official tool scores: {100 * (check['ours_miou_scored_classes'] or 0):.2f} | cityscapesscripts: "
              f"{100 * check['official_miou']:.2f} | largest per-class difference "
              f"{100 * check['max_class_diff']:.2e} points")
        if check["unscored_classes"]:
            print(f"  classes absent from ground truth and prediction (NaN for the official tool, 0 here): "
                  f"{', '.join(check['unscored_classes'])}")

    if args.save_dir is not None:
        out = Path(args.save_dir) / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        if results["miou"] is not None:
            labels = bar_labels(args.restore_from, compare, args.compare)
            bars = plot_class_iou_bars(
                [(labels[0], results["per_class_iou"], results["miou"])]
                + ([(labels[1], compare["per_class_iou"], compare.get("miou"))] if compare else []),
                out.parent / "class_iou.png",
                f"per-class IoU, {args.split} ({results['num_images']} images)")
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")  # last: its presence marks a finished run
        print(f"wrote {out}")
        if results["miou"] is not None:
            print(f"wrote {bars}")
    return results


def bar_labels(restore_from: str, compare: dict[str, Any] | None, compare_path: str | None) -> list[str]:
    """Legend labels of class_iou.png: ``<run folder>/<file stem>`` of each checkpoint (every run names its
    student ``city_<step>_G.pth``, so the stem alone says nothing); the paths as given when those agree."""
    def short(path: str) -> str:
        p = Path(path)
        return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem

    labels = [short(restore_from)]
    if compare is not None:
        ckpt = compare.get("checkpoint") if isinstance(compare.get("checkpoint"), dict) else {}
        other = ckpt.get("given_as") or ckpt.get("path") or str(compare_path)
        labels.append(short(other))
        if labels[0] == labels[1]:
            labels = [str(restore_from), f"{other} (from {compare_path})"]
    return labels


def cli(argv: list[str] | None = None) -> int:
    """Console entry: :func:`main`, with clear one-line errors (exit status 2) instead of tracebacks."""
    try:
        main(argv)
    except (EvaluationError, CheckpointError, DatasetError, DeviceError, ExportError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaluate.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())

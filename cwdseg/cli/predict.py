"""Run a segmentation network on your own images and videos: colour overlays, class-id PNGs, annotated videos.

    python predict.py --restore-from ckpt/new_rn18-cityscape_singleAndWhole_val-75.02_test-73.86.pth \\
        --input photos/ --output-dir outputs/photos
    python predict.py --restore-from outputs/export/student/student.onnx --input dashcam.mp4 \\
        --output-dir outputs/dashcam
    python predict.py --restore-from CKPT --input 'frames/*.jpg' --output-dir OUT --mode sliding --batch-size 4

``--restore-from`` is a checkpoint of any architecture ``evaluate.py`` reads (the architecture comes
from its keys), a ``.safetensors`` or an ``.onnx`` export of ``tools/export.py`` (run with ONNX Runtime;
the normalisation and classes come from the export's metadata). ``--input`` takes image files, folders,
glob patterns and video files, any number of them. Written into ``--output-dir``:

* per image ``overlay/<stem>.png`` (the image blended with the class colours, a legend of the classes
  present) and ``ids/<stem>.png`` (uint8 class ids, 0..C-1);
* per video ``<stem>_overlay<ext>`` (the annotated video, same size and frame rate) and
  ``ids/<stem>/<frame>.png`` (class ids of every frame).

Predictions are those of ``evaluate.py`` for the same pixels and protocol (the argmax of
:func:`cwdseg.evaluation.inference.predict_logits`; the input normalised exactly as in evaluation).
Frames of equal size go through the network ``--batch-size`` at a time; bf16 autocast on a GPU by
default (``--amp``). Nothing that exists is overwritten without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch
from torch import nn

from cwdseg.api import class_entries, class_table, load_network
from cwdseg.checkpoint import CheckpointError
from cwdseg.cli.checks import overlap_arg, writable_folder_error
from cwdseg.cli.parser import ArgumentParser
from cwdseg.data import DatasetError
from cwdseg.data.labels import NUM_CLASSES
from cwdseg.data.registry import DATASETS
from cwdseg.data.transforms import Normalization
from cwdseg.engine.distributed import DeviceError, resolve_device
from cwdseg.engine.precision import AMP_CHOICES
from cwdseg.evaluation.inference import input_size_error, network_input, predict_ids
from cwdseg.evaluation.loop import EvaluationError, _as_amp_dtype, progress_bar
from cwdseg.evaluation.media import (
    DECODERS,
    MediaError,
    MediaItem,
    VideoSink,
    discover,
    prefetch,
    read_image,
    read_video,
    video_info,
)
from cwdseg.export.normalization import ORIGINAL, channel_order, describe, from_dict, make
from cwdseg.viz.overlay import overlay_with_legend

OVERLAY_DIR, IDS_DIR = "overlay", "ids"


class PredictError(RuntimeError):
    """A bad predict.py argument or output folder, said with what to do."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command line of predict.py."""
    p = ArgumentParser(description="Segment images and videos with a trained network", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--restore-from", required=True, help="checkpoint (.pth), or an export (.safetensors, .onnx)")
    p.add_argument("--input", nargs="+", required=True, help="image files, folders, glob patterns, video files")
    p.add_argument("--output-dir", required=True, help="where the overlays, id PNGs and videos go")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    g = p.add_argument_group("model")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes of a .pth checkpoint; default: its metadata, else 19 (Cityscapes)")
    g.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="take the class names and colours of this dataset; default: the export's, else Cityscapes'")
    g.add_argument("--classes", default=None, help="JSON list of class names or {name, color} (overrides --dataset)")
    g.add_argument("--channel-order", choices=("BGR", "RGB"), default=None,
                   help="input channel order of the weights; default: the export's, else BGR (the original)")
    g.add_argument("--mean", type=float, nargs=3, default=None, help="per-channel mean; default as --channel-order")
    g.add_argument("--std", type=float, nargs=3, default=None, help="per-channel std; default as --channel-order")
    g = p.add_argument_group("protocol (as evaluate.py)")
    g.add_argument("--mode", choices=("whole", "sliding"), default="whole", help="whole image or overlapping tiles")
    g.add_argument("--tile", type=int, nargs=2, default=(512, 512), metavar=("H", "W"), help="sliding tile size")
    g.add_argument("--overlap", type=overlap_arg, default=1 / 3, help="sliding tile overlap (1/3 or a float)")
    g.add_argument("--tile-batch", type=int, default=6, help="tiles per forward in sliding mode")
    g.add_argument("--scales", type=float, nargs="+", default=[1.0], help="scales whose logits are averaged")
    g.add_argument("--flip", action="store_true", help="also average the mirrored image's logits")
    g = p.add_argument_group("runtime")
    g.add_argument("--batch-size", type=int, default=4, help="frames of equal size per forward")
    g.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N; default: cuda if available")
    g.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="autocast of the forward: auto = bf16 on a GPU that has it, fp32 on CPU (ONNX: always fp32)")
    g.add_argument("--decoder", choices=DECODERS, default="opencv", help="video decoder")
    g.add_argument("--max-frames", type=int, default=None, help="only the first N frames of each video")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress: a bar on a terminal, plain lines in a log")
    g = p.add_argument_group("output")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the class colours in the overlay")
    g.add_argument("--legend", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the legend of the classes present on the overlays")
    g.add_argument("--ids", action=argparse.BooleanOptionalAction, default=True, help="write class-id PNGs")
    g.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True, help="write image overlays")
    g.add_argument("--video-ext", default=".mp4", choices=(".mp4", ".avi", ".mkv", ".mov"),
                   help="container of the annotated videos")
    return p


@dataclass
class Predictor:
    """A network ready to segment: the module, what it is, its input normalisation and class table."""

    model: nn.Module
    arch: str
    normalization: Normalization
    class_names: list[str]
    colors: np.ndarray
    is_onnx: bool


def _read_classes_file(path: str) -> dict[str, Any]:
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PredictError(f"--classes {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(items, list) or not items:
        raise PredictError(f"--classes {path}: expected a list of class names or of {{name, color}}")
    try:
        return {"classes": class_entries(items)}
    except ValueError as exc:
        raise PredictError(f"--classes {path}: {exc}") from None


def load_predictor(args: argparse.Namespace, device: torch.device) -> Predictor:
    """The network of ``--restore-from`` (.pth / .safetensors / .onnx) with its normalisation and classes."""
    path = Path(args.restore_from)
    if path.is_dir() and not (path / "config.json").is_file():  # a Hugging Face folder is a network
        raise PredictError(f"--restore-from {path}: is a folder, not a checkpoint file; pass a file in it "
                           f"(.pth, .safetensors or .onnx)")
    if not path.exists():
        raise PredictError(f"--restore-from {path}: no such file")
    # as cwdseg.load reads files
    model, arch, meta, is_onnx = load_network(path, device, args.num_classes, dataset=args.dataset)
    if args.classes:
        meta = {**meta, **_read_classes_file(args.classes)}
    elif args.dataset:
        try:
            meta = {**meta, "classes": class_entries(args.dataset)}
        except DatasetError as exc:  # 'folder' reads its classes from its root's classes.json
            raise PredictError(f"--dataset {args.dataset}: {exc}; pass --classes ROOT/classes.json instead") from None
    num_classes = int(meta.get("num_classes", len(meta["classes"]) if meta.get("classes") else
                               args.num_classes or NUM_CLASSES))
    names, colors = class_table(meta, num_classes)
    base = from_dict(meta["normalization"]) if "normalization" in meta else ORIGINAL
    if args.channel_order and args.channel_order != channel_order(base) and args.mean is None:
        raise PredictError(f"--channel-order {args.channel_order} differs from the weights' {channel_order(base)}: "
                           f"give --mean (and --std) in {args.channel_order} order too")
    try:
        normalization = make(args.channel_order or channel_order(base), args.mean or base.mean,
                             args.std or base.std)
    except ValueError as exc:
        raise PredictError(str(exc)) from None
    return Predictor(model, arch, normalization, names, colors, is_onnx)


def plan_outputs(items: list[MediaItem], out_dir: Path, args: argparse.Namespace) -> dict[Path, dict[str, Path]]:
    """Where each input's outputs go; two inputs with the same stem, or existing outputs (without
    ``--overwrite``), are errors before anything runs."""
    plans: dict[Path, dict[str, Path]] = {}
    owner: dict[Path, Path] = {}
    for item in items:
        stem = item.path.stem
        if item.kind == "image":
            plan = {"overlay": out_dir / OVERLAY_DIR / f"{stem}.png"} if args.overlay else {}
            plan |= {"ids": out_dir / IDS_DIR / f"{stem}.png"} if args.ids else {}
        else:
            plan = {"video": out_dir / f"{stem}_overlay{args.video_ext}"}
            plan |= {"ids_dir": out_dir / IDS_DIR / stem} if args.ids else {}
        for target in plan.values():
            if target in owner and owner[target] != item.path:
                raise PredictError(f"{item.path} and {owner[target]} would both write {target}; rename one or "
                                   f"run them into different --output-dir")
            owner[target] = item.path
        plans[item.path] = plan
    if not args.overwrite:
        existing = [t for t in owner if t.exists() and (not t.is_dir() or any(t.iterdir()))]
        if existing:
            raise PredictError(f"{existing[0]} exists ({len(existing)} outputs do); pass --overwrite to replace "
                               f"them or choose another --output-dir")
    return plans


def _frames(items: list[MediaItem], args: argparse.Namespace) -> Iterator[tuple[MediaItem, int, np.ndarray]]:
    for item in items:
        if item.kind == "image":
            yield item, 0, read_image(item.path)
        else:
            for index, frame in enumerate(read_video(item.path, args.decoder, args.max_frames)):
                yield item, index, frame


def _batches(frames: Iterator, batch_size: int) -> Iterator[list]:
    """Consecutive frames of the same size and input file, ``batch_size`` at most."""
    batch: list = []
    for entry in frames:
        if batch and (len(batch) == batch_size or entry[2].shape != batch[0][2].shape or entry[0] != batch[0][0]):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise MediaError(f"{path}: could not be written (is the folder writable?)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, segment every input, write the outputs; returns a summary (inputs, frames, seconds)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.tile_batch < 1 or (args.max_frames is not None and args.max_frames < 1):
        parser.error("--batch-size, --tile-batch and --max-frames must be >= 1")
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    error = writable_folder_error("--output-dir", args.output_dir)
    if error:
        parser.error(error)
    items = discover(args.input)
    out_dir = Path(args.output_dir)
    plans = plan_outputs(items, out_dir, args)
    device = resolve_device(args.device, None)
    predictor = load_predictor(args, device)
    amp = None if predictor.is_onnx else _as_amp_dtype(args.amp, device)
    protocol = dict(mode=args.mode, tile=tuple(args.tile), overlap=args.overlap, scales=tuple(args.scales),
                    flip=args.flip, num_classes=len(predictor.class_names), tile_batch=args.tile_batch, amp_dtype=amp)
    total = sum(1 if it.kind == "image" else min(video_info(it.path, args.decoder)[0] or 0,
                                                   args.max_frames or 1 << 40) for it in items)
    n_videos = sum(it.kind == "video" for it in items)
    print(f"predicting {len(items) - n_videos} images and {n_videos} videos with {args.restore_from} "
          f"({predictor.arch}), {args.mode} mode, amp {args.amp if amp else 'none'}, device {device}; input "
          f"{describe(predictor.normalization)}", flush=True)
    luts = predictor.normalization.lut()
    sinks: dict[Path, VideoSink] = {}
    pending: list[Future] = []
    frames_done, start = 0, time.perf_counter()
    bar = progress_bar(total, "predict", args.progress, unit="frames")
    with ThreadPoolExecutor(max_workers=2) as writers:
        try:
            for batch in _batches(prefetch(_frames(items, args), depth=2 * args.batch_size), args.batch_size):
                error = input_size_error(*batch[0][2].shape[:2], protocol["scales"], args.mode, protocol["tile"])
                if error:
                    raise PredictError(f"{batch[0][0].path}: {error}")
                x = network_input([f for _, _, f in batch], predictor.normalization, luts)
                pred = predict_ids(predictor.model, x.to(device), **protocol)
                ids_batch = pred.to(torch.uint8).cpu().numpy()
                for (item, index, frame), ids in zip(batch, ids_batch):
                    plan = plans[item.path]
                    if item.kind == "video":
                        if item.path not in sinks:
                            sinks[item.path] = VideoSink(plan["video"], video_info(item.path, args.decoder)[1])
                        sinks[item.path].write(overlay_with_legend(frame, ids, predictor.class_names,
                                                                   predictor.colors, args.alpha, args.legend))
                        if "ids_dir" in plan:
                            pending.append(writers.submit(_write_png, plan["ids_dir"] / f"{index:06d}.png", ids))
                    else:
                        if "ids" in plan:
                            pending.append(writers.submit(_write_png, plan["ids"], ids))
                        if "overlay" in plan:
                            pending.append(writers.submit(
                                lambda p, f, i: _write_png(p, overlay_with_legend(
                                    f, i, predictor.class_names, predictor.colors, args.alpha, args.legend)),
                                plan["overlay"], frame, ids))
                frames_done += len(batch)
                bar.update(len(batch))
                bar.set_postfix(fps=f"{frames_done / (time.perf_counter() - start):.2f}")
                for future in [f for f in pending if f.done()]:
                    future.result()  # a failed write stops the run here
                    pending.remove(future)
            for future in pending:
                future.result()
        finally:
            bar.close()
            for sink in sinks.values():
                sink.close()
    seconds = time.perf_counter() - start
    for item in items:
        print(f"{item.path} -> " + ", ".join(str(p) for p in plans[item.path].values()))
    print(f"{frames_done} frames in {seconds:.1f} s ({frames_done / seconds:.2f} frames/s)")
    return {"inputs": [str(it.path) for it in items], "frames": frames_done, "seconds": seconds,
            "outputs": {str(k): {r: str(p) for r, p in v.items()} for k, v in plans.items()}}


def cli(argv: list[str] | None = None) -> int:
    """Console entry: :func:`main`, with one-line errors (exit status 2) instead of tracebacks."""
    try:
        main(argv)
    except (PredictError, MediaError, EvaluationError, CheckpointError, DeviceError) as exc:
        print(f"predict.py: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a file or folder inside --output-dir that may not be written
        print(f"predict.py: error: {exc.filename}: {exc.strerror}; choose a writable --output-dir", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""The toolkit as a Python library: load a network from any file the toolkit reads, segment arrays or
image files, draw overlays, evaluate on a dataset.

    import cwdseg
    seg = cwdseg.load("ckpt/new_rn18-cityscape_singleAndWhole_val-75.02_test-73.86.pth")
    ids = seg.predict("photo.png")                 # (H, W) class ids at the image's size
    probs = seg.probabilities(rgb_array)           # (C, H, W) soft-max maps, summing to 1 per pixel
    picture = seg.overlay(rgb_array, ids)          # (H, W, 3) uint8 RGB, class colours and legend
    results = cwdseg.evaluate(seg, "data/cityscapes", max_images=10)

Images are RGB (as PIL and matplotlib give them) uint8 ``(H, W, 3)`` arrays, or paths (decoded with
OpenCV, as the datasets do). The network input is built exactly as in evaluation: the weights'
:class:`cwdseg.data.transforms.Normalization` (channel order, mean, std) through its lookup tables,
so ``predict`` gives the class ids of ``evaluate.py`` and ``predict.py`` for the same pixels and
protocol: all three call :mod:`cwdseg.evaluation.inference`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, Union

import cv2
import numpy as np
import torch
from torch import nn

from cwdseg.checkpoint import CheckpointError
from cwdseg.config import RunConfig
from cwdseg.data.labels import CLASS_NAMES, NUM_CLASSES, TRAIN_ID_COLORS
from cwdseg.data.transforms import NORMALIZATIONS, Normalization
from cwdseg.engine.distributed import resolve_device
from cwdseg.evaluation.inference import network_input, predict_ids, predict_probabilities
from cwdseg.evaluation.loop import (
    EvaluationError,
    _as_amp_dtype,
    build_eval_dataset,
    build_eval_loader,
    evaluate_model,
    load_model_file,
    sha256_file,
)
from cwdseg.evaluation.media import read_image
from cwdseg.export.normalization import from_dict, to_dict

__all__ = ["load", "evaluate", "train", "evaluate_split", "Segmenter", "SegClass", "load_network", "class_table",
           "class_entries"]

Image = Union[np.ndarray, str, os.PathLike]


class SegClass(NamedTuple):
    """One class of a network's output: its id (channel), name and RGB colour."""

    id: int
    name: str
    color: tuple[int, int, int]


def load_network(path: str | os.PathLike, device: torch.device | str = "cpu", num_classes: int | None = None,
                 arch: str | None = None, dataset: str | None = None) -> tuple[nn.Module, str, dict[str, Any], bool]:
    """The network a file holds, on ``device`` in eval mode: ``(model, arch, metadata, is_onnx)``.

    ``.onnx`` (run with ONNX Runtime) and ``.safetensors`` exports of ``tools/export.py`` bring their
    metadata; a ``.pth`` is read as ``evaluate.py`` reads it (the architecture from its keys: the
    original's PSPNets, CIRKD's DeepLabV3/PSPNet files, the toolkit's students), its metadata from a
    toolkit student file's ``_metadata`` (``cwdseg.evaluation.loop.load_model_file``: architecture, classes,
    normalisation, dataset), else the architecture's normalisation (:data:`cwdseg.models.NORMALIZATION`) and
    ``num_classes`` (default: ``dataset``'s count, else 19, Cityscapes).
    ``arch`` (a ``.pth``'s expected architecture, an alias works) must agree with the file.
    """
    path = Path(path)
    if not path.is_file() and not (path.is_dir() and (path / "config.json").is_file()):  # or a Hugging Face folder
        raise CheckpointError(f"{path}: no such file; give a .pth checkpoint or a .safetensors/.onnx export")
    suffix = path.suffix.lower()
    device = torch.device(device)
    if suffix == ".onnx":
        from cwdseg.export.onnx import OnnxSegmenter

        model: nn.Module = OnnxSegmenter(path, device)
        meta = dict(model.metadata)
        return model, f"{meta.get('arch', 'network')} (ONNX Runtime)", meta, True
    if suffix == ".safetensors":
        from cwdseg.export.weights import load_safetensors_model

        model, arch, meta = load_safetensors_model(path)
        return model.to(device).eval(), arch, dict(meta), False
    loaded = load_model_file(path, arch, num_classes, dataset)
    meta: dict[str, Any] = {"arch": loaded.arch, "num_classes": loaded.num_classes,
                            "normalization": to_dict(NORMALIZATIONS[loaded.normalization])}
    if loaded.dataset:
        meta["dataset"] = loaded.dataset
    if loaded.class_names:
        meta["classes"] = [{"name": n, "color": list(c)} for n, c in zip(loaded.class_names, loaded.class_colors)]
    elif dataset and dataset != "folder":
        meta["classes"] = class_entries(dataset)
    return loaded.model.to(device).eval(), loaded.arch, meta, False


def class_table(meta: dict[str, Any], num_classes: int) -> tuple[list[str], np.ndarray]:
    """Class names and ``(C, 3)`` uint8 RGB colours: the metadata's, Cityscapes' for 19 classes, else
    numbered classes with distinct hues."""
    classes = meta.get("classes")
    if classes:
        return [c["name"] for c in classes], np.array([c["color"] for c in classes], np.uint8)
    if num_classes == NUM_CLASSES:
        return list(CLASS_NAMES), np.asarray(TRAIN_ID_COLORS)
    hues = np.linspace(0, 179, num_classes, endpoint=False).astype(np.uint8)  # distinct colours for unknown classes
    hsv = np.stack([hues, np.full_like(hues, 200), np.full_like(hues, 230)], -1)[None]
    return [str(i) for i in range(num_classes)], cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def class_entries(classes: str | Sequence[str | dict[str, Any]]) -> list[dict[str, Any]]:
    """A dataset name or a list of names / ``{name, color}`` -> ``[{"name", "color"}, ...]``."""
    if isinstance(classes, str):
        from cwdseg.data.registry import dataset_info

        info = dataset_info(classes)
        return [{"name": n, "color": [int(v) for v in c]} for n, c in zip(info.class_names, info.colors)]
    entries = []
    for i, item in enumerate(classes):
        name = item if isinstance(item, str) else item.get("name") if isinstance(item, dict) else None
        color = [128, 128, 128] if isinstance(item, str) else item.get("color") if isinstance(item, dict) else None
        if not isinstance(name, str) or not isinstance(color, (list, tuple)) or len(color) != 3:
            raise ValueError(f"entry {i} is not a name or {{\"name\": ..., \"color\": [r, g, b]}}")
        entries.append({"name": name, "color": [int(v) for v in color]})
    return entries


def _as_bgr(image: Image) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array (or a PIL image) -> BGR; a path -> decoded BGR, as the datasets decode."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(Path(image))
    if hasattr(image, "convert") and not isinstance(image, np.ndarray):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an RGB uint8 (H, W, 3) array or an image path, got a {what}"
                         + ("; drop the alpha channel with image[..., :3]" if isinstance(image, np.ndarray)
                            and image.ndim == 3 and image.shape[2] == 4 else ""))
    return np.ascontiguousarray(image[..., ::-1])


@dataclass
class Segmenter:
    """A network ready to segment images: the module, its architecture, input normalisation and classes.

    Made by :func:`load`. ``predict`` / ``probabilities`` take one image (an RGB uint8 ``(H, W, 3)`` array,
    a PIL image or a path) or a list of them; the protocol arguments are those of ``evaluate.py``.
    """

    model: nn.Module
    arch: str
    normalization: Normalization
    class_names: list[str]
    colors: np.ndarray
    device: torch.device
    amp: torch.dtype | None = None
    is_onnx: bool = False
    source: Path | None = None
    dataset: str | None = None      # the dataset a toolkit student file was trained on

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def classes(self) -> list[SegClass]:
        """``[SegClass(id, name, (r, g, b)), ...]``, one per output channel."""
        return [SegClass(i, n, tuple(int(v) for v in c)) for i, (n, c) in enumerate(zip(self.class_names, self.colors))]

    def _protocol(self, mode: str, flip: bool, scales: Sequence[float], tile: Sequence[int],
                  overlap: float | str, tile_batch: int) -> dict[str, Any]:
        return dict(mode=mode, tile=tuple(tile), overlap=overlap, scales=tuple(scales), flip=flip,
                    num_classes=self.num_classes, tile_batch=tile_batch, amp_dtype=self.amp)

    def _run(self, fn: Callable, image: Image | list[Image], protocol: dict[str, Any]):
        single = not isinstance(image, (list, tuple))
        outs = []
        luts = self.normalization.lut()
        for item in ([image] if single else image):
            x = network_input([_as_bgr(item)], self.normalization, luts).to(self.device)
            outs.append(fn(self.model, x, **protocol)[0].cpu().numpy())
        return outs[0] if single else outs

    def predict(self, image: Image | list[Image], *, mode: str = "whole", flip: bool = False,
                scales: Sequence[float] = (1.0,), tile: Sequence[int] = (512, 512), overlap: float | str = 1 / 3,
                tile_batch: int = 6) -> np.ndarray | list[np.ndarray]:
        """Class ids ``(H, W)`` at the image's size (uint8 up to 256 classes, else int64); a list for a list."""
        ids = self._run(predict_ids, image, self._protocol(mode, flip, scales, tile, overlap, tile_batch))
        dtype = np.uint8 if self.num_classes <= 256 else np.int64
        return [i.astype(dtype) for i in ids] if isinstance(ids, list) else ids.astype(dtype)

    def probabilities(self, image: Image | list[Image], *, mode: str = "whole", flip: bool = False,
                      scales: Sequence[float] = (1.0,), tile: Sequence[int] = (512, 512),
                      overlap: float | str = 1 / 3, tile_batch: int = 6) -> np.ndarray | list[np.ndarray]:
        """Soft-max maps ``(C, H, W)`` float32 (per pixel they sum to 1; argmax = :meth:`predict`)."""
        return self._run(predict_probabilities, image, self._protocol(mode, flip, scales, tile, overlap, tile_batch))

    def overlay(self, image: Image, ids: np.ndarray | None = None, *, alpha: float = 0.5,
                legend: bool = True) -> np.ndarray:
        """The image blended with the class colours (and a legend of the classes present), RGB uint8
        ``(H, W, 3)`` at the image's size: the picture ``predict.py`` writes. ``ids`` default: :meth:`predict`."""
        from cwdseg.viz.overlay import overlay_with_legend

        bgr = _as_bgr(image)
        ids = self.predict(image) if ids is None else np.asarray(ids)
        return overlay_with_legend(bgr, ids, self.class_names, self.colors, alpha, legend)[..., ::-1].copy()

    def __repr__(self) -> str:
        return (f"Segmenter({self.arch}, {self.num_classes} classes, input {self.normalization.name}, "
                f"device {self.device}" + (f", from {self.source}" if self.source else "") + ")")


def load(path: str | os.PathLike, *, device: str | torch.device = "auto", num_classes: int | None = None,
         arch: str | None = None, normalization: str | Normalization | None = None,
         classes: str | Sequence[str | dict[str, Any]] | None = None, amp: str = "none",
         dataset: str | None = None) -> Segmenter:
    """A :class:`Segmenter` for any network file the toolkit reads (see :func:`load_network`).

    ``device``: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``. ``num_classes`` and
    ``arch`` as :func:`load_network`. ``normalization``
    overrides the file's (a name of :data:`cwdseg.data.transforms.NORMALIZATIONS` or a record).
    ``classes`` overrides the file's class names and colours: a dataset name (``cwdseg.data.registry``),
    or a list of names or of ``{"name": ..., "color": [r, g, b]}``.
    ``amp``: autocast of the forward (``none`` = fp32 as the published numbers, ``auto``, ``bf16``,
    ``fp16``; an ONNX file always runs fp32). ``dataset``: the dataset a foreign file was trained on
    (its class count and names; a toolkit student file records its own).
    """
    dev = resolve_device(str(device) if isinstance(device, torch.device) else device, None)
    model, arch, meta, is_onnx = load_network(path, dev, num_classes, arch, dataset)
    if classes is not None:
        meta = {**meta, "classes": class_entries(classes)}
    count = int(meta.get("num_classes", len(meta["classes"]) if meta.get("classes") else NUM_CLASSES))
    if meta.get("classes") and len(meta["classes"]) != count:
        raise ValueError(f"{len(meta['classes'])} classes given for a network of {count} outputs ({path})")
    names, colors = class_table(meta, count)
    if isinstance(normalization, Normalization):
        norm = normalization
    elif normalization is not None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {normalization!r}: valid: {', '.join(NORMALIZATIONS)}")
        norm = NORMALIZATIONS[normalization]
    else:
        norm = from_dict(meta["normalization"]) if "normalization" in meta else NORMALIZATIONS["caffe_bgr"]
    return Segmenter(model, arch, norm, names, colors, dev, None if is_onnx else _as_amp_dtype(amp, dev), is_onnx,
                     Path(path), meta.get("dataset") or dataset)


def evaluate(segmenter_or_path: Segmenter | str | os.PathLike, data_dir: str | os.PathLike, *,
             device: str = "auto", amp: str = "none", **protocol: Any) -> dict[str, Any]:
    """Evaluate a network on a dataset split with ``evaluate.py``'s protocol; returns its results dict
    (``miou``, ``per_class_iou``, ... as fractions in [0, 1]; ``settings``; ``checkpoint`` and ``data`` records).

    ``segmenter_or_path``: a :class:`Segmenter` (its device, normalisation and amp are used) or a file
    for :func:`load` (with ``device`` and ``amp``). ``protocol``: the keywords of :func:`evaluate_split`
    (``dataset``, ``split``, ``max_images``, ``mode``, ``tile``, ``overlap``, ``scales``, ``flip``,
    ``short_side``, ``save_dir``, ...), named as ``evaluate.py``'s flags.
    """
    seg = segmenter_or_path if isinstance(segmenter_or_path, Segmenter) else \
        load(segmenter_or_path, device=device, amp=amp)
    return evaluate_split(seg, data_dir, **protocol)[0]


def evaluate_split(seg: Segmenter, data_dir: str | os.PathLike, *, dataset: str | None = None, split: str = "val",
                   data_list: str | None = None, max_images: int | None = None, mode: str = "whole",
                   tile: Sequence[int] = (512, 512), overlap: float | str = 1 / 3, tile_batch: int = 6,
                   scales: Sequence[float] = (1.0,), flip: bool = False, short_side: int | None = None,
                   batch_size: int = 1, num_workers: int = 2, save_dir: str | os.PathLike | None = None,
                   progress: bool = False, log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], Any]:
    """:func:`evaluate` for a loaded :class:`Segmenter`; returns ``(results, dataset)`` (the dataset's
    ``samples`` name the images, in order). With ``save_dir`` the prediction PNGs are written
    (``results.json`` is the caller's); ``log`` receives one line saying what is evaluated. ``dataset``:
    default the one the segmenter's file records, else cityscapes."""
    dataset = dataset or seg.dataset or "cityscapes"
    if seg.is_onnx:
        raise EvaluationError("evaluation runs PyTorch networks; give the .pth or .safetensors file, "
                              "not the ONNX export")
    from cwdseg.data.registry import dataset_info

    info = dataset_info(dataset, data_dir)
    if info.num_classes != seg.num_classes:
        raise EvaluationError(f"{seg.source or seg.arch} predicts {seg.num_classes} classes but {dataset} has "
                              f"{info.num_classes}; evaluate it on the dataset it was trained for")
    data = build_eval_dataset(data_dir, split, data_list, max_images, dataset=dataset, short_side=short_side,
                              normalization=seg.normalization)
    loader = build_eval_loader(data, batch_size, num_workers)
    if log is not None:
        amp_name = "none" if seg.amp is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}[seg.amp]
        log(f"evaluating {seg.source} ({seg.arch}, input {seg.normalization.name}) on {len(data)} {split} images, "
            f"{mode} mode, scales {list(scales)}, flip {flip}, amp {amp_name}, device {seg.device}")
    results = evaluate_model(seg.model, loader, num_classes=seg.num_classes, mode=mode, tile=tuple(tile),
                             overlap=overlap, scales=tuple(scales), flip=flip, device=seg.device, amp=seg.amp,
                             save_dir=save_dir, split=split, progress=progress, tile_batch=tile_batch, info=info)
    results["checkpoint"] = {"given_as": str(seg.source) if seg.source else None,  # the legend of a later --compare
                             "path": str(seg.source.resolve()) if seg.source else None,
                             "sha256": sha256_file(seg.source) if seg.source else None,
                             "arch": seg.arch, "normalization": seg.normalization.name}
    results["data"] = {"dataset": dataset, "data_dir": str(Path(data_dir).resolve()), "data_list": data_list,
                       "max_images": max_images}
    return results, data


def train(config: RunConfig | dict | str | os.PathLike, *, resume: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """Train the run ``config`` (a :class:`cwdseg.config.RunConfig`, its dict, or a recipe file; resolved and
    checked as ``train.py --config`` resolves it) and return its run folder. The same run as ``train.py``
    with the same settings, bit for bit; a finished run is not trained again unless ``force``; ``resume``
    continues from that ``last.pth`` (default: the folder's own, when it exists). Raises the one-line
    errors of ``train.py`` as exceptions (``cwdseg.config.ConfigError``, ``CheckpointError``, ...)."""
    from cwdseg.cli.train import main, resolve_config_data
    from cwdseg.engine.distributed import cleanup

    cfg = resolve_config_data(config)
    try:
        main(cfg=cfg, resume=None if resume is None else str(resume), force=force)
    finally:
        cleanup()
    return cfg.run_dir

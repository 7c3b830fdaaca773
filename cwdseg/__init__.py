"""cwdseg: channel-wise knowledge distillation (CWD, ICCV 2021) for semantic segmentation.

Rooms (each knows only what it needs):

- :mod:`cwdseg.models`: networks (PSPNet, the ABN layer, connector, discriminator, size summary).
  Models know no files, losses or loops.
- :mod:`cwdseg.data`: datasets, labels, transforms, sampling, loaders, the synthetic generator.
  Data knows no model.
- :mod:`cwdseg.distill`: the loss terms.
- :mod:`cwdseg.engine`: building the parts, the training step, resume state, run log, devices.
- :mod:`cwdseg.evaluation`: whole/sliding inference, metrics, the evaluation loop and its writers.
- :mod:`cwdseg.checkpoint`: loading and saving weights (``weights_only=True``, atomic writes).
- :mod:`cwdseg.viz`: colour maps, panels, curves, overlays, per-class bars, channel distributions, seeds.
- :mod:`cwdseg.export`: ONNX and safetensors exports, their metadata and model card.
- :mod:`cwdseg.config`: the typed run configuration (recipe files, ``config.json``).
- :mod:`cwdseg.cli`: the command lines behind ``train.py`` / ``evaluate.py`` / ``predict.py``
  (``cwd-train``, ``cwd-eval``).

The library, at the top level (:mod:`cwdseg.api`)::

    seg = cwdseg.load("student.pth")             # any network file the toolkit reads -> Segmenter
    ids = seg.predict(rgb_uint8_array)           # (H, W) class ids; also paths and lists
    results = cwdseg.evaluate(seg, "data/cityscapes")
    run_dir = cwdseg.train("configs/cityscapes/cd_logits.yaml")   # or a cwdseg.RunConfig / its dict
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"
__all__ = ["load", "evaluate", "train", "Segmenter", "RunConfig", "__version__"]

if TYPE_CHECKING:
    from cwdseg.api import Segmenter, evaluate, load, train
    from cwdseg.config import RunConfig


def __getattr__(name: str) -> Any:
    # Imported on first use, so that ``import cwdseg`` stays cheap (no torch, no OpenCV).
    if name in ("load", "evaluate", "train", "Segmenter"):
        from cwdseg import api

        return getattr(api, name)
    if name == "RunConfig":
        from cwdseg.config import RunConfig

        return RunConfig
    raise AttributeError(f"module 'cwdseg' has no attribute {name!r}")

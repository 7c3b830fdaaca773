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
- :mod:`cwdseg.export`: ONNX and safetensors exports with their metadata and model card.
- :mod:`cwdseg.viz`: colour maps, panels, overlays, curves, IoU bars and channel distributions.
- :mod:`cwdseg.cli`: the command lines behind ``train.py`` / ``evaluate.py`` / ``predict.py``
  (``cwd-train``, ``cwd-eval``), their parser and value checks.
"""
__version__ = "0.2.0"

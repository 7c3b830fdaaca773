"""Leaving PyTorch: ONNX and safetensors exports of a trained network, their metadata and model card.

- :mod:`.normalization`: the input normalisation a set of weights expects (channel order, mean, std).
- :mod:`.onnx`: ONNX export with dynamic batch/height/width, the ONNX Runtime check, and a module that
  runs an ``.onnx`` file where a PyTorch model is expected (``predict.py``).
- :mod:`.weights`: safetensors files (no pickle) with their metadata.
- :mod:`.metadata`: what an export records (architecture, classes, normalisation, recipe, val mIoU).
- :mod:`.model_card`: the Markdown model card written beside an export.
"""

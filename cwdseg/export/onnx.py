"""ONNX export of a segmentation network with dynamic batch, height and width; checked with ONNX Runtime.

What the exported graph computes: the network's main logits ``[N, C, h, w]`` at its output stride
(8 for the PSPNet: 65x65 for a 512x512 image), *not* upsampled to the image size, so that whole-image and
sliding-window inference (:func:`cwdseg.evaluation.inference.predict_logits`) can run on top of it
exactly as on the PyTorch model. The input ``image`` is ``[N, 3, H, W]`` float32, either

* **normalised** (default): the network's own input, e.g. BGR minus the mean for the CWD weights
  (:class:`cwdseg.data.transforms.Normalization`, recorded in the file's metadata as JSON under
  ``cwdseg.normalization``), or
* **raw** (``fold_normalization=True``): 0..255 values in the network's channel order; the graph
  subtracts the mean and divides by the std itself (metadata ``cwdseg.input = raw``).

Export details, each checked by ``tests/test_export.py`` at two input sizes:

* the network is exported in eval mode (dropout off, batch norm on its running statistics), through
  the ``torch.export``-based exporter (``dynamo=True``);
* ``nn.AdaptiveAvgPool2d`` with an output larger than 1x1 (the PSP bins 2, 3, 6) is replaced, in a copy
  of the network, by :class:`ExactAdaptiveAvgPool2d`: the exporter turns adaptive pooling into an
  ``AveragePool`` whose kernel is fixed at the example size, which is silently wrong at any other
  input size. The replacement computes the same bins as PyTorch (start ``floor(i L / b)``, end
  ``ceil((i + 1) L / b)``) as two small averaging matrices built from the input's shape, so it stays
  exact for every size. Global pooling (1x1) exports as ``ReduceMean`` and is left alone.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from cwdseg.data.transforms import Normalization
from cwdseg.export.normalization import ORIGINAL, apply, from_dict, to_dict
from cwdseg.models.summary import unwrap_model

INPUT_NAME, OUTPUT_NAME = "image", "logits"
META_PREFIX = "cwdseg."


class ExportError(RuntimeError):
    """An export or an exported file that does not work, with what to do about it."""


class ExactAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d(output_size)`` written with shape-derived averaging matrices (ONNX-exportable
    for dynamic H and W): ``out = P_h @ x @ P_w^T`` with ``P[i, j] = 1 / (end_i - start_i)`` on the bin."""

    def __init__(self, output_size: int | Sequence[int | None]) -> None:
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if len(size) != 2 or any(s is None for s in size):
            raise ValueError(f"ExactAdaptiveAvgPool2d needs two explicit output sizes, got {output_size!r}")
        self.output_size = (int(size[0]), int(size[1]))

    @staticmethod
    def _matrix(length: Any, bins: int, like: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(bins, device=like.device)
        start = (idx * length) // bins
        end = ((idx + 1) * length + bins - 1) // bins  # ceil((i + 1) L / b)
        pos = torch.arange(length, device=like.device)
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
        return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._matrix(x.shape[-2], self.output_size[0], x)
        cols = self._matrix(x.shape[-1], self.output_size[1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _is_global(output_size: Any) -> bool:
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    return all(s == 1 for s in size)


def export_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, on the CPU, with non-global adaptive pooling made exact for ONNX."""
    net = copy.deepcopy(model).cpu().eval()
    for _name, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d) and not _is_global(child.output_size):
                setattr(module, child_name, ExactAdaptiveAvgPool2d(child.output_size))
    return net


class LogitsOnly(nn.Module):
    """The network's main logits alone (the first element of a ``(logits, aux, feature)`` output), with the
    auxiliary head skipped when the network's forward takes ``aux``; optionally the normalisation first."""

    def __init__(self, model: nn.Module, normalization: Normalization | None = None) -> None:
        super().__init__()
        self.model = model
        self.takes_aux = "aux" in inspect.signature(model.forward).parameters
        self.fold = normalization is not None
        norm = normalization or ORIGINAL
        self.register_buffer("mean", torch.tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.fold:
            image = (image - self.mean) / self.std
        out = self.model(image, aux=False) if self.takes_aux else self.model(image)
        return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence what the exporter says about itself, none of it the user's concern: one log line per
    torchvision operator it cannot register (torchvision is not a dependency here) and torch's own
    ``LeafSpec`` deprecation warning from inside ``torch.export``. Other warnings still show."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, path: str | Path, normalization: Normalization = ORIGINAL,
                fold_normalization: bool = False, metadata: dict[str, Any] | None = None,
                example_size: tuple[int, int] = (64, 64), opset: int = 18) -> Path:
    """Write ``model``'s logits graph to ``path`` (dynamic batch/height/width; see the module docstring).

    ``metadata`` entries are stored as the file's ``metadata_props`` (JSON-encoded unless strings) under
    ``cwdseg.<key>``, together with ``cwdseg.normalization`` and ``cwdseg.input`` (normalised | raw).
    """
    from torch.export import Dim

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(export_ready(model), normalization if fold_normalization else None).eval()
    example = torch.zeros(2, 3, *example_size)
    dims = {"image": {0: Dim("batch"), 2: Dim("height"), 3: Dim("width")}}
    try:
        with quiet_exporter():
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_shapes=dims, opset_version=opset,
                              verbose=False, optimize=True, external_data=False)
    except Exception as exc:  # the exporter's own errors are long; keep the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX export of {type(unwrap_model(model)).__name__} failed: {first}") from exc
    import onnx

    proto = onnx.load(str(path))
    props = {"normalization": to_dict(normalization), "input": "raw" if fold_normalization else "normalised",
             **(metadata or {})}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key = META_PREFIX + key
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))
    static = static_dims(path)
    if static:
        raise ExportError(f"{path}: the graph hard-codes {', '.join(static)}; it would fail at other image sizes")
    return path



def static_dims(path: str | Path) -> list[str]:
    """Names of the input/output dimensions (batch, height, width) that the graph fixes to a number."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    fixed = []
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, what in ((0, "batch"), (2, "height"), (3, "width")):
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"{value.name} {what} = {dims[axis].dim_value}")
    return fixed


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``cwdseg.*`` metadata of an exported file, JSON values decoded (prefix removed)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out: dict[str, Any] = {}
    for entry in proto.metadata_props:
        if entry.key.startswith(META_PREFIX):
            try:
                out[entry.key[len(META_PREFIX):]] = json.loads(entry.value)
            except json.JSONDecodeError:
                out[entry.key[len(META_PREFIX):]] = entry.value
    return out


def _session(path: str | Path, device: torch.device | None = None):
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in available:
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({str(exc).strip().splitlines()[0]}); "
                          f"export it again with tools/export.py") from exc


def compare_with_onnxruntime(model: nn.Module, path: str | Path,
                             sizes: Sequence[tuple[int, int]] = ((64, 64), (96, 128)), batch: int = 2,
                             normalization: Normalization | None = None, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| between ONNX Runtime and the PyTorch model (fp32, eval) per input size.

    Inputs are random images (uint8 pixels through ``normalization`` when the graph takes raw values,
    i.e. was exported with ``fold_normalization``; else normalised values drawn the same way).
    """
    sess = _session(path)
    meta = read_onnx_metadata(path)
    norm = normalization or from_dict(meta.get("normalization", to_dict(ORIGINAL)))
    raw = meta.get("input") == "raw"
    reference = LogitsOnly(copy.deepcopy(model).cpu().eval()).eval()
    rng = np.random.default_rng(seed)
    diffs = {}
    for h, w in sizes:
        pixels = rng.integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)  # BGR, as OpenCV decodes
        normalised = np.stack([apply(norm, p) for p in pixels])
        feed = normalised
        if raw:
            ordered = pixels.transpose(0, 3, 1, 2)
            feed = (ordered[:, ::-1] if norm.rgb else ordered).astype(np.float32)
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(feed)})[0]
        with torch.no_grad():
            want = reference(torch.from_numpy(normalised)).numpy()
        if got.shape != want.shape:
            raise ExportError(f"{path}: ONNX output {got.shape} but PyTorch {want.shape} at input {h}x{w}")
        diffs[f"{h}x{w}"] = float(np.abs(got - want).max())
    return diffs


class OnnxSegmenter(nn.Module):
    """An exported ``.onnx`` file where a PyTorch network is expected: ``forward(x)`` takes the *normalised*
    input ``[N, 3, H, W]`` (whatever the file's ``input`` is) and returns the logits as a tensor on x's
    device. Runs in float32 on ONNX Runtime (CUDA provider when present and ``device`` is CUDA)."""

    def __init__(self, path: str | Path, device: torch.device | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = _session(self.path, device)
        self.metadata = read_onnx_metadata(self.path)
        self.normalization = from_dict(self.metadata.get("normalization", to_dict(ORIGINAL)))
        self.raw_input = self.metadata.get("input") == "raw"
        mean = torch.tensor(self.normalization.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.normalization.std).view(1, 3, 1, 1)
        self.register_buffer("_mean", mean, persistent=False)
        self.register_buffer("_std", std, persistent=False)
        self._anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # so that .parameters() has a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().float().cpu()
        if self.raw_input:  # undo the normalisation: the graph applies it itself
            feed = feed * self._std.cpu() + self._mean.cpu()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(feed.numpy())})[0]
        return torch.from_numpy(out).to(x.device)

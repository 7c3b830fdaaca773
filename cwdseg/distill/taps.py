"""Named taps: read any layer of a model by its module path, with forward hooks, without touching
the model's ``forward``.

A tap name is one of

* ``logits`` / ``aux`` / ``feature``: element 0 / 1 / 2 of the model's output tuple
  ``(logits, aux_logits, head_feature)`` (captured by a hook on the model itself);
* an alias of the architecture (``ArchSpec.taps`` in :mod:`cwdseg.models`: ``stage1``..``stage4``,
  ``head``, ...), resolved to a module path;
* a module path, e.g. ``layer3`` (PSPNet) or ``pretrained.layer3`` (DeepLabV3), whose output
  tensor is captured.

Usage::

    with TapRecorder(teacher, ["stage3", "logits"], aliases=arch_spec("pspnet_resnet101").taps) as rec:
        with torch.inference_mode():
            teacher(images)
    maps = rec.cloned()      # outside inference_mode: tensors that autograd may save

Tensors captured under ``torch.inference_mode`` (the training step's teacher) are inference
tensors: a loss that saves them for backward fails with "Inference tensors cannot be saved for
backward". :meth:`TapRecorder.cloned` copies them, and must be called outside inference mode
(a clone made inside is still an inference tensor).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

OUTPUT_TAPS: dict[str, int] = {"logits": 0, "aux": 1, "feature": 2}


class TapError(KeyError):
    """An unknown tap or a tap that is not a tensor; the message is one line listing the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers (module paths are
    the plain model's)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def available_paths(model: nn.Module, depth: int = 2) -> list[str]:
    """Module paths of ``model`` up to ``depth`` dots deep, numbered children left out below the top
    level (the listing an error shows; any deeper path works too)."""
    out = []
    for name, _ in _unwrap(model).named_modules():
        parts = name.split(".")
        if name and len(parts) <= depth and not any(p.isdigit() for p in parts[1:]):
            out.append(name)
    return out


def resolve_tap(model: nn.Module, name: str, aliases: Mapping[str, str] | None = None) -> str:
    """The module path (or output tap) that ``name`` means on ``model``; :class:`TapError` if none."""
    if name in OUTPUT_TAPS:
        return name
    path = (aliases or {}).get(name, name)
    try:
        _unwrap(model).get_submodule(path)
    except AttributeError:
        names = [*OUTPUT_TAPS, *(aliases or {}), *available_paths(model)]
        via = f" (alias of {path!r})" if path != name else ""
        raise TapError(f"unknown tap {name!r}{via} on {type(_unwrap(model)).__name__}; available: "
                       f"{', '.join(names)} (or any deeper module path)") from None
    return path


class TapRecorder:
    """Context manager that records the named taps of ``model`` during the forwards inside it.

    ``taps``: ``{name: tensor}`` of the last forward (names as given, aliases not expanded). Hooks are
    removed on exit. Unknown names raise :class:`TapError` at construction, before any forward.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], aliases: Mapping[str, str] | None = None) -> None:
        self.model = _unwrap(model)
        self.paths = {name: resolve_tap(self.model, name, aliases) for name in names}
        self.taps: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _module_hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TapError(f"tap {name!r} ({self.paths[name]}) returns {type(output).__name__}, not a tensor; "
                               "tap one of its submodules")
            self.taps[name] = output
        return hook

    def _output_hook(self, module: nn.Module, inputs: object, output: object) -> None:
        for name, path in self.paths.items():
            if path in OUTPUT_TAPS:
                index = OUTPUT_TAPS[path]
                value = output if isinstance(output, Tensor) and index == 0 else (
                    output[index] if isinstance(output, (tuple, list)) and len(output) > index else None)
                if not isinstance(value, Tensor):
                    raise TapError(f"tap {name!r}: the model's output has no tensor at position {index} "
                                   "(aux is None when the model runs with aux=False)")
                self.taps[name] = value

    def __enter__(self) -> "TapRecorder":
        if any(p in OUTPUT_TAPS for p in self.paths.values()):
            self._handles.append(self.model.register_forward_hook(self._output_hook))
        for name, path in self.paths.items():
            if path not in OUTPUT_TAPS:
                module = self.model.get_submodule(path)
                self._handles.append(module.register_forward_hook(self._module_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def cloned(self) -> dict[str, Tensor]:
        """Copies of the recorded taps that autograd may save (call outside ``torch.inference_mode``)."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("TapRecorder.cloned() inside torch.inference_mode gives inference tensors again; "
                               "call it after leaving inference mode")
        missing = [n for n in self.paths if n not in self.taps]
        if missing:
            raise TapError(f"taps {', '.join(missing)} were not recorded: run the model's forward inside the recorder")
        return {name: t.clone() for name, t in self.taps.items()}

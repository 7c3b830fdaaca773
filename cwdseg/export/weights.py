"""safetensors files of a network's weights: no pickle anywhere, metadata inside the file and beside it.

The tensors are :func:`cwdseg.checkpoint.export_state_dict` (the released key layout: no wrapper
prefixes, no ``num_batches_tracked``), so ``build_model(arch).load_state_dict(load_file(path))`` works in
plain PyTorch. The export metadata (:mod:`cwdseg.export.metadata`) is stored in the file's header as one
JSON string under the key ``cwdseg`` (safetensors metadata must be ``str -> str``).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cwdseg.checkpoint import CheckpointError, export_state_dict, infer_arch
from cwdseg.models import build_model

METADATA_KEY = "cwdseg"


def save_safetensors(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, Any] | None = None) -> Path:
    """Write the weights to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    if isinstance(model_or_state, nn.Module):
        state = export_state_dict(model_or_state)
    else:
        state = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in model_or_state.items())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(dict(state), tmp, metadata={METADATA_KEY: json.dumps(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_safetensors(path: str | Path) -> tuple["OrderedDict[str, torch.Tensor]", dict[str, Any]]:
    """``(state_dict, metadata)`` of a safetensors file (the format holds only tensors: nothing executes)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read as a safetensors file ({exc}); export it again") from exc
    try:
        metadata = json.loads(header.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its '{METADATA_KEY}' metadata is not JSON ({exc})") from exc
    return state, metadata


def load_safetensors_model(path: str | Path) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build the network a safetensors export holds and load it strictly; returns ``(model, arch, metadata)``.

    The architecture is the metadata's ``arch``, or read from the keys (``infer_arch``) when absent.
    """
    state, metadata = load_safetensors(path)
    arch = metadata.get("arch") or infer_arch(state)
    num_classes = int(metadata.get("num_classes", 19))
    try:
        model = build_model(arch, num_classes=num_classes)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: does not fit {arch}: {len(missing)} missing keys {missing[:5]}, "
                              f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}")
    return model.eval(), arch, metadata

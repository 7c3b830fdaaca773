"""Reading and writing weight files, in one place for training and evaluation.

Files handled:

* **teacher** PSPNet-R101: the original layout (``pspmodule.*`` / ``head.*``, 565 keys, as CWD's
  ``teacher_city.pth``) or the older toolbox layout (``head.0.*`` = PSP module, ``head.1.*`` =
  classifier, plus an unused ImageNet ``fc.*``, as SKD's teacher); strict on keys and shapes.
* **student** PSPNet-R18: the released 150-key layout, strict; also the ``"student"`` entry of our
  training checkpoint ``last.pth``.
* **ImageNet init**: the CSAIL (MIT sceneparsing) deep-stem ResNet-18 ``resnet18-imagenet.pth``;
  every backbone key must be present with its shape, the rest (``fc.*``) is skipped and reported.
* **CIRKD family** (``winycg/CIRKD``): the DeepLabV3-ResNet101 Cityscapes teacher
  (``deeplabv3_resnet101_citys_best_model.pth``: ``pretrained.*`` ResNetV1s backbone, ``head.aspp.*``
  / ``head.block.*``, ``auxlayer.*``, BN ``num_batches_tracked``), its DeepLabV3-R18 / -MobileNetV2
  and PSPNet-MobileNetV2 (``head.psp.*``) students, and the ImageNet initialisations
  ``resnet18-imagenet.pth`` / ``resnet101-imagenet.pth``
  (the same deep-stem layout as CSAIL's: top-level ``conv1..3``, ``layer1..4``, ``fc.*``; loaded
  under ``pretrained.``) and ``mobilenetv2-imagenet.pth`` (``features.0..18``, ``classifier.*``;
  ``features.0..17`` are loaded under ``pretrained.net.``, the 1x1 conv ``features.18`` and the
  classifier are skipped, as CIRKD does).

All reads use ``torch.load(..., weights_only=True)``: plain tensor dicts in the pre-1.0 (legacy)
and the zip serialization load; a pickle that carries code or custom objects is refused.
Every problem is a :class:`CheckpointError` naming the file and what to do, raised *before* any
tensor is copied into the model: a bad file never leaves a half-loaded or random model behind.

Weights are loaded as they are. :class:`cwdseg.models.abn.ABN` computes the InPlace-ABN scale ``|w| + eps``, so
the negative BN weights of the released files need no conversion (the ImageNet file is loaded the
same way, as the original code did). ``num_batches_tracked`` entries, which the original files do
not have and our ABN does not use, are ignored on load and never written.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from cwdseg.models import arch_spec
from cwdseg.models.mobilenetv2 import MobileNetV2Dilated
from cwdseg.models.pspnet import PSPNet
from cwdseg.models.resnet import ResNetV1s
from cwdseg.models.summary import unwrap_model

# Where to get the deep-stem ImageNet ResNet-18 that the original student starts from.
CSAIL_RESNET18_URL = "http://sceneparsing.csail.mit.edu/model/pretrained_resnet/resnet18-imagenet.pth"
HEAD_PREFIXES = ("pspmodule.", "head.", "dsn.", "auxlayer.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A weight file is missing, unreadable, untrusted or does not fit the model."""


# --------------------------------------------------------------------------------------------
# reading


def _torch_load(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path} (check the path; see ckpt/README.md "
                              "for where the released weights come from)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {path}")
    foreign = _foreign_format(path)
    if foreign:
        raise CheckpointError(f"{path}: {foreign}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" not in text and "Unsupported class" not in text:
            # not a pickle the weights-only reader understands at all: a truncated file, an HTML page ...
            reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            raise CheckpointError(
                f"{path}: cannot be read as a PyTorch file (the weights_only reader rejected it: "
                f"{reason.group(1).strip() if reason else type(e).__name__}); the file may be truncated, "
                "an HTML download page or an untrusted pickle - download it again") from e
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" (it contains {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused to load{what}: torch.load(weights_only=True) accepts only tensors and plain "
            "containers, and this pickle carries code or custom objects. Files from an untrusted source "
            "can execute code when unpickled. If you trust it, re-save only its tensors once, e.g. "
            "torch.save(obj.state_dict(), 'clean.pth') in a trusted session, and load that file."
        ) from e
    except Exception as e:  # truncated download, HTML error page, not a torch file at all
        raise CheckpointError(f"{path}: cannot be read as a PyTorch file ({type(e).__name__}: {e}); "
                              "the file may be truncated or not a checkpoint - download it again") from e


def _foreign_format(path: Path) -> str | None:
    """What a file is when it is an export of tools/export.py rather than PyTorch weights, with the command
    that takes it (None otherwise): an ONNX graph (protobuf, field 1 ``ir_version``) or safetensors."""
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"pytorch" in head.lower()):
        return ("is an ONNX export (tools/export.py), not PyTorch weights: run it with predict.py "
                "--restore-from FILE, or pass the .pth student it was exported from")
    if path.suffix.lower() == ".safetensors" or (head[8:10] == b'{"' and not head.startswith((b"PK", b"\x80"))):
        return ("is a safetensors export (tools/export.py), not a .pth checkpoint: predict.py --restore-from "
                "takes it, or pass the .pth student it was exported from")
    return None


def _check_tensor_dict(obj: Any, path: Path | str, where: str = "") -> "OrderedDict[str, torch.Tensor]":
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}{where}: expected a state_dict (a dict of name -> tensor), "
                              f"found a {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ", ".join(f"{k!r} ({type(obj[k]).__name__})" for k in bad[:MAX_LISTED])
        raise CheckpointError(f"{path}{where}: not a state_dict: {len(bad)} entries are not tensors: {shown}"
                              + (" ...; a training checkpoint? its 'student' entry is read automatically"
                                 if "student" not in obj else ""))
    out = OrderedDict(obj)
    if getattr(obj, "_metadata", None) is not None:
        out._metadata = obj._metadata  # type: ignore[attr-defined]  # the toolkit's student metadata rides here
    return out


def load_state_dict_file(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """The name -> tensor dict stored in ``path`` (legacy or zip serialization, weights_only).

    A training checkpoint of this toolkit (a dict with a ``"student"`` state_dict, as ``last.pth``)
    gives its student weights. Raises :class:`CheckpointError` for a missing or unreadable file, a
    pickle with code, or anything that is not a dict of tensors.
    """
    if Path(path).is_dir():  # a Hugging Face SegFormer folder (see the SegFormer section at the end)
        return _as_toolkit_layout(read_hf_folder(path), path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("student"), dict):
        return _check_tensor_dict(obj["student"], path, "['student']")
    return _as_toolkit_layout(_check_tensor_dict(_segformer_container(obj), path), path)


def load_checkpoint_dict(path: str | os.PathLike) -> dict:
    """A training checkpoint (e.g. ``last.pth``: nested dicts of tensors, numbers, strings, lists),
    read with weights_only=True. Raises :class:`CheckpointError` if it is not a dict."""
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a training checkpoint (a dict), found a {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------------
# checking a dict against a model


def _drop_counters(sd: dict) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))


def _resnet_depth(sd: dict, prefix: str) -> str | None:
    """``"resnet18"`` / ``"resnet101"`` from the deep-stem backbone keys under ``prefix``, or None."""
    stem = sd.get(prefix + "conv1.weight")
    if stem is None or tuple(stem.shape) != (64, 3, 3, 3) or prefix + "conv3.weight" not in sd:
        return None
    conv1 = sd.get(prefix + "layer1.0.conv1.weight")
    blocks3 = {k[len(prefix):].split(".")[1] for k in sd if k.startswith(prefix + "layer3.")}
    bottleneck = prefix + "layer1.0.conv3.weight" in sd
    if conv1 is not None and bottleneck and tuple(conv1.shape[2:]) == (1, 1) and len(blocks3) == 23:
        return "resnet101"
    if conv1 is not None and not bottleneck and tuple(conv1.shape[2:]) == (3, 3) and len(blocks3) == 2:
        return "resnet18"
    return None


def _is_mobilenetv2(sd: dict, prefix: str) -> bool:
    stem = sd.get(prefix + "features.0.0.weight")
    return stem is not None and tuple(stem.shape) == (32, 3, 3, 3)


def infer_backbone(state_dict: dict) -> str | None:
    """The backbone of an ImageNet initialisation file (top-level keys): ``"resnet18"``,
    ``"resnet101"`` (deep stem) or ``"mobilenetv2"``; None when it is none of these."""
    if _is_mobilenetv2(state_dict, ""):
        return "mobilenetv2"
    return _resnet_depth(state_dict, "")


def infer_arch(state_dict: dict) -> str:
    """The registry name (``cwdseg.models.ARCHS``) of the network a state_dict holds, read from
    its key names and shapes: the original layout (top-level ``conv1``.., either PSPNet teacher
    layout, or a CSAIL ImageNet ResNet) -> ``pspnet_resnet18`` / ``pspnet_resnet101``; CIRKD's
    (``pretrained.*`` + ``head.aspp.*``) -> ``deeplabv3_resnet18`` / ``_resnet101`` / ``_mobilenetv2``;
    any SegFormer layout -> ``segformer_b0`` ... ``_b5``."""
    segformer = infer_segformer_arch(state_dict)
    if segformer is not None:
        return segformer
    if any(k.startswith("pretrained.") for k in state_dict):
        if any(k.startswith("head.psp.") for k in state_dict):
            if _is_mobilenetv2(state_dict, "pretrained.net."):
                return "pspnet_mobilenetv2"
            raise CheckpointError("cannot tell the architecture of this state_dict: a CIRKD PSPNet (head.psp.*) on a "
                                  "ResNet, which this toolkit does not build (its pspnet_resnet18 is the CWD paper's); "
                                  "supported CIRKD files: DeepLabV3-R18/R101/MobileNetV2, PSPNet-MobileNetV2")
        if not any(k.startswith("head.aspp.") for k in state_dict):
            raise CheckpointError("cannot tell the architecture of this state_dict: a CIRKD-layout backbone "
                                  "(pretrained.*) without a DeepLabV3 (head.aspp.*) or PSPNet (head.psp.*) head")
        if _is_mobilenetv2(state_dict, "pretrained.net."):
            return "deeplabv3_mobilenetv2"
        depth = _resnet_depth(state_dict, "pretrained.")
        if depth is not None:
            return f"deeplabv3_{depth}"
        raise CheckpointError("cannot tell the architecture of this state_dict: a DeepLabV3 head (head.aspp.*) on a "
                              "backbone that is neither CIRKD's deep-stem ResNet-18/101 (pretrained.conv1.weight "
                              "[64, 3, 3, 3] ...) nor its MobileNetV2 (pretrained.net.features.0.0.weight "
                              "[32, 3, 3, 3])"
                              + "".join(f"; {h}" for h in _hints(state_dict)))
    stem = state_dict.get("conv1.weight")
    if stem is None or tuple(stem.shape) != (64, 3, 3, 3) or "conv3.weight" not in state_dict:
        raise CheckpointError("cannot tell the architecture of this state_dict: it has no deep stem "
                              "(conv1.weight [64, 3, 3, 3] ... conv3.weight, or pretrained.conv1.weight ... for "
                              "CIRKD's)"
                              + "".join(f"; {h}" for h in _hints(state_dict)))
    depth = _resnet_depth(state_dict, "")
    if depth is not None:
        return f"pspnet_{depth}"
    raise CheckpointError("cannot tell the architecture of this state_dict (expected the deep-stem "
                          "ResNet-18 or ResNet-101 backbone keys, e.g. layer1.0.conv1.weight)"
                          + "".join(f"; {h}" for h in _hints(state_dict)))


def _hints(sd: dict, expected_arch: str | None = None, imagenet: bool = False, role: str | None = None) -> list[str]:
    """Likely explanations of a mismatch, from the file's keys and shapes (``role``: what the file was
    loaded as, ``"teacher"`` or ``"student"``; the flag to suggest follows it)."""
    hints = []
    keys = list(sd)
    for prefix in WRAPPER_PREFIXES:
        n = sum(k.startswith(prefix) for k in keys)
        if keys and n >= len(keys) // 2:
            hints.append(f"keys are prefixed {prefix!r} (saved from a "
                         f"{'DataParallel/DDP' if prefix == 'module.' else 'torch.compile'} wrapper): strip the "
                         f"prefix, e.g. {{k.removeprefix({prefix!r}): v for k, v in sd.items()}}, and save again")
    conv1 = sd.get("conv1.weight")
    if conv1 is not None and tuple(conv1.shape[2:]) == (7, 7):
        hints.append("this looks like a torchvision ResNet (7x7 conv1); the deep-stem CSAIL weights are needed: "
                     f"download resnet18-imagenet.pth from {CSAIL_RESNET18_URL} (see ckpt/README.md)")
    if any(k.startswith("head.0.") for k in keys):
        hints.append("this is a teacher in the toolbox layout (head.0.* / head.1.*): load it as the teacher")
    if expected_arch is not None:
        try:
            arch = infer_arch(sd)
        except CheckpointError:
            arch = None
        if arch is not None and arch != expected_arch and any(k.startswith(HEAD_PREFIXES) for k in keys):
            loaded_as = role or ("teacher" if arch.endswith("resnet101") else "student")
            hints.append(f"the file holds a {arch.split('_', 1)[1]} {arch_spec(arch).label.split('-')[0]} ({arch}), "
                         f"the model is a {expected_arch}: is it the {loaded_as} file? (or pass --{loaded_as}-arch "
                         f"{arch})")
    if not imagenet and not hints and infer_backbone(sd) is not None \
            and not any(k.startswith(HEAD_PREFIXES + ("pretrained.",)) for k in keys):
        hints.append(f"the file is an ImageNet {infer_backbone(sd)} backbone (no segmentation head): use it as the "
                     "ImageNet initialisation (--student-init)")
    return hints


def _listing(title: str, items: list[str]) -> str:
    more = f" ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"\n  {len(items)} {title}: {', '.join(items[:MAX_LISTED])}{more}"


def _mismatch_report(path: Any, what: str, missing: list[str], unexpected: list[str],
                     mismatched: list[tuple[str, tuple, tuple]], hints: Iterable[str]) -> str:
    msg = f"{path}: does not fit the {what}; nothing was loaded."
    msg += "".join(f"\n  hint: {h}" for h in hints)  # first: below can be hundreds of lines
    if missing:
        msg += _listing("missing keys", missing)
    if unexpected:
        msg += _listing("unexpected keys", unexpected)
    if mismatched:  # every one: a shape mismatch is the thing the user must see
        msg += f"\n  {len(mismatched)} shape mismatches (file vs model):"
        msg += "".join(f"\n    {k}: {list(f)} vs {list(m)}" for k, f, m in mismatched)
    return msg


def _arch_of(model: nn.Module) -> str | None:
    try:
        return infer_arch(model.state_dict())
    except CheckpointError:
        return None


def _load_strict(model: nn.Module, sd: dict, path: Any, what: str) -> None:
    """Check every key and shape first, then load strictly; nothing is copied if anything differs."""
    model = unwrap_model(model)
    target = _drop_counters(model.state_dict())
    sd = _drop_counters(sd)
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in target
                  if k in sd and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        hints = _hints(sd, _arch_of(model), role=what.split()[0] if what.startswith(("teacher", "student")) else None)
        if ("head.weight" in sd and "head.weight" in target
                and sd["head.weight"].shape[0] != target["head.weight"].shape[0]):
            hints.insert(0, f"the file has {sd['head.weight'].shape[0]} classes, the model "
                            f"{target['head.weight'].shape[0]}: pass --num-classes {sd['head.weight'].shape[0]}")
        raise CheckpointError(_mismatch_report(path, what, missing, unexpected, mismatched, hints))
    result = model.load_state_dict(sd, strict=False)  # counters (if the model has any) stay as they are
    leftover = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; guard anyway
        raise CheckpointError(f"{path}: load_state_dict disagreed: missing {leftover}, "
                              f"unexpected {result.unexpected_keys}")


# --------------------------------------------------------------------------------------------
# the three kinds of file


def toolbox_to_original(sd: dict) -> "tuple[OrderedDict[str, torch.Tensor], list[str]]":
    """Rename a toolbox-layout teacher dict (``head.0.*`` PSP module, ``head.1.*`` classifier) to
    the original layout (``pspmodule.*``, ``head.*``) and drop its ImageNet ``fc.*``.
    Returns (renamed dict, dropped keys)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    dropped = []
    for k, v in sd.items():
        if k.startswith("head.0."):
            out["pspmodule." + k[len("head.0."):]] = v
        elif k.startswith("head.1."):
            out["head." + k[len("head.1."):]] = v
        elif k.startswith("fc."):
            dropped.append(k)
        else:
            out[k] = v
    return out, dropped


def load_network(model: nn.Module, path: str | os.PathLike, role: str = "network") -> None:
    """Load a network file into ``model``, strictly (every key, every shape), whatever its role.

    PSPNet: the original layout (``pspmodule.*``/``head.*``) and the toolbox layout
    (``head.0.*``/``head.1.*`` + ``fc.*``, the ImageNet classifier, which is dropped).
    CIRKD's networks: their layout as it is (``num_batches_tracked`` entries are not compared).
    """
    sd = load_state_dict_file(path)
    if any(k.startswith("head.0.") for k in sd) and isinstance(unwrap_model(model), PSPNet):
        sd, _ = toolbox_to_original(sd)
    _load_strict(model, sd, path, f"{role} ({_arch_of(unwrap_model(model)) or 'network'})")


def load_teacher(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a teacher file into ``model`` (:func:`load_network`)."""
    load_network(model, path, "teacher")


def load_student(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a student file (released 150-key layout, or the ``"student"`` entry of ``last.pth``)
    into ``model``, strictly. Keys with a ``module.``/``_orig_mod.`` prefix are an error (with a hint)."""
    sd = load_state_dict_file(path)
    _load_strict(model, sd, path, f"student ({_arch_of(unwrap_model(model)) or 'network'})")


def imagenet_prefix(model: nn.Module) -> str:
    """Where the keys of an ImageNet initialisation file go in ``model``: ``""`` for the original's
    PSPNets (top-level backbone), ``"pretrained."`` for CIRKD's ResNet backbones and ``"pretrained.net."``
    for its MobileNetV2 (file ``features.*`` -> model ``pretrained.net.features.*``)."""
    backbone = getattr(unwrap_model(model), "pretrained", None)
    if isinstance(backbone, MobileNetV2Dilated):
        return "pretrained.net."
    if isinstance(backbone, ResNetV1s):
        return "pretrained."
    return ""


def load_imagenet_backbone(model: nn.Module, path: str | os.PathLike, verbose: bool = True) -> dict[str, list[str]]:
    """Initialise the backbone of ``model`` from an ImageNet file: a deep-stem ResNet (the CSAIL /
    CIRKD ``resnet18-imagenet.pth``, ``resnet101-imagenet.pth``) or CIRKD's ``mobilenetv2-imagenet.pth``;
    the heads keep their initialisation. The file's keys are top-level (``conv1.weight``,
    ``features.0.0.weight``); they go under :func:`imagenet_prefix` in the model.

    Every backbone key of the model must be in the file with its shape, otherwise a
    :class:`CheckpointError` lists the missing keys / shape mismatches and a hint (prefixed keys,
    torchvision's 7x7 stem, ...). File entries that are not backbone keys (``fc.*``, ``classifier.*``,
    MobileNetV2's ``features.18``) are skipped. The BN weights are loaded as they are (the PSPNets'
    ABN applies ``|w| + eps``, as the original did).

    Returns ``{"loaded": [...], "skipped": [...], "not_loaded": [...]}``: model keys loaded, file keys
    skipped, model keys left at their initialisation; prints a summary when ``verbose``.
    """
    if isinstance(unwrap_model(model), SegFormer):  # MiT encoder files (see the SegFormer section)
        return load_segformer_encoder(model, path, verbose)
    raw = load_state_dict_file(path)
    net = unwrap_model(model)
    prefix = imagenet_prefix(net)
    sd = OrderedDict((prefix + k, v) for k, v in _drop_counters(raw).items())
    target = _drop_counters(net.state_dict())
    if prefix:
        backbone = [k for k in target if k.startswith(prefix)]
    else:
        backbone = [k for k in target if not k.startswith(HEAD_PREFIXES)]
    missing = [k for k in backbone if k not in sd]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in backbone
                  if k in sd and sd[k].shape != target[k].shape]
    if missing or mismatched:
        hints = _hints(raw, imagenet=True)
        found, wanted_bb = infer_backbone(raw), _model_backbone(net)
        if found is not None and found != wanted_bb:
            hints.append(f"the file is an ImageNet {found}, the model's backbone is a {wanted_bb}: pass the "
                         f"{wanted_bb}-imagenet.pth file (or --student-arch for a {found} student)")
        if prefix and any(k.startswith(prefix) for k in raw):
            hints.append(f"the file's keys already start with {prefix!r}: it is a whole segmentation model, "
                         "not an ImageNet backbone (evaluate it with evaluate.py, or use it as --teacher-ckpt)")
        missing_shown = [k[len(prefix):] if prefix else k for k in missing]
        raise CheckpointError(_mismatch_report(
            path, "backbone of the model (ImageNet initialisation needs every backbone key"
                  + (f"; file keys are read under {prefix!r})" if prefix else ")"),
            missing_shown, [], mismatched, hints))
    wanted = set(backbone)
    result = net.load_state_dict(OrderedDict((k, sd[k]) for k in backbone), strict=False)
    if result.unexpected_keys:  # cannot happen: all keys come from the model itself
        raise CheckpointError(f"{path}: unexpected keys while loading the backbone: {result.unexpected_keys}")
    report = {
        "loaded": backbone,
        "skipped": [k for k in raw if prefix + k not in wanted],
        "not_loaded": [k for k in target if k not in wanted],
    }
    if verbose:
        print(f"ImageNet initialisation from {path}: loaded {len(report['loaded'])} backbone tensors; "
              f"skipped {len(report['skipped'])} file entries ({_short(report['skipped'])}); "
              f"{len(report['not_loaded'])} head tensors keep their initialisation "
              f"({_short(sorted({k.split('.')[0] + '.*' for k in report['not_loaded']}))})")
    return report


def _model_backbone(net: nn.Module) -> str:
    arch = _arch_of(net)
    return arch.split("_", 1)[1] if arch else "unknown"


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "") if keys else "none"


# --------------------------------------------------------------------------------------------
# writing


def export_state_dict(model: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The model's weights in the released layout: unwrapped from DDP (``.module``) and
    torch.compile (``._orig_mod``), without ``num_batches_tracked``, detached CPU tensors."""
    sd = _drop_counters(unwrap_model(model).state_dict())
    return OrderedDict((k, v.detach().to("cpu", copy=True).contiguous()) for k, v in sd.items())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SaveError(CheckpointError):
    """A file could not be written (no space, no permission); the previous file at that path is intact."""


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on ``folder``'s filesystem."""
    return shutil.disk_usage(folder).free


def _atomic_write(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, flush + fsync,
    ``os.replace``, fsync of the folder. The bytes are known before the first write, so a lack of
    space is reported before anything is written (the old file stays until the new one is complete:
    the filesystem must hold one new file beside it), and a write that fails anyway (ENOSPC, a quota,
    permissions) is a :class:`SaveError` naming the file, the bytes needed and the bytes free."""
    path = Path(path)
    needed = len(data)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = free_bytes(path.parent)
        if needed > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _save_error(path, needed, exc) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a reader sees the old file or the complete new one, never half
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _save_error(path, needed, exc) from None
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _save_error(path: Path, needed: int, exc: OSError) -> SaveError:
    kept = " (the previous file is intact)" if path.exists() else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = free_bytes(path.parent)
        except OSError:
            free = -1
        return SaveError(f"cannot write {path}{kept}: no space left: it needs {needed} bytes, {free} bytes are "
                         "free there; free some space or choose another --save-dir")
    return SaveError(f"cannot write {path}{kept}: {exc.strerror or exc}; check that the folder is writable "
                     "or choose another --save-dir")


def atomic_save(obj: Any, path: str | os.PathLike, legacy_format: bool = False) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see :func:`_atomic_write`). The file is serialised
    in memory first, so its size is known before the disk is touched. ``legacy_format`` writes the
    pre-1.6 serialization."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy_format)
    _atomic_write(path, buffer.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (as :func:`atomic_save`)."""
    _atomic_write(path, text.encode("utf-8"))


STUDENT_FORMAT = "cwdseg/student/1"


def student_filename(dataset: str, step: int) -> str:
    """The student file of ``step``: the original's ``city_<step>_G.pth`` on Cityscapes,
    ``<dataset>_<step>_G.pth`` on the other datasets."""
    return f"{'city' if dataset == 'cityscapes' else dataset}_{step}_G.pth"


def save_student(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Save the student's weights in the released layout (150 keys for PSPNet-R18, no prefixes,
    no ``num_batches_tracked``). The legacy serialization is used so that the file opens in the
    original tools (PyTorch 0.4-1.5) as well as here.

    ``meta`` (plain JSON data: architecture, classes, normalisation, the run's configuration) travels in
    the state dict's ``_metadata`` attribute under ``"cwdseg"``: ``load_state_dict`` ignores entries that
    name no module, ``torch.load(weights_only=True)`` restores them, so the file stays a plain state dict
    that the original code loads strictly."""
    sd = export_state_dict(model)
    if meta is not None:
        sd._metadata = getattr(sd, "_metadata", OrderedDict())  # type: ignore[attr-defined]
        sd._metadata["cwdseg"] = dict(meta, format=STUDENT_FORMAT)  # type: ignore[attr-defined]
    atomic_save(sd, path, legacy_format=True)


def student_metadata(state_dict: dict) -> dict | None:
    """What the toolkit wrote into a student file (:func:`save_student`), or None for a foreign file."""
    meta = getattr(state_dict, "_metadata", None) or {}
    found = meta.get("cwdseg") if isinstance(meta, dict) else None
    return found if isinstance(found, dict) and found.get("format") == STUDENT_FORMAT else None


def state_dict_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys and raw tensor bytes: equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# SegFormer / MiT files (issue 23). The key renaming lives in cwdseg.models.segformer_keys; this
# section reads the files. Accepted: a Hugging Face model folder (config.json + model.safetensors
# or pytorch_model.bin: ``nvidia/segformer-b*-finetuned-*``, ``nvidia/mit-b*``), CIRKD's / NVlabs'
# ``.pth`` (``patch_embed1.*``, ``block1.0.attn.kv.*``, ``linear_fuse.*``; ImageNet ``mit_b*.pth``)
# and mmseg's MiT (``layers.*``, optionally under ``backbone.`` in a ``{'meta', 'state_dict'}`` file;
# the encoder only: mmseg's SegformerHead is another network). Every such file is renamed to the
# toolkit's keys when read, so load_teacher / load_student / evaluate's load_model take it as they are.

from cwdseg.models.segformer import SegFormer  # noqa: E402
from cwdseg.models.segformer_keys import SegformerKeyError, detect_layout, infer_variant, to_toolkit  # noqa: E402

SEGFORMER_FILES_HELP = ("SegFormer files: a Hugging Face folder with config.json and model.safetensors (or "
                        "pytorch_model.bin), e.g. nvidia/segformer-b0-finetuned-cityscapes-1024-1024 or the ImageNet "
                        "encoder nvidia/mit-b0 (download it with `hf download nvidia/mit-b0 --local-dir ckpt/mit-b0`), "
                        "CIRKD's / NVlabs' .pth (mit_b0.pth) or an mmseg MiT file (mit2mmseg.py output)")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_hf_folder(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """The tensors of a Hugging Face SegFormer folder, as stored (hub key names). ``config.json`` must
    say ``"model_type": "segformer"``; weights from ``model.safetensors`` (safetensors) or
    ``pytorch_model.bin`` (torch.load weights_only). Nothing is downloaded."""
    import json

    folder = Path(path)
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder}: is a folder, not a file (and without config.json, not a Hugging Face model "
                              f"folder); give a weight file, or {SEGFORMER_FILES_HELP}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{config}: cannot be read as JSON ({e}); download the folder again") from e
    if model_type != "segformer":
        raise CheckpointError(f"{config}: model_type is {model_type!r}, not 'segformer'; only SegFormer folders are "
                              "read from Hugging Face")
    for name in HF_WEIGHT_FILES:
        weights = folder / name
        if weights.is_file():
            break
    else:
        sharded = sorted(p.name for p in folder.glob("*.index.json"))
        raise CheckpointError(f"{folder}: no {' or '.join(HF_WEIGHT_FILES)} beside config.json"
                              + (f" (found the sharded index {sharded[0]}: merge the shards into one file)" if sharded
                                 else "; download the weights too"))
    if weights.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return OrderedDict(load_file(str(weights), device="cpu"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights}: cannot be read as safetensors ({e}); download it again") from e
    return _check_tensor_dict(_torch_load(weights), weights)


def _segformer_container(obj: Any) -> Any:
    """The state dict inside an mmseg (``{'meta', 'state_dict'}``) or NVlabs (``{'model'}``) SegFormer file;
    any other object as it is."""
    if isinstance(obj, dict):
        for entry in ("state_dict", "model"):
            inner = obj.get(entry)
            if isinstance(inner, dict) and detect_layout(inner) is not None:
                return inner
    return obj


def _segformer_to_toolkit(sd: "OrderedDict[str, torch.Tensor]", path: Any,
                          encoder_only: bool = False) -> "tuple[OrderedDict[str, torch.Tensor], list[str]]":
    try:
        renamed, dropped, _ = to_toolkit(sd, encoder_only=encoder_only)
    except SegformerKeyError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return renamed, dropped


def _as_toolkit_layout(sd: "OrderedDict[str, torch.Tensor]", path: Any) -> "OrderedDict[str, torch.Tensor]":
    """A SegFormer dict in a foreign layout renamed to the toolkit's; any other dict as it is."""
    if detect_layout(sd) in (None, "toolkit"):
        return sd
    return _segformer_to_toolkit(sd, path)[0]


def _read_segformer_raw(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    if Path(path).is_dir():
        return read_hf_folder(path)
    return _check_tensor_dict(_segformer_container(_torch_load(path)), path)


def infer_segformer_arch(state_dict: dict) -> str | None:
    """``"segformer_b0"`` ... ``"segformer_b5"`` for a SegFormer state dict (any layout), None for another
    network; a SegFormer whose widths / depths fit no published variant is a :class:`CheckpointError`."""
    if detect_layout(state_dict) is None:
        return None
    sd = _as_toolkit_layout(OrderedDict(state_dict), "state_dict")
    variant = infer_variant(sd)
    if variant is None:
        widths = [tuple(sd[k].shape)[0] for k in sd if k.endswith("patch_embeddings.proj.weight")]
        raise CheckpointError(f"a SegFormer with stage widths {widths} that fits none of the published MiT-B0..B5 "
                              "configurations (cwdseg.models.segformer.SEGFORMER_VARIANTS)")
    return f"segformer_{variant}"


def load_segformer_encoder(model: nn.Module, path: str | os.PathLike, verbose: bool = True) -> dict[str, list[str]]:
    """ImageNet initialisation of a SegFormer student: the MiT encoder from ``path`` (an ``nvidia/mit-b*``
    folder, NVlabs' ``mit_b*.pth``, an mmseg MiT file, or any SegFormer file's encoder); the decode head keeps
    its initialisation. Every encoder key of the model must be in the file with its shape (else a
    :class:`CheckpointError` listing them). Returns ``{"loaded", "skipped", "not_loaded"}`` as
    :func:`load_imagenet_backbone`."""
    net = unwrap_model(model)
    raw = _read_segformer_raw(path)
    sd, dropped = _segformer_to_toolkit(raw, path, encoder_only=True)
    target = _drop_counters(net.state_dict())
    encoder = [k for k in target if k.startswith("segformer.")]
    missing = [k for k in encoder if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [(k, tuple(sd[k].shape), tuple(target[k].shape)) for k in encoder
                  if k in sd and sd[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        hints = []
        found = infer_variant(sd)
        if found is not None:
            hints.append(f"the file holds a MiT-{found.upper()} encoder: pass --student-arch segformer_{found} "
                         "or the encoder file of the student's variant")
        raise CheckpointError(_mismatch_report(path, "encoder of the SegFormer student (ImageNet initialisation)",
                                               missing, unexpected, mismatched, hints))
    net.load_state_dict(sd, strict=False)
    report = {"loaded": encoder, "skipped": dropped, "not_loaded": [k for k in target if k not in sd]}
    if verbose:
        print(f"ImageNet initialisation from {path}: loaded {len(encoder)} encoder tensors; skipped "
              f"{len(dropped)} file entries ({_short(dropped)}); {len(report['not_loaded'])} decode-head tensors keep "
              "their initialisation")
    return report

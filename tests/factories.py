"""Test helpers that write checkpoint files in the layouts of the original releases.

The key/shape lists are generated here from the architecture *as described in the report*
(``/work/shared/reference/original_code.md`` §4 and its appendix), not by asking the model under
test, so tests can compare the model against them. ``tests/test_networks.py`` pins this generator
to a literal transcription of the appendix.

Every writer uses ``torch.save(sd, path, _use_new_zipfile_serialization=False)`` (the pre-1.0
"legacy" serialization of the released files), writes no ``num_batches_tracked`` and, like the
released files, makes some BN weights negative (InPlace-ABN uses ``|w| + eps``). Each writer
returns the dict it wrote.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

Shape = tuple[int, ...]
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")
IMAGENET_CLASSES = 1000


def _bn(prefix: str, channels: int) -> list[tuple[str, Shape]]:
    return [(f"{prefix}.{s}", (channels,)) for s in BN_SUFFIXES]


def backbone_key_shapes(arch: str) -> list[tuple[str, Shape]]:
    """Keys and shapes of the deep-stem dilated ResNet backbone (stem + layer1..4), in module order."""
    if arch == "resnet18":
        bottleneck, depths, expansion = False, (2, 2, 2, 2), 1
    elif arch == "resnet101":
        bottleneck, depths, expansion = True, (3, 4, 23, 3), 4
    else:
        raise ValueError(f"unknown arch {arch!r}")
    spec: list[tuple[str, Shape]] = []
    for i, (cin, cout) in enumerate([(3, 64), (64, 64), (64, 128)], start=1):
        spec += [(f"conv{i}.weight", (cout, cin, 3, 3))] + _bn(f"bn{i}", cout)
    inplanes = 128
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                spec += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.bn1", planes)
                spec += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
                spec += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + _bn(f"{p}.bn3", planes * 4)
            else:
                spec += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + _bn(f"{p}.bn1", planes)
                spec += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
            if b == 0:  # every stage's first block has a downsample here (inplanes starts at 128)
                spec += [(f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1))]
                spec += _bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return spec


def pspnet_key_shapes(arch: str, num_classes: int = 19) -> list[tuple[str, Shape]]:
    """Keys and shapes of the whole PSPNet in the original (released) layout."""
    feat = 512 if arch == "resnet18" else 2048
    psp = feat // 4
    dsn_in = feat // 2
    spec = backbone_key_shapes(arch)
    for i in range(4):
        spec += [(f"pspmodule.stages.{i}.1.weight", (psp, feat, 1, 1))] + _bn(f"pspmodule.stages.{i}.2", psp)
    spec += [("pspmodule.bottleneck.0.weight", (psp, feat + 4 * psp, 3, 3))] + _bn("pspmodule.bottleneck.1", psp)
    spec += [("head.weight", (num_classes, psp, 1, 1)), ("head.bias", (num_classes,))]
    spec += [("dsn.0.weight", (dsn_in // 2, dsn_in, 3, 3)), ("dsn.0.bias", (dsn_in // 2,))]
    spec += _bn("dsn.1", dsn_in // 2)
    spec += [("dsn.3.weight", (num_classes, dsn_in // 2, 1, 1)), ("dsn.3.bias", (num_classes,))]
    return spec


def torchvision_resnet18_key_shapes() -> list[tuple[str, Shape]]:
    """Keys/shapes of torchvision's resnet18 (7x7 stem, no conv2/conv3, layer1 without downsample)."""
    spec: list[tuple[str, Shape]] = [("conv1.weight", (64, 3, 7, 7))] + _bn("bn1", 64)
    inplanes = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            p = f"layer{stage}.{b}"
            spec += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + _bn(f"{p}.bn1", planes)
            spec += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
            if b == 0 and inplanes != planes:
                spec += [(f"{p}.downsample.0.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.downsample.1", planes)
            inplanes = planes
    return spec + [("fc.weight", (IMAGENET_CLASSES, 512)), ("fc.bias", (IMAGENET_CLASSES,))]


def fill_state_dict(spec: list[tuple[str, Shape]], seed: int = 0, negative_bn: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """Random float32 tensors for ``spec`` with magnitudes that keep a forward pass O(1).

    Convs: normal with std 1/sqrt(fan_in); biases small; BN: |weight| in [0.5, 1.5] with about a quarter negative when
    ``negative_bn`` (at least one per file), running_var in [0.5, 1.5].
    """
    g = torch.Generator().manual_seed(seed)
    sd: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, shape in spec:
        leaf = key.rsplit(".", 1)[1]
        if len(shape) >= 2:  # conv / linear weight
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
        elif leaf == "weight":  # BN weight
            t = 0.5 + torch.rand(shape, generator=g)
            if negative_bn:
                t = torch.where(torch.rand(shape, generator=g) < 0.25, -t, t)
        elif leaf == "running_var":
            t = 0.5 + torch.rand(shape, generator=g)
        elif leaf == "num_batches_tracked":  # plain BatchNorm2d files (CIRKD's): an int64 scalar
            sd[key] = torch.tensor(int(torch.randint(1, 100000, (), generator=g)), dtype=torch.long)
            continue
        else:  # BN bias, running_mean, conv/linear bias
            t = 0.1 * torch.randn(shape, generator=g)
        sd[key] = t.float().contiguous()
    if negative_bn:
        first_bn = next(k for k, s in spec if len(s) == 1 and k.endswith(".weight") and not k.startswith(("head", "dsn.0", "dsn.3", "fc")))
        sd[first_bn][0] = -sd[first_bn][0].abs()
    return sd


def random_state_dict(arch: str, seed: int = 0, negative_bn: bool = True, num_classes: int = 19) -> "OrderedDict[str, torch.Tensor]":
    """A full PSPNet state_dict for ``arch`` in the original layout (no num_batches_tracked)."""
    return fill_state_dict(pspnet_key_shapes(arch, num_classes), seed, negative_bn)


def _save_legacy(sd: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path), _use_new_zipfile_serialization=False)


def write_legacy_student(path: str | Path, seed: int = 0, negative_bn: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """Write a released-student-like file (150 keys, PSPNet-R18) in the legacy serialization."""
    sd = random_state_dict("resnet18", seed, negative_bn)
    _save_legacy(sd, path)
    return sd


def to_toolbox_layout(sd: dict, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Rename an original-layout teacher dict to the older toolbox layout (SKD's teacher file):
    ``pspmodule.*`` -> ``head.0.*``, ``head.*`` -> ``head.1.*``, plus an ImageNet ``fc.*``."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in sd.items():
        if k.startswith("pspmodule."):
            k = "head.0." + k[len("pspmodule."):]
        elif k.startswith("head."):
            k = "head.1." + k[len("head."):]
        out[k] = v
    g = torch.Generator().manual_seed(seed + 1)
    out["fc.weight"] = 0.01 * torch.randn(IMAGENET_CLASSES, 2048, generator=g)
    out["fc.bias"] = torch.zeros(IMAGENET_CLASSES)
    return out


def write_legacy_teacher(path: str | Path, layout: str = "original", seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Write a PSPNet-R101 teacher file: ``layout="original"`` (565 keys, ``pspmodule.*``/``head.*``,
    as CWD's teacher_city.pth) or ``"toolbox"`` (``head.0.*``/``head.1.*`` + ``fc.*``, as SKD's)."""
    sd = random_state_dict("resnet101", seed)
    if layout == "toolbox":
        sd = to_toolbox_layout(sd, seed)
    elif layout != "original":
        raise ValueError(f"layout must be 'original' or 'toolbox', got {layout!r}")
    _save_legacy(sd, path)
    return sd


def csail_resnet18_state_dict(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """The CSAIL deep-stem ImageNet ResNet-18 (resnet18-imagenet.pth) key layout: backbone + fc."""
    sd = fill_state_dict(backbone_key_shapes("resnet18") + [("fc.weight", (IMAGENET_CLASSES, 512)),
                                                             ("fc.bias", (IMAGENET_CLASSES,))], seed)
    return sd


def write_csail_resnet18(path: str | Path, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Write a resnet18-imagenet.pth-like file (deep stem, ``fc.*``, no num_batches_tracked)."""
    sd = csail_resnet18_state_dict(seed)
    _save_legacy(sd, path)
    return sd


def write_torchvision_resnet18(path: str | Path, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Write a torchvision-like resnet18 file (7x7 conv1): the wrong ImageNet init for this student."""
    sd = fill_state_dict(torchvision_resnet18_key_shapes(), seed)
    _save_legacy(sd, path)
    return sd


# ------------------------------------------------------------------------------------------------
# CIRKD family (winycg/CIRKD, models/ at 7e0d21f, March 2022: the code of its released teacher).
# Written from the description of that code in /work/shared/reference/peers.md and the model
# docstrings' *facts* (names, widths, rates), not by asking the models under test.

CIRKD_BN_SUFFIXES = BN_SUFFIXES + ("num_batches_tracked",)
CIRKD_HEAD_WIDTH = {"resnet18": 128, "resnet101": 256, "mobilenetv2": 128}   # ASPP / head channels C
CIRKD_BACKBONE_OUT = {"resnet18": 512, "resnet101": 2048, "mobilenetv2": 320}
# MobileNetV2 (t, c, n, s), width 1.0; CIRKD keeps features[0..17] (no 1280 conv, no classifier)
MBV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _with_counters(spec: list[tuple[str, Shape]]) -> list[tuple[str, Shape]]:
    """Add ``num_batches_tracked`` (shape ()) after each BN's running_var, as nn.BatchNorm2d saves them."""
    out: list[tuple[str, Shape]] = []
    for key, shape in spec:
        out.append((key, shape))
        if key.endswith(".running_var"):
            out.append((key[: -len("running_var")] + "num_batches_tracked", ()))
    return out


def mobilenetv2_key_shapes(imagenet_tail: bool = False) -> list[tuple[str, Shape]]:
    """``features.*`` of MobileNetV2 (top-level keys, as in ``mobilenetv2-imagenet.pth``).
    ``imagenet_tail`` adds what the ImageNet file has beyond CIRKD's backbone: ``features.18``
    (1x1 conv 320 -> 1280 + BN) and ``classifier.1`` (Linear 1280 -> 1000)."""
    spec: list[tuple[str, Shape]] = [("features.0.0.weight", (32, 3, 3, 3))] + _bn("features.0.1", 32)
    inp, index = 32, 1
    for t, c, n, _s in MBV2_SETTING:
        for _ in range(n):
            p, hidden = f"features.{index}.conv", inp * t
            if t == 1:
                spec += [(f"{p}.0.weight", (hidden, 1, 3, 3))] + _bn(f"{p}.1", hidden)
                spec += [(f"{p}.3.weight", (c, hidden, 1, 1))] + _bn(f"{p}.4", c)
            else:
                spec += [(f"{p}.0.weight", (hidden, inp, 1, 1))] + _bn(f"{p}.1", hidden)
                spec += [(f"{p}.3.weight", (hidden, 1, 3, 3))] + _bn(f"{p}.4", hidden)
                spec += [(f"{p}.6.weight", (c, hidden, 1, 1))] + _bn(f"{p}.7", c)
            inp, index = c, index + 1
    if imagenet_tail:
        spec += [("features.18.0.weight", (1280, 320, 1, 1))] + _bn("features.18.1", 1280)
        spec += [("classifier.1.weight", (IMAGENET_CLASSES, 1280)), ("classifier.1.bias", (IMAGENET_CLASSES,))]
    return spec


def deeplabv3_key_shapes(backbone: str, num_classes: int = 19) -> list[tuple[str, Shape]]:
    """CIRKD's DeepLabV3 state_dict (``pretrained.*`` backbone, ``head.*``, ``auxlayer.*`` on ResNets),
    with ``num_batches_tracked`` for every BN, in module order."""
    if backbone == "mobilenetv2":
        spec = [("pretrained.net." + k, s) for k, s in mobilenetv2_key_shapes()]
    else:
        spec = [("pretrained." + k, s) for k, s in backbone_key_shapes(backbone)]
    cin, c = CIRKD_BACKBONE_OUT[backbone], CIRKD_HEAD_WIDTH[backbone]
    spec += [("head.aspp.b0.0.weight", (c, cin, 1, 1))] + _bn("head.aspp.b0.1", c)
    for b in (1, 2, 3):
        spec += [(f"head.aspp.b{b}.block.0.weight", (c, cin, 3, 3))] + _bn(f"head.aspp.b{b}.block.1", c)
    spec += [("head.aspp.b4.gap.1.weight", (c, cin, 1, 1))] + _bn("head.aspp.b4.gap.2", c)
    spec += [("head.aspp.project.0.weight", (c, 5 * c, 1, 1))] + _bn("head.aspp.project.1", c)
    spec += [("head.block.0.weight", (c, c, 3, 3))] + _bn("head.block.1", c)
    spec += [("head.block.4.weight", (num_classes, c, 1, 1)), ("head.block.4.bias", (num_classes,))]
    if backbone != "mobilenetv2":
        c3 = cin // 2
        spec += [("auxlayer.block.0.weight", (c3 // 4, c3, 3, 3))] + _bn("auxlayer.block.1", c3 // 4)
        spec += [("auxlayer.block.4.weight", (num_classes, c3 // 4, 1, 1)), ("auxlayer.block.4.bias", (num_classes,))]
    return _with_counters(spec)


def pspnet_mobile_key_shapes(num_classes: int = 19) -> list[tuple[str, Shape]]:
    """CIRKD's PSPNet-MobileNetV2 (``psp_mobile``): ``pretrained.net.features.*``, ``head.psp.conv{1..4}``
    (1x1 320 -> 80 + BN), ``head.block`` (3x3 640 -> 128 + BN), ``head.classifier``; no aux head."""
    spec = [("pretrained.net." + k, s) for k, s in mobilenetv2_key_shapes()]
    for i in range(1, 5):
        spec += [(f"head.psp.conv{i}.0.weight", (80, 320, 1, 1))] + _bn(f"head.psp.conv{i}.1", 80)
    spec += [("head.block.0.weight", (128, 640, 3, 3))] + _bn("head.block.1", 128)
    spec += [("head.classifier.weight", (num_classes, 128, 1, 1)), ("head.classifier.bias", (num_classes,))]
    return _with_counters(spec)


def cirkd_state_dict(backbone: str, seed: int = 0, num_classes: int = 19) -> "OrderedDict[str, torch.Tensor]":
    """A CIRKD DeepLabV3 state_dict for ``backbone`` ("resnet18", "resnet101", "mobilenetv2")."""
    return fill_state_dict(deeplabv3_key_shapes(backbone, num_classes), seed, negative_bn=False)


def write_cirkd_deeplabv3(path: str | Path, backbone: str = "resnet101", seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """Write a CIRKD DeepLabV3 file, as its ``save_checkpoint`` does (``torch.save(model.state_dict())``,
    zip serialization, unwrapped). ``backbone="resnet101"``: the released Cityscapes teacher's layout."""
    sd = cirkd_state_dict(backbone, seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return sd


def cirkd_imagenet_state_dict(backbone: str, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """CIRKD's ImageNet initialisations: ``resnet18-imagenet.pth`` / ``resnet101-imagenet.pth``
    (deep stem, top-level keys, ``fc.*``) and ``mobilenetv2-imagenet.pth`` (``features.0..18``,
    ``classifier.1.*``); BN ``num_batches_tracked`` included."""
    if backbone == "mobilenetv2":
        spec = mobilenetv2_key_shapes(imagenet_tail=True)
    else:
        feat = CIRKD_BACKBONE_OUT[backbone]
        spec = backbone_key_shapes(backbone) + [("fc.weight", (IMAGENET_CLASSES, feat)), ("fc.bias", (IMAGENET_CLASSES,))]
    return fill_state_dict(_with_counters(spec), seed, negative_bn=False)


def write_cirkd_imagenet(path: str | Path, backbone: str, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    sd = cirkd_imagenet_state_dict(backbone, seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return sd

"""Networks: the segmentation models (registry below), the feature connector and the discriminator
of the adversarial term.

``build_model(arch)`` builds a network from the plain dict ``ARCHS`` (``ARCH = head_backbone``):

==========================  ===============================================  ======  =========
arch                        what                                             family  head feat
==========================  ===============================================  ======  =========
``pspnet_resnet18``         the CWD paper's student (original code)          cwd     128
``pspnet_resnet101``        the CWD paper's teacher (original code)          cwd     512
``deeplabv3_resnet18``      CIRKD-protocol student                           cirkd   128
``deeplabv3_resnet101``     CIRKD-protocol teacher (78.07 val released)      cirkd   256
``deeplabv3_mobilenetv2``   CIRKD-protocol student                           cirkd   128
``pspnet_mobilenetv2``      CIRKD's PSPNet-MobileNetV2 (``psp_mobile``)      cirkd   128
``segformer_b0`` ... ``_b5``  SegFormer, MiT-B0 ... B5 encoder (transformers)   segformer  256/768
==========================  ===============================================  ======  =========

``resnet18`` / ``resnet101`` stay as aliases of the two PSPNets (the names the command lines and
checkpoints of the original code use). Every network returns ``(logits, aux_logits, head_feature)``
from ``forward(x, aux=True)``, at output stride 8.

Each architecture records the input normalisation its weights expect, by *name* (the data room
defines what the name means: ``cwdseg.data.transforms.NORMALIZATIONS``). Both families were trained
with Caffe-style BGR mean subtraction and no std: the original CWD code, and CIRKD's
``dataset/cityscapes.py`` (``image - [104.00698793, 116.66876762, 122.67891434]`` on the BGR
``cv2.imread`` image, in every version from March 2022 to August 2025). The SegFormers' weights
(NVlabs ImageNet encoders, Hugging Face and mmseg models) take RGB ImageNet mean/std (``imagenet_rgb``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from cwdseg.models.deeplabv3 import DeepLabV3, deeplabv3_mobilenetv2, deeplabv3_resnet18, deeplabv3_resnet101
from cwdseg.models.pspnet import PSPNet, pspnet_resnet18, pspnet_resnet101
from cwdseg.models.pspnet_mobile import PSPNetMobile, pspnet_mobilenetv2
from cwdseg.models.segformer import (
    SegFormer,
    segformer_b0,
    segformer_b1,
    segformer_b2,
    segformer_b3,
    segformer_b4,
    segformer_b5,
    stride4,
)


@dataclass(frozen=True)
class ArchSpec:
    """What the rest of the toolkit needs to know about an architecture, without building it.

    ``feature_channels``: channels of the head feature (third output). ``normalization``: name of
    the input normalisation of its weights. ``family``: ``"cwd"`` (the original code's layout,
    InPlace-ABN, max pool in ceil mode) or ``"cirkd"`` (CIRKD's layout, BatchNorm2d, floor mode),
    which also decides the output size (see :func:`output_size`), or ``"segformer"`` (stride 4).
    ``aux_head``: whether it has an auxiliary head. ``label``: the name papers use. ``taps``: friendly
    names of the layers a distillation term may read (``cwdseg.distill.taps``), alias -> module path:
    ``stage1``..``stage4`` (backbone stages, output stride 4, 8, 8, 8; SegFormer's 4, 8, 16, 32) and
    ``head`` (the module whose output is the head feature, the third output). ``head_prefixes``: the
    state_dict prefixes of the head (every other parameter is the backbone / encoder): what a recipe
    with a larger head learning rate (SegFormer's 10x) puts in the head's parameter group.
    """

    builder: Callable[..., nn.Module]
    feature_channels: int
    normalization: str
    family: str
    aux_head: bool
    label: str
    taps: dict[str, str] = field(default_factory=dict)
    head_prefixes: tuple[str, ...] = ()


_PSP_HEAD = ("pspmodule.", "head.", "dsn.")          # PSPNet (original layout)
_CIRKD_HEAD = ("head.", "auxlayer.")                 # CIRKD's networks: backbone under pretrained.*


# ResNets: the four stages; PSPNet (original layout) keeps them at the top level, CIRKD's models
# under ``pretrained``. MobileNetV2 (``features`` 0..17): stage1 = features.3 (24 ch, stride 4),
# stage2 = features.6 (32 ch, stride 8), stage3 = features.13 (96 ch), stage4 = features.17 (320 ch),
# the last block of each resolution / width group. ``head``: the head feature's producer (in
# DeepLabV3 ``head.block.3``, the Dropout after which the classifier runs).
_PSP_TAPS = {**{f"stage{i}": f"layer{i}" for i in range(1, 5)}, "head": "pspmodule"}
_V1S_TAPS = {f"stage{i}": f"pretrained.layer{i}" for i in range(1, 5)}
_MBV2_TAPS = {f"stage{i}": f"pretrained.net.features.{b}" for i, b in zip(range(1, 5), (3, 6, 13, 17))}
_DEEPLAB_HEAD = {"head": "head.block.3", "aspp": "head.aspp"}
# SegFormer: the four encoder stages (strides 4, 8, 16, 32) and the decode head's ReLU, whose output is
# the fused map (the head feature); cwdseg.models.segformer.SegFormer.taps gives the same maps by name.
_SEGFORMER_TAPS = {**{f"stage{i}": f"segformer.stages.{i - 1}" for i in range(1, 5)}, "head": "decode_head.activation"}
_SEGFORMER_HEAD = ("decode_head.",)

ARCHS: dict[str, ArchSpec] = {
    "pspnet_resnet18": ArchSpec(pspnet_resnet18, 128, "caffe_bgr", "cwd", True, "PSPNet-R18", _PSP_TAPS,
                                _PSP_HEAD),
    "pspnet_resnet101": ArchSpec(pspnet_resnet101, 512, "caffe_bgr", "cwd", True, "PSPNet-R101", _PSP_TAPS,
                                 _PSP_HEAD),
    "deeplabv3_resnet18": ArchSpec(deeplabv3_resnet18, 128, "caffe_bgr", "cirkd", True, "DeepLabV3-R18",
                                   {**_V1S_TAPS, **_DEEPLAB_HEAD}, _CIRKD_HEAD),
    "deeplabv3_resnet101": ArchSpec(deeplabv3_resnet101, 256, "caffe_bgr", "cirkd", True, "DeepLabV3-R101",
                                    {**_V1S_TAPS, **_DEEPLAB_HEAD}, _CIRKD_HEAD),
    "deeplabv3_mobilenetv2": ArchSpec(deeplabv3_mobilenetv2, 128, "caffe_bgr", "cirkd", False, "DeepLabV3-MBv2",
                                      {**_MBV2_TAPS, **_DEEPLAB_HEAD}, _CIRKD_HEAD),
    "pspnet_mobilenetv2": ArchSpec(pspnet_mobilenetv2, 128, "caffe_bgr", "cirkd", False, "PSPNet-MBv2",
                                   {**_MBV2_TAPS, "head": "head.block", "psp": "head.psp"}, _CIRKD_HEAD),
    # SegFormer (transformers' modules): decoder width 256 (B0/B1) or 768 (B2-B5), RGB ImageNet mean/std
    **{f"segformer_{v}": ArchSpec(builder, width, "imagenet_rgb", "segformer", False, f"SegFormer-{v.upper()}",
                                  _SEGFORMER_TAPS, _SEGFORMER_HEAD)
       for v, builder, width in (("b0", segformer_b0, 256), ("b1", segformer_b1, 256), ("b2", segformer_b2, 768),
                                 ("b3", segformer_b3, 768), ("b4", segformer_b4, 768), ("b5", segformer_b5, 768))},
}
ARCH_ALIASES: dict[str, str] = {"resnet18": "pspnet_resnet18", "resnet101": "pspnet_resnet101"}
ARCH_NAMES: tuple[str, ...] = tuple(ARCHS) + tuple(ARCH_ALIASES)  # every name the command lines accept
PAPER_PAIR = ("pspnet_resnet101", "pspnet_resnet18")  # (teacher, student) of the CWD paper

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    **{name: spec.builder for name, spec in ARCHS.items()},
    **{alias: ARCHS[name].builder for alias, name in ARCH_ALIASES.items()},
}


def canonical_arch(name: str) -> str:
    """The registry name of ``name`` (``"resnet18"`` -> ``"pspnet_resnet18"``); ValueError if unknown."""
    name = ARCH_ALIASES.get(name, name)
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; valid archs: {', '.join(ARCH_NAMES)}")
    return name


def arch_spec(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``name`` (an alias works too)."""
    return ARCHS[canonical_arch(name)]


# Channels of the head feature (third output of forward: the map before the classifier), what the
# feature-map distillation terms compare; by every accepted name.
FEATURE_CHANNELS: dict[str, int] = {name: arch_spec(name).feature_channels for name in ARCH_NAMES}
PSP_FEATURE_CHANNELS: dict[str, int] = {"resnet18": 128, "resnet101": 512}  # the two PSPNets, by alias
# The input normalisation (a name of cwdseg.data.transforms.NORMALIZATIONS) the weights expect.
NORMALIZATION: dict[str, str] = {name: arch_spec(name).normalization for name in ARCH_NAMES}


def _stride8(size: int, ceil_pool: bool) -> int:
    size = (size - 1) // 2 + 1                      # 3x3 conv, stride 2, padding 1
    if ceil_pool:                                   # MaxPool2d(3, 2, 1, ceil_mode=True)
        pooled = -(-(size - 1) // 2) + 1
        if (pooled - 1) * 2 >= size + 1:            # the last window must start inside input + left pad
            pooled -= 1
        size = pooled
    else:                                           # MaxPool2d(3, 2, 1)
        size = (size - 1) // 2 + 1
    return (size - 1) // 2 + 1                      # the stride-2 3x3 of layer2 (or block 4 of MobileNetV2)


def output_size(arch: str, input_size: tuple[int, int]) -> tuple[int, int]:
    """Height and width of the outputs of ``arch`` for an (H, W) input: stride 8, with the
    original code's ceil-mode max pool (512 -> 65) or CIRKD's floor mode (512 -> 64); SegFormer's
    stride 4 of its 7x7 / stride 4 / pad 3 patch embedding (512 -> 128, 513 -> 129)."""
    family = arch_spec(arch).family
    if family == "segformer":
        return stride4(int(input_size[0])), stride4(int(input_size[1]))
    ceil_pool = family == "cwd"
    return _stride8(int(input_size[0]), ceil_pool), _stride8(int(input_size[1]), ceil_pool)


def build_model(arch: str, num_classes: int = 19) -> nn.Module:
    """Build the network named ``arch`` (a registry name or alias) with random weights."""
    try:
        builder = MODEL_BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCH_NAMES)}") from None
    return builder(num_classes=num_classes)


def is_head_parameter(arch: str, name: str) -> bool:
    """Whether the parameter ``name`` (a ``named_parameters()`` key of ``build_model(arch)``, DDP /
    torch.compile prefixes allowed) belongs to the head of ``arch`` (see ``ArchSpec.head_prefixes``)."""
    for wrapper in ("module.", "_orig_mod."):
        while name.startswith(wrapper):
            name = name[len(wrapper):]
    return name.startswith(arch_spec(arch).head_prefixes)


def __getattr__(name: str) -> Any:
    # Discriminator / FeatureConnector live in their own modules (owned by the losses code); import
    # them on first use so that a plain `from cwdseg.models import build_model` needs only the networks.
    if name == "Discriminator":
        from cwdseg.models.discriminator import Discriminator
        return Discriminator
    if name == "FeatureConnector":
        from cwdseg.models.connector import FeatureConnector
        return FeatureConnector
    raise AttributeError(f"module 'cwdseg.models' has no attribute {name!r}")


__all__ = [
    "ARCHS", "ARCH_ALIASES", "ARCH_NAMES", "ArchSpec", "DeepLabV3", "FEATURE_CHANNELS", "MODEL_BUILDERS",
    "NORMALIZATION", "PAPER_PAIR", "PSP_FEATURE_CHANNELS", "PSPNet", "PSPNetMobile", "arch_spec", "build_model",
    "canonical_arch",
    "deeplabv3_mobilenetv2", "deeplabv3_resnet18", "deeplabv3_resnet101", "output_size", "pspnet_mobilenetv2",
    "pspnet_resnet18",
    "pspnet_resnet101", "Discriminator", "FeatureConnector", "SegFormer", "is_head_parameter",
    "segformer_b0", "segformer_b1", "segformer_b2", "segformer_b3", "segformer_b4", "segformer_b5",
]

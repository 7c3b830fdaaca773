"""Networks of the CWD re-implementation: PSPNet teacher/student, the feature connector and the
discriminator of the adversarial term.

``build_model(arch)`` builds a PSPNet from the plain dict ``MODEL_BUILDERS``.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from cwdseg.models.pspnet import PSPNet, pspnet_resnet18, pspnet_resnet101

MODEL_BUILDERS: dict[str, Callable[..., PSPNet]] = {
    "resnet18": pspnet_resnet18,
    "resnet101": pspnet_resnet101,
}

# Channels of the head feature (third output of forward: the map before the classifier), what the
# feature-map distillation terms compare. Every architecture returns (logits, aux_logits, head_feature).
PSP_FEATURE_CHANNELS: dict[str, int] = {"resnet18": 128, "resnet101": 512}
FEATURE_CHANNELS = PSP_FEATURE_CHANNELS


def build_model(arch: str, num_classes: int = 19) -> nn.Module:
    """Build the PSPNet named ``arch`` ("resnet18" student or "resnet101" teacher) with random weights."""
    try:
        builder = MODEL_BUILDERS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {sorted(MODEL_BUILDERS)}") from None
    return builder(num_classes=num_classes)


def __getattr__(name: str) -> Any:
    # Discriminator / FeatureConnector live in their own modules (owned by the losses code); import
    # them on first use so that a plain `from cwdseg.models import build_model` needs only pspnet.py.
    if name == "Discriminator":
        from cwdseg.models.discriminator import Discriminator
        return Discriminator
    if name == "FeatureConnector":
        from cwdseg.models.connector import FeatureConnector
        return FeatureConnector
    raise AttributeError(f"module 'cwdseg.models' has no attribute {name!r}")


__all__ = [
    "MODEL_BUILDERS", "PSP_FEATURE_CHANNELS", "FEATURE_CHANNELS", "PSPNet", "build_model", "pspnet_resnet18", "pspnet_resnet101",
    "Discriminator", "FeatureConnector",
]

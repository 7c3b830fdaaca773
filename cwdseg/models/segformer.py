"""SegFormer (Xie et al., NeurIPS 2021): a Mix Transformer (MiT-B0 ... B5) encoder and the all-MLP
decode head, built from Hugging Face ``transformers``' own modules (``SegformerForSemanticSegmentation``,
pinned in setup.py's ``segformer`` extra) and wrapped to the registry's contract.

``forward(x, aux=True)`` returns ``(logits, None, feature)``: logits ``[N, K, h, w]`` at stride 4
(the 7x7 / stride 4 / pad 3 patch embedding: ``h = (H - 1) // 4 + 1``, 1024 -> 256), no auxiliary head,
and the decode head's fused map (after ``linear_fuse`` -> BN -> ReLU, before dropout and the classifier;
256 channels for B0/B1, 768 for B2-B5). :meth:`SegFormer.taps` gives every named map.

The state_dict keys are those of ``transformers``' in-memory model (``segformer.stages.*``,
``decode_head.*``); files in other layouts (hub folders, NVlabs/CIRKD, mmseg) are renamed by
:mod:`cwdseg.models.segformer_keys`. Weights expect RGB ImageNet mean/std input (``imagenet_rgb``).

Published configurations (NVlabs ``mix_transformer.py``, CIRKD ``models/segformer.py``, the
``nvidia/mit-b*`` configs): hidden sizes 32-64-160-256 (B0) or 64-128-320-512 (B1-B5), heads 1-2-5-8,
sequence-reduction ratios 8-4-2-1, MLP ratio 4, depths below, decoder width 256 (B0/B1) / 768 (B2-B5).
Parameters with a 19-class head (``transformers`` 5.23): B0 3,719,027 (3.7M), B4 64,007,635 (64.0M); with
the 150-class ADE20K head of the SegFormer paper's table, 3.75M and 64.11M (published 3.8M and 64.1M).
The decode head's dropout is 0.1 (NVlabs, mmseg, transformers); CIRKD's SegFormer uses none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# variant -> (hidden sizes, depths, decoder width)
SEGFORMER_VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}
TAP_NAMES = ("stage1", "stage2", "stage3", "stage4", "decode", "logits")
HEAD_PREFIXES = ("decode_head.",)  # parameters of the decode head (10x learning rate in the recipe)

__all__ = ["HEAD_PREFIXES", "SEGFORMER_VARIANTS", "SegFormer", "TAP_NAMES", "segformer_config", "stride4"] + \
    [f"segformer_{v}" for v in SEGFORMER_VARIANTS]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("SegFormer needs Hugging Face transformers: pip install -e '.[segformer]'") from None
    return transformers


def segformer_config(variant: str, num_classes: int = 19, drop_path_rate: float = 0.1):
    """The published ``transformers.SegformerConfig`` of MiT-``variant`` (``"b0"`` ... ``"b5"``)."""
    if variant not in SEGFORMER_VARIANTS:
        raise ValueError(f"unknown SegFormer variant {variant!r}; valid: {', '.join(SEGFORMER_VARIANTS)}")
    hidden, depths, decoder = SEGFORMER_VARIANTS[variant]
    return _transformers().SegformerConfig(
        num_channels=3, num_encoder_blocks=4, depths=list(depths), hidden_sizes=list(hidden),
        sr_ratios=[8, 4, 2, 1], num_attention_heads=[1, 2, 5, 8], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
        mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=decoder, drop_path_rate=drop_path_rate,
        classifier_dropout_prob=0.1, reshape_last_stage=True, num_labels=num_classes,
        semantic_loss_ignore_index=255,
    )


def stride4(size: int) -> int:
    """Output length of the first patch embedding (7x7 conv, stride 4, padding 3): the logits' size."""
    return (int(size) + 2 * 3 - 7) // 4 + 1


class SegFormer(nn.Module):
    """SegFormer built from a ``transformers.SegformerConfig`` (``reshape_last_stage`` is forced on:
    the decode head needs the last stage as a map). Submodules ``segformer`` (the MiT encoder,
    ``transformers.SegformerModel``) and ``decode_head`` (``SegformerDecodeHead``) are those of
    ``SegformerForSemanticSegmentation(config)``, with its weight initialisation."""

    def __init__(self, config) -> None:
        super().__init__()
        transformers = _transformers()
        config = transformers.SegformerConfig.from_dict(config.to_dict())  # a copy: the caller's stays as it is
        config.reshape_last_stage = True
        full = transformers.SegformerForSemanticSegmentation(config)
        self.config = full.config
        self.segformer = full.segformer
        self.decode_head = full.decode_head
        self.num_classes = int(config.num_labels)
        self.feature_channels = int(config.decoder_hidden_size)

    def taps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every named map: ``stage1..4`` (encoder stage outputs [N, C_i, H/4..H/32, ...]), ``decode``
        (the fused decoder map) and ``logits``. The decode head's computation is transformers'
        ``SegformerDecodeHead.forward``, spelled out to expose the fused map: per stage a linear
        projection to the decoder width, bilinear upsampling (align_corners=False) to stage 1's size,
        concatenation in the order stage4..stage1, 1x1 conv (no bias) -> BN -> ReLU, dropout, 1x1 classifier."""
        out: dict[str, torch.Tensor] = {}
        h = x
        for i, stage in enumerate(self.segformer.stages):
            h = stage(h)
            out[f"stage{i + 1}"] = h
        head = self.decode_head
        size = out["stage1"].shape[2:]
        projected = []
        for i, proj in enumerate(head.linear_projections):
            s = out[f"stage{i + 1}"]
            n, _, sh, sw = s.shape
            p = proj(s).transpose(1, 2).reshape(n, -1, sh, sw)
            projected.append(F.interpolate(p, size=size, mode="bilinear", align_corners=False))
        fused = head.activation(head.batch_norm(head.linear_fuse(torch.cat(projected[::-1], dim=1))))
        out["decode"] = fused
        out["logits"] = head.classifier(head.dropout(fused))
        return out

    def forward(self, x: torch.Tensor, aux: bool = True) -> tuple[torch.Tensor, None, torch.Tensor]:
        """``(logits, None, decode feature)``; ``aux`` is accepted for the registry's contract (no aux head)."""
        t = self.taps(x)
        return t["logits"], None, t["decode"]


def _builder(variant: str):
    def build(num_classes: int = 19) -> SegFormer:
        return SegFormer(segformer_config(variant, num_classes))
    build.__name__ = f"segformer_{variant}"
    build.__doc__ = f"SegFormer-{variant.upper()} (MiT-{variant.upper()} encoder, published configuration)."
    return build


segformer_b0 = _builder("b0")
segformer_b1 = _builder("b1")
segformer_b2 = _builder("b2")
segformer_b3 = _builder("b3")
segformer_b4 = _builder("b4")
segformer_b5 = _builder("b5")

"""Key layouts of SegFormer / MiT weights and their renaming to :class:`cwdseg.models.segformer.SegFormer`'s
(``transformers`` 5.23's in-memory names). State dicts in, state dicts out: reading files is the checkpoint
side's job.

Layouts (checked against the authors' code):

* ``"toolkit"``: ours = ``transformers`` in memory: ``segformer.stages.{i}.patch_embeddings.{proj,layer_norm}``,
  ``...blocks.{j}.{layernorm_before,attention.{q,k,v,o}_proj,attention.sequence_reduction.{sequence_reduction,
  layer_norm},layernorm_after,mlp.{fc1,dwconv.dwconv,fc2}}``, ``segformer.stages.{i}.layer_norm``,
  ``decode_head.{linear_projections.{i}.proj,linear_fuse,batch_norm,classifier}``.
* ``"hf"``: a hub folder's file (``nvidia/mit-b*``, ``nvidia/segformer-b*-finetuned-*``): ``segformer.encoder.
  {patch_embeddings.{i},block.{i}.{j},layer_norm.{i}}``, ``attention.self.{query,key,value,sr,layer_norm}``,
  ``attention.output.dense``, ``layer_norm_{1,2}``, ``mlp.dense{1,2}``, ``decode_head.linear_c.{i}``; an ImageNet
  encoder (``SegformerForImageClassification``) adds ``classifier.*`` (1000 classes).
* ``"nvlabs"``: NVlabs ``mix_transformer.py`` / CIRKD ``models/segformer.py``: ``patch_embed{i}.{proj,norm}``,
  ``block{i}.{j}.{norm1,attn.q,attn.kv,attn.proj,attn.sr,attn.norm,norm2,mlp.fc1,mlp.dwconv.dwconv,mlp.fc2}``
  (``attn.kv`` fuses key rows [:C] and value rows [C:]), ``norm{i}`` (i = 1..4); CIRKD's head
  ``linear_c{i}.proj``, ``linear_fuse.0`` (1x1 conv *with* a bias), ``linear_fuse.1`` (BN), ``linear_pred``;
  the ImageNet ``mit_b*.pth`` has ``head.*`` (1000-class classifier) instead.
* ``"mmseg"``: mmsegmentation's ``MixVisionTransformer`` (``tools/model_converters/mit2mmseg.py``):
  ``layers.{i}.0.{projection,norm}``, ``layers.{i}.1.{j}.{norm1,attn.attn.in_proj_{weight,bias}`` (q;k;v rows),
  ``attn.attn.out_proj,attn.sr,attn.norm,norm2,ffn.layers.{0,1,4}}`` (fc1/fc2 as 1x1 convs), ``layers.{i}.2``;
  ``backbone.`` in front inside a segmentation model. mmseg's ``SegformerHead`` is another network
  (per-stage conv + BN + ReLU, stages joined c1..c4): only its encoder maps here.

CIRKD's ``linear_fuse.0`` bias is folded exactly into the BN: ``BN(Wx + b)`` with running mean ``m`` equals
``BN(Wx)`` with running mean ``m - b`` (in training mode the batch mean removes ``b`` either way).
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch

from cwdseg.models.segformer import SEGFORMER_VARIANTS

LAYOUTS = ("toolkit", "hf", "nvlabs", "mmseg")
Dict = "OrderedDict[str, torch.Tensor]"


class SegformerKeyError(ValueError):
    """A state dict that is not a SegFormer / MiT layout this module maps, or that misses a needed key."""


def detect_layout(sd: dict) -> str | None:
    """Which SegFormer layout ``sd`` is in (``"toolkit"``, ``"hf"``, ``"nvlabs"``, ``"mmseg"``), or None."""
    keys = list(sd)
    if any(k.startswith("segformer.stages.") for k in keys):
        return "toolkit"
    if any(k.startswith("segformer.encoder.") for k in keys):
        return "hf"
    if any(re.match(r"(backbone\.)?layers\.\d+\.1\.\d+\.attn\.attn\.in_proj_weight$", k) for k in keys):
        return "mmseg"
    if any(re.match(r"block\d\.\d+\.attn\.kv\.weight$", k) for k in keys):
        return "nvlabs"
    return None


_HF_BLOCK = [("attention.self.query.", "attention.q_proj."), ("attention.self.key.", "attention.k_proj."),
             ("attention.self.value.", "attention.v_proj."),
             ("attention.self.sr.", "attention.sequence_reduction.sequence_reduction."),
             ("attention.self.layer_norm.", "attention.sequence_reduction.layer_norm."),
             ("attention.output.dense.", "attention.o_proj."), ("layer_norm_1.", "layernorm_before."),
             ("layer_norm_2.", "layernorm_after."), ("mlp.dense1.", "mlp.fc1."), ("mlp.dense2.", "mlp.fc2."),
             ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv.")]


def _rename_hf(key: str) -> str | None:
    m = re.match(r"segformer\.encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(.+)$", key)
    if m:
        return f"segformer.stages.{m[1]}.patch_embeddings.{m[2]}.{m[3]}"
    m = re.match(r"segformer\.encoder\.layer_norm\.(\d+)\.(.+)$", key)
    if m:
        return f"segformer.stages.{m[1]}.layer_norm.{m[2]}"
    m = re.match(r"segformer\.encoder\.block\.(\d+)\.(\d+)\.(.+)$", key)
    if m:
        for old, new in _HF_BLOCK:
            if m[3].startswith(old):
                return f"segformer.stages.{m[1]}.blocks.{m[2]}.{new}{m[3][len(old):]}"
        return None
    m = re.match(r"decode_head\.linear_c\.(\d+)\.proj\.(.+)$", key)
    if m:
        return f"decode_head.linear_projections.{m[1]}.proj.{m[2]}"
    if re.match(r"decode_head\.(linear_fuse|batch_norm|classifier)\.", key):
        return key
    return None


_NV_BLOCK = [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."), ("attn.q.", "attention.q_proj."),
             ("attn.proj.", "attention.o_proj."), ("attn.sr.", "attention.sequence_reduction.sequence_reduction."),
             ("attn.norm.", "attention.sequence_reduction.layer_norm."), ("mlp.fc1.", "mlp.fc1."),
             ("mlp.fc2.", "mlp.fc2."), ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv.")]
_MM_BLOCK = [("norm1.", "layernorm_before."), ("norm2.", "layernorm_after."),
             ("attn.attn.out_proj.", "attention.o_proj."),
             ("attn.sr.", "attention.sequence_reduction.sequence_reduction."),
             ("attn.norm.", "attention.sequence_reduction.layer_norm."), ("ffn.layers.0.", "mlp.fc1."),
             ("ffn.layers.1.", "mlp.dwconv.dwconv."), ("ffn.layers.4.", "mlp.fc2.")]


def _convert(sd: dict, layout: str) -> "tuple[OrderedDict[str, torch.Tensor], list[str]]":
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unmapped: list[str] = []
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = None
        if layout == "hf":
            new = _rename_hf(key)
        elif layout == "nvlabs":
            new = _nvlabs_one(key, value, out, sd)
        elif layout == "mmseg":
            new = _encoder_one(key.removeprefix("backbone."), value, out, "mmseg")
        if new is None:
            unmapped.append(key)
        elif new != "":
            if layout == "mmseg" and new.endswith((".mlp.fc1.weight", ".mlp.fc2.weight")):
                value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv -> linear
            out[new] = value
    return out, unmapped


def _split_kv(rest: str, value: torch.Tensor, prefix: str, out: dict) -> bool:
    """NVlabs/CIRKD ``attn.kv.*``: key rows [:C], value rows [C:]."""
    if not rest.startswith("attn.kv."):
        return False
    c = value.shape[0] // 2
    out[prefix + "attention.k_proj." + rest[8:]] = value[:c]
    out[prefix + "attention.v_proj." + rest[8:]] = value[c:]
    return True


def _split_qkv(rest: str, value: torch.Tensor, prefix: str, out: dict) -> bool:
    """mmseg ``attn.attn.in_proj_*``: query, key, value rows."""
    fused = re.match(r"attn\.attn\.in_proj_(weight|bias)$", rest)
    if not fused:
        return False
    for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
        out[f"{prefix}attention.{name}.{fused[1]}"] = part
    return True


# (patch-embedding regex, its conv's name, stage-norm regex, block regex, first stage index, block renames, fused split)
_ENCODERS = {
    "nvlabs": (r"patch_embed(\d)\.(proj|norm)\.(.+)$", "proj", r"norm(\d)\.(.+)$", r"block(\d)\.(\d+)\.(.+)$", 1,
               _NV_BLOCK, _split_kv),
    "mmseg": (r"layers\.(\d)\.0\.(projection|norm)\.(.+)$", "projection", r"layers\.(\d)\.2\.(.+)$",
              r"layers\.(\d)\.1\.(\d+)\.(.+)$", 0, _MM_BLOCK, _split_qkv),
}


def _encoder_one(key: str, value: torch.Tensor, out: dict, layout: str) -> str | None:
    """The new name of an encoder ``key`` of ``layout`` (``""``: written into ``out`` here; None: no encoder key)."""
    patch, proj, stage_norm, block, first, table, split = _ENCODERS[layout]
    m = re.match(patch, key)
    if m:
        part = "proj" if m[2] == proj else "layer_norm"
        return f"segformer.stages.{int(m[1]) - first}.patch_embeddings.{part}.{m[3]}"
    m = re.match(stage_norm, key)
    if m:
        return f"segformer.stages.{int(m[1]) - first}.layer_norm.{m[2]}"
    m = re.match(block, key)
    if not m:
        return None
    prefix = f"segformer.stages.{int(m[1]) - first}.blocks.{m[2]}."
    if split(m[3], value, prefix, out):
        return ""
    return next((prefix + new + m[3][len(old):] for old, new in table if m[3].startswith(old)), None)


def _nvlabs_one(key: str, value: torch.Tensor, out: dict, sd: dict) -> str | None:
    """The new name of ``key`` (``""``: written into ``out`` here; None: not an NVlabs/CIRKD key)."""
    if re.match(r"(patch_embed|norm|block)\d", key):
        return _encoder_one(key, value, out, "nvlabs")
    m = re.match(r"linear_c(\d)\.proj\.(.+)$", key)
    if m:
        return f"decode_head.linear_projections.{int(m[1]) - 1}.proj.{m[2]}"
    if key == "linear_fuse.0.weight":
        return "decode_head.linear_fuse.weight"
    if key == "linear_fuse.0.bias":
        return ""  # folded into the BN's running mean below
    m = re.match(r"linear_fuse\.1\.(weight|bias|running_var)$", key)
    if m:
        return f"decode_head.batch_norm.{m[1]}"
    if key == "linear_fuse.1.running_mean":
        bias = sd.get("linear_fuse.0.bias")
        out["decode_head.batch_norm.running_mean"] = value if bias is None else value - bias.to(value.dtype)
        return ""
    m = re.match(r"linear_pred\.(weight|bias)$", key)
    if m:
        return f"decode_head.classifier.{m[1]}"
    return None


# file entries that are not part of a segmentation SegFormer: ImageNet classifiers of the encoder files
IMAGENET_CLASSIFIER = {"hf": ("classifier.",), "nvlabs": ("head.",), "mmseg": (), "toolkit": ()}


def to_toolkit(sd: dict, encoder_only: bool = False) -> "tuple[OrderedDict[str, torch.Tensor], list[str], str]":
    """Rename a SegFormer / MiT state dict to :class:`SegFormer`'s keys.

    Returns ``(renamed, dropped, layout)``: ``dropped`` lists the file keys left out: an ImageNet
    classifier (``classifier.*`` / ``head.*``), and with ``encoder_only`` every decode-head key.
    Raises :class:`SegformerKeyError` when the layout is unknown, when keys of a known layout do not map
    (listed), or for an mmseg decode head (a different network) unless ``encoder_only``."""
    layout = detect_layout(sd)
    if layout is None:
        raise SegformerKeyError("not a SegFormer / MiT state dict (no segformer.stages.*, segformer.encoder.*, "
                                "blockN.*.attn.kv.* or layers.*.attn.attn.in_proj_weight keys)")
    classifier = IMAGENET_CLASSIFIER[layout]
    kept = {k: v for k, v in sd.items() if not k.startswith(classifier)}
    dropped = [k for k in sd if k not in kept]
    if layout == "mmseg":
        head = [k for k in kept if k.startswith("decode_head.") or k.startswith("auxiliary_head.")]
        if head and not encoder_only:
            raise SegformerKeyError(
                "an mmsegmentation SegFormer: its SegformerHead (per-stage conv+BN+ReLU, stages joined c1..c4) is "
                "a different network from the SegFormer decode head built here; only its encoder can be used "
                "(--student-init); for a teacher use the CIRKD/NVlabs or Hugging Face files")
        dropped += head
        kept = {k: v for k, v in kept.items() if k not in head}
    if layout == "toolkit":
        renamed, unmapped = OrderedDict((k, v) for k, v in kept.items() if not k.endswith("num_batches_tracked")), []
    else:
        renamed, unmapped = _convert(kept, layout)
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (f" ... (+{len(unmapped) - 10})" if len(unmapped) > 10 else "")
        raise SegformerKeyError(f"{len(unmapped)} keys of this {layout}-layout SegFormer file have no counterpart "
                                f"in the model: {shown}")
    if encoder_only:
        head = [k for k in renamed if not k.startswith("segformer.")]
        dropped += head
        renamed = OrderedDict((k, v) for k, v in renamed.items() if k.startswith("segformer."))
    return renamed, dropped, layout


def infer_variant(sd: dict) -> str | None:
    """``"b0"`` ... ``"b5"`` from a toolkit-layout state dict's stage widths and depths (and the decoder
    width when present); None when the shapes fit no published variant."""
    widths, depths = [], []
    for i in range(4):
        w = sd.get(f"segformer.stages.{i}.patch_embeddings.proj.weight")
        if w is None:
            return None
        widths.append(int(w.shape[0]))
        blocks = {k.split(".")[4] for k in sd if k.startswith(f"segformer.stages.{i}.blocks.")}
        depths.append(len(blocks))
    fuse = sd.get("decode_head.linear_fuse.weight")
    for name, (hidden, dep, decoder) in SEGFORMER_VARIANTS.items():
        if tuple(widths) == hidden and tuple(depths) == dep and (fuse is None or int(fuse.shape[0]) == decoder):
            return name
    return None

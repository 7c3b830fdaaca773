"""Model summary: ``python -m cwdseg.models --arch resnet18 --size 512 1024`` prints parameters and
GMACs (and, for the CIRKD family, the "FLOPs" in CIRKD's own counting convention)."""
from __future__ import annotations

import argparse
import sys

import torch

from cwdseg.models import ARCH_NAMES, arch_spec, build_model, canonical_arch
from cwdseg.models.summary import conv_macs_by_module, count_parameters

# (part, top-level module names) per family; a module belongs to the first part whose prefix matches.
PARTS = {
    "cwd": (("backbone", ("conv", "bn", "layer")), ("psp head", ("pspmodule", "head")), ("dsn (aux)", ("dsn",))),
    "cirkd": (("backbone", ("pretrained",)), ("head", ("head",)), ("aux head", ("auxlayer",))),
    "segformer": (("encoder", ("segformer",)), ("head", ("decode_head",))),  # MACs include attention matmuls
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cwdseg.models", description=__doc__)
    p.add_argument("--arch", choices=ARCH_NAMES, default="resnet18", help="network (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(512, 1024),
                   help="input height and width (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=19, help="output classes (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    h, w = args.size
    if h <= 0 or w <= 0:
        get_args_parser().error(f"--size must be positive, got {h} {w}")
    arch = canonical_arch(args.arch)
    spec = arch_spec(arch)
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = build_model(arch, args.num_classes)
        out_h, out_w = model.eval()(torch.empty(1, 3, h, w))[0].shape[-2:]
    macs = conv_macs_by_module(model, (h, w))
    params = count_parameters(model)
    aux = "aux head included" if spec.aux_head else "no aux head"
    print(f"{spec.label} ({arch}): {params:,} parameters ({params / 1e6:.2f}M), "
          f"{len(model.state_dict())} state_dict keys")
    print(f"input {h}x{w} -> logits {out_h}x{out_w}: {sum(macs.values()) / 1e9:.2f} GMACs "
          f"(conv multiply-accumulates of one image, {aux})")
    if spec.family == "cirkd":
        cirkd = sum(conv_macs_by_module(model, (h, w), convention="cirkd").values())
        print(f"  CIRKD utils/flops.py count (dilation ignored in output sizes): {cirkd / 1e9:.1f} G")
    print(f"  head feature: {spec.feature_channels} channels; input normalisation: {spec.normalization}")
    for part, prefixes in PARTS[spec.family]:
        p_params = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0].startswith(prefixes))
        p_macs = sum(v for n, v in macs.items() if n.split(".")[0].startswith(prefixes))
        print(f"  {part:<10} {p_params / 1e6:8.3f}M params  {p_macs / 1e9:8.2f} GMACs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

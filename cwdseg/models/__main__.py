"""Model summary: ``python -m cwdseg.models --arch resnet18 --size 512 1024`` prints parameters and GMACs."""
from __future__ import annotations

import argparse
import sys

import torch

from cwdseg.models import MODEL_BUILDERS, build_model
from cwdseg.models.summary import conv_macs_by_module, count_parameters

PARTS = (("backbone", ("conv", "bn", "layer")), ("psp head", ("pspmodule", "head")), ("dsn (aux)", ("dsn",)))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cwdseg.models", description=__doc__)
    p.add_argument("--arch", choices=sorted(MODEL_BUILDERS), default="resnet18", help="network (default: %(default)s)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(512, 1024),
                   help="input height and width (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=19, help="output classes (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    h, w = args.size
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = build_model(args.arch, args.num_classes)
        out_h, out_w = model.eval()(torch.empty(1, 3, h, w))[0].shape[-2:]
    macs = conv_macs_by_module(model, (h, w))
    params = count_parameters(model)
    print(f"PSPNet-{args.arch}: {params:,} parameters ({params / 1e6:.2f}M), {len(model.state_dict())} state_dict keys")
    print(f"input {h}x{w} -> logits {out_h}x{out_w}: {sum(macs.values()) / 1e9:.2f} GMACs "
          "(conv multiply-accumulates of one image, dsn included)")
    for part, prefixes in PARTS:
        p_params = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0].startswith(prefixes))
        p_macs = sum(v for n, v in macs.items() if n.split(".")[0].startswith(prefixes))
        print(f"  {part:<10} {p_params / 1e6:8.3f}M params  {p_macs / 1e9:8.2f} GMACs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation throughput: images/s of whole-image and sliding-window inference at full resolution.

    python -m benchmarks.bench_eval                       # R18 student, 1024x2048, fp32 and bf16
    python -m benchmarks.bench_eval --arch resnet101 --device cuda --images 10

Random weights (speed does not depend on them), eval mode, the same ``predict_logits`` + argmax that
``evaluate.py`` runs; data loading is not included. Before each configuration one untimed warm-up
image at half the height and width (a quarter of the cost) sets up the kernels and the allocator.
Each image is timed on its own: rows give the median s/image with its spread over ``--images``.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import torch

if __package__:  # imported as benchmarks.bench_eval (tests/test_evaluate.py)
    from benchmarks import stats
else:  # run as a script, or imported as a sibling by run.py
    import stats
from cwdseg.engine.precision import AMP_DTYPES
from cwdseg.evaluation.inference import predict_logits, sliding_windows
from cwdseg.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    arch: str = "resnet18",
    size: Sequence[int] = (1024, 2048),
    modes: Sequence[str] = ("whole", "sliding"),
    amps: Sequence[str] = ("none", "bf16"),
    images: int = 1,
    tile: Sequence[int] = (512, 512),
    overlap: float = 1 / 3,
    tile_batch: int = 6,
    device: str | None = None,
    warmup: bool = True,
) -> list[dict]:
    """Time ``images`` single-image predictions per (mode, amp); one dict per configuration.

    Each dict: ``arch, mode, amp, size, tiles, images, seconds (total), seconds_per_image (median, q1, q3,
    min, max, n, iqr), images_per_s (from the median), device, threads``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(arch).to(dev).eval()
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 3, *size, generator=gen) * 50).to(dev)  # the scale of mean-subtracted 0..255 pixels
    small = x[..., : size[0] // 2, : size[1] // 2]
    rows = []
    for mode in modes:
        for amp in amps:
            def once(inp: torch.Tensor = x, mode=mode, amp=amp) -> None:
                logits = predict_logits(model, inp, mode=mode, tile=tile, overlap=overlap, tile_batch=tile_batch,
                                        amp_dtype=AMP_DTYPES[amp])
                logits.argmax(1)

            if warmup:
                once(small)
            per_image = stats.repeat(once, images, warmup=0, sync=lambda: _sync(dev))
            spread = stats.summarize(per_image)
            rows.append({
                "arch": arch, "mode": mode, "amp": amp, "size": list(size),
                "tiles": len(sliding_windows(size[0], size[1], tile, overlap)) if mode == "sliding" else 1,
                "images": images, "seconds": sum(per_image), "seconds_per_image": spread.as_dict(),
                "images_per_s": 1 / spread.median,
                "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                "threads": torch.get_num_threads(),
            })
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`run` as a plain-text table."""
    lines = ["evaluation throughput (predict_logits + argmax, no data loading)",
             f"{'arch':<10} {'mode':<8} {'amp':<5} {'size':>9} {'tiles':>5} {'s/image (median, IQR, min-max, n)':<44} "
             f"{'img/s':>8}  device"]
    for r in rows:
        size = f"{r['size'][0]}x{r['size'][1]}"
        spread = stats.Summary.from_dict(r["seconds_per_image"]).text(2)
        lines.append(f"{r['arch']:<10} {r['mode']:<8} {r['amp']:<5} {size:>9} {r['tiles']:>5} {spread:<44} "
                     f"{r['images_per_s']:>8.3f}  {r['device']} ({r['threads']} threads)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet101"))
    p.add_argument("--size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    p.add_argument("--modes", nargs="+", default=["whole", "sliding"], choices=("whole", "sliding"))
    p.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=tuple(AMP_DTYPES))
    p.add_argument("--images", type=int, default=1, help="timed images per configuration")
    p.add_argument("--tile-batch", type=int, default=6)
    p.add_argument("--device", default=None)
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    args = p.parse_args(argv)
    rows = run(args.arch, tuple(args.size), args.modes, args.amp, args.images, tile_batch=args.tile_batch,
               device=args.device, warmup=args.warmup)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()

"""All benchmarks in one run: data loader, synchronised ABN, loss cost, training step (each speed switch), evaluation.

    python benchmarks/run.py            # this machine, a few minutes on 2 CPU cores
    python benchmarks/run.py --quick    # a smoke test of the code: its numbers are not results
    python benchmarks/run.py --device cuda --crop 512 512 --batch 8 --compile --loader cache   # a GPU, the paper recipe

Every ratio compares settings measured side by side in this same run; nothing is compared with figures
from another machine or another day. Every figure is a median over repeats after warm-up, printed with
its spread (IQR, min-max), and a ratio within the spread carries a warning (``benchmarks/stats.py``).
Results go to ``--json`` (default benchmarks/latest.json) and are printed as tables; RESULTS.md records
figures with the machine they came from.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import stats

ROOT = Path(__file__).resolve().parents[1]
# The bench_* modules are imported as siblings: a script's own folder is the first entry of its import path.


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": _cpu_model(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--crop", type=int, nargs=2, default=(128, 128), help="training-step crop")
    p.add_argument("--batch", type=int, default=2, help="training-step batch")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--quick", action="store_true", help="smoke test: fewer steps and images, numbers are not results")
    p.add_argument("--loader", default="none", choices=["none", "png", "cache"],
                   help="training-step rows fed by the real loader (PNG or image cache), with its wait time")
    p.add_argument("--only", nargs="*", default=None, choices=["loader", "abn", "losses", "train", "eval"])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "latest.json"))
    return p


def main(argv: list[str] | None = None) -> None:
    a = get_args_parser().parse_args(argv)
    todo = a.only or ["loader", "abn", "losses", "train", "eval"]
    results: dict = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": a.quick}
    if a.quick:
        print(stats.QUICK_BANNER, flush=True)

    if "loader" in todo:
        import bench_loader

        rows = bench_loader.run(samples=4 if a.quick else 24, quick=a.quick)
        results["loader"] = rows
        print(bench_loader.format_table(rows), flush=True)
    if "abn" in todo:
        import bench_abn

        shape = (2, 32, 17, 17) if a.quick else ((8, 512, 65, 65) if a.device.startswith("cuda") else (2, 256, 65, 65))
        rows = bench_abn.run(a.device, shape, rounds=3 if a.quick else 7, number=1 if a.quick else 3)
        results["abn"] = rows
        print("\n" + bench_abn.format_table(rows), flush=True)
    if "losses" in todo:
        import bench_losses

        rows = bench_losses.run(quick=a.quick)
        results["losses"] = rows
        print("\n" + bench_losses.format_table(rows), flush=True)
    if "train" in todo:
        import bench_train

        steps = 2 if a.quick else 6
        rows = bench_train.run(tuple(a.crop), a.batch, steps=steps, warmup=1 if a.quick else 2, device=a.device,
                               with_compile=a.compile, loader=a.loader)
        results["train"] = rows
        print("\n" + bench_train.format_table(
            rows, f"training step, CWD logits, batch {a.batch}, crop {a.crop[0]}x{a.crop[1]}, {a.device}"), flush=True)
    if "eval" in todo:
        import bench_eval

        rows = bench_eval.run(device=a.device, images=1 if a.quick else 3)
        results["eval"] = rows
        print("\n" + bench_eval.format_table(rows), flush=True)

    Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {a.json}")
    if a.quick:
        print(stats.QUICK_BANNER)


if __name__ == "__main__":
    main()

"""Training-step throughput with each speed switch, measured side by side in one run.

Each setting runs in its own process (so peak memory is its own) on the same synthetic batch, through
``cwdseg.engine.step.train_step`` — the exact function the training loop calls. The reference row is fp32, NCHW, eager.
Every step is timed on its own (synchronised on a GPU) after ``--warmup`` untimed steps: rows give the median
ms/step with its IQR and min-max, throughput and MFU from the median, and a warning where a ratio is within
the spread. The settings run one after the other (each in its own process), so load from other processes on
a shared machine is not spread evenly over them: compare ratios against their spread.

``--loader png|cache`` feeds every step from the real ``build_loader`` on synthetic 1024x2048 images (from the
PNGs, or from the memory-mapped image cache) and reports the time each step waited for its batch (data ms);
``none`` (the default) reuses one batch on the device.

    python benchmarks/bench_train.py                       # CPU: 128x128 crops, batch 2
    python benchmarks/bench_train.py --crop 512 512 --batch 8 --device cuda --loader cache   # the paper recipe on a GPU
    python benchmarks/bench_train.py --student-arch resnet18 deeplabv3_resnet18 deeplabv3_mobilenetv2 \
        --teacher-arch deeplabv3_resnet101                # each student of the CIRKD protocol, one table each
    python benchmarks/bench_train.py --student-arch segformer_b0 --teacher-arch segformer_b4 \
        --settings "fp32 NCHW eager" "bf16 NCHW"          # SegFormer-B4 -> B0 (the CIRKD SegFormer pair)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stats

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    # name: (amp, channels_last, compile)
    "fp32 NCHW eager": ("none", False, False),
    "fp32 channels_last": ("none", True, False),
    "bf16 NCHW": ("bf16", False, False),
    "bf16 channels_last": ("bf16", True, False),
    "bf16 channels_last compile": ("bf16", True, True),
}


def _loader_batches(kind: str, crop: tuple[int, int], batch: int, tmp: str, device, channels_last: bool):
    """An endless iterator of (images, labels) on the device from the real loader, and the seconds each waited."""
    import torch

    from cwdseg.data.cityscapes import CityscapesDataset, build_loader
    from cwdseg.data.sampling import TrainSampleStream
    from cwdseg.data.synthetic import generate

    root = generate(Path(tmp) / "synthetic", n_train=max(8, batch), n_val=0, n_test=0, size=(1024, 2048))
    cache = str(Path(tmp) / "image_cache") if kind == "cache" else None
    ds = CityscapesDataset(root, "train", crop_size=crop, image_cache=cache, verbose=False)
    loader = build_loader(ds, batch, sampler=TrainSampleStream(len(ds), seed=0), drop_last=True)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    waits: list[float] = []

    def batches():
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            images, labels, _ = next(iterator)
            waits.append(time.perf_counter() - start)
            yield (images.to(device, non_blocking=True, memory_format=mem), labels.to(device, non_blocking=True).long())

    return batches(), waits


def measure_one(setting: str, crop: tuple[int, int], batch: int, steps: int, warmup: int, device: str,
                recipe: str, loader: str = "none", student_arch: str = "resnet18",
                teacher_arch: str = "resnet101") -> dict:
    """Time each of ``steps`` calls of train_step after ``warmup`` calls; runs in the current process."""
    import torch

    from cwdseg.cli.train import resolve_config
    from cwdseg.engine.build import build_criteria, build_engine, build_models, build_optimizers
    from cwdseg.engine.distributed import DistInfo, peak_memory_mb, resolve_device
    from cwdseg.engine.step import train_step

    amp, channels_last, compile_ = SETTINGS[setting]
    recipe_flags = {
        "cwd-logits": ["--cwd", "True"],
        "cwd-kd-adv": ["--cwd", "True", "--kd", "True", "--adv", "True"],
        "baseline": [],
    }[recipe]
    cfg = resolve_config([
        "--amp", amp, "--channels-last", str(channels_last), "--compile", str(compile_), "--device", device,
        "--input-size", f"{crop[0]},{crop[1]}", "--batch-size", str(batch), "--teacher-ckpt", "random",
        "--student-init", "random", "--student-arch", student_arch, "--teacher-arch", teacher_arch, *recipe_flags,
    ])
    torch.manual_seed(0)
    info = DistInfo(device=resolve_device(device))
    engine = build_engine(cfg, info)
    quiet = lambda *_: None  # noqa: E731
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # the random-weights warnings
        models = build_models(cfg, info, quiet)
    criteria, weights = build_criteria(cfg, models, info.device)
    opt_g, opt_d = build_optimizers(cfg, models, criteria)
    mem = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, *crop, device=info.device).to(memory_format=mem)
    labels = torch.randint(0, 19, (batch, *crop), device=info.device)
    labels[:, :4] = 255
    micro = [(images, labels)]
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    feed, waits = (None, [])
    if loader != "none":
        feed, waits = _loader_batches(loader, crop, batch, tmp.name, info.device, channels_last)

    def sync():
        if info.device.type == "cuda":
            torch.cuda.synchronize()

    out = {}

    def step() -> None:
        out["terms"] = train_step([next(feed)] if feed is not None else micro, models, criteria, weights, opt_g, opt_d,
                                  engine)

    for _ in range(warmup):
        step()
    sync()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = stats.repeat(step, steps, warmup=0, sync=sync)
    data_ms = stats.summarize(waits[warmup:]).scaled(1e3).as_dict() if waits else None
    tmp.cleanup()
    peak_mb = peak_memory_mb(info.device)
    from cwdseg.engine.runlog import peak_tflops
    from cwdseg.models.summary import training_step_flops

    flops = training_step_flops(cfg.models.student_arch,
                                cfg.models.teacher_arch if models.teacher is not None else None, crop, batch)
    per_step = stats.summarize(times)
    seconds = per_step.median
    peak = peak_tflops(info.device)
    tflops = flops / seconds / 1e12
    return {
        "setting": setting, "student_arch": student_arch,
        "teacher_arch": teacher_arch if models.teacher is not None else None, "ms_per_step": 1000 * seconds,
        "ms_per_step_spread": per_step.scaled(1e3).as_dict(),
        "images_per_s": batch / seconds, "tflops": tflops, "mfu": tflops / peak if peak else None,
        "peak_mem_mb": peak_mb, "data_ms": data_ms, "loader": loader, "loss": float(out["terms"]["total"]),
        "device_name": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
    }


def run(crop: tuple[int, int] = (128, 128), batch: int = 2, steps: int = 4, warmup: int = 2, device: str = "cpu",
        recipe: str = "cwd-logits", settings: list[str] | None = None, with_compile: bool = False,
        loader: str = "none", student_arch: str = "resnet18", teacher_arch: str = "resnet101") -> list[dict]:
    """Measure every setting in its own subprocess; returns rows with ``ratio`` to the fp32 NCHW eager row
    (ratio of median throughputs) and a ``warning`` where that ratio is within the spread."""
    names = settings or [s for s in SETTINGS if with_compile or "compile" not in s]
    rows = []
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--crop", str(crop[0]), str(crop[1]), "--batch", str(batch),
               "--steps", str(steps), "--warmup", str(warmup), "--device", device, "--recipe", recipe,
               "--loader", loader, "--student-arch", student_arch, "--teacher-arch", teacher_arch]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
        if out.returncode != 0:
            raise RuntimeError(f"benchmark setting {name!r} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = rows[0]["images_per_s"]
    ref_spread = stats.Summary.from_dict(rows[0]["ms_per_step_spread"])
    for r in rows:
        r["ratio"] = r["images_per_s"] / ref
        r["warning"] = None if r is rows[0] else stats.ratio_warning(
            stats.Summary.from_dict(r["ms_per_step_spread"]), ref_spread, f"{r['setting']} vs {rows[0]['setting']}")
    return rows


def format_table(rows: list[dict], title: str) -> str:
    """Median ms/step with IQR and min-max, throughput, TFLOP/s, MFU, peak memory, data wait, ratio; warnings."""
    lines = [f"{title}; {rows[0]['device_name'] if rows else ''}",
             f"{'setting':<28} {'ms/step':>9} {'IQR':>15} {'min-max':>15} {'img/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
             f"{'peak MB':>8} {'data ms':>8} {'ratio':>6}"]
    warnings = []
    for r in rows:
        s = r["ms_per_step_spread"]
        mfu = "" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        data = "" if r.get("data_ms") is None else f"{r['data_ms']['median']:.1f}"
        lines.append(f"{r['setting']:<28} {r['ms_per_step']:>9.1f} {s['q1']:>7.1f}-{s['q3']:<7.1f} "
                     f"{s['min']:>7.1f}-{s['max']:<7.1f} {r['images_per_s']:>8.2f} {r['tflops']:>8.3f} {mfu:>6} "
                     f"{r['peak_mem_mb']:>8.0f} {data:>8} {r['ratio']:>5.2f}x")
        if r.get("warning"):
            warnings.append(r["warning"])
    return "\n".join(lines + warnings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--crop", type=int, nargs=2, default=(128, 128))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--recipe", default="cwd-logits", choices=["cwd-logits", "cwd-kd-adv", "baseline"])
    p.add_argument("--loader", default="none", choices=["none", "png", "cache"],
                   help="feed steps from the real loader (PNG or image cache) and report its wait time")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps after 1 warm-up step")
    p.add_argument("--compile", action="store_true", help="add the torch.compile row (10-20 s cold start on CPU)")
    p.add_argument("--student-arch", nargs="+", default=["resnet18"],
                   help="student network(s) (cwdseg.models.ARCH_NAMES); one table per student")
    p.add_argument("--teacher-arch", default="resnet101", help="teacher network of the distillation recipes")
    p.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                   help="measure only these settings (the first is the reference row); default: all but compile")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(a.one, tuple(a.crop), a.batch, a.steps, a.warmup, a.device, a.recipe, a.loader,
                                     a.student_arch[0], a.teacher_arch)))
        return
    if a.quick:
        print(stats.QUICK_BANNER)
        a.steps, a.warmup = 2, 1
    rows = []
    for student in a.student_arch:
        student_rows = run(tuple(a.crop), a.batch, a.steps, a.warmup, a.device, a.recipe, settings=a.settings,
                           with_compile=a.compile,
                           loader=a.loader, student_arch=student, teacher_arch=a.teacher_arch)
        teacher = f", teacher {a.teacher_arch}" if a.recipe != "baseline" else ""
        print(format_table(student_rows, f"training step, student {student}{teacher}, {a.recipe}, batch {a.batch}, "
                                         f"crop {a.crop[0]}x{a.crop[1]}, {a.device}"))
        rows += student_rows
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

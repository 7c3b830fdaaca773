"""Synchronised ABN: time and memory of its implementations side by side (``cwdseg.models.abn``).

    python benchmarks/bench_abn.py                      # CPU: "sums" (all-reduce of sums) vs "plain"
    python benchmarks/bench_abn.py --device cuda        # GPU: "sums" vs "native" (torch's SyncBatchNorm kernels)

One ABN layer (leaky ReLU) in training mode with cross-process statistics, forward + backward of
``(y * dy).sum()``, in a process group of one (gloo on CPU, NCCL on CUDA): the collectives are trivial, so
this measures the compute and memory of each implementation, not the network. Implementations: ``sums``
(generic ops on an fp32 copy of the activation, the default off CUDA), ``native`` (torch's
``batch_norm_stats`` family, CUDA only, the default on CUDA) and ``plain`` (the native implementation's
autograd function with the kernels written in plain torch ops, the CPU stand-in).

Time: ``torch.utils.benchmark.Timer`` (it synchronises CUDA), one measurement of ``--number`` calls per
implementation per round, rounds interleaved (A B, B A, ...) after a warm-up; median with IQR and min-max
over rounds. Memory: the bytes autograd keeps for the backward pass (``saved_tensors_hooks``, each storage
counted once), which is what a training step holds per layer until its backward; on CUDA also the peak
allocated during a step above what was allocated before it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path

import stats
import torch
import torch.distributed as dist
from torch.utils import benchmark as tbench

from cwdseg.models.abn import ABN, convert_sync_abn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _init_world_of_one(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs its forward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def run(device: str = "cpu", shape: tuple[int, int, int, int] = (2, 256, 65, 65),
        dtypes: tuple[str, ...] = ("fp32", "bf16"), impls: tuple[str, ...] | None = None, rounds: int = 7,
        number: int = 3) -> list[dict]:
    """Rows: impl, dtype, shape, ms (median, q1, q3, min, max, n, iqr), saved_mb, peak_mb, ratio, max_diff."""
    dev = torch.device(device)
    if impls is None:
        impls = ("sums", "native") if dev.type == "cuda" else ("sums", "plain")
    _init_world_of_one(dev)
    rows = []
    try:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dev, dtype)
            dy = torch.randn(shape, generator=g).to(dev, dtype)
            layers, forwards, steps, outputs = {}, {}, {}, {}
            for impl in impls:
                torch.manual_seed(0)
                layers[impl] = convert_sync_abn(ABN(shape[1]).to(dev), kernels=impl).train()

                def forward(impl: str = impl, x=x, layers=layers) -> torch.Tensor:
                    xi = x.detach().requires_grad_(True)
                    return layers[impl](xi), xi

                def step(forward=forward, dy=dy) -> None:
                    y, _ = forward()
                    y.backward(dy)

                forwards[impl], steps[impl] = forward, step
                y, xi = forward()
                y.backward(dy)
                outputs[impl] = (y.detach().float(), xi.grad.float())
            ref = impls[0]
            saved = {impl: saved_bytes(lambda impl=impl, forwards=forwards: forwards[impl]()[0]) for impl in impls}
            peaks = {impl: _cuda_step_peak(steps[impl], dev) for impl in impls}
            timers = {impl: tbench.Timer(stmt="step()", globals={"step": steps[impl]},
                                         num_threads=torch.get_num_threads()) for impl in impls}
            per_call = {impl: [] for impl in impls}

            def measure(impl: str, r: int, timers=timers, per_call=per_call) -> None:
                seconds = timers[impl].timeit(number).mean
                if r >= 0:  # warm-up rounds are negative
                    per_call[impl].append(seconds)

            stats.interleaved({impl: (lambda r, impl=impl: measure(impl, r)) for impl in impls}, rounds, warmup=1,
                              with_round=True)
            ref_summary = stats.summarize(per_call[ref]).scaled(1e3)
            for impl in impls:
                s = stats.summarize(per_call[impl]).scaled(1e3)
                diff = max(float((outputs[impl][k] - outputs[ref][k]).abs().max()) for k in range(2))
                rows.append({
                    "impl": impl, "dtype": dtype_name, "shape": list(shape), "device": _device_name(dev),
                    "ms": s.as_dict(), "saved_mb": saved[impl] / 2**20, "peak_mb": peaks[impl],
                    "ratio": s.median / ref_summary.median, "max_diff_vs_" + ref: diff,
                    "warning": None if impl == ref else stats.ratio_warning(s, ref_summary,
                                                                           f"{impl} vs {ref} ({dtype_name})"),
                })
    finally:
        dist.destroy_process_group()
    return rows


def _cuda_step_peak(step, dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize(dev)
    return (torch.cuda.max_memory_allocated(dev) - before) / 2**20


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    shape = "x".join(map(str, rows[0]["shape"]))
    lines = [f"synchronised ABN, forward + backward, one layer {shape}, world of 1; {rows[0]['device']}",
             f"{'impl':<7} {'dtype':<5} {'ms':>8} {'IQR':>15} {'min-max':>15} {'saved MB':>9} {'peak MB':>8} "
             f"{'ratio':>6} {'max diff':>9}"]
    warnings = []
    for r in rows:
        s = r["ms"]
        peak = "" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        diff = next(v for k, v in r.items() if k.startswith("max_diff"))
        lines.append(f"{r['impl']:<7} {r['dtype']:<5} {s['median']:8.2f} {s['q1']:7.2f}-{s['q3']:<7.2f} "
                     f"{s['min']:7.2f}-{s['max']:<7.2f} {r['saved_mb']:9.2f} {peak:>8} {r['ratio']:5.2f}x {diff:9.2e}")
        if r.get("warning"):
            warnings.append(r["warning"])
    lines.append("saved MB: kept by autograd for the backward pass; ratio: median time over the first row's of "
                 "the same dtype; max diff: largest |difference| of output and input gradient from the first row")
    return "\n".join(lines + warnings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"),
                   help="activation shape (default: 2 256 65 65 on CPU, 8 512 65 65 on CUDA: the PSP head at 512x512)")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--impl", nargs="+", default=None, choices=["sums", "native", "plain"])
    p.add_argument("--rounds", type=int, default=7, help="interleaved measurements per implementation")
    p.add_argument("--number", type=int, default=3, help="calls per measurement")
    p.add_argument("--quick", action="store_true", help="smoke test: small shape, 3 rounds")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = p.parse_args(argv)
    if "native" in (a.impl or []) and not a.device.startswith("cuda"):
        p.error("--impl native needs --device cuda: torch's batch_norm_stats kernels are CUDA-only (torch 2.13)")
    shape = tuple(a.shape) if a.shape else ((8, 512, 65, 65) if a.device.startswith("cuda") else (2, 256, 65, 65))
    if a.quick:
        print(stats.QUICK_BANNER)
        shape, a.rounds, a.number = (2, 32, 17, 17), 3, 1
    rows = run(a.device, shape, tuple(a.dtype), tuple(a.impl) if a.impl else None, a.rounds, a.number)
    print(format_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

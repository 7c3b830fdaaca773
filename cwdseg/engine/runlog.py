"""The run log: metrics.jsonl, the progress bar or plain lines, throughput/MFU figures, the code version."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cwdseg.engine.distributed import peak_memory_mb

# Peak dense bf16 tensor throughput, for model-FLOPs utilisation; unknown devices report TFLOP/s only.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "4090": 165.0}


class RunLog:
    """Rank 0 writes metrics.jsonl and a progress bar (or plain lines when not on a terminal)."""

    def __init__(self, run_dir: Path | None, total: int, start: int, enabled: bool, trackers=None) -> None:
        self.enabled, self.trackers = enabled, trackers  # trackers: cwdseg.engine.trackers.Trackers or None
        self.file = open(run_dir / "metrics.jsonl", "a") if enabled and run_dir else None
        self.bar = None
        if enabled and run_dir is not None and sys.stdout.isatty():  # the bar belongs to the loop
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def metrics(self, record: dict[str, Any], steps_done: int) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.trackers:
            self.trackers.log_scalars(record["step"], record)
        losses = " ".join(f"{k}={v:.4f}" for k, v in record["loss"].items())
        if self.bar is not None:
            self.bar.update(steps_done)
            self.bar.set_postfix_str(f"{losses} lr={record['lr']:.2e} {record['images_per_s']:.1f} img/s")
        else:
            tflops = record.get("tflops")
            extra = f" {tflops:.2f} TFLOP/s" if tflops is not None else ""
            print(f"step {record['step'] + 1}/{record['num_steps']} {losses} lr={record['lr']:.3e} "
                  f"{record['iter_ms']:.0f} ms/it (data {record['data_ms']:.0f} ms) "
                  f"{record['images_per_s']:.1f} img/s{extra} mem {record['peak_mem_mb']:.0f} MB "
                  f"eta {_fmt_time(record['eta_s'])}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"




class StepWindow:
    """The steps since the last log line: loss terms summed on the device, data-wait and wall time.

    ``record`` is the loop's only host sync: the mean of each term over the window, throughput, MFU, ETA.
    """

    def __init__(self, batch_size: int, flops_per_step: float, peak_tflops: float | None) -> None:
        self.batch_size, self.flops_per_step, self.peak = batch_size, flops_per_step, peak_tflops
        self.reset()

    def reset(self) -> None:
        self.start, self.data_seconds, self.steps, self.terms = time.perf_counter(), 0.0, 0, {}

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for k, v in terms.items():
            self.terms[k] = self.terms[k] + v if k in self.terms else v

    def record(self, step: int, num_steps: int, lr: float, device: torch.device) -> dict[str, Any]:
        """The metrics line after ``step`` steps (``step - 1`` is the index of the last one run)."""
        values = {k: float(v) / self.steps for k, v in self.terms.items()}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {values}; lower --lr-g or use --amp none")
        iter_s = (time.perf_counter() - self.start) / self.steps
        tflops = self.flops_per_step / iter_s / 1e12
        return {
            "step": step - 1, "num_steps": num_steps, "loss": values, "lr": lr,
            "images_per_s": self.batch_size / iter_s, "iter_ms": 1000 * iter_s,
            "data_ms": 1000 * self.data_seconds / self.steps, "peak_mem_mb": peak_memory_mb(device),
            "tflops": tflops, "mfu": tflops / self.peak if self.peak else None,
            "eta_s": iter_s * (num_steps - step),
        }

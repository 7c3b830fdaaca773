"""torch.distributed helpers: ranks from the environment that ``torchrun`` sets, no launcher arguments.

A plain ``python train.py`` is a world of one process and needs none of this; under
``torchrun --nproc_per_node=N train.py`` the same code runs DDP (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(RuntimeError):
    """A device flag that cannot be honoured on this machine."""


def resolve_device(device: str | None = "auto", gpu: str | int | None = None, local_rank: int = 0) -> torch.device:
    """``--device`` / the original's ``--gpu N`` -> a ready device.

    ``auto`` (or None) is this rank's GPU when CUDA is available, else the CPU; asking for CUDA on a
    machine without it is an error, never a silent fall-back. The device is also prepared: CUDA's
    current device is set, and on the CPU subnormal floats are flushed to zero (the softmax of large
    logits produces them, and they make CPU kernels ~25x slower while changing nothing above 1e-38).
    """
    if gpu is not None and str(gpu) != "None":  # the original's default was the string 'None'
        if not str(gpu).isdigit():
            raise DeviceError(f"--gpu {gpu!r}: expected a GPU index such as 0")
        gpu_device = f"cuda:{gpu}"
        if device not in (None, "auto") and torch.device(device) != torch.device(gpu_device):
            raise DeviceError(f"--gpu {gpu} and --device {device} disagree; pass only one of them")
        device = gpu_device
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"--device {device!r} is not a device name (cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} was asked for, but this machine has no CUDA GPU; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(dev)
    elif dev.type == "cpu":
        torch.set_flush_denormal(True)
    return dev


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU; on a CPU the peak resident set
    (``VmHWM``; unlike ``ru_maxrss`` it does not carry over a parent's peak across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def init_distributed(device_name: str = "auto", gpu: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, gpu, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def average_gradients(parameters: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Average ``.grad`` over processes, for modules trained outside DDP (connector, discriminator).

    One flattened all-reduce: those modules are small, and a single call keeps the collective order
    identical on every rank.
    """
    if world_size <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average floating-point buffers (BatchNorm running statistics) so every rank holds the same model."""
    if world_size <= 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world_size

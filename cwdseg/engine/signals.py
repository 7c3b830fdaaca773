"""Stopping a training run cleanly: Ctrl-C, a scheduler's SIGTERM, and its early-warning signal.

What each signal does once the loop is running:

* the first SIGINT (Ctrl-C), SIGTERM or ``--stop-signal`` (default SIGUSR1, e.g. Slurm's
  ``--signal=USR1@120``) asks the loop to finish the current step, write ``last.pth`` and exit with
  status 0 and a line saying how to resume;
* a second Ctrl-C, at least :data:`DOUBLE_PRESS_S` after the first, aborts at once
  (``KeyboardInterrupt``): ``last.pth`` is written atomically, so the previous one stays intact;
  repeated SIGTERMs are the launcher forwarding what it got (torchrun does), not an abort;
* DataLoader workers ignore these signals (``cwdseg.data.cityscapes.worker_init_fn``): a SIGTERM to
  the whole process group, as Slurm and torchrun send it, reaches the main process, which still
  needs its workers for the step it finishes;
* under torchrun every rank stops after the same step: the ranks all-reduce their flags (on log
  steps, to keep host syncs rare; preemption grace periods are far longer than ``--log-every`` steps).
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
import time

import torch

from cwdseg.engine.distributed import DistInfo

STOP_SIGNAL_CHOICES = ("USR1", "USR2", "none")
# torchrun forwards a Ctrl-C to its ranks, which the terminal has already sent them: two SIGINTs in a
# few milliseconds are one press. A person's second press comes later.
DOUBLE_PRESS_S = 1.0


class StopRequest:
    """Signal handler state: which signal asked to stop, and when."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.first_at = 0.0
        self.installed: list[int] = []

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self, stop_signal: str = "USR1") -> "StopRequest":
        """Handle SIGINT, SIGTERM and ``SIG<stop_signal>`` (``"none"``: only the first two)."""
        names = ["SIGINT", "SIGTERM"] + ([f"SIG{stop_signal}"] if stop_signal != "none" else [])
        for name in names:
            signum = getattr(signal, name)
            signal.signal(signum, self)
            self.installed.append(signum)
        return self

    def restore(self) -> None:
        for signum in self.installed:
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        self.installed = []

    def __call__(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self.first_at = name, now
            print(f"\n{name}: finishing the current step, then saving last.pth "
                  f"({'Ctrl-C again to abort at once' if name == 'SIGINT' else 'then exiting'})",
                  file=sys.stderr, flush=True)
        elif signum == signal.SIGINT and now - self.first_at >= DOUBLE_PRESS_S:
            raise KeyboardInterrupt

    def agreed(self, step: int, log_every: int, info: DistInfo) -> bool:
        """Whether to stop after ``step``; the same answer on every rank."""
        if not info.distributed:
            return self.requested
        if step % log_every:
            return False
        flag = torch.tensor([float(self.requested)], device=info.device)
        torch.distributed.all_reduce(flag)
        if flag.item() and self.signal_name is None:
            self.signal_name = "a signal to another rank"
        return bool(flag.item())


def resume_hint() -> str:
    """How to continue: the same command (under torchrun: the same torchrun command)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        return "rerun the same torchrun command to resume"
    return "resume with the same command: " + shlex.join(["python", *sys.argv])


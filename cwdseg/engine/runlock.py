"""One run per folder: a lock file naming its owner, and the "already complete" check.

``SAVE_DIR/SAVE_NAME/run.lock`` holds the owner's host, pid, start time and command, and is held
with ``flock`` for as long as the run lives. The kernel drops the flock when the process dies,
however it dies (SIGKILL included), so a lock file whose flock can be taken was left by a run that
is gone: a *stale* lock, reported and taken over. A lock that is held refuses the second run with
a message naming the first. A clean exit removes the file.

Under torchrun rank 0 takes the lock and tells the other ranks the outcome, so every rank stops
with the same answer.
"""
from __future__ import annotations

import atexit
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path

import torch

from cwdseg import checkpoint as ckpt
from cwdseg.engine.distributed import DistInfo

LOCK_NAME = "run.lock"

# Lock descriptors this process holds. A forked child (a DataLoader worker) inherits them, and a flock
# lives as long as any descriptor of it is open: a worker outliving a SIGKILLed parent by the seconds its
# watchdog takes would keep the folder locked. Children close their copies at once (the parent's lock
# is untouched); O_CLOEXEC does the same for programs started with exec.
_HELD_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLockError(RuntimeError):
    """The run folder is used by another live run."""


class RunLock:
    """The held lock of one run folder (rank 0 only); :meth:`release` removes it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink first: a waiting run then finds a fresh file
        finally:
            _HELD_FDS.discard(self.fd)
            os.close(self.fd)
            self.fd = None


def _owner_text(info: dict) -> str:
    started = info.get("started", "?")
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {started}"
            + (f": {info['command']}" if info.get("command") else ""))


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        return json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError:
        return {"command": raw.strip()[:200]}


def acquire(run_dir: Path, log=print) -> RunLock:
    """Take ``run_dir/run.lock`` or raise :class:`RunLockError` naming the run that holds it."""
    path = Path(run_dir) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunLockError(f"{run_dir} is in use by another run ({_owner_text(owner)}); wait for it to end, "
                               f"stop it, or pass another --save-name") from None
        # The holder may have unlinked the file between our open and flock: then lock the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_owner(fd)
    if previous:
        log(f"note: {path} was left by a run that is no longer running ({_owner_text(previous)}); "
            "stale lock taken over")
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": shlex.join(["python", *sys.argv])}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)
    _HELD_FDS.add(fd)
    return RunLock(path, fd)


def acquire_for_run(run_dir: Path, info: DistInfo, log=print) -> RunLock:
    """Rank 0 takes the lock; every rank raises the same :class:`RunLockError` when it is taken."""
    lock, message = RunLock(Path(run_dir) / LOCK_NAME, None), ""
    if info.is_main:
        try:
            lock = acquire(run_dir, log)
        except RunLockError as exc:
            message = str(exc)
    if info.distributed:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        if not info.is_main:
            raise SystemExit(2)  # rank 0 prints the message
        raise RunLockError(message)
    atexit.register(lock.release)
    return lock


def completed_message(run_dir: Path, cfg) -> str | None:
    """The no-op message when ``run_dir`` holds this run finished (last.pth at the last step with the
    same configuration, the final weights, and eval.json when evaluating); None otherwise."""
    from cwdseg.engine.state import config_differences

    num_steps, evaluate = cfg.optim.num_steps, cfg.eval.final
    last = Path(run_dir) / "last.pth"
    final = Path(run_dir) / ckpt.student_filename(cfg.data.dataset, num_steps - 1)
    if not (last.is_file() and final.is_file()) or (evaluate and not (Path(run_dir) / "eval.json").is_file()):
        return None
    state = ckpt.load_checkpoint_dict(last)
    if state.get("step") != num_steps or config_differences(state, cfg):
        return None  # not finished, or other settings (which resuming refuses with the differences)
    return (f"{run_dir} holds this run complete ({num_steps}/{num_steps} steps, {final.name}"
            f"{', eval.json' if evaluate else ''}): nothing to do; pass --force to write its outputs again")

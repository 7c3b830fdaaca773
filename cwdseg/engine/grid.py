"""A grid of training runs (methods x seeds, optionally x students) as ordinary run folders.

Every job is a normal ``train.py`` run (``python -m cwdseg.cli.train ...``, or ``torchrun`` for
several GPUs) with its own ``--save-dir/--save-name``, so a job that was killed or preempted resumes
from its ``last.pth`` when it is started again, and re-running the grid skips the finished runs
(those with a final-iteration ``eval.json``) and resumes the others. Locally the jobs run one after
another; on Slurm they are submitted through ``submitit`` (``cluster="debug"`` or ``"local"`` runs
the same path on this machine, which the tests use).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cwdseg
from cwdseg.distill.registry import PRESETS, DistillSpecError, parse_distill

# Flags the grid sets itself: a job's identity.
GRID_FLAGS = ("--seed", "--save-dir", "--save-name", "--preset", "--distill", "--student-arch", "--resume")


class GridError(ValueError):
    """A bad grid request (method, seeds, train.py flags); one line naming the culprit and the fix."""


@dataclass(frozen=True)
class GridJob:
    method: str            # a preset name, or --distill entries joined by '+'
    seed: int
    student: str | None
    run_dir: str
    train_args: tuple[str, ...]   # the complete train.py argument list

    @property
    def name(self) -> str:
        return Path(self.run_dir).name


def method_args(method: str) -> list[str]:
    """train.py flags of a method: ``--preset NAME``, or ``--distill`` entries given as ``a=1+b=2,opt=v``."""
    if method in PRESETS:
        return ["--preset", method]
    entries = [e for e in method.split("+") if e]
    if not entries or "=" not in method:
        raise GridError(f"method {method!r} is neither a preset ({', '.join(PRESETS)}) nor --distill entries "
                        "joined by '+' (e.g. cwd=3+kd=10)")
    try:
        parse_distill(entries)
    except DistillSpecError as exc:
        raise GridError(f"method {method!r}: {exc}") from None
    return ["--distill", *entries]


def method_label(method: str) -> str:
    """A folder-safe name for a method."""
    if method in PRESETS:
        return method
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", method.replace("+", "__").replace("=", ""))


def plan_grid(methods: Sequence[str], seeds: Sequence[int], save_dir: str | Path, train_args: Sequence[str] = (),
              students: Sequence[str] | None = None) -> list[GridJob]:
    """One job per (method, seed[, student]), in that nesting order (seeds innermost)."""
    if not methods:
        raise GridError("no methods given; pass --methods with preset names or distill entries")
    if not seeds or len(set(seeds)) != len(seeds):
        raise GridError(f"seeds must be distinct and at least one, got {list(seeds)}")
    for flag in train_args:
        if flag.split("=")[0] in GRID_FLAGS:
            raise GridError(f"train.py flag {flag} is set by the grid for each job; leave it out")
    args = list(train_args)
    for i, flag in enumerate(args):
        if flag.split("=")[0] == "--eval" and (flag.endswith("=False") or args[i + 1:i + 2] == ["False"]):
            raise GridError("--eval False: the grid's summary needs each run's final-iteration eval.json")
    labels = [method_label(m) for m in methods]
    if len(set(labels)) != len(labels):
        raise GridError(f"methods {list(methods)} repeat one another")
    jobs = []
    for student in (students or [None]):
        for method, label in zip(methods, labels):
            extra = method_args(method)
            for seed in seeds:
                name = f"{label}_seed{seed}" + (f"_{student}" if student else "")
                argv = [*args, *extra, "--seed", str(seed), "--save-dir", str(save_dir), "--save-name", name]
                if student:
                    argv += ["--student-arch", student]
                jobs.append(GridJob(method, int(seed), student, str(Path(save_dir) / name), tuple(argv)))
    return jobs


def job_status(job: GridJob) -> str:
    """``"done"`` (final-iteration eval.json present), ``"resume"`` (a last.pth to continue) or ``"new"``."""
    run_dir = Path(job.run_dir)
    eval_path = run_dir / "eval.json"
    if eval_path.exists():
        try:
            if json.loads(eval_path.read_text()).get("selection") == "final-iteration":
                return "done"
        except (OSError, json.JSONDecodeError):
            pass
    return "resume" if (run_dir / "last.pth").exists() else "new"


def train_command(job: GridJob, gpus: int = 1, python: str = sys.executable) -> list[str]:
    """The job's command line: train.py as a module, under torchrun for several GPUs."""
    if gpus > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                "-m", "cwdseg.cli.train", *job.train_args]
    return [python, "-m", "cwdseg.cli.train", *job.train_args]


def job_env() -> dict[str, str]:
    """The environment of a job: this one, with the running copy of cwdseg first on the import path."""
    root = str(Path(cwdseg.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=root + (os.pathsep + path if path else ""))


def write_manifest(jobs: Sequence[GridJob], save_dir: str | Path) -> Path:
    """``SAVE_DIR/grid.json``: the jobs of the grid, for ``tools/summarize_runs.py`` and for people."""
    path = Path(save_dir) / "grid.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"jobs": [asdict(j) for j in jobs]}, indent=2) + "\n")
    return path


def run_local(jobs: Sequence[GridJob], gpus: int = 1, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the unfinished jobs one after another in subprocesses; a failed job does not stop the others.

    Returns one record per job: ``{name, run_dir, status_before, returncode}`` (returncode None when skipped).
    """
    results = []
    for i, job in enumerate(jobs, start=1):
        status = job_status(job)
        if status == "done":
            log(f"[{i}/{len(jobs)}] {job.name}: finished, skipped")
            results.append({"name": job.name, "run_dir": job.run_dir, "status_before": status, "returncode": None})
            continue
        log(f"[{i}/{len(jobs)}] {job.name}: {'resuming' if status == 'resume' else 'starting'}")
        rc = subprocess.run(train_command(job, gpus), env=job_env()).returncode
        if rc != 0:
            log(f"[{i}/{len(jobs)}] {job.name}: train.py exited with status {rc}; see {job.run_dir}")
        results.append({"name": job.name, "run_dir": job.run_dir, "status_before": status, "returncode": rc})
    return results


# --------------------------------------------------------------------------------------------------
# Slurm through submitit
# --------------------------------------------------------------------------------------------------
try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is needed only for the Slurm path
    _Checkpointable = object  # type: ignore[misc,assignment]


class TrainJob(_Checkpointable):
    """A submitit job that runs one grid job's train.py in a child process.

    Before a Slurm time limit or preemption submitit calls :meth:`checkpoint` (``slurm_signal_delay_s``
    ahead); it sends the child SIGTERM, on which train.py saves ``last.pth`` after the current step and
    exits, and returns the same job for requeueing, which then resumes from that file.
    """

    grace_s = 90.0  # how long checkpoint() waits for train.py to save

    def __init__(self, job: GridJob, gpus: int = 1) -> None:
        self.job, self.gpus, self._proc = job, gpus, None

    def __call__(self) -> str:
        if job_status(self.job) == "done":
            return self.job.run_dir
        self._proc = subprocess.Popen(train_command(self.job, self.gpus), env=job_env())
        rc = self._proc.wait()
        self._proc = None
        if rc != 0:
            raise RuntimeError(f"{self.job.name}: train.py exited with status {rc}; see {self.job.run_dir}")
        if job_status(self.job) != "done":
            raise RuntimeError(f"{self.job.name}: stopped before the end (last.pth saved); run the grid again to resume")
        return self.job.run_dir

    def checkpoint(self, *args: Any, **kwargs: Any):
        proc, self._proc = self._proc, None  # a process handle cannot be pickled into the requeued job
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                pass
        return super().checkpoint(*args, **kwargs)


def make_executor(folder: str | Path, cluster: str | None = None, timeout_min: int = 24 * 60, gpus: int = 1,
                  cpus_per_task: int = 8, partition: str | None = None, mem_gb: int | None = None,
                  slurm_extra: dict[str, Any] | None = None):
    """A ``submitit.AutoExecutor``: Slurm when available (or ``cluster="slurm"``), ``"local"``/``"debug"``
    to run the same jobs on this machine."""
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params: dict[str, Any] = dict(timeout_min=timeout_min, name="cwdseg-grid")
    if executor.cluster == "slurm":
        params.update(slurm_gpus_per_node=gpus, slurm_ntasks_per_node=1, slurm_cpus_per_task=cpus_per_task,
                      slurm_signal_delay_s=120)
        if partition:
            params["slurm_partition"] = partition
        if mem_gb:
            params["slurm_mem"] = f"{mem_gb}GB"
        if slurm_extra:
            params["slurm_additional_parameters"] = slurm_extra
    executor.update_parameters(**params)
    return executor


def submit(jobs: Sequence[GridJob], executor, gpus: int = 1, log: Callable[[str], None] = print) -> list:
    """Submit the unfinished jobs; returns the submitit jobs (finished grid jobs are skipped)."""
    submitted = []
    for job in jobs:
        if job_status(job) == "done":
            log(f"{job.name}: finished, skipped")
            continue
        sjob = executor.submit(TrainJob(job, gpus))
        log(f"{job.name}: submitted as {sjob.job_id}")
        submitted.append(sjob)
    return submitted

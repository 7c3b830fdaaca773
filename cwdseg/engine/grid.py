"""A grid of training runs (methods x seeds, optionally x students) as ordinary run folders.

Every job is a normal ``train.py`` run (``python -m cwdseg.cli.train ...``, or ``torchrun`` for
several GPUs) with its own ``--save-dir/--save-name``, so a job that was killed or preempted resumes
from its ``last.pth`` when it is started again, and re-running the grid skips the finished runs
(those with a final-iteration ``eval.json``) and resumes the others. Locally the jobs run one after
another; on Slurm they are submitted through ``submitit`` (``cluster="debug"`` or ``"local"`` runs
the same path on this machine, which the tests use).

Budget-matched grids (:func:`apply_budget`): with a measure other than ``iterations`` each job gets
its own ``--num-steps`` so that every method of a student spends what the most expensive one spends
in the base number of steps (``flops``: the analytic FLOPs of a step, ``cwdseg.engine.compute``;
``time``: measured seconds per step). The poly schedule runs over the job's own step count, and the
stretch is recorded in the manifest and in each run folder's ``budget.json``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import cwdseg
from cwdseg.distill.registry import PRESETS, DistillSpecError, parse_distill
from cwdseg.engine.compute import run_cost_from_folder, write_cost

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
    budget: dict | None = None    # the budget match of this job (apply_budget), None when not matched

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


# --------------------------------------------------------------------------------------------------
# Budget matching
# --------------------------------------------------------------------------------------------------
BUDGETS = ("iterations", "flops", "time")
BUDGET_UNITS = {"flops": "FLOP", "time": "s"}
BUDGET_FILE = "budget.json"


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``argv`` (None when absent)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def with_num_steps(argv: Sequence[str], steps: int) -> tuple[str, ...]:
    """``argv`` with every ``--num-steps`` removed and ``--num-steps steps`` appended."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-steps":
            skip = True
        elif not a.startswith("--num-steps="):
            out.append(a)
    return (*out, "--num-steps", str(int(steps)))


def match_steps(per_step: Mapping[str, float], base_steps: int) -> dict[str, tuple[int, float]]:
    """``{key: (steps, stretch)}`` so that ``steps x per_step[key]`` equals what the most expensive key
    spends in ``base_steps``: stretch = max(per_step) / per_step[key] (exact), steps = round(base x stretch)."""
    if base_steps < 1:
        raise GridError(f"--num-steps must be at least 1 for a budget, got {base_steps}")
    bad = {k: v for k, v in per_step.items() if not v > 0}
    if bad:
        raise GridError(f"per-step costs must be positive, got {bad}; re-measure them")
    top = max(per_step.values())
    return {k: (max(1, round(base_steps * top / v)), top / v) for k, v in per_step.items()}


def apply_budget(jobs: Sequence[GridJob], measure: str, per_step: Mapping[tuple[str, str | None], float],
                 base_steps: int, source: str = "") -> list[GridJob]:
    """The jobs with their own ``--num-steps``: within each student, every method spends the budget of
    the most expensive one (its per-step cost x ``base_steps``). ``per_step`` maps (method, student) to
    the measure's cost of one step (FLOPs, or seconds). ``iterations`` leaves the jobs as they are."""
    if measure not in BUDGETS:
        raise GridError(f"--budget {measure!r}: choose one of {', '.join(BUDGETS)}")
    if measure == "iterations":
        return list(jobs)
    out = []
    for student in dict.fromkeys(j.student for j in jobs):
        keys = list(dict.fromkeys(j.method for j in jobs if j.student == student))
        matched = match_steps({m: per_step[(m, student)] for m in keys}, base_steps)
        top = max(keys, key=lambda m: per_step[(m, student)])
        for job in (j for j in jobs if j.student == student):
            steps, stretch = matched[job.method]
            budget = {"measure": measure, "unit": BUDGET_UNITS[measure], "base_steps": base_steps, "steps": steps,
                      "stretch": steps / base_steps, "stretch_exact": stretch,
                      "per_step": per_step[(job.method, student)],
                      "budget": per_step[(top, student)] * base_steps, "matched_to": top,
                      "spent": per_step[(job.method, student)] * steps, "source": source,
                      "schedule": "poly over the job's own --num-steps"}
            out.append(replace(job, train_args=with_num_steps(job.train_args, steps), budget=budget))
    return [next(o for o in out if o.run_dir == j.run_dir) for j in jobs]


def write_manifest(jobs: Sequence[GridJob], save_dir: str | Path, budget_files: bool = True) -> Path:
    """``SAVE_DIR/grid.json``: the jobs of the grid (with their budget match), for ``tools/summarize_runs.py``
    and for people; a budget-matched job also gets ``budget.json`` in its run folder."""
    path = Path(save_dir) / "grid.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"jobs": [asdict(j) for j in jobs]}, indent=2) + "\n")
    for job in jobs if budget_files else ():
        if job.budget is not None:
            Path(job.run_dir).mkdir(parents=True, exist_ok=True)
            (Path(job.run_dir) / BUDGET_FILE).write_text(json.dumps(job.budget, indent=2) + "\n")
    return path


def seconds_per_step(run_dir: str | Path) -> float:
    """Measured seconds per training step of a (calibration) run: the median iteration time of its
    metrics.jsonl lines after the first (which holds start-up)."""
    path = Path(run_dir) / "metrics.jsonl"
    times = [json.loads(x)["iter_ms"] / 1000 for x in path.read_text().splitlines() if x.strip()] \
        if path.is_file() else []
    if len(times) < 2:
        raise GridError(f"{run_dir}: fewer than 2 logged steps in metrics.jsonl to time a step; raise "
                        "--calibration-steps (logged every step)")
    return statistics.median(times[1:])


def record_cost(job: GridJob) -> Path:
    """``cost.json`` of a finished job (cwdseg.engine.compute.RunCost, from its config.json and metrics.jsonl)."""
    return write_cost(job.run_dir, run_cost_from_folder(job.run_dir))


def job_log_path(job: GridJob) -> Path:
    """Where run_local keeps a job's console output: SAVE_DIR/logs/<name>.log (beside the run folder, which a
    job that fails before it starts never creates)."""
    return Path(job.run_dir).parent / "logs" / f"{job.name}.log"


def error_line(log_text: str) -> str:
    """The one line that says why a job failed: its last ``error:`` line (train.py's one-line errors),
    else the last line of a traceback or output."""
    lines = [x.strip() for x in log_text.splitlines() if x.strip()]
    errors = [x for x in lines if "error:" in x.lower() or x.startswith(("RuntimeError", "ValueError"))]
    return (errors or lines or ["(no output)"])[-1]


def _run_logged(command: list[str], log_path: Path, echo: Callable[[str], None]) -> int:
    """Run ``command``, its output both shown (``echo``) and kept in ``log_path`` (appended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log, subprocess.Popen(command, env=job_env(), stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            echo(line.rstrip("\n"))
    return proc.returncode


def run_local(jobs: Sequence[GridJob], gpus: int = 1, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the unfinished jobs one after another in subprocesses; a failed job does not stop the others.

    Returns one record per job: ``{name, run_dir, status_before, returncode, log, error}`` (returncode None
    when skipped; ``error``: the failed job's one-line reason, from its log SAVE_DIR/logs/<name>.log).
    """
    results = []
    for i, job in enumerate(jobs, start=1):
        status = job_status(job)
        record = {"name": job.name, "run_dir": job.run_dir, "status_before": status, "returncode": None,
                  "log": str(job_log_path(job)), "error": None}
        if status == "done":
            log(f"[{i}/{len(jobs)}] {job.name}: finished, skipped")
            if not (Path(job.run_dir) / "cost.json").exists():
                record_cost(job)
            results.append(record)
            continue
        log(f"[{i}/{len(jobs)}] {job.name}: {'resuming' if status == 'resume' else 'starting'}")
        start = job_log_path(job).stat().st_size if job_log_path(job).exists() else 0
        rc = _run_logged(train_command(job, gpus), job_log_path(job), log)
        record["returncode"] = rc
        if rc == 0 and job_status(job) == "done":
            record_cost(job)
        if rc != 0:
            with open(job_log_path(job)) as f:
                f.seek(start)
                record["error"] = error_line(f.read())
            log(f"[{i}/{len(jobs)}] {job.name}: train.py exited with status {rc}: {record['error']} "
                f"(log: {job_log_path(job)})")
        results.append(record)
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
            raise RuntimeError(f"{self.job.name}: stopped before the end (last.pth saved); "
                               "run the grid again to resume")
        record_cost(self.job)
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

"""Train a grid of methods x seeds (optionally x students) as ordinary run folders, then summarise it.

    python -m tools.run_grid --methods baseline cd_logits at_feat --seeds 0 1 2 --save-dir runs/table2 \\
        -- --data-dir data/cityscapes
    python -m tools.run_grid --table2 --seeds 0 1 2 --launcher slurm --partition gpu --save-dir runs/table2

A method is a preset name (``python -m tools.run_grid --list``) or ``--distill`` entries joined by
'+' (``cwd=3,tau=4+kd=10``). Flags after ``--`` go to every train.py run unchanged. Each job writes
SAVE_DIR/<method>_seed<seed>[_<student>]/; running the same command again skips the finished runs
and resumes the killed or preempted ones from their last.pth. ``--launcher local`` runs the jobs
here one after another; ``slurm`` submits them through submitit (``debug``/``local``: submitit on
this machine, for trying the path out). At the end (local launcher) the table is written as
SAVE_DIR/summary.{md,json,png} (see tools/summarize_runs.py).

Matched budgets: ``--budget flops`` gives each method its own --num-steps so that every method of a
student spends the FLOPs (student forward+backward, teacher forward, connectors; see
cwdseg/engine/compute.py) that the most expensive one spends in the --num-steps given after ``--``;
``--budget time`` does the same with seconds per step measured by a short calibration run of each
method (``--calibration-steps``, in SAVE_DIR/_calibration/, on this machine: run it where the grid
runs). The poly schedule stretches with the steps; each run folder gets a budget.json.

    python -m tools.run_grid --methods baseline cd_logits ifvd_logits --budget flops --seeds 0 1 2 \\
        --save-dir runs/matched -- --data-dir data/cityscapes --num-steps 40000
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from cwdseg.distill.registry import PRESETS, TABLE2
from cwdseg.engine.compute import step_cost_of_config
from cwdseg.engine.grid import (
    BUDGETS,
    GridError,
    apply_budget,
    make_executor,
    plan_grid,
    run_local,
    seconds_per_step,
    submit,
    with_num_steps,
    write_manifest,
)
from cwdseg.evaluation.summary import SummaryError, load_run, summarize, to_markdown, write_summary


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=None, help="preset names or distill entries joined by '+'")
    p.add_argument("--table2", action="store_true", help="the paper's Table 2: " + " ".join(TABLE2))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--students", nargs="+", default=None, help="student architectures (train.py --student-arch)")
    p.add_argument("--save-dir", required=False, default="runs/grid", help="where the run folders go (%(default)s)")
    p.add_argument("--launcher", choices=["local", "slurm", "debug"], default="local")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per job; > 1 runs torchrun")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="Slurm time limit per job (it requeues itself)")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--budget", choices=BUDGETS, default="iterations",
                   help="what the runs of a student are matched on: the same --num-steps (iterations), or the "
                        "same total FLOPs / device time as the most expensive method (%(default)s)")
    p.add_argument("--calibration-steps", type=int, default=10,
                   help="--budget time: steps of each method's timing run (the first is left out)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and their state, run nothing")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    return p


def plan(argv: list[str]) -> tuple[argparse.Namespace, list]:
    """The tool's arguments and the grid's jobs (a bad value is a parser error: one line, exit status 2)."""
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = get_parser()
    a = parser.parse_args(own)
    if a.list:
        return a, []
    methods = list(TABLE2) if a.table2 else a.methods
    if not methods:
        parser.error("give --methods or --table2")
    if a.budget == "time" and a.launcher == "slurm":
        parser.error("--budget time times each method on this machine, not on the cluster's nodes; "
                     "use --budget flops with --launcher slurm")
    try:
        jobs = plan_grid(methods, a.seeds, a.save_dir, train_args, a.students)
        if a.budget == "flops":
            jobs = apply_budget(jobs, "flops", flops_per_step(jobs), base_steps(jobs[0]),
                                "analytic, cwdseg.engine.compute.step_cost")
        return a, jobs
    except GridError as exc:
        parser.error(str(exc))


def job_config(train_args):
    """train.py's resolved configuration for ``train_args`` (architectures, crop, batch, steps, spec)."""
    from cwdseg.cli.train import resolve_config

    return resolve_config(list(train_args))


def base_steps(job) -> int:
    return job_config(job.train_args).optim.num_steps


def flops_per_step(jobs) -> dict:
    """(method, student) -> analytic FLOPs of one training step of that job's settings."""
    costs = {}
    for job in jobs:
        if (job.method, job.student) not in costs:
            costs[(job.method, job.student)] = step_cost_of_config(job_config(job.train_args)).flops_per_step
    return costs


def calibrate_time(a, jobs) -> dict:
    """(method, student) -> measured seconds per step: a --calibration-steps run of each method (first seed)
    in SAVE_DIR/_calibration, logged every step, without evaluation; an earlier finished one is reused."""
    if a.calibration_steps < 2:
        raise GridError(f"--calibration-steps must be at least 2 (the first step is left out), "
                        f"got {a.calibration_steps}")
    first = {}
    for job in jobs:
        first.setdefault((job.method, job.student), job)
    calib_dir = f"{a.save_dir}/_calibration"
    seconds = {}
    for key, job in first.items():
        args = [x for x in job.train_args]
        args[args.index("--save-dir") + 1] = calib_dir
        calib = replace(job, run_dir=f"{calib_dir}/{job.name}",
                        train_args=(*with_num_steps(args, a.calibration_steps), "--log-every", "1", "--eval", "False",
                                    "--save-last-every", str(a.calibration_steps)))
        print(f"calibration: timing {job.method}" + (f" ({job.student})" if job.student else "") +
              f" over {a.calibration_steps} steps")
        result = run_local([calib], a.gpus, log=lambda _: None)[0]
        if result["returncode"] not in (None, 0):
            raise GridError(f"the calibration run of {job.method} failed: {result['error']} (log: {result['log']})")
        seconds[key] = seconds_per_step(calib.run_dir)
    return seconds


def main(argv: list[str] | None = None) -> int:
    a, jobs = plan(sys.argv[1:] if argv is None else list(argv))
    if a.list:
        for name, preset in PRESETS.items():
            published = f"{preset.published:.2f}" if preset.published is not None else "-"
            print(f"{name:<14} {preset.method:<12} {preset.map:<12} paper {published:>6}  "
                  f"{' '.join(preset.terms) or '(none)'}")
        return 0
    if a.budget == "time" and not a.dry_run:
        try:
            jobs = apply_budget(jobs, "time", calibrate_time(a, jobs), base_steps(jobs[0]),
                                f"median s/step of a {a.calibration_steps}-step run, this machine")
        except GridError as exc:
            print(f"run_grid.py: error: {exc}", file=sys.stderr)
            return 2
    write_manifest(jobs, a.save_dir, budget_files=not a.dry_run)
    if a.budget == "time" and a.dry_run:
        print("budget time: the steps are set when the grid runs, after a calibration run of each method")
    for job in jobs:
        if job.budget is not None:
            b = job.budget
            print(f"budget {a.budget}: {job.name}: {b['steps']} steps (x{b['stretch']:.4g} of {b['base_steps']}), "
                  f"{b['per_step']:.4g} {b['unit']}/step")
    if a.dry_run:
        from cwdseg.engine.grid import job_status, train_command

        for job in jobs:
            print(f"{job_status(job):<7} {' '.join(train_command(job, a.gpus)[1:])}")
        return 0
    if a.launcher == "local":
        return summarize_local(run_local(jobs, a.gpus), a.save_dir)
    executor = make_executor(f"{a.save_dir}/submitit", cluster=a.launcher if a.launcher == "debug" else "slurm",
                             timeout_min=a.timeout_min, gpus=a.gpus, cpus_per_task=a.cpus_per_task,
                             partition=a.partition)
    submitted = submit(jobs, executor, a.gpus)
    print(f"{len(submitted)} job(s) submitted; when they end: python -m tools.summarize_runs {a.save_dir}")
    if a.launcher == "debug":
        for job in submitted:
            job.result()
    return 0


def summarize_local(results: list[dict], save_dir: str) -> int:
    """The table of the finished jobs; each failed job named with its one-line error and log. Exit status 1
    when any job failed (no table at all when none finished)."""
    failed = [r for r in results if r["returncode"] not in (None, 0)]
    finished = [r for r in results if r not in failed]
    status = 0
    if finished:
        try:
            summary = summarize([load_run(r["run_dir"]) for r in finished])
        except SummaryError as exc:
            print(f"run_grid.py: {exc}", file=sys.stderr)
            return 1
        paths = write_summary(summary, save_dir)
        print(to_markdown(summary))
        print(f"table: {paths['markdown']}, {paths['json']}, {paths['chart']}")
    if failed:
        print(f"run_grid.py: {len(failed)} of {len(results)} job(s) failed"
              + ("" if finished else "; no table written") + ":", file=sys.stderr)
        for r in failed:
            print(f"  {r['name']}: {r['error']} (log: {r['log']})", file=sys.stderr)
        print("run_grid.py: fix the cause and run the same command again (finished runs are skipped)", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

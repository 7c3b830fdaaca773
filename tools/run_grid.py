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
"""
from __future__ import annotations

import argparse
import sys

from cwdseg.distill.registry import PRESETS, TABLE2
from cwdseg.engine.grid import GridError, make_executor, plan_grid, run_local, submit, write_manifest
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
    try:
        return a, plan_grid(methods, a.seeds, a.save_dir, train_args, a.students)
    except GridError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    a, jobs = plan(sys.argv[1:] if argv is None else list(argv))
    if a.list:
        for name, preset in PRESETS.items():
            published = f"{preset.published:.2f}" if preset.published is not None else "-"
            print(f"{name:<14} {preset.method:<12} {preset.map:<12} paper {published:>6}  {' '.join(preset.terms) or '(none)'}")
        return 0
    write_manifest(jobs, a.save_dir)
    if a.dry_run:
        from cwdseg.engine.grid import job_status, train_command

        for job in jobs:
            print(f"{job_status(job):<7} {' '.join(train_command(job, a.gpus)[1:])}")
        return 0
    if a.launcher == "local":
        results = run_local(jobs, a.gpus)
        failed = [r["name"] for r in results if r["returncode"] not in (None, 0)]
        try:
            summary = summarize([load_run(r["run_dir"]) for r in results if r["name"] not in failed])
        except SummaryError as exc:
            print(f"run_grid.py: {exc}", file=sys.stderr)
            return 1
        paths = write_summary(summary, a.save_dir)
        print(to_markdown(summary))
        print(f"table: {paths['markdown']}, {paths['json']}, {paths['chart']}")
        if failed:
            print(f"run_grid.py: {len(failed)} job(s) failed: {', '.join(failed)}; run the same command to retry",
                  file=sys.stderr)
            return 1
        return 0
    executor = make_executor(f"{a.save_dir}/submitit", cluster=a.launcher if a.launcher == "debug" else "slurm",
                             timeout_min=a.timeout_min, gpus=a.gpus, cpus_per_task=a.cpus_per_task,
                             partition=a.partition)
    submitted = submit(jobs, executor, a.gpus)
    print(f"{len(submitted)} job(s) submitted; when they end: python -m tools.summarize_runs {a.save_dir}")
    if a.launcher == "debug":
        for job in submitted:
            job.result()
    return 0


if __name__ == "__main__":
    sys.exit(main())

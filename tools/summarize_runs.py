"""Summarise run folders into the paper-style table: mean ± std over seeds, n, Δ to the baseline of the
same set, the paper's figure, images/s and device-hours; written as Markdown, JSON and a bar chart.

    python -m tools.summarize_runs runs/table2                 # every run folder inside
    python -m tools.summarize_runs runs/a_seed0 runs/a_seed1 --out-dir reports --best
    python -m tools.summarize_runs runs/table2 --log-to tensorboard   # the table and chart in a tracker too

The final-iteration eval.json is used unless ``--best`` (best_val.json: chosen on val, optimistic;
labelled so in every output). Exit status 2 with a one-line message for a folder that cannot be used.
"""
from __future__ import annotations

import argparse
import sys

from cwdseg.engine.trackers import TrackerError, log_summary, log_to_arg
from cwdseg.evaluation.summary import SummaryError, find_runs, load_run, summarize, to_markdown, write_summary


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders, or folders holding run folders")
    p.add_argument("--out-dir", default=None, help="where summary.{md,json,png} go (default: the first folder)")
    p.add_argument("--best", action="store_true", help="best-on-val checkpoints instead of the final iteration")
    p.add_argument("--stem", default="summary", help="file name stem of the outputs")
    p.add_argument("--log-to", type=log_to_arg, default=[], metavar="TRACKERS",
                   help="also push the table and chart to tensorboard,mlflow,wandb (a tracker run in --out-dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_parser().parse_args(argv)
    selection = "best" if a.best else "final"
    try:
        folders = find_runs(a.runs)
        summary = summarize([load_run(f, selection) for f in folders], selection)
    except SummaryError as exc:
        print(f"summarize_runs.py: error: {exc}", file=sys.stderr)
        return 2
    out_dir = a.out_dir or a.runs[0]
    paths = write_summary(summary, out_dir, stem=a.stem + ("_best_val" if a.best else ""))
    print(to_markdown(summary))
    print(f"written: {paths['markdown']}, {paths['json']}, {paths['chart']}")
    if a.log_to:
        try:
            log_summary(a.log_to, out_dir, summary, paths["chart"], to_markdown(summary))
        except TrackerError as exc:
            print(f"summarize_runs.py: error: {exc}", file=sys.stderr)
            return 2
        print(f"pushed to {', '.join(a.log_to)} (tracker run in {out_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run folders -> the paper-style comparison table: mean +- std over seeds, n, the difference to the
baseline trained in the same set, throughput and accelerator-hours; Markdown, JSON and a bar chart.

The final-iteration ``eval.json`` is used by default (what the paper reports); ``selection="best"``
uses ``best_val.json`` (the checkpoint chosen on the val set itself: optimistic) and says so in
every output. Runs are grouped by (distillation spec, student architecture); the label is the
preset's name when a run used one unchanged.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from cwdseg.distill.registry import PRESETS, spec_run_name

SELECTIONS = {"final": ("eval.json", "final-iteration"),
              "best": ("best_val.json", "best-val (chosen on the val set: optimistic)")}


class SummaryError(ValueError):
    """A run folder that cannot be summarised; one line naming the folder and the fix."""


@dataclass
class RunResult:
    run_dir: str
    label: str
    student: str
    seed: int
    miou: float                    # percent
    images_per_s: float | None
    device_hours: float | None     # training time x processes (accelerators, or CPU processes)
    device: str
    num_steps: int
    spec: dict = field(default_factory=dict)


def _throughput_and_hours(run_dir: Path, world_size: int) -> tuple[float | None, float | None]:
    """Mean logged images/s (the first line, which holds start-up, left out when there are others) and
    the training time from metrics.jsonl: sum over log lines of iteration time x steps in the line's
    window, times the number of processes. After a resume a step logged twice counts once (the last)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None, None
    records: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "step" in rec and "iter_ms" in rec:
                records[int(rec["step"])] = rec
    if not records:
        return None, None
    steps = sorted(records)
    seconds, prev = 0.0, -1
    for step in steps:
        seconds += records[step]["iter_ms"] / 1000 * (step - prev)
        prev = step
    rates = [records[s]["images_per_s"] for s in steps]
    rate = statistics.fmean(rates[1:] if len(rates) > 1 else rates)
    return rate, seconds * world_size / 3600


def load_run(run_dir: str | Path, selection: str = "final") -> RunResult:
    run_dir = Path(run_dir)
    file, tag = SELECTIONS[selection]
    config_path, eval_path = run_dir / "config.json", run_dir / file
    if not config_path.exists():
        raise SummaryError(f"{run_dir}: no config.json; is this a train.py run folder?")
    if not eval_path.exists():
        hint = ("the run has not finished (re-run it, or the grid, to resume)" if selection == "final" else
                "train it with --eval-every N --save-best True, or summarise the final iteration")
        raise SummaryError(f"{run_dir}: no {file}; {hint}")
    config = json.loads(config_path.read_text())
    result = json.loads(eval_path.read_text())
    if selection == "final" and result.get("selection") != "final-iteration":
        raise SummaryError(f"{eval_path}: selection is {result.get('selection')!r}, not 'final-iteration'")
    spec = config.get("distill_terms") or {}
    label = spec_run_name(spec, config.get("preset")) if spec else "baseline"
    rate, hours = _throughput_and_hours(run_dir, int(config.get("world_size", 1)))
    return RunResult(str(run_dir), label, config.get("student_arch", "resnet18"), int(config.get("seed", 0)),
                     100 * float(result["miou"]), rate, hours, str(config.get("device", "?")),
                     int(config.get("num_steps", 0)), spec)


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each path that has a config.json, else its subfolders that have one."""
    found = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise SummaryError(f"{p}: not a folder")
        if (p / "config.json").exists():
            found.append(p)
        else:
            found += sorted(q for q in p.iterdir() if (q / "config.json").exists())
    if not found:
        raise SummaryError(f"no run folders (with a config.json) in {', '.join(map(str, paths))}")
    return found


def summarize(runs: Sequence[RunResult], selection: str = "final") -> dict[str, Any]:
    """Rows of the table, one per (spec, student), in first-seen order, plus what they were computed from."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        key = (json.dumps(run.spec, sort_keys=True), run.student)
        groups.setdefault(key, []).append(run)
    baselines = {student: members for (spec, student), members in groups.items() if spec == "{}"}
    rows = []
    for (spec, student), members in groups.items():
        values = [m.miou for m in members]
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else None
        base = baselines.get(student)
        delta = None if base is None or spec == "{}" else mean - statistics.fmean(m.miou for m in base)
        label = members[0].label
        preset = PRESETS.get(label)
        rates = [m.images_per_s for m in members if m.images_per_s is not None]
        hours = [m.device_hours for m in members if m.device_hours is not None]
        rows.append({
            "method": label, "student": student, "n": len(values), "miou_mean": mean, "miou_std": std,
            "delta_vs_baseline": delta, "published": preset.published if preset else None,
            "paper_row": f"{preset.method}, {preset.map}" if preset else None,
            "seeds": [m.seed for m in members], "miou_runs": values,
            "images_per_s": statistics.fmean(rates) if rates else None,
            "device_hours_per_run": statistics.fmean(hours) if hours else None,
            "device_hours_total": sum(hours) if hours else None,
            "device": sorted({m.device for m in members}), "num_steps": sorted({m.num_steps for m in members}),
            "runs": [m.run_dir for m in members], "spec": json.loads(spec),
        })
    return {"selection": SELECTIONS[selection][1], "std": "sample standard deviation (n-1) over seeds",
            "rows": rows, "run_results": [asdict(r) for r in runs]}


def _fmt(x: float | None, spec: str = ".2f", signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, ("+" if signed else "") + spec)


def to_markdown(summary: dict[str, Any]) -> str:
    sel = summary["selection"]
    lines = [f"Cityscapes-style val mIoU (%), checkpoint: **{sel}**; mean ± std over seeds ({summary['std']}).", "",
             "| method | student | n | mIoU | Δ vs baseline | paper | images/s | device-h per run | device-h total | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        miou = _fmt(r["miou_mean"]) + (f" ± {_fmt(r['miou_std'])}" if r["miou_std"] is not None else " (n=1)")
        lines.append(
            f"| {r['method']} | {r['student']} | {r['n']} | {miou} | {_fmt(r['delta_vs_baseline'], signed=True)} | "
            f"{_fmt(r['published'])} | {_fmt(r['images_per_s'], '.1f')} | {_fmt(r['device_hours_per_run'], '.3g')} | "
            f"{_fmt(r['device_hours_total'], '.3g')} | {', '.join(map(str, r['seeds']))} |")
    lines += ["", "Δ: difference of the means to the baseline (no distillation) of the same student in this set. "
              "paper: the CWD paper's Table 2 (mean of 3 runs, PSPNet-R101 -> R18, 40k steps, 512x512). "
              "device-h: training time (from metrics.jsonl) x processes, on " +
              ", ".join(sorted({d for r in summary["rows"] for d in r["device"]})) + "."]
    return "\n".join(lines) + "\n"


def plot_bars(summary: dict[str, Any], path: str | Path) -> None:
    """Bars of the mean mIoU with the std as error bars, the paper's figure as a marker where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    names = [r["method"] + ("" if len({x["student"] for x in rows}) == 1 else f"\n{r['student']}") for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 1.5), 4.0))
    xs = range(len(rows))
    ax.bar(xs, [r["miou_mean"] for r in rows], yerr=[r["miou_std"] or 0.0 for r in rows], capsize=4,
           color="#4C72B0", label=f"this code ({summary['selection']}; ±1 std)")
    paper = [(i, r["published"]) for i, r in enumerate(rows) if r["published"] is not None]
    if paper:
        ax.scatter([i for i, _ in paper], [v for _, v in paper], marker="_", s=400, color="#C44E52", label="paper")
    for i, r in enumerate(rows):
        ax.annotate(f"n={r['n']}", (i, r["miou_mean"]), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 3), textcoords="offset points")
    ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("val mIoU (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(summary: dict[str, Any], out_dir: str | Path, stem: str = "summary") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json", "chart": out / f"{stem}.png"}
    paths["markdown"].write_text(to_markdown(summary))
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    plot_bars(summary, paths["chart"])
    return paths

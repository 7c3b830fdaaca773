"""Run folders -> the paper-style comparison table: per method n, mean, sample std and the 95 % t-interval
of the mean over seeds, the difference to the baseline trained in the same set with its 95 % interval
(paired by seed when the seeds match, Welch otherwise; see :mod:`cwdseg.evaluation.stats`), the
compute each run spent (steps, budget stretch, FLOPs where recorded), throughput and accelerator-hours;
Markdown, JSON and a chart with every seed as a dot.

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

from cwdseg.checkpoint import student_filename
from cwdseg.config import CONFIG_FORMAT
from cwdseg.data.synthetic import MARKER_FILE as SYNTHETIC_MARKER
from cwdseg.distill.registry import PRESETS, spec_run_name
from cwdseg.engine.compute import logged_training
from cwdseg.evaluation.stats import LEVEL, Difference, compare_to_baseline, mean_interval, welch_difference

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
    data: str = "cityscapes"       # the dataset's name, or "synthetic" (a cwdseg.data.synthetic copy)
    budget: dict | None = None     # budget.json of a budget-matched grid (cwdseg.engine.grid)
    cost: dict | None = None       # cost.json: what the run spent (cwdseg.engine.compute.RunCost)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{path}: not valid JSON ({exc}); delete it or re-run the job") from None


def _no_eval_hint(run_dir: Path, config: dict) -> str:
    """What to do about a missing final eval.json: evaluate a run trained with --eval False, resume the others."""
    if config["eval"]["final"] is False:
        final = run_dir / student_filename(config["data"]["dataset"], int(config["optim"]["num_steps"]) - 1)
        return ("the run was trained with --eval False, so it has no evaluation; evaluate it with its train.py "
                "command plus --eval True (the finished steps are not repeated; writes eval.json), or for the "
                f"numbers alone: python evaluate.py --restore-from {final} --data-dir {config['data']['root']}")
    return "the run has not finished (re-run it, or the grid, to resume)"


def _throughput_and_hours(run_dir: Path, world_size: int) -> tuple[float | None, float | None]:
    """Mean logged images/s and the training time x processes in hours, from metrics.jsonl
    (:func:`cwdseg.engine.compute.logged_training`)."""
    logged = logged_training(run_dir)
    if logged is None:
        return None, None
    return logged["images_per_s"], logged["seconds"] * world_size / 3600


def load_run(run_dir: str | Path, selection: str = "final") -> RunResult:
    run_dir = Path(run_dir)
    file, tag = SELECTIONS[selection]
    config_path, eval_path = run_dir / "config.json", run_dir / file
    if not config_path.exists():
        raise SummaryError(f"{run_dir}: no config.json; is this a train.py run folder?")
    record = _read_json(config_path) or {}
    if record.get("format") != CONFIG_FORMAT:
        raise SummaryError(f"{config_path}: not a config.json of this toolkit's runs (format {CONFIG_FORMAT!r}); "
                           "runs written before the typed configuration cannot be summarised with these")
    config, environment = record["config"], record.get("environment", {})
    if not eval_path.exists():
        hint = (_no_eval_hint(run_dir, config) if selection == "final" else
                "train it with --eval-every N --save-best True, or summarise the final iteration")
        raise SummaryError(f"{run_dir}: no {file}; {hint}")
    result = json.loads(eval_path.read_text())
    if selection == "final" and result.get("selection") != "final-iteration":
        raise SummaryError(f"{eval_path}: selection is {result.get('selection')!r}, not 'final-iteration'")
    spec = config["distill"]["terms"]
    label = spec_run_name(spec, config["distill"]["preset"]) if spec else "baseline"
    rate, hours = _throughput_and_hours(run_dir, int(environment.get("world_size", 1)))
    synthetic = (Path(str(config["data"]["root"])) / SYNTHETIC_MARKER).is_file()
    data = "synthetic" if synthetic else str(config["data"]["dataset"])
    return RunResult(str(run_dir), label, config["models"]["student_arch"], int(config["optim"]["seed"]),
                     100 * float(result["miou"]), rate, hours, str(environment.get("device", "?")),
                     int(config["optim"]["num_steps"]), spec, data, _read_json(run_dir / "budget.json"),
                     _read_json(run_dir / "cost.json"))


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


def _difference(members: Sequence[RunResult], base: Sequence[RunResult], paired: bool) -> Difference:
    """The group's difference to its baseline: paired by seed when both hold the same distinct seeds."""
    a, b = {m.seed: m.miou for m in members}, {m.seed: m.miou for m in base}
    if len(a) == len(members) and len(b) == len(base):
        return compare_to_baseline(a, b, paired)
    return welch_difference([m.miou for m in members], [m.miou for m in base])


def _spent(members: Sequence[RunResult]) -> dict[str, Any]:
    """What the group's runs spent, where recorded: budget stretch (budget.json), FLOPs and images (cost.json)."""
    stretch = sorted({round(float(m.budget["stretch"]), 6) for m in members if m.budget and "stretch" in m.budget})
    costs = [m.cost for m in members if m.cost]
    flops = [float(c["total_flops"]) for c in costs if c.get("total_flops") is not None]
    images = [int(c["images_seen"]) for c in costs if c.get("images_seen") is not None]
    return {"budget_stretch": stretch or None,
            "budget_measure": sorted({m.budget.get("measure") for m in members if m.budget}) or None,
            "train_flops_per_run": statistics.fmean(flops) if flops else None,
            "images_seen_per_run": statistics.fmean(images) if images else None}


def summarize(runs: Sequence[RunResult], selection: str = "final", paired: bool = True) -> dict[str, Any]:
    """Rows of the table, one per (spec, student), in first-seen order, plus what they were computed from.

    Each row: n, mean, sample std and the 95 % t-interval of the mean mIoU over seeds; the difference to
    the baseline (no distillation) of the same student in this set with its 95 % interval, paired by
    seed when both hold the same seeds and ``paired`` (else Welch), and whether that interval spans 0."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        key = (json.dumps(run.spec, sort_keys=True), run.student)
        groups.setdefault(key, []).append(run)
    baselines = {student: members for (spec, student), members in groups.items() if spec == "{}"}
    rows = []
    for (spec, student), members in groups.items():
        values = [m.miou for m in members]
        ci = mean_interval(values)
        base = baselines.get(student)
        diff = None if base is None or spec == "{}" else _difference(members, base, paired)
        label = members[0].label
        data = sorted({m.data for m in members})
        # The paper's figures are Cityscapes val: shown only beside runs on Cityscapes itself.
        preset = PRESETS.get(label) if data == ["cityscapes"] else None
        rates = [m.images_per_s for m in members if m.images_per_s is not None]
        hours = [m.device_hours for m in members if m.device_hours is not None]
        rows.append({
            "method": label, "student": student, "n": len(values), "miou_mean": ci.mean, "miou_std": ci.std,
            "miou_ci95": None if ci.low is None else [ci.low, ci.high],
            "delta_vs_baseline": None if diff is None else diff.diff,
            "delta_ci95": None if diff is None or diff.low is None else [diff.low, diff.high],
            "delta_test": None if diff is None else diff.test,
            "delta_spans_zero": None if diff is None else diff.spans_zero,
            "delta": None if diff is None else diff.to_json(),
            "published": preset.published if preset else None,
            "paper_row": f"{preset.method}, {preset.map}" if preset else None,
            "seeds": [m.seed for m in members], "miou_runs": values, "data": data,
            "images_per_s": statistics.fmean(rates) if rates else None,
            "device_hours_per_run": statistics.fmean(hours) if hours else None,
            "device_hours_total": sum(hours) if hours else None,
            "device": sorted({m.device for m in members}), "num_steps": sorted({m.num_steps for m in members}),
            **_spent(members),
            "runs": [m.run_dir for m in members], "spec": json.loads(spec),
        })
    return {"selection": SELECTIONS[selection][1], "std": "sample standard deviation (n-1) over seeds",
            "interval": f"{100 * LEVEL:.0f} % t-interval of the mean (n-1 df); differences: paired t over seeds "
                        "when the seeds match, else Welch (Welch-Satterthwaite df)",
            "rows": rows, "run_results": [asdict(r) for r in runs]}


def _fmt(x: float | None, spec: str = ".2f", signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, ("+" if signed else "") + spec)


def _fmt_interval(ci: list[float] | None, signed: bool = False) -> str:
    return "—" if ci is None else f"[{_fmt(ci[0], signed=signed)}, {_fmt(ci[1], signed=signed)}]"


def to_markdown(summary: dict[str, Any]) -> str:
    sel = summary["selection"]
    rows = summary["rows"]
    data = sorted({d for r in rows for d in r.get("data", [])})
    lines = [f"Val mIoU (%) on {', '.join(data)}, checkpoint: **{sel}**; n runs (seeds), mean ± sample std, "
             "95 % CI of the mean; Δ: difference to the same-grid baseline with its 95 % CI.", "",
             "| method | student | n | mIoU mean ± std | 95 % CI | Δ vs baseline | Δ 95 % CI | test | paper | steps "
             "| stretch | train PFLOP/run | images/s | device-h per run | device-h total | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        miou = _fmt(r["miou_mean"]) + (f" ± {_fmt(r['miou_std'])}" if r["miou_std"] is not None else " (n=1)")
        delta = _fmt(r["delta_vs_baseline"], signed=True) + (" *" if r.get("delta_spans_zero") else "")
        stretch = ", ".join(f"×{x:.3g}" for x in r["budget_stretch"]) if r.get("budget_stretch") else "—"
        pflop = None if r.get("train_flops_per_run") is None else r["train_flops_per_run"] / 1e15
        lines.append(
            f"| {r['method']} | {r['student']} | {r['n']} | {miou} | {_fmt_interval(r['miou_ci95'])} | {delta} | "
            f"{_fmt_interval(r['delta_ci95'], signed=True)} | {r['delta_test'] or '—'} | {_fmt(r['published'])} | "
            f"{', '.join(map(str, r['num_steps']))} | {stretch} | {_fmt(pflop, '.4g')} | "
            f"{_fmt(r['images_per_s'], '.1f')} | "
            f"{_fmt(r['device_hours_per_run'], '.3g')} | {_fmt(r['device_hours_total'], '.3g')} | "
            f"{', '.join(map(str, r['seeds']))} |")
    spans = [r["method"] for r in rows if r.get("delta_spans_zero")]
    lines += ["", "Δ: difference of the means to the baseline (no distillation) of the same student in this set; "
              "test: paired = t on the per-seed differences (same seeds, so same data order), welch = Welch's t, "
              "— = fewer than 2 runs (no interval). paper: the CWD paper's Table 2 (mean of 3 runs, PSPNet-R101 -> "
              "R18, 40k steps, 512x512). stretch: steps over the grid's base steps in a budget-matched grid. "
              "device-h: training time (from metrics.jsonl) x processes, on " +
              ", ".join(sorted({d for r in rows for d in r["device"]})) + "."]
    if spans:
        lines += ["", f"\\* the 95 % interval of Δ spans 0 for {', '.join(spans)}: these runs do not show whether "
                  "the method is better or worse than the baseline."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict[str, Any], path: str | Path) -> None:
    """The chart: every seed's mIoU as a dot, the mean with its 95 % interval, the paper's figure where known."""
    from cwdseg.viz.seeds import plot_seed_dots

    rows = summary["rows"]
    data = ", ".join(sorted({d for r in rows for d in r["data"]}))
    several = len({r["student"] for r in rows}) > 1
    plot_seed_dots([{"label": r["method"] + (f"\n{r['student']}" if several else ""), "values": r["miou_runs"],
                     "mean": r["miou_mean"], "ci": r["miou_ci95"], "reference": r["published"]} for r in rows],
                   path, ylabel="val mIoU (%)", title=f"{data}; checkpoint: {summary['selection']}; mean and 95 % CI",
                   reference_label="paper")


def write_summary(summary: dict[str, Any], out_dir: str | Path, stem: str = "summary") -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json", "chart": out / f"{stem}.png"}
    paths["markdown"].write_text(to_markdown(summary))
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(summary, paths["chart"])
    return paths

"""Training curves from a run's ``metrics.jsonl`` (one line per logged step), as a PNG.

Loss terms are signed (the WGAN critic's loss is negative), so they are drawn on a symmetric-log
axis (linear near zero, logarithmic beyond): every term keeps its line and its legend entry. The
intermediate val mIoU of ``--eval-every`` (``eval_history.jsonl`` beside the metrics) gets its own panel.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in step order (a resumed run may repeat steps: keep the last)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _linthresh(values: list[float]) -> float:
    """Where the symlog axis turns logarithmic: below the smallest non-zero magnitude drawn."""
    small = [abs(v) for v in values if v and math.isfinite(v)]
    return min(small) if small else 1.0


def plot_training_curves(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Loss terms (symlog), learning rate, throughput and, when present, intermediate val mIoU against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} has no records to plot")
    history_path = Path(metrics_path).with_name("eval_history.jsonl")
    history = read_metrics(history_path) if history_path.is_file() else []
    steps = [r["step"] + 1 for r in records]
    panels = 4 if history else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax_loss, ax_lr, ax_speed = axes[:3]
    drawn: list[float] = []
    for name in records[-1]["loss"]:
        points = [(s, r["loss"][name]) for s, r in zip(steps, records)
                  if r["loss"].get(name) is not None and math.isfinite(r["loss"][name])]
        if points:
            ax_loss.plot(*zip(*points), label=name, linewidth=1.2)
            drawn += [v for _, v in points]
    ax_loss.set_yscale("symlog", linthresh=_linthresh(drawn))
    ax_loss.axhline(0.0, color="0.6", linewidth=0.6)
    ax_loss.set_xlabel("step")
    ax_loss.set_title("weighted loss terms (symlog)")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [r["lr"] for r in records])
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate (poly)")
    ax_speed.plot(steps, [r["images_per_s"] for r in records])
    ax_speed.set_xlabel("step")
    ax_speed.set_title("images/s")
    if history:
        ax_val = axes[3]
        ax_val.plot([h["step"] + 1 for h in history], [100 * h["miou"] for h in history], marker="o")
        ax_val.set_xlabel("step")
        ax_val.set_title("val mIoU (%), intermediate")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png

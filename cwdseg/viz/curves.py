"""Training curves from a run's ``metrics.jsonl`` (one line per logged step), as a PNG."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in step order (a resumed run may repeat steps: keep the last)."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_training_curves(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path:
    """Loss terms (log scale), learning rate and throughput against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} has no records to plot")
    steps = [r["step"] + 1 for r in records]
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(15, 4))
    for name in records[-1]["loss"]:
        values = [r["loss"].get(name) for r in records]
        points = [(s, v) for s, v in zip(steps, values) if v is not None and v > 0]
        if points:
            ax_loss.plot(*zip(*points), label=name, linewidth=1.2)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("weighted loss terms")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [r["lr"] for r in records])
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate (poly)")
    ax_speed.plot(steps, [r["images_per_s"] for r in records])
    ax_speed.set_xlabel("step")
    ax_speed.set_title("images/s")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png

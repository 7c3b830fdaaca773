"""A comparison over seeds as a chart: every run a dot, the mean with its confidence interval beside it.

Bars of the mean hide how few runs there are and how far apart they lie; with 3 seeds the dots are
the data. The interval is the one the caller computed (the summary's 95 % t-interval of the mean).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from cwdseg.viz.bars import save_figure


def plot_seed_dots(groups: Sequence[dict[str, Any]], out_png: str | Path, ylabel: str = "value",
                   title: str = "", reference_label: str = "reference") -> Path:
    """``groups``: ``[{"label", "values": [per run], "mean", "ci": [low, high] or None, "reference": float or
    None}, ...]``, one column each, in order. Dots are spread a little sideways so equal values stay visible;
    the mean is a black tick with the interval as its error bar (none for n = 1); a reference value (e.g.
    the paper's) is a red dash."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not groups:
        raise ValueError("plot_seed_dots needs at least one group")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(groups) + 1.5), 4.0))
    for i, g in enumerate(groups):
        values = list(g["values"])
        n = len(values)
        offsets = [(k - (n - 1) / 2) * min(0.08, 0.3 / max(n, 1)) for k in range(n)]
        ax.scatter([i - 0.12 + o for o in offsets], values, s=18, color="#4C72B0", alpha=0.8, zorder=3,
                   label="one run (seed)" if i == 0 else None)
        ci = g.get("ci")
        yerr = None if ci is None else [[g["mean"] - ci[0]], [ci[1] - g["mean"]]]
        ax.errorbar([i + 0.12], [g["mean"]], yerr=yerr, fmt="_", markersize=14, color="black", capsize=4, zorder=4,
                    label="mean, 95 % CI" if i == 0 else None)
        ax.annotate(f"n={n}", (i + 0.12, ci[1] if ci else g["mean"]), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 3), textcoords="offset points")
    refs = [(i, g["reference"]) for i, g in enumerate(groups) if g.get("reference") is not None]
    if refs:
        ax.scatter([i for i, _ in refs], [v for _, v in refs], marker="_", s=400, color="#C44E52", zorder=2,
                   label=reference_label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g["label"] for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.margins(y=0.12)  # room for the n= labels above the intervals
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    return save_figure(fig, out_png, dpi=120)

"""Per-class IoU as a bar chart: one network, or a student beside its teacher (grouped bars)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_class_iou_bars(results: Sequence[tuple[str, dict[str, float], float | None]], out_png: str | Path,
                        title: str = "") -> Path:
    """``results`` is ``[(label, {class: IoU in [0, 1]}, mIoU or None), ...]`` (e.g. student, then teacher);
    the classes are those of the first entry, in its order. IoU is drawn in percent; the legend gives the mIoU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("plot_class_iou_bars needs at least one (label, per_class_iou, miou) entry")
    classes = list(results[0][1])
    for label, per_class, _ in results[1:]:
        if list(per_class) != classes:
            raise ValueError(f"{label}: its classes differ from {results[0][0]}'s; both results must score the "
                             f"same classes")
    n = len(results)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(classes) * (1 + 0.3 * (n - 1))), 4.0))
    for k, (label, per_class, miou) in enumerate(results):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(classes))]
        name = label + (f" (mIoU {100 * miou:.2f})" if miou is not None else "")
        ax.bar(xs, [100 * per_class[c] for c in classes], width=width, label=name)
    if n == 2:  # the difference, where people look first
        for i, c in enumerate(classes):
            delta = 100 * (results[0][1][c] - results[1][1][c])
            top = 100 * max(results[0][1][c], results[1][1][c])
            ax.text(i, top + 1, f"{delta:+.1f}", ha="center", va="bottom", fontsize=6,
                    color="tab:green" if delta >= 0 else "tab:red")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or "per-class IoU", fontsize=10)
    return save_figure(fig, out_png, dpi=90)


def save_figure(fig, out_png: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it as ``out_png`` (its folder created) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def _label(results: dict, fallback: str) -> str:
    ckpt = results.get("checkpoint") or {}
    if isinstance(ckpt, dict) and ckpt.get("path"):
        return f"{Path(ckpt['path']).stem} ({ckpt.get('arch', '?')})"
    return fallback


def plot_results_iou(results: dict, out_png: str | Path, compare: dict | None = None) -> Path:
    """The bar chart of an ``evaluate.py`` results dict, beside a second one (e.g. the teacher's) if given."""
    entries = [(_label(results, "this evaluation"), results["per_class_iou"], results.get("miou"))]
    if compare is not None:
        entries.append((_label(compare, "compared"), compare["per_class_iou"], compare.get("miou")))
    title = f"per-class IoU, {results.get('split', 'val')} ({results.get('num_images', '?')} images)"
    return plot_class_iou_bars(entries, out_png, title)

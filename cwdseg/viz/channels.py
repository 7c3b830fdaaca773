"""What channel-wise distillation compares: per-class channel distributions of teacher and student.

CWD (Shu et al., ICCV 2021) turns every channel ``c`` of a map into a distribution over the H*W
positions, ``p_c = softmax_i(z_{c,i} / tau)``, and minimises ``tau^2 * KL(p^T_c || p^S_c)`` averaged over
channels (:class:`cwdseg.distill.cwd.CriterionCWD`, ``norm_type="channel"``, ``divergence="kl"``). On
logits, channel ``c`` is class ``c``: its distribution says *where* the network puts that class.

:func:`channel_distributions` computes, for one image, the teacher's and the student's distributions, the
pointwise KL terms ``tau^2 p^T (log p^T - log p^S)`` and the per-channel KL. The per-channel values are
the loss's own terms: each is ``CriterionCWD`` applied to that one channel, so their mean is exactly the
CWD loss of the image. :func:`plot_channel_grid` draws them as the grid of heatmaps of the paper's figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cwdseg.distill.cwd import CriterionCWD


@dataclass
class ChannelDistillation:
    """One image's channel distributions (``[C, H, W]`` float32 arrays) and per-channel KL (``[C]``)."""

    teacher: np.ndarray
    student: np.ndarray
    kl_map: np.ndarray
    kl: np.ndarray
    loss: float
    tau: float


def _as_single(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"{what} must be one map [C, H, W] or [1, C, H, W], got {tuple(x.shape)}")
    return x.detach().float().cpu()


def channel_distributions(student_map: torch.Tensor, teacher_map: torch.Tensor, tau: float = 4.0,
                          resize: bool = False) -> ChannelDistillation:
    """Distributions and KL of one image's student/teacher maps (logits or features, same channels).

    ``resize`` resizes the student map to the teacher's H, W (bilinear, align_corners=True), as
    ``CriterionCWD(resize=True)`` does; otherwise the sizes must match.
    """
    s, t = _as_single(student_map, "student_map"), _as_single(teacher_map, "teacher_map")
    criterion = CriterionCWD("channel", "kl", temperature=tau, resize=resize)
    if s.shape[2:] != t.shape[2:] and resize:
        s = F.interpolate(s, size=t.shape[2:], mode="bilinear", align_corners=True)
    with torch.no_grad():
        loss = float(criterion(s, t))
        kl = np.array([float(criterion(s[:, c:c + 1], t[:, c:c + 1])) for c in range(t.shape[1])], np.float64)
        n, c, h, w = t.shape
        log_t = F.log_softmax(t.reshape(c, h * w) / tau, dim=-1)
        log_s = F.log_softmax(s.reshape(c, h * w) / tau, dim=-1)
        kl_map = (tau ** 2) * log_t.exp() * (log_t - log_s)
    return ChannelDistillation(teacher=log_t.exp().reshape(c, h, w).numpy(),
                               student=log_s.exp().reshape(c, h, w).numpy(),
                               kl_map=kl_map.reshape(c, h, w).numpy(), kl=kl, loss=loss, tau=float(tau))


def top_channels(dist: ChannelDistillation, k: int) -> list[int]:
    """The ``k`` channels with the largest KL, largest first."""
    return [int(c) for c in np.argsort(-dist.kl, kind="stable")[:k]]


def plot_channel_grid(dist: ChannelDistillation, out_png: str | Path, channels: Sequence[int],
                      names: Sequence[str] | None = None, image_rgb: np.ndarray | None = None,
                      title: str = "") -> Path:
    """The figure: the image and the per-channel KL of every channel on top, then one row per selected
    channel: teacher distribution, student distribution (same colour scale) and the pointwise KL terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names) if names is not None else [str(c) for c in range(len(dist.kl))]
    rows = len(channels)
    h, w = dist.teacher.shape[1:]
    cell_w = 3.2
    cell_h = max(1.2, cell_w * h / w)
    fig = plt.figure(figsize=(3 * cell_w + 0.8, 3.2 + rows * (cell_h + 0.55)))
    grid = fig.add_gridspec(rows + 1, 3, height_ratios=[2.6] + [cell_h] * rows, hspace=0.6, wspace=0.25)
    top_image = fig.add_subplot(grid[0, 0])
    if image_rgb is not None:
        top_image.imshow(image_rgb)
        top_image.set_title("input", fontsize=9)
    top_image.axis("off")
    bars = fig.add_subplot(grid[0, 1:])
    colors = ["tab:red" if c in channels else "tab:gray" for c in range(len(dist.kl))]
    bars.bar(range(len(dist.kl)), dist.kl, color=colors)
    bars.set_xticks(range(len(dist.kl)))
    bars.set_xticklabels(names if len(names) <= 40 else [""] * len(names), rotation=70, fontsize=7)
    bars.set_ylabel(f"τ²·KL (τ={dist.tau:g})", fontsize=8)
    bars.set_title(f"per-channel KL(teacher ‖ student); CWD loss = mean = {dist.loss:.4f}", fontsize=9)
    for row, c in enumerate(channels, start=1):
        vmax = float(max(dist.teacher[c].max(), dist.student[c].max()))
        for col, (data, label, cmap) in enumerate(((dist.teacher[c], "teacher p", "viridis"),
                                                   (dist.student[c], "student p", "viridis"),
                                                   (dist.kl_map[c], f"KL terms, sum {dist.kl[c]:.4f}", "magma"))):
            ax = fig.add_subplot(grid[row, col])
            im = ax.imshow(data, cmap=cmap, vmin=0.0 if col < 2 else None, vmax=vmax if col < 2 else None)
            ax.set_title(f"{names[c]}: {label}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out_png
